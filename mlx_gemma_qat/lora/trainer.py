"""LoRA training on the frozen quantized model: AdamW, warmup + cosine schedule, gradient accumulation,
gradient checkpointing, validation, checkpoints that resume bit for bit, data parallelism over mx.distributed
(world.py: a failure or a Ctrl-C on one rank stops every rank at the same point).

Loss: the cross-entropy *summed* over target tokens, divided by the number of target tokens of the whole
step (every micro-batch of the accumulation, every rank). So accumulating A micro-batches, or splitting a
batch over W processes, gives the gradient of the combined batch (up to float summation order).

Everything a step depends on is a pure function of (seed, step): the batch (data.Batches.batch), the dropout
key (seeded per step), the schedule (from the optimizer's step counter). A checkpoint stores the adapter, the
optimizer state (moments and step) and the step; resuming from it continues exactly as if never stopped.

The output head over Gemma's 262,144-token vocabulary dominates a step on the CPU: it runs only at target
positions, in chunks; with gradient checkpointing each chunk is also under ``mx.checkpoint`` (one chunk's logits
alive at a time in the backward pass too).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from ..atomic import atomic_dir, write_text
from ..generate import image_token_ids
from .adapters import (AdapterConfig, AdapterError, adapter_layers, adapter_weights, apply_adapters, check_identity, save_adapters,
                       save_json, save_safetensors, set_adapter_weights, text_model)
from .settings import from_dict
from ..world import World

METRICS_FILE, PLOT_FILE = "metrics.jsonl", "loss-curve.png"
CHECKPOINTS, LATEST = "checkpoints", "latest"


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a checkpoint that does not fit this run)."""


class NonFiniteError(TrainingError):
    """A step's loss or gradients are not finite: the step was not applied (the run diverged)."""


@dataclass
class TrainConfig:
    iters: int = 100
    batch_size: int = 4            # the global batch (split over data-parallel ranks)
    grad_accum: int = 1            # micro-batches per optimizer step
    learning_rate: float = 5e-5
    warmup: int = 0                # steps of linear warmup from 0
    min_lr_ratio: float = 0.0      # the cosine decays to learning_rate * this at the last step
    weight_decay: float = 0.0
    max_grad_norm: float = 0.0     # clip the global gradient norm (0: off)
    max_seq_length: int = 2048
    mask_prompt: bool = True
    pack: bool = False
    seed: int = 0
    grad_checkpoint: bool = False
    loss_chunk: int = 256          # target positions per chunk of the output head
    val_every: int = 50            # steps between validations (0: only at the end)
    val_batches: int = 25          # -1: the whole validation set
    save_every: int | None = None  # steps between checkpoints (None: a tenth of iters; 0: only at the end)
    report_every: int = 10

    # what may differ between a run and its resumption without changing the result
    _FREE = ("val_every", "val_batches", "save_every", "report_every")

    @property
    def checkpoint_every(self) -> int:
        """Steps between checkpoints: ``save_every``, or a tenth of the run when it is None (0: only at the end)."""
        return max(1, self.iters // 10) if self.save_every is None else self.save_every

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """From a dict of fields; an unknown key is a TrainingError."""
        return from_dict(cls, d, "training", TrainingError)


def schedule(cfg: TrainConfig):
    """Linear warmup from 0 to the peak, then a cosine decay to ``min_lr_ratio`` of it at the last step."""
    peak, end = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio
    decay = optim.cosine_decay(peak, max(cfg.iters - cfg.warmup, 1), end)
    if cfg.warmup <= 0:
        return decay
    return optim.join_schedules([optim.linear_schedule(0.0, peak, cfg.warmup), decay], [cfg.warmup])


def _checkpointed(module: nn.Module, fn):
    """``fn(*args)`` under mx.checkpoint, with ``module``'s trainable parameters as inputs (so they get gradients)."""
    def inner(params, *args):
        module.update(params)
        return fn(*args)

    ck = mx.checkpoint(inner)
    return lambda *args: ck(module.trainable_parameters(), *args)


def _hidden(model, inputs: mx.array, images: list | None, grad_checkpoint: bool, pixels=None) -> mx.array:
    """Final hidden states of a batch (a batch with images goes through the vision tower, frozen). ``pixels``:
    image sources -> preprocessed pixels (images.ImageCache.pixels; default: decode them now)."""
    text = text_model(model)
    inner = text.model
    groups = None
    if images and any(images):
        if inputs.shape[0] != 1:
            raise ValueError("rows with images are run one at a time")
        if pixels is None:
            from ..image import preprocess_all

            px, _ = preprocess_all(list(images[0]), model.mcfg.vision.image_size)
        else:
            px = pixels(list(images[0]))
        h, groups = model.embed_prompt(np.array(inputs[0]), mx.array(px))  # the tower has no trainable part
    else:
        h = inner.embed(inputs)
    masks = inner._masks(h.shape[1], None, groups)
    for i, layer in enumerate(inner.layers):
        mask = masks[inner.cfg.is_sliding(i)]
        if grad_checkpoint:
            h = _checkpointed(layer, lambda x, m=mask, lay=layer: lay(x, m))(h)
        else:
            h = layer(h, mask)
    return inner.norm(h)


def _chunk_nll(text, h: mx.array, targets: mx.array, weights: mx.array) -> mx.array:
    targets, weights = mx.stop_gradient(targets), mx.stop_gradient(weights)  # inputs of mx.checkpoint
    logits = text.head(h).astype(mx.float32)
    nll = mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return (nll * weights).sum()


def batch_loss(model, inputs, targets, weights, images=None, *, grad_checkpoint=False, chunk=128, pixels=None):
    """(summed cross-entropy over target tokens, number of target tokens) of one batch.

    The head runs only at positions that are targets (weight > 0): prompt tokens under --mask-prompt and padding
    cost no logits. With ``grad_checkpoint`` each chunk of the head is recomputed in the backward pass too, so
    one chunk's logits are alive at a time (less memory, one more head pass). ``pixels``: see ``_hidden``."""
    text = text_model(model)
    if images and any(images) and inputs.shape[0] > 1:
        parts = [batch_loss(model, inputs[i:i + 1], targets[i:i + 1], weights[i:i + 1], [images[i]],
                            grad_checkpoint=grad_checkpoint, chunk=chunk, pixels=pixels)
                 for i in range(inputs.shape[0])]
        return sum(p[0] for p in parts), sum(p[1] for p in parts)
    h = _hidden(model, inputs, images, grad_checkpoint, pixels)
    w = np.array(weights).reshape(-1)
    keep = mx.array(np.nonzero(w != 0)[0].astype(np.uint32))
    h = h.reshape(-1, h.shape[-1])[keep]
    t, w = targets.reshape(-1)[keep], weights.reshape(-1)[keep]

    def nll(hc, tc, wc):
        return _chunk_nll(text, hc, tc, wc)

    if grad_checkpoint:
        nll = _checkpointed(text.model.embed_tokens if text.cfg.tie_word_embeddings else text.lm_head, nll)
    total = mx.array(0.0)
    for s in range(0, h.shape[0], chunk):
        total = total + nll(h[s:s + chunk], t[s:s + chunk], w[s:s + chunk])
    return total, weights.sum()


def _to_arrays(batch):
    inputs, targets, weights, images = batch
    return mx.array(inputs), mx.array(targets), mx.array(weights), images


def evaluate(model, batches, n: int, cfg: TrainConfig, world: World | None = None, image_cache=None) -> float:
    """Mean cross-entropy per target token over the first ``n`` batches (-1: all) of ``batches``. ``image_cache``:
    the run's images.ImageCache (default: decode each image when it is used)."""
    world = world or World()
    n = len(batches) if n < 0 else min(n, len(batches))
    total, count = mx.array(0.0), mx.array(0.0)
    was_training = model.training
    model.eval()
    error = None
    try:
        for k in range(n):
            s, c = batch_loss(model, *_to_arrays(batches.batch(k)), chunk=cfg.loss_chunk,
                              pixels=image_cache.pixels if image_cache is not None else None)
            total, count = total + s, count + c
            mx.eval(total, count)
    except BaseException as e:  # noqa: BLE001 - the other ranks learn of it in the sum below
        if world.size == 1:
            raise
        error, total, count = e, mx.array(0.0), mx.array(0.0)
    finally:
        if was_training:
            model.train()
    total, count, failed = world.sum((total, count, world.flags(error)))
    world.check(error, failed, "validating")
    return float(total.item() / max(count.item(), 1.0))


def _not_finite(loss: float, grads) -> str | None:
    """What is not finite in a step (the loss, else the gradient tensors with an inf or NaN), or None. A finite
    loss can have non-finite gradients (an overflow in the backward pass): applying them would put NaN in every
    adapter weight they reach, and in every checkpoint after."""
    if not math.isfinite(loss):
        return f"the training loss became {loss}"
    flat = tree_flatten(grads)
    ok = mx.stack([mx.all(mx.isfinite(g)) for _, g in flat]).tolist()
    bad = [name for (name, _), good in zip(flat, ok) if not good]
    if not bad:
        return None
    more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
    return f"the gradients are not finite (inf or NaN in {bad[0]}{more}) though the loss is finite ({loss:.4f})"


# ----------------------------------------------------------------------------------------- checkpoints
def _checkpoint_dir(adapter_path: Path) -> Path:
    return adapter_path / CHECKPOINTS


def checkpoint_path(adapter_path: Path, step: int) -> Path:
    """Where checkpoint ``step`` is (or would be) saved."""
    return _checkpoint_dir(Path(adapter_path)) / f"step-{step:07d}"


def save_checkpoint(adapter_path: Path, step: int, model, optimizer, adapter_cfg, train_cfg, extra: dict,
                    keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically (atomic.atomic_dir: a temporary folder, flushed, renamed when
    complete), then replace the ``latest`` pointer the same way: an interrupted save leaves the previous
    checkpoint as the latest. Keeps the ``keep`` newest checkpoints, and removes temporaries left by a save
    that was killed."""
    root = _checkpoint_dir(adapter_path)
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(adapter_path, step)
    name = final.name
    with atomic_dir(final) as tmp:
        save_safetensors(tmp / "adapters.safetensors", adapter_weights(model))
        save_safetensors(tmp / "optimizer.safetensors", dict(tree_flatten(optimizer.state)))
        save_json(tmp / "state.json", {"step": step, "adapter": asdict(adapter_cfg), "train": asdict(train_cfg),
                                       **extra})
    write_text(root / LATEST, name)
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in done[:-keep] + list(root.glob(".step-*.partial*")):
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(adapter_path: Path) -> Path | None:
    pointer = _checkpoint_dir(adapter_path) / LATEST
    if not pointer.is_file():
        return None
    p = _checkpoint_dir(adapter_path) / pointer.read_text().strip()
    return p if (p / "state.json").is_file() else None


def _check_data(ck: Path, saved: str | None, current: str | None, allow_change: bool, log) -> None:
    """Refuse (or, with ``allow_change``, warn) to resume on training data other than the checkpoint's (their
    data.fingerprint; a checkpoint or a data source without one is not checked)."""
    if saved is None or current is None or saved == current:
        return
    what = (f"the training data differ from those {ck} was trained on (fingerprint {current[:12]}, "
            f"saved {saved[:12]}: records, their order, the tokenizer or the chat template changed)")
    if not allow_change:
        raise TrainingError(f"--resume: {what}; the batches would not continue the run. Resume on the same data, "
                            "or pass --allow-data-change (allow_data_change=True) to go on with these")
    if log:
        log(f"Warning: {what}; resuming on them anyway (--allow-data-change)")


def _read_metrics(path: Path, upto: int) -> list[dict]:
    """The metrics lines of ``path`` up to step ``upto`` (none when it is absent); a line cut short by a killed
    run is skipped (the file is rewritten from these lines when training goes on)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            m = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(m, dict) and isinstance(m.get("step"), int) and m["step"] <= upto:
            out.append(m)
    return out


def _load_checkpoint(adapter_path: Path, model, optimizer, adapter_cfg: AdapterConfig, train_cfg: TrainConfig,
                     data_fingerprint: str | None, allow_data_change: bool, log) -> int:
    """Restore adapter, optimizer state and step from the latest checkpoint (rank 0: the other machines of a
    data-parallel run get its values through the group, ``_share``); returns the step. Training data other than
    the checkpoint's are refused unless ``allow_data_change`` (see _check_data)."""
    ck = latest_checkpoint(adapter_path)
    if ck is None:
        raise TrainingError(f"--resume: no checkpoint in {_checkpoint_dir(adapter_path)}")
    state = json.loads((ck / "state.json").read_text())
    saved_adapter = AdapterConfig.from_dict(state["adapter"])
    check_identity(model, saved_adapter, ck)
    mine, theirs = asdict(adapter_cfg), asdict(saved_adapter)
    diff = [k for k in mine if k not in ("layers", "base_model") and mine[k] != theirs.get(k)]
    t_mine, t_theirs = asdict(train_cfg), state["train"]
    diff += [k for k in t_mine if k not in TrainConfig._FREE and t_mine[k] != t_theirs.get(k)]
    if diff:
        raise TrainingError(f"--resume: {ck} was written with different settings ({', '.join(diff)}); "
                            "resume with the same ones (only reporting, validation and save intervals may change)")
    _check_data(ck, state.get("data_fingerprint"), data_fingerprint, allow_data_change, log)
    set_adapter_weights(model, mx.load(str(ck / "adapters.safetensors")), ck)
    optimizer.state = tree_unflatten(list(mx.load(str(ck / "optimizer.safetensors")).items()))
    return int(state["step"])


def _share(world: World, model, optimizer, step: int, resumed: bool, data_fingerprint: str | None) -> int:
    """Data-parallel: rank 0's resumed adapter, optimizer state and step on every rank (returns the step), and
    every rank's training data checked against rank 0's (a machine with other files would train on other
    batches than the ones the run is made of)."""
    if resumed:
        text = text_model(model)
        text.update(world.broadcast(text.trainable_parameters()))
        optimizer.state = world.broadcast(optimizer.state)
        step = int(world.broadcast(mx.array(step)).item())
    if data_fingerprint is not None:
        mine = mx.array(np.frombuffer(bytes.fromhex(data_fingerprint), np.uint8).astype(np.int32))
        theirs = bytes(np.array(world.broadcast(mine)).astype(np.uint8)).hex()
        with world.together("comparing the ranks' training data"):
            if theirs != data_fingerprint:
                raise TrainingError(f"rank {world.rank}'s training data differ from rank 0's (fingerprint "
                                    f"{data_fingerprint[:12]}, rank 0 {theirs[:12]}): every machine needs the same "
                                    "data")
    return step


# ------------------------------------------------------------------------------------------ training
class _CtrlC:
    """While training: the first Ctrl-C (SIGINT) asks to stop after the step in progress, which is then completed
    and saved; a second one interrupts at once (KeyboardInterrupt; the last completed step is saved). The request
    is only recorded here; the training loop reads ``requested`` and shares it with the other data-parallel ranks
    through the step's gradient sum, so that all of them stop after the same step even when only one was
    interrupted. Installed only in the main thread (elsewhere Python delivers no signal); the previous handler
    is restored on exit."""

    def __init__(self, say: bool):
        self.requested, self.say, self._previous, self._installed = False, say, None, False

    def __enter__(self) -> "_CtrlC":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.say:  # os.write: buffered streams must not be re-entered from a signal handler
            try:
                os.write(2, b"\nCtrl-C: stopping after this step, which will be saved (Ctrl-C again: stop now)\n")
            except OSError:
                pass

    def __exit__(self, *exc) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.default_int_handler)


@dataclass
class _Completed:
    """The state after the last completed step (MLX arrays are immutable: holding them copies nothing)."""

    step: int
    params: dict
    opt_state: dict
    trained_tokens: int

    @classmethod
    def of(cls, step: int, model, optimizer, trained_tokens: int) -> "_Completed":
        return cls(step, text_model(model).trainable_parameters(), tree_map(lambda x: x, optimizer.state),
                   trained_tokens)

    def restore(self, model, optimizer) -> None:
        """Put this state back (an interruption can come between an update's parts)."""
        text_model(model).update(self.params)
        optimizer.state = tree_map(lambda x: x, self.opt_state)


@dataclass
class TrainResult:
    steps: int
    train_loss: float
    val_loss: float | None
    first_val_loss: float | None
    tokens_per_s: float
    peak_memory_gb: float
    adapter_path: Path
    test_loss: float | None = None


def _write_plot(adapter_path: Path, metrics: list[dict]) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    tr = [(m["step"], m["train_loss"]) for m in metrics if "train_loss" in m]
    va = [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]
    fig, ax = plt.subplots(figsize=(6, 4))
    if tr:
        ax.plot(*zip(*tr), label="train")
    if va:
        ax.plot(*zip(*va), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = adapter_path / PLOT_FILE
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _diverged_advice(adapter_path: Path, step: int | None) -> str:
    where = f"Step {step}, the last completed one, is saved in {checkpoint_path(adapter_path, step)}; " if step else ""
    return (where + "a run is deterministic, so resuming it would meet the same step again: train anew with a lower "
            "learning rate or a --max-grad-norm")


def _stop_message(e: BaseException, adapter_path: Path, completed: int, saved: int, iters: int, world: int,
                  resume_command: str | None) -> str:
    """The line that tells how to continue a run that stopped early after step ``completed``, whose newest
    checkpoint is step ``saved`` (0: none)."""
    what = "Interrupted" if isinstance(e, KeyboardInterrupt) else "Stopped by an error"
    if saved == 0:
        return f"{what} before any step was saved: nothing to resume."
    where = f"saved in {checkpoint_path(adapter_path, saved)}"
    if saved < completed:
        where = f"step {completed} could not be saved; the newest checkpoint is step {saved}"
    if world > 1:
        how = "rerun the same mlx.launch command with --resume added"
    else:
        how = resume_command or "rerun the same command with --resume added (resume=True in Python)"
    fix = "" if isinstance(e, KeyboardInterrupt) else " once the error is fixed"
    return f"{what} after step {completed} of {iters}: {where}. To continue{fix}: {how}"


def train(model, train_set, valid_set, adapter_path, adapter_cfg: AdapterConfig, train_cfg: TrainConfig, *,
          resume: bool = False, progress: bool = True, log=print, stop_after: int | None = None,
          resume_command: str | None = None, allow_data_change: bool = False, image_cache=None) -> TrainResult:
    """Train adapters on ``model`` (loaded by model/load.py) from ``data.Batches`` of the train and validation
    sets (built with this run's batch size, seed and rank). Writes the adapter, metrics and checkpoints under
    ``adapter_path``. ``stop_after``: stop (as if interrupted) after that many steps of this call.

    No lost work: Ctrl-C (see ``_CtrlC``) or an error during the steps saves the last completed step as a
    checkpoint (unless it is saved already; rank 0 alone, with no collective, so it cannot wait on a rank that
    is gone), logs how to continue (``resume_command``: the exact command, when the caller knows it) and raises.
    A step whose loss or gradients are not finite is not applied (NonFiniteError).

    Checkpoints record ``train_set.fingerprint`` (data.Batches has one); ``resume`` refuses other training data
    unless ``allow_data_change`` (then it warns).

    ``image_cache``: an images.ImageCache (``finetune`` passes the one that checked the data); a model with a vision
    tower gets a new one otherwise, so an image is decoded once per run, not at each use."""
    from tqdm import tqdm

    if train_cfg.grad_checkpoint and adapter_cfg.dropout > 0:
        raise TrainingError("dropout with gradient checkpointing is not supported: the recomputed pass would draw "
                            "another dropout mask than the forward pass (use one or the other)")
    world = World()
    main = world.rank == 0
    adapter_path = Path(adapter_path)
    metrics_file = adapter_path / METRICS_FILE
    metrics: list[dict] = []
    data_fingerprint = getattr(train_set, "fingerprint", None)
    start = 0
    with world.together("preparing the run"):  # adapters, --adapter-path, --resume
        if not adapter_layers(model):
            mx.random.seed(train_cfg.seed)  # the adapters' initial values: the same on every rank and every run
            adapter_cfg = apply_adapters(model, adapter_cfg, warn=log if main else None)
        if image_cache is None and image_token_ids(model) is not None:
            from .images import ImageCache

            image_cache = ImageCache(model.mcfg.vision.image_size)
        model.train()
        opt = optim.AdamW(learning_rate=schedule(train_cfg), weight_decay=train_cfg.weight_decay)
        opt.init(text_model(model).trainable_parameters())
        if main:
            if resume:
                start = _load_checkpoint(adapter_path, model, opt, adapter_cfg, train_cfg, data_fingerprint,
                                         allow_data_change, log)
            elif latest_checkpoint(adapter_path) is not None:
                raise TrainingError(f"{adapter_path} holds checkpoints of an earlier run: pass --resume to continue "
                                    "it, or choose another --adapter-path")
            metrics = _read_metrics(metrics_file, start) if resume else []
            adapter_path.mkdir(parents=True, exist_ok=True)
            write_text(metrics_file, "".join(json.dumps(m) + "\n" for m in metrics))
    if world.size > 1:
        start = _share(world, model, opt, start, resume, data_fingerprint)
        if not main and resume:
            metrics = _read_metrics(metrics_file, start)  # where the machine shares rank 0's folder (else none)

    pixels = image_cache.pixels if image_cache is not None else None
    loss_and_grad = nn.value_and_grad(text_model(model), lambda *a, **k: batch_loss(model, *a, pixels=pixels, **k))

    def log_metric(m):
        metrics.append(m)
        if main:
            with open(metrics_file, "a") as fh:
                fh.write(json.dumps(m) + "\n")

    paused = [0.0]  # seconds spent validating inside the loop (not training time)

    def validate(step):
        """The validation loss (every rank), recorded (rank 0) together with the others' agreement."""
        if valid_set is None:
            return None
        t = time.perf_counter()
        v = evaluate(model, valid_set, train_cfg.val_batches, train_cfg, world, image_cache)
        paused[0] += time.perf_counter() - t
        with world.together(f"recording the validation loss of step {step}"):
            log_metric({"step": step, "val_loss": v})
        return v

    first_val = None
    if start == 0:
        first_val = validate(0)
    else:
        first_val = next((m["val_loss"] for m in metrics if "val_loss" in m and m["step"] == 0), None)
    end = train_cfg.iters if stop_after is None else min(train_cfg.iters, start + stop_after)
    bar = tqdm(total=train_cfg.iters, initial=start, disable=not (progress and main), unit="step", dynamic_ncols=True)
    mx.reset_peak_memory()
    paused[0] = 0.0
    tokens, t0, window_loss, window_n, last_train = 0, time.perf_counter(), 0.0, 0.0, float("nan")
    trained_tokens = int(next((m.get("trained_tokens", 0) for m in reversed(metrics) if "trained_tokens" in m), 0))
    val = None
    completed = _Completed.of(start, model, opt, trained_tokens)
    saved = [start]  # the step of the newest checkpoint (start: none yet, or the one resumed from)

    def save(c: _Completed) -> None:
        if main:
            save_checkpoint(adapter_path, c.step, model, opt, adapter_cfg, train_cfg,
                            {"trained_tokens": c.trained_tokens, "data_fingerprint": data_fingerprint})
        saved[0] = c.step

    try:
        with _CtrlC(say=main) as ctrl_c:
            for step in range(start, end):
                mx.random.seed(train_cfg.seed * 1_000_003 + step * 7919 + world.rank)
                grads, lsum, ntok, error = None, mx.array(0.0), mx.array(0.0), None
                try:
                    for micro in range(train_cfg.grad_accum):
                        k = step * train_cfg.grad_accum + micro
                        inputs, targets, weights, images = _to_arrays(train_set.batch(k))
                        (s, n), g = loss_and_grad(inputs, targets, weights, images,
                                                  grad_checkpoint=train_cfg.grad_checkpoint, chunk=train_cfg.loss_chunk)
                        grads = g if grads is None else tree_map(mx.add, grads, g)
                        lsum, ntok = lsum + s, ntok + n
                        mx.eval(grads, lsum, ntok)
                except BaseException as e:  # noqa: BLE001 - the other ranks learn of it in the sum below
                    if world.size == 1:
                        raise
                    error, lsum, ntok = e, mx.array(0.0), mx.array(0.0)
                    grads = tree_map(mx.zeros_like, text_model(model).trainable_parameters())
                # one collective per step: gradients, loss, tokens, a Ctrl-C on any rank, a failure on any rank
                grads, lsum, ntok, halt, failed = world.sum((grads, lsum, ntok, mx.array(float(ctrl_c.requested)),
                                                             world.flags(error)))
                world.check(error, failed, f"computing step {step + 1}")
                count = max(ntok.item(), 1.0)
                loss = lsum.item() / count
                problem = _not_finite(loss, grads)
                if problem:
                    world.stopped_together = True
                    raise NonFiniteError(f"{problem} at step {step + 1}; nothing of that step was applied")
                grads = tree_map(lambda x: x / count, grads)
                if train_cfg.max_grad_norm > 0:
                    grads, _ = optim.clip_grad_norm(grads, train_cfg.max_grad_norm)
                opt.update(text_model(model), grads)
                mx.eval(text_model(model).trainable_parameters(), opt.state)
                tokens += int(ntok.item())
                trained_tokens += int(ntok.item())
                window_loss, window_n = window_loss + lsum.item(), window_n + ntok.item()
                done = step + 1
                completed = _Completed.of(done, model, opt, trained_tokens)
                bar.update(1)
                # rank 0 writes files: each write is agreed on (at steps every rank knows), so that a failure
                # stops every rank instead of leaving them waiting in the next step's sum
                if done % max(train_cfg.report_every, 1) == 0 or done == end:
                    dt = time.perf_counter() - t0 - paused[0]
                    last_train = window_loss / max(window_n, 1.0)
                    m = {"step": done, "train_loss": last_train, "learning_rate": float(opt.learning_rate.item()),
                         "tokens_per_s": tokens / dt, "peak_memory_gb": mx.get_peak_memory() / 1e9,
                         "trained_tokens": trained_tokens}
                    with world.together(f"recording the metrics of step {done}"):
                        log_metric(m)
                    bar.set_postfix(loss=f"{last_train:.3f}", tok_s=f"{m['tokens_per_s']:.1f}",
                                    peak=f"{m['peak_memory_gb']:.2f}GB", refresh=False)
                    window_loss, window_n = 0.0, 0.0
                if train_cfg.val_every and done % train_cfg.val_every == 0 and done != train_cfg.iters:
                    val = validate(done)
                    if main and progress and val is not None:
                        bar.write(f"step {done}: validation loss {val:.4f}")
                every = train_cfg.checkpoint_every
                if (every and done % every == 0) or done == end:
                    with world.together(f"saving step {done}"):
                        save(completed)
                if halt.item() > 0 and done < end:
                    world.stopped_together = True
                    raise KeyboardInterrupt
    except BaseException as e:
        bar.close()
        completed.restore(model, opt)
        if completed.step > saved[0]:
            try:
                save(completed)
            except Exception as failed:  # noqa: BLE001 - say so, and raise the error that stopped the run
                if main and log:
                    log(f"Could not save step {completed.step}: {type(failed).__name__}: {failed}")
        if world.stopped_together:  # every rank is here: the others wait for rank 0's save before they exit
            world.barrier()          # (mlx.launch stops all ranks as soon as one exits with an error)
        if isinstance(e, NonFiniteError):
            kept = completed.step if saved[0] == completed.step and completed.step > 0 else None
            raise NonFiniteError(f"{e}. " + _diverged_advice(adapter_path, kept)) from None
        if main and log:
            log(_stop_message(e, adapter_path, completed.step, saved[0], train_cfg.iters, world.size, resume_command))
        raise
    bar.close()
    elapsed = time.perf_counter() - t0 - paused[0]
    if end == train_cfg.iters:
        val = validate(train_cfg.iters)
        with world.together("saving the adapter"):
            if main:
                save_adapters(model, adapter_cfg, adapter_path)
                if _write_plot(adapter_path, metrics) is None and log:
                    log(f"({PLOT_FILE} not drawn: matplotlib is not installed; pip install 'mlx-gemma-qat[plot]')")
    model.eval()
    return TrainResult(steps=end, train_loss=last_train, val_loss=val, first_val_loss=first_val,
                       tokens_per_s=tokens / elapsed if elapsed > 0 else 0.0,
                       peak_memory_gb=mx.get_peak_memory() / 1e9, adapter_path=adapter_path)


__all__ = ["TrainConfig", "TrainResult", "TrainingError", "NonFiniteError", "AdapterError", "train", "evaluate",
           "batch_loss", "schedule", "save_checkpoint", "latest_checkpoint", "checkpoint_path"]
