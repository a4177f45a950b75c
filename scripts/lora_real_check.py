"""Dev check, end to end on the real Gemma 3 270M in Google's QAT layout (F16 embedding + Q4_0 linears):
train a group-pooled adapter on a public text, fuse it, export the GGUF, and compare greedy tokens of the
runtime adapter, the fused MLX folder, and llama.cpp on the exported GGUF (scripts/check_gguf_export.py,
llama-cpp-python in the dev venv /work/devenv).

    .venv/bin/python scripts/lora_real_check.py WORKDIR [--iters 8] [-n 24]

Results are in scripts/lora_real_check_results.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "tests" / "fixtures" / "texts" / "GPL-3"  # committed, see its README
PROMPTS = ["The GNU General Public License is", "You may convey verbatim copies"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--length", type=int, default=64, help="tokens per training record")
    ap.add_argument("-n", type=int, default=24, help="greedy tokens per prompt")
    ap.add_argument("--valid", type=int, default=6, help="held-out records (every fifth record of the text)")
    ap.add_argument("--learning-rate", type=float, default=5e-5)
    args = ap.parse_args()
    from mlx_gemma_qat import load
    from mlx_gemma_qat.convert import convert
    from mlx_gemma_qat.convert.to_gguf import export_gguf
    from mlx_gemma_qat.generate import generate_step
    from mlx_gemma_qat.lora import finetune
    from mlx_gemma_qat.lora.fuse import fuse, summary

    w = args.workdir
    w.mkdir(parents=True, exist_ok=True)
    from check_gguf_export import real_qat_gguf  # this script's folder is on sys.path

    gguf_path = real_qat_gguf()
    folder = w / "qat"
    if not folder.exists():
        convert(gguf_path, folder, progress=False)
    _, tok = load(folder)
    ids = tok.encode(TEXT.read_text(), add_special_tokens=False)
    data = w / "data"
    data.mkdir(exist_ok=True)
    n = args.length
    chunks = [tok.decode(ids[i * n:(i + 1) * n]) for i in range(len(ids) // n)]
    held = [c for i, c in enumerate(chunks) if i % 5 == 4][: args.valid]  # every fifth record held out
    train = [c for i, c in enumerate(chunks) if i % 5 != 4][: 2 * args.iters]
    for name, rows in (("train", train), ("valid", held)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    t0 = time.time()
    r = finetune(folder, data, w / "adapter", adapter=dict(kind="pooled"),
                 train_config=dict(iters=args.iters, batch_size=2, learning_rate=args.learning_rate, val_every=0, save_every=0,
                                   report_every=1), progress=False, log=lambda *a: None)
    print(f"trained {r.steps} steps in {time.time() - t0:.0f} s: validation loss {r.first_val_loss:.4f} -> "
          f"{r.val_loss:.4f}, {r.tokens_per_s:.2f} tokens/s, peak {r.peak_memory_gb:.2f} GB")
    report = fuse(folder, w / "adapter", w / "fused", force=True, progress=False)
    print(summary(report))
    rep = export_gguf(w / "fused", w / "fused.gguf", base_gguf=gguf_path, force=True, progress=False)
    print("GGUF export:", rep["counts"], "exact:", rep["exact"])
    runtime, _ = load(folder, adapter_path=w / "adapter")
    fused, _ = load(w / "fused")
    for p in PROMPTS:
        x = mx.array(tok.encode(p))
        a = [t for t, _ in generate_step(x, runtime, max_tokens=args.n)]
        b = [t for t, _ in generate_step(x, fused, max_tokens=args.n)]
        print(f"{p!r}: runtime adapter vs fused MLX folder: {'EQUAL' if a == b else 'DIFFER'}: {tok.decode(a)!r}")
    del runtime, fused
    for p in PROMPTS:
        subprocess.run([sys.executable, str(ROOT / "scripts" / "check_gguf_export.py"), str(w / "fused"),
                        str(w / "fused.gguf"), "--prompt", p, "-n", str(args.n)], check=False)


if __name__ == "__main__":
    main()
