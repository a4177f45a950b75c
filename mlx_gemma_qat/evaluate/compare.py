"""``mlx-gemma compare``: several models against one reference on the same tokens, in one table and a plot.

The reference runs first and its log-probs go to a logits file (``reference.py``); each model is then loaded
alone, measured (perplexity, KL divergence, same-top %, decode speed, memory) and freed, so only one model
is in memory at a time.
"""

from __future__ import annotations

import gc
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np


@dataclass
class Row:
    name: str
    source: str
    kv_bits: int | None
    bits_per_weight: float  # all weights, as the loaded folder stores them
    stored_gb: float  # weight bytes in that folder
    weights_gb: float  # MLX memory the loaded weights take (float32 copies where widened)
    peak_gb: float  # MLX peak while evaluating
    ppl: float
    ppl_error: float
    kld_mean: float | None
    kld_error: float | None
    kld_99: float | None
    same_top: float | None
    decode_tps: float
    kld: np.ndarray | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("kld")
        return d


def parse_spec(spec: str) -> tuple[str, str]:
    """'NAME=SOURCE' or 'SOURCE' (named after its file or folder)."""
    if "=" in spec and "/" not in spec.split("=", 1)[0]:
        name, src = spec.split("=", 1)
        return name, src
    return Path(spec.rstrip("/")).name or spec, spec


def stored_bits(folder) -> tuple[float, float]:
    """(bits per weight, GB) of the weights a model folder stores (packed ints, scales and biases counted)."""
    from ..inspect import inspect_path

    rep = inspect_path(folder)
    params = sum(g.params for g in rep.groups)
    nbytes = sum(g.bytes for g in rep.groups)
    return 8 * nbytes / max(params, 1), nbytes / 1e9


def decode_speed(model, prompt: np.ndarray, n: int, kv_bits=None, kv_group_size: int = 64) -> float:
    """Greedy decode tokens/s after the prompt (the first token, made by the prefill, is not counted)."""
    from ..generate import generate_step

    if n < 2:
        return float("nan")
    t0 = None
    for i, _ in enumerate(generate_step(mx.array(prompt), model, max_tokens=n, kv_bits=kv_bits,
                                        kv_group_size=kv_group_size)):
        if i == 0:
            t0 = time.perf_counter()
    return (n - 1) / (time.perf_counter() - t0)


def _load(source, dtype, widen):
    from .. import load
    from ..models_cache import resolve_model

    folder = resolve_model(source)
    before = mx.get_active_memory()
    model, tok = load(folder, dtype=dtype, widen=widen)
    mx.eval(model.parameters())
    return model, tok, folder, (mx.get_active_memory() - before) / 1e9


def _free():
    gc.collect()
    mx.clear_cache()


def compare(models: list[str], ids, *, ref: str | None = None, ref_logits=None, context: int = 2048,
            stride: int | None = None, kv_bits: tuple = (), kv_group_size: int = 64, decode_tokens: int = 32,
            logits_top_k: int = 0, dtype=None, widen=None, chunk: int = 256, progress: bool = False, log=print,
            save_ref_logits=None) -> list[Row]:
    """Rows for the reference (if a model) and for each model x (float KV, each of ``kv_bits``).
    ``save_ref_logits``: keep the reference model's logits file there (else a temporary file), for later runs."""
    from .kld import kl_divergence
    from .perplexity import perplexity

    if (ref is None) == (ref_logits is None):
        raise ValueError("give a reference model or a reference logits file (one of them)")
    rows, tmp = [], None
    if ids is None:
        ids = _tokens_of(ref_logits)
    prompt = np.asarray(ids, np.int32)[:16]
    try:
        if ref is not None:
            name, src = parse_spec(ref)
            log(f"reference {name}: scoring the text")
            model, tok, folder, wgb = _load(src, dtype, widen)
            if save_ref_logits is None:
                tmp = tempfile.TemporaryDirectory(prefix="mlx-gemma-compare-")
            ref_logits = Path(save_ref_logits or Path(tmp.name) / "reference.logits")
            p = perplexity(model, ids, context=context, stride=stride, chunk=chunk,
                           save_logits=ref_logits, logits_top_k=logits_top_k, progress=progress)
            if p.interrupted:
                raise KeyboardInterrupt
            bpw, sgb = stored_bits(folder)
            rows.append(Row(name, src, None, bpw, sgb, wgb, p.peak_memory_gb, p.ppl, p.ppl_error, None, None, None,
                            None, decode_speed(model, prompt, decode_tokens)))
            del model
            _free()
        for spec in models:
            name, src = parse_spec(spec)
            model, tok, folder, wgb = _load(src, dtype, widen)  # once per model: KV variants share it
            bpw, sgb = stored_bits(folder)
            for bits in (None, *kv_bits):
                label = name if bits is None else f"{name}, KV {bits}-bit"
                log(f"{label}: scoring the text")
                k = kl_divergence(model, ids, ref_logits=ref_logits, chunk=chunk,
                                  kv_bits=bits, kv_group_size=kv_group_size, progress=progress)
                s = k.stats
                rows.append(Row(label, src, bits, bpw, sgb, wgb, k.peak_memory_gb, s.ppl, s.ppl_error, s.kld_mean,
                                s.kld_error, s.kld_percentiles["99"], s.same_top,
                                decode_speed(model, prompt, decode_tokens, bits, kv_group_size), k.kld))
                if k.interrupted:
                    raise KeyboardInterrupt
            del model
            _free()
    except KeyboardInterrupt:
        log(f"interrupted: {len(rows)} rows done")
    finally:
        if tmp is not None:
            tmp.cleanup()
    return rows


def _tokens_of(ref_logits) -> np.ndarray:
    from .reference import LogitsFile

    f = LogitsFile(ref_logits)
    f.close()
    return f.ids


def format_table(rows: list[Row]) -> str:
    """A Markdown table; the reference's KLD columns are empty."""
    out = ["| model | bits/weight | stored GB | weights in memory GB | peak GB | perplexity | mean KLD | "
           "99% KLD | same top | decode tok/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        k = "—" if r.kld_mean is None else f"{r.kld_mean:.5f} ± {r.kld_error:.5f}"
        out.append(f"| {r.name} | {r.bits_per_weight:.2f} | {r.stored_gb:.3f} | {r.weights_gb:.3f} | {r.peak_gb:.2f} | "
                   f"{r.ppl:.3f} ± {r.ppl_error:.3f} | {k} | {'—' if r.kld_99 is None else f'{r.kld_99:.4f}'} | "
                   f"{'—' if r.same_top is None else f'{100 * r.same_top:.2f}%'} | {r.decode_tps:.2f} |")
    return "\n".join(out)


def plot(rows: list[Row], path, title: str = "") -> None:
    """Two panels: the distribution of per-token KLD per model (log scale), and perplexity vs bits per weight."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("the plot needs matplotlib: pip install 'mlx-gemma-qat[plot]'") from None
    fig, (a, b) = plt.subplots(1, 2, figsize=(14, 5.5))
    for i, r in enumerate(rows):  # one colour per row in both panels
        color = f"C{i % 10}"
        if r.kld is not None:
            x = np.sort(np.maximum(r.kld, 1e-7))
            a.plot(x, np.arange(1, x.size + 1) / x.size, color=color, linestyle=("-", "--", "-.", ":")[i % 4],
                   label=f"{r.name} (mean {r.kld_mean:.4f})")  # dashes keep identical curves apart
        b.errorbar(r.bits_per_weight, r.ppl, yerr=r.ppl_error, fmt="*" if r.kld is None else "o", color=color,
                   ms=12 if r.kld is None else 7, capsize=3, label=r.name)
    a.set_xscale("log")
    a.set_xlabel("per-token KL divergence from the reference (nats, log scale; 1e-7 and below at 1e-7)")
    a.set_ylabel("fraction of tokens at or below")
    a.set_title("KLD distribution (further left is closer)")
    a.grid(alpha=0.3)
    a.legend(fontsize=8)
    b.legend(fontsize=8)
    b.set_xlabel("bits per weight (all weights, as stored)")
    b.set_ylabel("perplexity")
    b.set_title("perplexity vs size (* = reference)")
    b.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
