"""Constrained decoding on the real embedded Gemma 3 270M: its cost against free decoding, in one process.

1. Decode tokens/s of ``stream_generate`` free and under a JSON schema, the same raw prompt, greedy, the two
   alternated ``--runs`` times each (so drift on a shared machine hits both alike); the ratio constrained /
   free of the medians (goal: >= 0.9x; the next mask is computed while the model runs its forward).
2. The mask's own cost per token, replaying the constrained run's tokens through a fresh Matcher at the model's
   logits width: llguidance's mask (``Matcher.mask_words``), the whole ``apply`` on (1, width) logits (bits to
   a bool mask, ``where``; evaluated), and ``consume``, each timed apart; against the free decode step's time.
3. ``--server``: the server engine (``server.engine.Engine``) with 8 clients at once, half of them under the
   schema (``submit(..., matcher=...)``), against the same 8 all free: aggregate completion tokens/s and
   the ratio. (On the CPU the engine decodes one request after another.)

    .venv/bin/python scripts/bench_structured.py [--tokens 64] [--runs 3] [--server] [--out FILE]

Nothing here asserts a time: these are single runs on whatever machine this is; the ratios matter.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlx_gemma_qat import load, stream_generate  # noqa: E402
from mlx_gemma_qat.constrain import compile_constraint, logits_width  # noqa: E402
from mlx_gemma_qat.generate import encode_prompt  # noqa: E402

# An open-ended record (free strings, an unbounded array) so the model writes as long as a free run does.
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
        "licence": {"enum": ["GPL-3.0", "MIT", "Apache-2.0", "other"]},
        "points": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["title", "year", "licence", "points"],
    "additionalProperties": False,
}
PROMPT = ("The GNU General Public License is a free, copyleft license for software and other kinds of works. "
          "Describe it as a JSON record with a title, a year, a licence and many points:\n")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def decode_run(model, tok, n: int, constraint=None) -> tuple[float, int, str, list[int], str]:
    """One greedy generation: (decode tokens/s, tokens, finish reason, token ids, text)."""
    rs = list(stream_generate(model, tok, PROMPT, n, chat=False, constraint=constraint))
    return (rs[-1].generation_tps, rs[-1].generation_tokens, rs[-1].finish_reason, [r.token for r in rs],
            "".join(r.text for r in rs))


def decode_speed(model, tok, constraint, n: int, runs: int) -> dict:
    decode_run(model, tok, 4)  # warm-up: first-call allocations, the tokenizer's llguidance view
    decode_run(model, tok, 4, constraint)
    free, cons, last = [], [], None
    for i in range(runs):
        for kind, out in (("free", free), ("constrained", cons)):
            tps, k, finish, ids, text = decode_run(model, tok, n, constraint if kind == "constrained" else None)
            out.append(tps)
            log(f"run {i + 1}/{runs} {kind}: {k} tokens ({finish}), {tps:.2f} tok/s")
            if kind == "constrained":
                last = (ids, text, finish)
    return {"free": free, "constrained": cons, "ids": last[0], "text": last[1], "finish": last[2]}


def mask_costs(model, tok, constraint, ids: list[int]) -> dict:
    """Per token, replaying ``ids``: mask_words, apply (evaluated) and consume, each timed apart (seconds)."""
    width = logits_width(model)
    logits = mx.random.normal((1, width))
    mx.eval(logits)
    words_s, apply_s, consume_s = [], [], []
    m = constraint.matcher(tok, width)
    for t in ids:
        a = time.perf_counter()
        m.mask_words()
        b = time.perf_counter()
        mx.eval(m.apply(logits))  # computes the words again, then the bits and the where
        c = time.perf_counter()
        if t in tok.eos_token_ids:
            break
        m.consume(t)
        d = time.perf_counter()
        words_s.append(b - a)
        apply_s.append(c - b)
        consume_s.append(d - c)
    return {"mask_words": words_s, "apply": apply_s, "consume": consume_s}


def server_throughput(model, tok, constraint, *, clients: int = 8, constrained: int = 4, max_tokens: int = 32,
                      runs: int = 1) -> dict:
    """The server engine with ``clients`` requests at once, ``constrained`` of them under ``constraint``
    (``Engine.submit(..., matcher=...)``), against the same requests all free: aggregate completion tokens/s
    (all tokens / wall time from the first submit to the last event), per run, alternated."""
    from mlx_gemma_qat.server.engine import Engine, SamplingParams

    prompts = [encode_prompt(tok, f"{PROMPT}(record {i})", chat=False) for i in range(clients)]
    width = logits_width(model)

    def level(n_constrained: int, n: int = clients, tokens: int = max_tokens) -> tuple[float, list]:
        with Engine(model, tok, parallel=clients, cache_entries=0) as eng:
            matchers = [constraint.matcher(tok, width) if i < n_constrained else None for i in range(n)]
            t0 = time.perf_counter()
            handles = [eng.submit(ids, SamplingParams(max_tokens=tokens), matcher=mt)
                       for ids, mt in zip(prompts[:n], matchers)]
            results = []
            for h in handles:
                events = list(h)
                results.append(("".join(e.text for e in events), events[-1].finish_reason,
                                events[-1].usage.completion_tokens))
            wall = time.perf_counter() - t0
        return sum(r[2] for r in results) / wall, results

    out = {"free": [], "mixed": [], "mixed_results": None}
    level(1, n=2, tokens=2)  # warm-up
    for i in range(runs):
        for kind, k in (("free", 0), ("mixed", constrained)):
            tps, results = level(k)
            out[kind].append(tps)
            log(f"server run {i + 1}/{runs} {kind} ({k}/{clients} constrained): {tps:.2f} tok/s aggregate")
            if kind == "mixed":
                out["mixed_results"] = results
    return out


def ms(xs) -> str:
    return f"{1e3 * statistics.median(xs):.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model (default: the embedded Gemma 3 270M)")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per generation")
    ap.add_argument("--runs", type=int, default=3, help="alternated free/constrained runs")
    ap.add_argument("--server", action="store_true", help="also the engine with 8 clients, half constrained")
    ap.add_argument("--server-tokens", type=int, default=24, help="tokens per server request")
    ap.add_argument("--out", type=Path, default=None, help="also write the report there")
    args = ap.parse_args()

    t_start = time.perf_counter()
    model, tok = load(args.model)
    t = time.perf_counter()
    constraint = compile_constraint(json_schema=SCHEMA)
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    constraint.matcher(tok, logits_width(model))  # builds llguidance's view of the tokenizer (once per tokenizer)
    first_matcher_s = time.perf_counter() - t
    t = time.perf_counter()
    constraint.matcher(tok, logits_width(model))
    matcher_s = time.perf_counter() - t

    speed = decode_speed(model, tok, constraint, args.tokens, args.runs)
    free, cons = statistics.median(speed["free"]), statistics.median(speed["constrained"])
    costs = mask_costs(model, tok, constraint, speed["ids"])
    step_ms = 1e3 / free if free else float("nan")
    server = None
    if args.server:
        server = server_throughput(model, tok, constraint, max_tokens=args.server_tokens)

    lines = [
        "## Constrained decoding: real embedded Gemma 3 270M",
        "",
        f"mlx {mx.__version__}, {platform.machine()} {platform.system()}, device {mx.default_device()}, "
        f"`python scripts/bench_structured.py {' '.join(sys.argv[1:])}`".rstrip() + "; greedy, raw prompt of "
        f"{len(encode_prompt(tok, PROMPT, chat=False))} tokens, {args.tokens} new tokens, logits width "
        f"{logits_width(model):,}",
        "",
        "| decode | runs (tok/s) | median tok/s | vs free |",
        "|---|---|---|---|",
        f"| free | {', '.join(f'{x:.2f}' for x in speed['free'])} | {free:.2f} | 1.00x |",
        f"| JSON schema | {', '.join(f'{x:.2f}' for x in speed['constrained'])} | {cons:.2f} | "
        f"{cons / free:.2f}x (goal >= 0.9x) |",
        "",
        f"Constrained output ({speed['finish']}, {len(speed['ids'])} tokens): `{speed['text'][:160]}`",
        "",
        f"Per token over those {len(costs['apply'])} tokens (median ms; a free decode step takes {step_ms:.1f} ms):",
        "",
        "| step | median ms | max ms | share of a free step |",
        "|---|---|---|---|",
    ]
    for name, xs in costs.items():
        lines.append(f"| {name} | {ms(xs)} | {1e3 * max(xs):.3f} | "
                     f"{100 * statistics.median(xs) * 1e3 / step_ms:.1f}% |")
    lines += [
        "",
        f"Compile the schema: {1e3 * compile_s:.1f} ms; first Matcher (builds llguidance's tokenizer view, once per "
        f"tokenizer): {first_matcher_s:.2f} s; a later Matcher: {1e3 * matcher_s:.1f} ms.",
    ]
    if server is not None:
        f_, m_ = statistics.median(server["free"]), statistics.median(server["mixed"])
        replies = server["mixed_results"][:4]
        stopped = [text for text, finish, _ in replies if finish == "stop"]
        lines += [
            "",
            f"Server engine, 8 clients at once, {args.server_tokens} tokens each (decode_batch: the engine's "
            f"default on {mx.default_device()}): all free {f_:.2f} tok/s aggregate; 4 of 8 under the schema "
            f"{m_:.2f} tok/s ({m_ / f_:.2f}x). Of the 4 constrained replies, {len(stopped)} ended (valid JSON: "
            f"{sum(map(_is_json, stopped))}), {4 - len(stopped)} were cut at {args.server_tokens} tokens; e.g. "
            f"`{replies[0][0][:100]}`",
        ]
    lines += ["", f"Total wall time {time.perf_counter() - t_start:.0f} s."]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.write_text(report, encoding="utf-8")


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


if __name__ == "__main__":
    main()
