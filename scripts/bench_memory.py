#!/usr/bin/env python3
"""Memory at the stored size: weights held, peak while generating and KV bytes, ours against mlx-lm.

On the embedded Gemma 3 270M in both layouts people download: the Q4_K_M mix as shipped (Q8_0 embedding,
Q5_0/Q8_0/Q4_K/Q6_K linears) and Google's QAT layout (token_embd F16, every linear Q4_0; made from the same
file by scripts/make_qat_layout.py, what llama.cpp's quantizer makes). Each measurement runs in its own
process (MLX's allocator counts from zero):

* ours, three ways: the bfloat16 path (the GPU/Mac default: every tensor at its stored precision), the
  CPU with ``--no-widen`` (float32 compute, stored precision) and the CPU default (float32, widened);
* mlx-lm 0.32 on the very same converted folder (``mlx_lm.load`` reads it), at its defaults;
* decode speed of ours (CPU default and --no-widen) against mlx-lm's float32 group-32 re-quantization of the
  same weights (``mlx_lm.convert -q --q-group-size 32 --dtype float32`` of our dequantized form), alternated;
* perplexity of the bfloat16 path against float32 (GPL-3, first --ppl-tokens tokens);
* KV cache bytes held against the theory (sliding layers x window + global layers x context) at 8K and 32K
  tokens, float and --kv-bits 8/4, filling the caches of the 270M's geometry directly;
* llama.cpp's own reported buffer sizes when ``--llama-python`` names a Python with llama-cpp-python.

    python scripts/bench_memory.py [--workdir DIR] [--quick] [--llama-python /path/to/python]

Targets (issue 7): quantized linears <= 1.12x their GGUF bytes and F16 tensors 1.00x on the bfloat16 path;
peak while generating <= weights + KV + 10%; decode on this CPU not slower than before (the CPU default path
is the previous one) relative to mlx-lm g32-f32.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import gpl3_ids, run  # noqa: E402

PY = sys.executable
PROMPT_IDS = [2, 818, 5279, 529, 7001, 563]  # <bos>The capital of France is
MIB = 2**20


# ---------------------------------------------------------------- workers (one process each)


def _ggml_bytes(gguf_path: str) -> dict:
    import gguf

    r = gguf.GGUFReader(gguf_path)
    lin = sum(int(t.n_bytes) for t in r.tensors if t.name.startswith("blk.") and t.tensor_type.name not in ("F32", "F16"))
    f16 = {t.name: int(t.n_bytes) for t in r.tensors if t.tensor_type.name in ("F16", "BF16")}
    return {"linears": lin, "f16": f16}


def worker_ours(folder: str, gguf_path: str, dtype: str, widen: bool, n: int) -> dict:
    import gguf
    import mlx.core as mx

    from mlx_gemma_qat.generate import generate_step
    from mlx_gemma_qat.model.cache import cache_nbytes
    from mlx_gemma_qat.model.load import load_model
    from mlx_gemma_qat.model.quantized import QuantizedLinear

    base = mx.get_active_memory()
    model = load_model(folder, dtype=dtype, widen=widen)
    weights = mx.get_active_memory() - base
    lin = sum(m.weight.nbytes + m.scales.nbytes + m.biases.nbytes
              for _, m in model.named_modules() if isinstance(m, QuantizedLinear))
    src = _ggml_bytes(gguf_path)
    out = {"weights": weights, "linears": lin, "gguf_linears": src["linears"]}
    emb = model.model.embed_tokens
    if "token_embd.weight" in src["f16"]:
        t = next(t for t in gguf.GGUFReader(gguf_path).tensors if t.name == "token_embd.weight")
        out["f16_ratio"] = emb.weight.nbytes / src["f16"]["token_embd.weight"]
        out["f16_exact"] = bool(np.array_equal(np.array(emb.weight.astype(mx.float32)),
                                               np.asarray(t.data).astype(np.float32)))
    cache = model.make_cache()
    mx.reset_peak_memory()
    steps, t0 = 0, None
    for i, _ in enumerate(generate_step(mx.array(PROMPT_IDS), model, max_tokens=n, cache=cache)):
        if i == 0:
            t0 = time.perf_counter()
        steps = i
    out["decode"] = steps / (time.perf_counter() - t0)
    out["peak"] = mx.get_peak_memory() - base
    out["kv"] = cache_nbytes(cache)
    return out


def worker_mlxlm(folder: str, n: int) -> dict:
    import mlx.core as mx
    import mlx_lm

    base = mx.get_active_memory()
    model, tok = mlx_lm.load(folder)
    weights = mx.get_active_memory() - base
    mx.reset_peak_memory()
    last = None
    for last in mlx_lm.stream_generate(model, tok, PROMPT_IDS, max_tokens=n):
        pass
    return {"weights": weights, "peak": mx.get_peak_memory() - base, "decode": last.generation_tps}


def worker_ppl(folder: str, dtype: str, ids_file: str) -> dict:
    from mlx_gemma_qat.model.load import load_model
    from mlx_gemma_qat.evaluate.scoring import token_nll

    t0 = time.perf_counter()
    nll = token_nll(load_model(folder, dtype=dtype), np.load(ids_file), 256)
    return {"ppl": math.exp(float(nll.mean())), "seconds": time.perf_counter() - t0}


def worker_kv(folder: str) -> dict:
    """Fill the caches of the model's geometry to 8K and 32K tokens; bytes held against the theory."""
    import mlx.core as mx

    from bench_kv import kv_bytes
    from mlx_gemma_qat.model.config import TextConfig

    cfg = TextConfig.from_dict(json.loads((Path(folder) / "config.json").read_text()))
    rows = []
    for dtype, nb in (("float32", 4), ("bfloat16", 2)):
        for bits in (None, 8, 4):
            for ctx in (8192, 32768):
                held, _ = kv_bytes(cfg, ctx, bits, 64, getattr(mx, dtype))
                rows.append({"dtype": dtype, "bits": bits, "context": ctx, "held": held,
                             "theory": cfg.kv_cache_bytes(ctx, nb, bits, 64)})
    return {"rows": rows}


def worker_llama(gguf_path: str) -> dict:
    """llama.cpp's own figures: model buffer and KV cache sizes from its log (llama-cpp-python)."""
    import contextlib
    import io
    import os
    import re
    import tempfile

    from llama_cpp import Llama

    buf = io.StringIO()  # llama-cpp-python logs through Python's sys.stderr, llama.cpp itself to fd 2
    with tempfile.TemporaryFile("w+") as f:
        fd = os.dup(2)
        os.dup2(f.fileno(), 2)
        try:
            with contextlib.redirect_stderr(buf):
                Llama(gguf_path, n_ctx=8192, n_threads=1, verbose=True)
        finally:
            os.dup2(fd, 2)
        f.seek(0)
        log_text = f.read() + buf.getvalue()

    def total(rx):
        return sum(float(m) for m in re.findall(rx, log_text))

    return {"model_mib": total(r"model buffer size =\s+([\d.]+) MiB"), "kv_mib_8k": total(r"KV buffer size =\s+([\d.]+) MiB"),
            "compute_mib": total(r"compute buffer size =\s+([\d.]+) MiB")}


WORKERS = {"ours": worker_ours, "mlxlm": worker_mlxlm, "ppl": worker_ppl, "kv": worker_kv, "llama": worker_llama}


def child(kind: str, *args, python: str = PY) -> dict:
    text, wall, rss = run([python, __file__, "--_worker", kind, json.dumps(list(args))])
    res = json.loads(text.strip().splitlines()[-1])
    res["rss"] = rss
    return res


# ---------------------------------------------------------------- preparation and report


def prepare(work: Path) -> dict[str, Path]:
    from mlx_gemma_qat.models_cache import default_gguf

    work.mkdir(parents=True, exist_ok=True)
    p = {"q4km_gguf": Path(default_gguf()), "qat_gguf": work / "gemma3-270m-qat-layout.gguf"}
    if not p["qat_gguf"].is_file():
        run([PY, str(Path(__file__).with_name("make_qat_layout.py")), "-o", str(p["qat_gguf"])])
    for name in ("q4km", "qat"):
        p[name] = work / f"ours-{name}"
        if not (p[name] / "config.json").is_file():
            run(["mlx-gemma", "convert", str(p[f"{name}_gguf"]), "-o", str(p[name]), "--quiet", "--force"])
    hf, g32 = work / "hf-q4km", work / "mlxlm-g32-f32-q4km"
    if not (hf / "config.json").is_file():
        run(["mlx-gemma", "convert", str(p["q4km_gguf"]), "-o", str(hf), "--dequantize", "--quiet", "--force"])
    if not (g32 / "config.json").is_file():
        run([PY, "-m", "mlx_lm", "convert", "--hf-path", str(hf), "--mlx-path", str(g32), "-q", "--q-group-size", "32",
             "--dtype", "float32"])
    p["mlxlm_g32"] = g32
    return p


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=str(Path.home() / ".cache" / "mlx_gemma_qat" / "bench-memory"))
    ap.add_argument("--tokens", type=int, default=32, help="tokens generated per memory/speed run")
    ap.add_argument("--repeats", type=int, default=3, help="alternated decode runs per system")
    ap.add_argument("--ppl-tokens", type=int, default=512)
    ap.add_argument("--quick", action="store_true", help="1 decode repeat, 256-token perplexity")
    ap.add_argument("--llama-python", default=None, help="a Python with llama-cpp-python, for llama.cpp's sizes")
    ap.add_argument("--_worker", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._worker:
        print(json.dumps(WORKERS[a._worker[0]](*json.loads(a._worker[1]))))
        return
    if a.quick:
        a.repeats, a.ppl_tokens = 1, 256
    import mlx.core as mx
    import mlx_lm

    work = Path(a.workdir)
    p = prepare(work)
    out = [f"# bench_memory ({time.strftime('%Y-%m-%d')}, mlx {mx.__version__}, mlx-lm {mlx_lm.__version__}, "
           f"MLX CPU backend, 2-core x86-64; {a.tokens} tokens generated per run)", ""]

    out += ["## Weights and peak memory (MiB; each row its own process)", "",
            "| layout | system | weights | quantized linears / GGUF bytes | F16 embedding / GGUF bytes (bit-exact) "
            "| peak while generating | peak / (weights + KV) | decode tok/s |", "|---|---|---|---|---|---|---|---|"]
    ours_runs = {}
    for layout in ("qat", "q4km"):
        for label, dtype, widen in (("ours, bfloat16 path (stored)", "bfloat16", False),
                                    ("ours, CPU --no-widen (stored)", "float32", False),
                                    ("ours, CPU default (widened)", "float32", True)):
            r = child("ours", str(p[layout]), str(p[f"{layout}_gguf"]), dtype, widen, a.tokens)
            ours_runs[(layout, label)] = r
            f16 = f"{r['f16_ratio']:.2f}x ({'yes' if r['f16_exact'] else 'NO'})" if "f16_ratio" in r else "— (Q8_0)"
            out.append(f"| {layout} | {label} | {r['weights'] / MIB:.1f} | {r['linears'] / r['gguf_linears']:.3f}x | {f16} "
                       f"| {r['peak'] / MIB:.1f} | {r['peak'] / (r['weights'] + r['kv']):.3f} | {r['decode']:.2f} |")
        m = child("mlxlm", str(p[layout]), a.tokens)
        out.append(f"| {layout} | mlx-lm {mlx_lm.__version__}, same folder, its defaults | {m['weights'] / MIB:.1f} | | "
                   f"| {m['peak'] / MIB:.1f} | | {m['decode']:.2f} |")
    src_sizes = {k: Path(p[f"{k}_gguf"]).stat().st_size / MIB for k in ("qat", "q4km")}
    out += ["", "GGUF files: " + ", ".join(f"{k} {v:.1f} MiB" for k, v in src_sizes.items())]

    if a.llama_python:
        out += ["", "## llama.cpp's own sizes (its log, n_ctx 8192)", ""]
        for layout in ("qat", "q4km"):
            try:
                r = child("llama", str(p[f"{layout}_gguf"]), python=a.llama_python)
                out.append(f"- {layout}: model buffers {r['model_mib']:.1f} MiB (mapped file + CPU repack), KV buffers "
                           f"{r['kv_mib_8k']:.1f} MiB at 8K (f16; its sliding layers keep a full-size cache by default), "
                           f"compute buffer {r['compute_mib']:.1f} MiB")
            except (RuntimeError, subprocess.SubprocessError) as e:
                out.append(f"- {layout}: llama.cpp run failed: {str(e).splitlines()[0]}")

    out += ["", f"## Decode speed on this CPU, alternated {a.repeats}x (Q4_K_M mix; ratios to mlx-lm g32-f32 of the "
            "same weights)", "", "| system | decode tok/s (median) | runs | ratio |", "|---|---|---|---|"]
    speeds = {"ours CPU default": [], "ours --no-widen": [], "mlx-lm g32-f32": []}
    for _ in range(a.repeats):
        speeds["ours CPU default"].append(child("ours", str(p["q4km"]), str(p["q4km_gguf"]), "float32", True, a.tokens)["decode"])
        speeds["ours --no-widen"].append(child("ours", str(p["q4km"]), str(p["q4km_gguf"]), "float32", False, a.tokens)["decode"])
        speeds["mlx-lm g32-f32"].append(child("mlxlm", str(p["mlxlm_g32"]), a.tokens)["decode"])
    peer = statistics.median(speeds["mlx-lm g32-f32"])
    for k, v in speeds.items():
        out.append(f"| {k} | {statistics.median(v):.2f} | {', '.join(f'{x:.2f}' for x in v)} | "
                   f"{statistics.median(v) / peer:.2f}x |")

    out += ["", f"## Perplexity, bfloat16 path vs float32 (GPL-3, first {a.ppl_tokens} tokens)", "",
            "| layout | float32 | bfloat16 | change |", "|---|---|---|---|"]
    ids_file = work / f"gpl3-{a.ppl_tokens}.npy"
    np.save(ids_file, gpl3_ids(p["q4km"], a.ppl_tokens))
    for layout in ("q4km", "qat"):
        f32 = child("ppl", str(p[layout]), "float32", str(ids_file))["ppl"]
        bf = child("ppl", str(p[layout]), "bfloat16", str(ids_file))["ppl"]
        out.append(f"| {layout} | {f32:.3f} | {bf:.3f} | {100 * (bf / f32 - 1):+.2f}% |")

    out += ["", "## KV cache bytes held vs theory (270M geometry: 15 sliding layers x window 512 + 3 global x context)",
            "", "| cache dtype | kv-bits | context | held MiB | theory MiB | held / theory |", "|---|---|---|---|---|---|"]
    try:
        for r in child("kv", str(p["q4km"]))["rows"]:
            out.append(f"| {r['dtype']} | {r['bits'] or '—'} | {r['context']} | {r['held'] / MIB:.2f} | "
                       f"{r['theory'] / MIB:.2f} | {r['held'] / r['theory']:.3f} |")
    except RuntimeError as e:
        out.append(f"(KV measurement failed: {str(e).splitlines()[0]})")
    print("\n".join(out))


if __name__ == "__main__":
    main()
