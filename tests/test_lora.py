"""LoRA adapters, training, resume and fuse on the tiny fixture (quantized: Q4_0-grid linears, 4-bit embedding)."""

import json
import signal
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_gemma_qat import load
from mlx_gemma_qat.lora import AdapterConfig, AdapterError, TrainConfig, TrainingError, train
from mlx_gemma_qat.lora.adapters import adapter_layers, adapter_weights, apply_adapters, save_adapters, text_model
from mlx_gemma_qat.lora.fuse import fuse
from mlx_gemma_qat.lora.trainer import batch_loss, latest_checkpoint

TINY = Path(__file__).parent / "fixtures" / "tiny_gemma3"
IDS = mx.array([[2, 10, 20, 30, 40, 50, 60, 70, 80, 90]])


@pytest.fixture(scope="module")
def qfolder(tmp_path_factory):
    from mlx_gemma_qat.convert import convert

    return convert(TINY, tmp_path_factory.mktemp("lora") / "m", embed_bits=4, progress=False)


class PatternBatches:
    """Deterministic learnable batches: every token is repeated once."""

    def __init__(self, n, batch, length, seed, nan_at=None):
        r = np.random.default_rng(seed)
        x = r.integers(3, 200, (n, batch, length + 1))
        x[:, :, 1::2] = x[:, :, 0:-1:2]  # each token is said twice
        self.x, self.nan_at = x.astype(np.int32), nan_at

    def __len__(self):
        return len(self.x)

    def batch(self, k):
        x = self.x[k % len(self.x)]
        w = np.ones((x.shape[0], x.shape[1] - 1), np.float32)
        if self.nan_at is not None and k >= self.nan_at:
            w[0, 0] = np.nan
        return x[:, :-1], x[:, 1:], w, [()] * x.shape[0]


def _randomize(model, seed=3, a=0.05, b=0.01):
    mx.random.seed(seed)
    for m in adapter_layers(model).values():
        m.lora_a = mx.random.normal(m.lora_a.shape) * a
        m.lora_b = mx.random.normal(m.lora_b.shape) * b


@pytest.mark.parametrize("kind", ["lora", "pooled"])
def test_untrained_adapter_changes_nothing_and_base_is_frozen(qfolder, kind):
    model, _ = load(qfolder)
    ref = model(IDS)
    cfg = apply_adapters(model, AdapterConfig(kind=kind, num_layers=-1, embedding=True))
    assert len(cfg.layers) == 8 * 7 + 1 and set(cfg.layers.values()) == {kind}
    assert mx.array_equal(model(IDS), ref).item()
    names = set(adapter_weights(model))
    assert names and all(n.endswith((".lora_a", ".lora_b")) for n in names)  # the base is frozen


def test_layer_selection_and_bad_options(qfolder):
    model, _ = load(qfolder)
    cfg = apply_adapters(model, AdapterConfig(num_layers=2, keys=["q_proj", "v_proj"]))
    assert sorted(cfg.layers) == [f"model.layers.{i}.self_attn.{p}_proj" for i in (6, 7) for p in "qv"]
    with pytest.raises(AdapterError, match="no linear layer named nope"):
        apply_adapters(load(qfolder)[0], AdapterConfig(keys=["nope"]))
    with pytest.raises(AdapterError, match="no layer to adapt"):
        apply_adapters(load(qfolder)[0], AdapterConfig(num_layers=0))
    assert len(apply_adapters(load(qfolder)[0], AdapterConfig(num_layers=99)).layers) == 8 * 7
    with pytest.raises(AdapterError, match="kind"):
        AdapterConfig(kind="qlora")


def test_pooled_update_is_lora_with_a_constant_over_each_group(qfolder):
    """A group-pooled adapter equals a standard one whose A repeats each pooled row over its group."""
    pooled, _ = load(qfolder)
    apply_adapters(pooled, AdapterConfig(kind="pooled", num_layers=1, keys=["up_proj"]))
    _randomize(pooled)
    plain, _ = load(qfolder)
    apply_adapters(plain, AdapterConfig(kind="lora", num_layers=1, keys=["up_proj"]))
    p, q = (adapter_layers(m)["model.layers.7.mlp.up_proj"] for m in (pooled, plain))
    q.lora_a, q.lora_b = mx.repeat(p.lora_a, 32, axis=0), p.lora_b
    np.testing.assert_allclose(np.array(pooled(IDS)), np.array(plain(IDS)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["lora", "pooled"])
def test_gradients_match_finite_differences(qfolder, kind):
    model, _ = load(qfolder)
    apply_adapters(model, AdapterConfig(kind=kind, num_layers=2, embedding=True))
    _randomize(model, a=0.05, b=0.02)
    model.train()
    x = mx.array(np.random.default_rng(0).integers(3, 200, (2, 13)).astype(np.int32))
    args = (x[:, :-1], x[:, 1:], mx.ones((2, 12)))

    def loss(m):
        s, n = batch_loss(m, *args, chunk=5)
        return s / n

    (_, _), grads = nn.value_and_grad(text_model(model), lambda *a: batch_loss(model, *a, chunk=5))(*args)
    grads = dict(tree_flatten(grads))
    rng = np.random.default_rng(1)
    layers = adapter_layers(model)
    checked = 0
    for name in ("model.layers.7.mlp.down_proj", "model.layers.6.self_attn.q_proj", "model.embed_tokens"):
        layer = layers[name]
        for attr in ("lora_a", "lora_b"):
            w = np.array(getattr(layer, attr))
            g = np.array(grads[f"{name}.{attr}"]) / 24.0  # batch_loss returns the sum over 24 target tokens
            flat = np.argsort(-np.abs(g).ravel())[:2].tolist() + rng.integers(0, w.size, 1).tolist()
            for idx in flat:
                i = np.unravel_index(idx, w.shape)
                eps = 3e-4
                vals = []
                for sgn in (1, -1):
                    w2 = w.copy()
                    w2[i] += sgn * eps
                    setattr(layer, attr, mx.array(w2))
                    vals.append(loss(model).item())
                setattr(layer, attr, mx.array(w))
                fd = (vals[0] - vals[1]) / (2 * eps)
                assert abs(fd - g[i]) <= 5e-3 + 3e-2 * abs(g[i]), (name, attr, i, fd, g[i])
                checked += 1
    assert checked == 18


def _run(folder, out, kind="pooled", iters=8, stop_after=None, resume=False, train_set=None, log=None, **kw):
    model, _ = load(folder)
    tcfg = TrainConfig(iters=iters, batch_size=4, learning_rate=5e-4, warmup=2, val_every=4, save_every=4,
                       report_every=2, **kw)
    acfg = AdapterConfig(kind=kind, num_layers=4, embedding=True, dropout=0.1)
    return model, train(model, train_set or PatternBatches(6, 4, 24, 0), PatternBatches(2, 4, 24, 1), out, acfg, tcfg,
                        progress=False, log=log or (lambda *_: None), stop_after=stop_after, resume=resume)


def test_training_lowers_validation_loss_and_writes_outputs(qfolder, tmp_path):
    _, r = _run(qfolder, tmp_path / "a", iters=12)
    assert r.val_loss < r.first_val_loss - 0.25
    names = {p.name for p in (tmp_path / "a").iterdir()}
    assert {"adapters.safetensors", "adapter_config.json", "metrics.jsonl", "checkpoints", "loss-curve.png"} <= names
    assert (tmp_path / "a" / "loss-curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "val_loss" in m] == [0, 4, 8, 12]
    train_lines = [m for m in metrics if "train_loss" in m]
    assert [m["step"] for m in train_lines] == [2, 4, 6, 8, 10, 12]
    assert all(m["tokens_per_s"] > 0 and m["peak_memory_gb"] > 0 for m in train_lines)
    lrs = [m["learning_rate"] for m in train_lines]
    # the rate the last update of each line used: update k (1-based) uses schedule(k - 1); 2 warmup steps
    # from 0, then a cosine over the remaining 10 to 0
    want = [5e-4 * (k - 1) / 2 if k <= 2 else 2.5e-4 * (1 + np.cos(np.pi * (k - 3) / 10)) for k in (2, 4, 6, 8, 10, 12)]
    np.testing.assert_allclose(lrs, want, rtol=1e-5)
    # the saved adapter reloads, on the same model only
    model, _ = load(qfolder, adapter_path=tmp_path / "a")
    assert set(adapter_layers(model)) == set(json.loads((tmp_path / "a" / "adapter_config.json").read_text())["layers"])


def test_resume_is_bit_identical(qfolder, tmp_path):
    full, _ = _run(qfolder, tmp_path / "full", iters=8)
    _run(qfolder, tmp_path / "half", iters=8, stop_after=3)
    assert latest_checkpoint(tmp_path / "half").name == "step-0000003"
    resumed, _ = _run(qfolder, tmp_path / "half", iters=8, resume=True)
    a, b = adapter_weights(full), adapter_weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert mx.array_equal(a[k], b[k]).item(), k
    opt_a = mx.load(str(tmp_path / "full" / "checkpoints" / "step-0000008" / "optimizer.safetensors"))
    opt_b = mx.load(str(tmp_path / "half" / "checkpoints" / "step-0000008" / "optimizer.safetensors"))
    assert all(mx.array_equal(opt_a[k], opt_b[k]).item() for k in opt_a)
    with pytest.raises(TrainingError, match="different settings.*learning_rate"):
        model, _ = load(qfolder)
        train(model, PatternBatches(6, 4, 24, 0), None, tmp_path / "half", AdapterConfig(kind="pooled", num_layers=4,
              embedding=True, dropout=0.1), TrainConfig(iters=8, batch_size=4, learning_rate=1e-3), resume=True,
              progress=False)
    with pytest.raises(TrainingError, match="--resume"):  # a fresh run into a folder with checkpoints
        _run(qfolder, tmp_path / "half", iters=8)


def test_resume_after_a_kill_mid_metrics_line(qfolder, tmp_path):
    """A run killed while appending to metrics.jsonl leaves half a line: resuming skips it (it crashed)."""
    _run(qfolder, tmp_path / "k", iters=8, stop_after=4)
    with open(tmp_path / "k" / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 5, "train_lo')
    _, r = _run(qfolder, tmp_path / "k", iters=8, resume=True)
    assert r.steps == 8
    lines = (tmp_path / "k" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines if "train_loss" in x] == [2, 4, 6, 8]


def test_resume_on_changed_data_is_refused_unless_allowed(qfolder, tmp_path):
    from mlx_gemma_qat.lora import finetune

    data = tmp_path / "data"
    data.mkdir()
    rows = [{"prompt": f"Say {w}", "completion": f"{w} {w}"} for w in "red green blue black".split()]
    train_file = data / "train.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "ad"
    cfg = dict(iters=4, batch_size=2, val_every=0, save_every=0)

    def run(lines=None, **kw):
        return finetune(qfolder, data, out, adapter=dict(num_layers=1), train_config=cfg, progress=False,
                        log=(lines.append if lines is not None else lambda *a: None), **kw)

    run(stop_after=2)
    state = json.loads((latest_checkpoint(out) / "state.json").read_text())
    assert len(state["data_fingerprint"]) == 64
    train_file.write_text("".join(json.dumps(r) + "\n" for r in rows[::-1]))  # the same records, reordered
    with pytest.raises(TrainingError, match="training data differ from those .*step-0000002 was trained on.*"
                                            "--allow-data-change"):
        run(resume=True)
    assert latest_checkpoint(out).name == "step-0000002"
    lines = []
    assert run(lines, resume=True, allow_data_change=True).steps == 4
    assert any(x.startswith("Warning: the training data differ") for x in lines)
    new = json.loads((latest_checkpoint(out) / "state.json").read_text())["data_fingerprint"]
    assert new != state["data_fingerprint"]  # later checkpoints record the data they were trained on


def test_interrupted_checkpoint_keeps_the_last_good_one(qfolder, tmp_path, monkeypatch):
    from mlx_gemma_qat.lora import trainer

    _run(qfolder, tmp_path / "r", iters=8, stop_after=4)
    good = latest_checkpoint(tmp_path / "r")
    real = trainer.save_json

    def dying(path, obj):
        if Path(path).name == "state.json":
            raise KeyboardInterrupt
        return real(path, obj)

    monkeypatch.setattr(trainer, "save_json", dying)
    with pytest.raises(KeyboardInterrupt):
        _run(qfolder, tmp_path / "r", iters=8, resume=True)
    assert latest_checkpoint(tmp_path / "r") == good
    monkeypatch.setattr(trainer, "save_json", real)
    _run(qfolder, tmp_path / "r", iters=8, resume=True)  # and resuming from it still works
    assert latest_checkpoint(tmp_path / "r").name == "step-0000008"


def test_checkpoints_every_tenth_of_the_run_by_default(qfolder, tmp_path):
    assert [TrainConfig(iters=n).checkpoint_every for n in (5, 100, 1500)] == [1, 10, 150]
    assert TrainConfig(iters=100, save_every=0).checkpoint_every == 0
    model, _ = load(qfolder)
    train(model, PatternBatches(6, 4, 24, 0), None, tmp_path / "c", AdapterConfig(num_layers=1),
          TrainConfig(iters=20, batch_size=4), progress=False, log=lambda *_: None, stop_after=3)
    assert sorted(p.name for p in (tmp_path / "c" / "checkpoints").glob("step-*")) == ["step-0000002", "step-0000003"]


class Interrupting(PatternBatches):
    """Ctrl-C (``times`` SIGINTs to this process), or ``error`` raised, when batch ``at`` is fetched."""

    def __init__(self, *a, at, times=1, error=None):
        super().__init__(*a)
        self.at, self.times, self.error = at, times, error

    def batch(self, k):
        if k == self.at:
            if self.error is not None:
                raise self.error
            for _ in range(self.times):
                signal.raise_signal(signal.SIGINT)
        return super().batch(k)


@pytest.mark.parametrize("how, saved", [("ctrl-c", 6), ("ctrl-c twice", 5), ("error", 5)])
def test_a_stopped_run_saves_its_last_completed_step_and_resumes_exactly(qfolder, tmp_path, how, saved):
    """Ctrl-C lets the step in progress (6) finish and saves it; a second Ctrl-C or an error stops at once and
    saves the last completed step (5). Checkpoints are due at 4 and 8 only. Resuming equals an unbroken run."""
    lines = []
    before = signal.getsignal(signal.SIGINT)  # (SIG_IGN where the suite was started in the background)
    batches = Interrupting(6, 4, 24, 0, at=5, times=2 if how == "ctrl-c twice" else 1,
                           error=OSError("disk on fire") if how == "error" else None)
    with pytest.raises(OSError if how == "error" else KeyboardInterrupt):
        _run(qfolder, tmp_path / "r", iters=8, train_set=batches, log=lines.append)
    assert signal.getsignal(signal.SIGINT) is before  # Ctrl-C handling is restored
    assert latest_checkpoint(tmp_path / "r").name == f"step-{saved:07d}"
    what, fix = ("Stopped by an error", " once the error is fixed") if how == "error" else ("Interrupted", "")
    assert lines[-1] == (f"{what} after step {saved} of 8: saved in {tmp_path / 'r' / 'checkpoints' / f'step-{saved:07d}'}. "
                         f"To continue{fix}: rerun the same command with --resume added (resume=True in Python)")
    resumed, _ = _run(qfolder, tmp_path / "r", iters=8, resume=True)
    full, _ = _run(qfolder, tmp_path / "full", iters=8)
    a, b = adapter_weights(full), adapter_weights(resumed)
    assert all(mx.array_equal(a[k], b[k]).item() for k in a)


def test_an_interruption_inside_an_update_saves_the_step_before_it(qfolder, tmp_path, monkeypatch):
    """Ctrl-C in the middle of step 6's optimizer update (its step counter and some moments already moved): the
    saved step 5 is step 5's state, not a mix, and resuming from it equals an unbroken run."""
    import mlx.optimizers as optim

    real, calls = optim.AdamW.apply_single, [0]

    def interrupted(self, *a):
        if self.step.item() == 6:
            calls[0] += 1
            if calls[0] == 10:
                raise KeyboardInterrupt
        return real(self, *a)

    monkeypatch.setattr(optim.AdamW, "apply_single", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(qfolder, tmp_path / "r", iters=8)
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path / "r").name == "step-0000005"
    resumed, _ = _run(qfolder, tmp_path / "r", iters=8, resume=True)
    full, _ = _run(qfolder, tmp_path / "full", iters=8)
    a, b = adapter_weights(full), adapter_weights(resumed)
    assert all(mx.array_equal(a[k], b[k]).item() for k in a)


def test_nan_loss_stops_and_saves_the_last_completed_step(qfolder, tmp_path):
    model, _ = load(qfolder)
    with pytest.raises(TrainingError, match=r"loss became nan at step 6; nothing of that step was applied\. "
                                            r"Step 5, the last completed one, is saved in .*step-0000005"):
        train(model, PatternBatches(6, 4, 24, 0, nan_at=5), None, tmp_path / "n", AdapterConfig(num_layers=2),
              TrainConfig(iters=8, batch_size=4, save_every=4), progress=False, log=lambda *_: None)
    assert latest_checkpoint(tmp_path / "n").name == "step-0000005"


def test_unknown_settings_are_refused(qfolder, tmp_path):
    """A typo in a settings dict is an error naming it (it was dropped, and the run used the default)."""
    from mlx_gemma_qat.lora import finetune

    with pytest.raises(TrainingError, match="unknown training setting 'learning_rte' \\(did you mean 'learning_rate'"):
        TrainConfig.from_dict({"iters": 2, "learning_rte": 1e-3})
    with pytest.raises(AdapterError, match="unknown adapter setting 'rnak'"):
        AdapterConfig.from_dict({"rnak": 4})
    with pytest.raises(TrainingError, match="unknown training setting 'rank'"):
        finetune(qfolder, tmp_path, tmp_path / "ad", train_config={"iters": 1, "rank": 4})
    with pytest.raises(AdapterError, match="unknown adapter settings 'iters', 'seed'"):
        finetune(qfolder, tmp_path, tmp_path / "ad", adapter={"iters": 1, "seed": 2})
    assert not (tmp_path / "ad").exists()
    model, _ = load(qfolder)
    save_adapters(model, apply_adapters(model, AdapterConfig(num_layers=1)), tmp_path / "saved")
    cfg = tmp_path / "saved" / "adapter_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "lora_scale": 2.0}))
    with pytest.raises(AdapterError, match=r"adapter_config\.json: not a valid adapter config .*'lora_scale'"):
        load(qfolder, adapter_path=tmp_path / "saved")


def test_non_finite_gradients_with_a_finite_loss_stop_before_the_update(qfolder, tmp_path, monkeypatch):
    from mlx_gemma_qat.lora import trainer

    real, calls = trainer.batch_loss, [0]

    def poisoned(model, *a, **k):
        s, n = real(model, *a, **k)
        calls[0] += 1
        if calls[0] == 6:  # step 6: the loss unchanged, a NaN gradient (0 * the infinite slope of sqrt at 0)
            w = adapter_layers(model)["model.layers.7.mlp.down_proj"].lora_a
            s = s + 0.0 * mx.sqrt(mx.abs(w - w)).sum()
        return s, n

    monkeypatch.setattr(trainer, "batch_loss", poisoned)
    model, _ = load(qfolder)
    with pytest.raises(TrainingError, match=r"gradients are not finite \(inf or NaN in model\.layers\.7\.mlp\.down_proj"
                                            r"\.lora_a\) though the loss is finite \(\d.*\) at step 6; nothing"):
        train(model, PatternBatches(6, 4, 24, 0), None, tmp_path / "g", AdapterConfig(num_layers=2),
              TrainConfig(iters=8, batch_size=4, save_every=3), progress=False, log=lambda *_: None)
    assert all(mx.all(mx.isfinite(v)).item() for v in adapter_weights(model).values())  # the step was not applied
    saved = mx.load(str(latest_checkpoint(tmp_path / "g") / "adapters.safetensors"))
    assert all(mx.all(mx.isfinite(v)).item() for v in saved.values())  # nor saved


def test_adapter_from_another_model_is_refused(qfolder, tmp_path):
    from mlx_gemma_qat.convert import convert

    model, _ = load(qfolder)
    cfg = apply_adapters(model, AdapterConfig(num_layers=2))
    save_adapters(model, cfg, tmp_path / "ad")
    other = convert(TINY, tmp_path / "other", progress=False)  # the same weights, another layout
    with pytest.raises(AdapterError, match="trained on another model"):
        load(other, adapter_path=tmp_path / "ad")
    with pytest.raises(AdapterError, match="trained on another model"):
        fuse(other, tmp_path / "ad", tmp_path / "f")
    assert not (tmp_path / "f").exists()
    (tmp_path / "ad" / "adapters.safetensors").write_bytes(b"junk")
    with pytest.raises(AdapterError, match="not a readable"):
        load(qfolder, adapter_path=tmp_path / "ad")


def _weights(folder):
    return mx.load(str(next(Path(folder).glob("*.safetensors"))))


def test_pooled_fuse_is_exact(qfolder, tmp_path):
    model, _ = load(qfolder)
    cfg = apply_adapters(model, AdapterConfig(kind="pooled", num_layers=-1, embedding=True))
    _randomize(model)
    save_adapters(model, cfg, tmp_path / "ad")
    runtime = model(IDS)
    report = fuse(qfolder, tmp_path / "ad", tmp_path / "fused", progress=False)
    assert {r["how"] for r in report.values()} == {"biases (exact)"}
    base, fused = _weights(qfolder), _weights(tmp_path / "fused")
    assert base.keys() == fused.keys()
    moved = {k for k in base if not mx.array_equal(base[k], fused[k]).item()}
    assert moved == {f"model.{n.removeprefix('model.')}.biases" for n in cfg.layers}  # only biases, all of them
    for name, layer in adapter_layers(model).items():
        want = base[f"{name}.biases"].astype(mx.float32) + layer.delta()
        assert fused[f"{name}.biases"].dtype == base[f"{name}.biases"].dtype
        assert mx.array_equal(fused[f"{name}.biases"], want.astype(base[f"{name}.biases"].dtype)).item()
    # the fused model is the runtime adapter up to that rounding: with the biases unrounded, equal in float32
    fm, _ = load(tmp_path / "fused")
    exact = {f"{n}.biases": base[f"{n}.biases"].astype(mx.float32) + layer.delta()
             for n, layer in adapter_layers(model).items()}
    from mlx.utils import tree_unflatten

    fm.update(tree_unflatten(list(exact.items())))
    np.testing.assert_allclose(np.array(fm(IDS)), np.array(runtime), atol=2e-4, rtol=1e-5)
    assert json.loads((tmp_path / "fused" / "config.json").read_text())["mlx_gemma_qat"]["fused"]["kind"] == "pooled"


def test_lora_fuse_rounds_onto_the_layer_grid(qfolder, tmp_path):
    model, _ = load(qfolder)
    cfg = apply_adapters(model, AdapterConfig(kind="lora", num_layers=2))
    save_adapters(model, cfg, tmp_path / "zero")  # untrained: B = 0, a zero update
    fuse(qfolder, tmp_path / "zero", tmp_path / "f0", progress=False)
    base = _weights(qfolder)
    assert all(mx.array_equal(base[k], v).item() for k, v in _weights(tmp_path / "f0").items())  # idempotent
    _randomize(model, a=0.05, b=0.003)  # updates of about a grid step
    save_adapters(model, cfg, tmp_path / "ad")
    report = fuse(qfolder, tmp_path / "ad", tmp_path / "f1", progress=False)
    fused = _weights(tmp_path / "f1")
    for name, layer in adapter_layers(model).items():
        assert mx.array_equal(fused[f"{name}.scales"], base[f"{name}.scales"]).item()
        assert mx.array_equal(fused[f"{name}.biases"], base[f"{name}.biases"]).item()
        s, b = base[f"{name}.scales"].astype(mx.float32), base[f"{name}.biases"].astype(mx.float32)
        target = mx.dequantize(base[f"{name}.weight"], s, b, group_size=32, bits=4) + layer.delta()
        got = mx.dequantize(fused[f"{name}.weight"], s, b, group_size=32, bits=4)
        step, low = mx.repeat(s, 32, axis=1), mx.repeat(b, 32, axis=1)
        lo, hi = mx.minimum(low - step / 2, low + 15.5 * step), mx.maximum(low - step / 2, low + 15.5 * step)
        in_range = (target >= lo) & (target <= hi)  # Q4_0 scales may be negative
        nearest = mx.abs(target - got) <= mx.abs(step) / 2 * (1 + 1e-5)
        assert mx.all(nearest | ~in_range).item()  # the nearest grid point wherever the grid reaches
        at_end = mx.isclose(got, low, atol=1e-6) | mx.isclose(got, low + 15 * step, atol=1e-6)
        assert mx.all(in_range | at_end).item()  # else the end of the grid it passed
        assert in_range.astype(mx.float32).mean().item() > 0.9
        assert report[name]["changed_fraction"] < 0.5
    assert np.mean([r["changed_fraction"] for r in report.values()]) > 0.01


def test_cli_lora_fuse_generate(qfolder, tmp_path):
    """The commands end to end on JSONL data (needs lora/data.py)."""
    pytest.importorskip("mlx_gemma_qat.lora.data")
    from click.testing import CliRunner

    from mlx_gemma_qat.cli import main

    data = tmp_path / "data"
    data.mkdir()
    rows = [{"prompt": f"Say {w}", "completion": f"{w} {w} {w}"} for w in ["red", "green", "blue", "black", "white", "gray"]]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    run = CliRunner().invoke
    r = run(main, ["lora", "-m", str(qfolder), "--data", str(data), "--adapter-path", str(tmp_path / "ad"), "--iters", "6",
                   "--batch-size", "2", "--num-layers", "2", "--learning-rate", "1e-3", "--val-every", "3"])
    assert r.exit_code == 0, r.output
    assert "validation loss" in r.output and (tmp_path / "ad" / "adapters.safetensors").is_file()
    r = run(main, ["fuse", "-m", str(qfolder), "--adapter-path", str(tmp_path / "ad"), "-o", str(tmp_path / "fused"),
                   "--data", str(data)])
    assert r.exit_code == 0, r.output
    line = next(x for x in r.output.splitlines() if x.startswith("validation loss"))
    a, b = (float(x.split()[-1].strip(",")) for x in line.split(", fused")[0:1] + [line.split(", fused")[1].split()[0]])
    assert abs(a - b) < 1e-3  # exact up to the float16 rounding of the fused biases
    for extra in ([], ["--adapter-path", str(tmp_path / "ad")]):
        r = run(main, ["generate", "-m", str(qfolder), "-p", "Say red", "-n", "4", "--no-stats", *extra])
        assert r.exit_code == 0, r.output


def test_cli_ctrl_c_saves_and_prints_the_resume_command(qfolder, tmp_path):
    """A real SIGINT to `mlx-gemma lora` (no --save-every: checkpoints every 150 of 1500 steps): the step in
    progress is finished and saved, the exact command to continue is printed, the exit status is not 0."""
    import os
    import shlex
    import subprocess
    import sys
    import time

    data = tmp_path / "data"
    data.mkdir()
    rows = [{"text": f"{w} is a colour"} for w in "red green blue black".split()]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "ad"
    args = ["lora", "-m", str(qfolder), "--data", str(data), "--adapter-path", str(out), "--iters", "1500",
            "--batch-size", "2", "--num-layers", "1", "--report-every", "1"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "mlx_gemma_qat.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not ((out / "metrics.jsonl").is_file() and "train_loss" in (out / "metrics.jsonl").read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0
    line = next(x for x in err.splitlines() if x.startswith("Interrupted after step "))
    step = int(line.split()[3])
    assert 0 < step < 150 and latest_checkpoint(out).name == f"step-{step:07d}"
    assert line.endswith(f"To continue: {shlex.join(['mlx-gemma', *args, '--resume'])}"), line


def test_training_on_chat_records_with_images_keeps_the_vision_tower_frozen(vlm, tmp_path):
    """A chat record with an image trains the text adapters through the (frozen) vision tower."""
    from mlx_gemma_qat.lora import finetune

    folder, model, _ = vlm
    imgs = Path(__file__).parent / "fixtures" / "images"
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"messages": [{"role": "user", "content": [{"type": "image", "image": str(imgs / f)},
                                                       {"type": "text", "text": "What is this?"}]},
                          {"role": "assistant", "content": f"A picture called {f}."}]} for f in ("a.png", "b.jpg")]
    rows += [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]}] * 2
    for name in ("train", "valid"):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = finetune(folder, data, tmp_path / "ad", adapter=dict(kind="lora", num_layers=2),
                 train_config=dict(iters=3, batch_size=2, learning_rate=1e-3, val_every=0, save_every=0),
                 progress=False, log=lambda *a: None)
    assert np.isfinite(r.train_loss) and r.val_loss < r.first_val_loss
    saved = mx.load(str(tmp_path / "ad" / "adapters.safetensors"))
    n_blocks = len(model.language_model.model.layers)
    assert {k.rsplit(".", 1)[0] for k in saved} == {f"model.layers.{i}.{p}" for i in (n_blocks - 2, n_blocks - 1)
                                                     for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                               "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                               "mlp.down_proj")}  # nothing of the vision tower
    trained, _ = load(folder, adapter_path=tmp_path / "ad")
    assert len(adapter_layers(trained)) == 14


def _chat_with_images(folder: Path, images: list) -> Path:
    rows = [{"messages": [{"role": "user", "content": [{"type": "image", "image": str(i)},
                                                       {"type": "text", "text": "What is this?"}]},
                          {"role": "assistant", "content": f"A picture called {Path(i).name}."}]} for i in images]
    rows += [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]}] * 2
    folder.mkdir(exist_ok=True)
    for name in ("train", "valid"):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_bad_images_are_errors_naming_file_and_line_before_step_1(vlm, tmp_path):
    import struct
    import zlib

    from mlx_gemma_qat.lora import finetune
    from mlx_gemma_qat.lora.data import DataError

    folder = vlm[0]
    good = Path(__file__).parent / "fixtures" / "images" / "a.png"
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    ihdr = struct.pack(">IIBBBBB", 8000, 8000, 8, 2, 0, 0, 0)  # a 64 MP header, no pixels
    chunk = lambda kind, body: struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))  # noqa: E731
    (tmp_path / "huge.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    for bad, why in (("junk.png", "not a readable image"), ("gone.png", "no such image file"),
                     ("huge.png", "8000x8000 pixels is more than")):
        data = _chat_with_images(tmp_path / "data", [good, tmp_path / bad])
        with pytest.raises(DataError, match=rf"train\.jsonl:2: .*{bad}: {why}"):
            finetune(folder, data, tmp_path / "ad", adapter=dict(num_layers=1),
                     train_config=dict(iters=2, batch_size=2, val_every=0), progress=False, log=lambda *a: None)
        assert not (tmp_path / "ad").exists()  # refused before anything was written


def test_each_image_is_decoded_once_per_run(vlm, tmp_path, monkeypatch):
    """Checking, training steps (two epochs) and validations all use the run's cache: one decode per image."""
    import collections

    from mlx_gemma_qat import image
    from mlx_gemma_qat.lora import finetune

    opened = collections.Counter()
    real = image.open_image

    def counting(src):
        opened[str(src)] += 1
        return real(src)

    monkeypatch.setattr(image, "open_image", counting)
    imgs = Path(__file__).parent / "fixtures" / "images"
    data = _chat_with_images(tmp_path / "data", [imgs / "a.png", imgs / "b.jpg"])
    finetune(vlm[0], data, tmp_path / "ad", adapter=dict(kind="lora", num_layers=1),
             train_config=dict(iters=4, batch_size=2, val_every=1, save_every=0), progress=False, log=lambda *a: None)
    assert opened == {str(imgs / "a.png"): 1, str(imgs / "b.jpg"): 1}


def test_image_cache_is_bounded_by_bytes_least_recently_used_out():
    from mlx_gemma_qat.image import preprocess
    from mlx_gemma_qat.lora.images import ImageCache

    a, b, c = (str(Path(__file__).parent / "fixtures" / "images" / f) for f in ("a.png", "b.jpg", "wide.png"))
    cache = ImageCache(8, max_bytes=2 * 3 * 8 * 8 * 4)  # room for two 8x8 images
    assert np.array_equal(cache.pixels([a, b])[1], preprocess(b, 8)) and cache.decoded == 2
    cache.pixels([a])  # a is now the most recent: c pushes b out
    cache.pixels([c])
    assert cache.nbytes <= cache.max_bytes and cache.decoded == 3
    cache.pixels([a, c])
    assert cache.decoded == 3
    cache.pixels([b])
    assert cache.decoded == 4


def test_cli_fuse_exports_a_gguf_from_a_gguf_model(tmp_path):
    """QAT layout (F16 embedding, Q4_0 linears) from a GGUF: train, fuse --gguf: the changed layers are Q4_1 and
    equal the fused folder (gguf-py's own dequantizer); the rest is copied bit for bit."""
    import gguf
    from click.testing import CliRunner
    from gguf_factory import write_tiny_gguf

    from mlx_gemma_qat.cli import main
    from mlx_gemma_qat.convert import convert

    src = tmp_path / "tiny-qat.gguf"
    write_tiny_gguf(src)
    folder = convert(src, tmp_path / "m", progress=False)
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"text": f"{w} is a colour, {w} is a word"} for w in "red green blue black white gray".split()]
    for name in ("train", "valid"):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = CliRunner().invoke
    r = run(main, ["lora", "-m", str(folder), "--data", str(data), "--adapter-path", str(tmp_path / "ad"), "--iters", "3",
                   "--batch-size", "2", "--num-layers", "1", "--keys", "down_proj", "--learning-rate", "1e-3"])
    assert r.exit_code == 0, r.output
    r = run(main, ["fuse", "-m", str(folder), "--adapter-path", str(tmp_path / "ad"), "-o", str(tmp_path / "fused"),
                   "--gguf", str(tmp_path / "fused.gguf")])
    assert r.exit_code == 0, r.output
    base, out = gguf.GGUFReader(str(src)), gguf.GGUFReader(str(tmp_path / "fused.gguf"))
    types = {t.name: t.tensor_type.name for t in out.tensors}
    assert types["blk.7.ffn_down.weight"] == "Q4_1" and types["blk.6.ffn_down.weight"] == "Q4_0"
    b = {t.name: t for t in base.tensors}
    for t in out.tensors:
        if t.name != "blk.7.ffn_down.weight":
            assert np.array_equal(np.asarray(t.data), np.asarray(b[t.name].data)), t.name
    fused = _weights(tmp_path / "fused")
    n = "model.layers.7.mlp.down_proj"
    want = mx.dequantize(fused[f"{n}.weight"], fused[f"{n}.scales"].astype(mx.float32),
                         fused[f"{n}.biases"].astype(mx.float32), group_size=32, bits=4)
    t = next(t for t in out.tensors if t.name == "blk.7.ffn_down.weight")
    got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
    assert np.array_equal(got, np.array(want))
    r = run(main, ["fuse", "-m", str(folder), "--adapter-path", str(tmp_path / "ad"), "-o", str(tmp_path / "fused")])
    assert r.exit_code != 0 and "exists" in r.output  # never overwritten without --force
