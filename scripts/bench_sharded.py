#!/usr/bin/env python3
"""One process against a model split over 2 local ranks (``mlx.launch -n 2 --backend ring``), same machine, same run.

For each of 1 process, 2-rank tensor parallel and 2-rank pipeline parallel, ``mlx-gemma generate`` runs greedy
with the same prompt (the embedded Gemma 3 270M by default) and reports its prefill and decode tok/s, the weight
memory of each rank (``--stats``: MLX active memory after load) and the bytes its ranks exchange per decoded
token, counted from the shapes each collective moves (model/shard.py):

- tensor: two ``all_sum`` of one hidden state per layer (attention, MLP), one of a token's embedding row, and the
  head's ``all_gather`` of the vocabulary's logits;
- pipeline: one hidden state per rank boundary and back to rank 0, and one ``all_sum`` of the logits.

A ring ``all_sum`` of B bytes over N ranks sends 2(N-1)/N * B per rank; an all_gather (N-1)/N * B. The figures
are per rank sent. On this machine both ranks share its cores and talk over loopback TCP: the ratios say what
splitting costs when compute is shared, not what two Macs gain (each with its own GPU and memory bandwidth).

    python scripts/bench_sharded.py                 # the 270M, 64-token prompt, 32 tokens
    python scripts/bench_sharded.py -m MODEL --prompt-tokens 128 --max-tokens 64
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from launcher import ring_port  # noqa: E402  (the tests' helper: consecutive free ports for the ring's ranks)


def generate(args, mode: str | None) -> dict:
    mlx_gemma = shutil.which("mlx-gemma", path=str(BIN)) or "mlx-gemma"
    prompt = " ".join(["one two three four five six seven eight"] * (args.prompt_tokens // 8))
    cmd = [mlx_gemma, "generate", "--prompt", prompt, "-n", str(args.max_tokens), "--stats", "--raw"]
    if args.model:
        cmd += ["-m", args.model]
    if mode:
        cmd = [str(BIN / "mlx.launch"), "-n", "2", "--backend", "ring", "--starting-port", str(ring_port(2)), "--",
               *cmd, "--shard", mode]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    out = p.stdout + p.stderr
    m = re.search(r"Prompt: (\d+) tokens, ([\d.]+) tokens-per-sec\nGeneration: (\d+) tokens, ([\d.]+)", out)
    if p.returncode or not m:
        sys.exit(f"{' '.join(cmd[:8])} ... failed:\n{out[-3000:]}")
    w = re.search(r"Weights per rank \(.*\): ([\d., ]+) MiB", out)
    weights = [float(v) for v in w.group(1).split(",")] if w else None
    return {"prompt": int(m.group(1)), "prefill": float(m.group(2)), "decode": float(m.group(4)),
            "weights": weights, "wall": time.perf_counter() - t0}


def one_process_weights(model) -> float:
    """MiB of the whole model held in one process (MLX active memory after load)."""
    code = ("import mlx.core as mx, sys; from mlx_gemma_qat import load; m = load(sys.argv[1] if len(sys.argv) > 1 "
            "else None); print(mx.get_active_memory() / 2**20)")
    p = subprocess.run([sys.executable, "-c", code, *([model] if model else [])], capture_output=True, text=True,
                       check=True)
    return float(p.stdout.strip().splitlines()[-1])


def bytes_per_token(model, mode: str, size: int = 2) -> int:
    """Bytes each rank sends per decoded token (float32 activations, the CPU's compute dtype)."""
    from mlx_gemma_qat.model.config import TextConfig
    from mlx_gemma_qat.model.load import read_config
    from mlx_gemma_qat.models_cache import resolve_model

    config = read_config(resolve_model(model))
    cfg = TextConfig.from_dict(config.get("text_config", config))
    h, v, f = cfg.hidden_size, cfg.vocab_size, 4
    ring_sum = 2 * (size - 1) / size
    if mode == "tensor":
        chunk = -(-v // size)
        return int(ring_sum * f * h * (2 * cfg.num_hidden_layers + 1) + (size - 1) / size * f * chunk * size)
    return int(f * h + ring_sum * f * v)  # each rank hands one hidden state on (the last back to 0); the logits


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-m", "--model", default=None, help="default: the embedded Gemma 3 270M")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    if args.model:  # converted once before anything is timed (the embedded model: by the first load below)
        subprocess.run([str(BIN / "mlx-gemma"), "pull", args.model], check=True, capture_output=True)
    whole = one_process_weights(args.model)
    rows = {"1 process": generate(args, None)}
    for mode in ("tensor", "pipeline"):
        rows[f"2 ranks, {mode}"] = generate(args, mode)
    base = rows["1 process"]
    print(f"model: {args.model or 'embedded Gemma 3 270M'}; prompt {base['prompt']} tokens, {args.max_tokens} "
          f"generated, greedy, float32 on {sys.platform}; one machine, ranks over loopback TCP")
    print(f"one process holds {whole:.1f} MiB of weights")
    print("| run | prefill tok/s | decode tok/s | prefill vs 1 | decode vs 1 | weights per rank (MiB, share of 1) "
          "| bytes sent per token per rank |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        mode = name.split(", ")[-1] if "ranks" in name else None
        weights = ", ".join(f"{w:.1f} ({w / whole:.2f})" for w in r["weights"]) if r["weights"] else f"{whole:.1f}"
        sent = f"{bytes_per_token(args.model, mode):,}" if mode else "0"
        print(f"| {name} | {r['prefill']:.1f} | {r['decode']:.2f} | {r['prefill'] / base['prefill']:.2f}x "
              f"| {r['decode'] / base['decode']:.2f}x | {weights} | {sent} |")


if __name__ == "__main__":
    main()
