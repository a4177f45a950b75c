"""Quantized KV cache on the real embedded Gemma 3 270M: perplexity and KV bytes.

1. Perplexity over a text longer than the sliding window (default: the first 1,024 tokens of
   tests/fixtures/texts/GPL-3; the 270M's window is 512) with the float cache and with the cache
   quantized at 8 and 4 bits (group 64, and group 32 at 4 bits), evaluated in 256-token chunks through the
   cache, so every sliding layer's rotating cache wraps.
2. KV cache bytes at 8K and 32K context, float and quantized, in float32 (the CPU compute dtype) and
   bfloat16 (the GPU one): what the caches allocate (``cache_nbytes``, fed with random keys of the model's
   geometry), what MLX's active memory grew by, and the theory (local layers x window + global layers x
   context, at the bits plus a scale and a bias per group).

    .venv/bin/python scripts/bench_kv.py [--tokens 1024] [--text FILE] [--out scripts/bench_kv_results.md]
"""

from __future__ import annotations

import argparse
import gc
import math
import platform
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlx_gemma_qat import load  # noqa: E402
from mlx_gemma_qat.model.cache import cache_nbytes, make_cache  # noqa: E402
from mlx_gemma_qat.evaluate.scoring import token_nll  # noqa: E402

SETTINGS = [(None, 64), (8, 64), (4, 64), (4, 32)]


def label(bits, gs):
    return "float" if bits is None else f"{bits}-bit g{gs}"


def perplexities(model, ids):
    rows, base = [], None
    for bits, gs in SETTINGS:
        t = time.perf_counter()
        nll = token_nll(model, ids, chunk=256, kv_bits=bits, kv_group_size=gs)
        dt = time.perf_counter() - t
        ppl = math.exp(float(nll.mean()))
        if base is None:
            base = nll
        rows.append((label(bits, gs), ppl, nll, dt))
        print(f"  {label(bits, gs)}: perplexity {ppl:.4f} ({dt:.0f} s)", file=sys.stderr, flush=True)
    return rows, base


def kv_bytes(cfg, context, bits, gs, dtype):
    """Feed every layer's cache ``context`` random keys/values (in 4096-token chunks); return (allocated,
    MLX active-memory growth)."""
    gc.collect()
    mx.clear_cache()
    before = mx.get_active_memory()
    cache = make_cache(cfg, bits, gs)
    chunk = 4096
    for start in range(0, context, chunk):
        n = min(chunk, context - start)
        k = mx.random.normal((1, cfg.num_key_value_heads, n, cfg.head_dim)).astype(dtype)
        for c in cache:
            c.update_and_fetch(k, k)
        mx.eval([c.state for c in cache])
        del k
    gc.collect()
    mx.clear_cache()
    held = mx.get_active_memory() - before
    n = cache_nbytes(cache)
    del cache
    return n, held


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", default=str(Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "texts" / "GPL-3"))
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--out", default=None, help="Also write the report (markdown) here.")
    args = ap.parse_args()

    model, tok = load()
    cfg = model.cfg
    ids = [tok.bos_token_id] + tok.encode(Path(args.text).read_text(), add_special_tokens=False)
    ids = ids[: args.tokens]
    print(f"perplexity over {len(ids)} tokens (window {cfg.sliding_window})", file=sys.stderr, flush=True)
    rows, base = perplexities(model, ids)

    out = []
    out.append("# Quantized KV cache: real embedded Gemma 3 270M\n")
    out.append(f"mlx {mx.__version__}, {platform.machine()} {platform.system()}, device {mx.default_device()}, "
               f"compute {model.model.compute_dtype}; `python scripts/bench_kv.py`\n")
    out.append(f"## Perplexity, first {len(ids)} tokens of {Path(args.text).name} (sliding window "
               f"{cfg.sliding_window}; 256-token chunks through the cache)\n")
    out.append("| KV cache | perplexity | change vs float | mean abs change of token NLL | max abs change | time |")
    out.append("|---|---|---|---|---|---|")
    p0 = rows[0][1]
    for name, ppl, nll, dt in rows:
        d = np.abs(nll - base)
        out.append(f"| {name} | {ppl:.4f} | {100 * (ppl / p0 - 1):+.2f}% | {d.mean():.4f} | {d.max():.4f} | {dt:.0f} s |")
    # the part past the window only
    w = cfg.sliding_window
    tail = [math.exp(float(nll[w:].mean())) for _, _, nll, _ in rows]
    out.append(f"\nTokens past the window only (positions {w + 1}-{len(ids) - 1}): "
               + ", ".join(f"{r[0]} {p:.4f} ({100 * (p / tail[0] - 1):+.2f}%)" for r, p in zip(rows, tail)) + "\n")

    n_sliding = sum(cfg.is_sliding(i) for i in range(cfg.num_hidden_layers))
    out.append(f"## KV cache bytes ({cfg.num_hidden_layers} layers: {n_sliding} sliding x window "
               f"{cfg.sliding_window}, {cfg.num_hidden_layers - n_sliding} global x context; {cfg.num_key_value_heads} "
               f"kv head x head_dim {cfg.head_dim}; scales and biases in the cache dtype)\n")
    out.append("| context | cache dtype | KV cache | allocated (MiB) | MLX active growth (MiB) | theory (MiB) | allocated / theory |")
    out.append("|---|---|---|---|---|---|---|")
    mib = 2**20
    for context in (8192, 32768):
        for dtype, size in ((mx.float32, 4), (mx.bfloat16, 2)):
            for bits, gs in ((None, 64), (8, 64), (4, 64)):
                n, held = kv_bytes(cfg, context, bits, gs, dtype)
                theory = cfg.kv_cache_bytes(context, size, bits, gs)
                out.append(f"| {context} | {str(dtype).split('.')[-1]} | {label(bits, gs)} | {n / mib:.2f} | "
                           f"{held / mib:.2f} | {theory / mib:.2f} | {n / theory:.4f} |")
                print(f"  kv {context} {dtype} {label(bits, gs)}: {n / mib:.2f} MiB (theory {theory / mib:.2f})",
                      file=sys.stderr, flush=True)
    report = "\n".join(out) + "\n"
    print(report)
    if args.out:
        Path(args.out).write_text(report)


if __name__ == "__main__":
    main()
