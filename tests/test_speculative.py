"""Speculative decoding (speculative.py): greedy output identical to plain decoding past the sliding window, in
every cache form and entry point; sampled output distributed as the target's (chi-square)."""

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import random_model, tiny_config

from mlx_gemma_qat import load, stream_generate
from mlx_gemma_qat.chat import ChatSession
from mlx_gemma_qat.cli import main
from mlx_gemma_qat.constrain import compile_constraint, logits_width
from mlx_gemma_qat.model.cache import trim_cache
from mlx_gemma_qat.prompt_cache import cache_prompt
from mlx_gemma_qat.sampling import Sampler
from mlx_gemma_qat.speculative import (
    DraftError,
    ModelDraft,
    PromptLookup,
    check_vocab,
    make_drafter,
    speculative_step,
)

IMAGES = Path(__file__).parent / "fixtures" / "images"
WINDOW = 16  # the tiny fixtures' sliding window


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    model, tok = load(tiny_folder)
    assert model.cfg.sliding_window == WINDOW
    return model, tok


@pytest.fixture(scope="module")
def poor():
    """A draft that shares the vocabulary and knows nothing: nearly every draft is rejected."""
    return random_model(tiny_config(vocab_size=512, sliding_window=8), seed=5)


def tokens_of(model, tok, prompt, n, **kw):
    rs = list(stream_generate(model, tok, prompt, n, **kw))
    return [r.token for r in rs], rs[-1]


def first_difference(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


PROMPT = list(range(10, 50))  # 40 tokens: past the window before the first draft (and 100 tokens follow)


@pytest.mark.parametrize("kv", [None, 8])
@pytest.mark.parametrize("how", ["itself", "poor", "quantized-self", "lookup", "lookup-k8"])
def test_greedy_output_is_plain_decoding_past_the_window(tiny, poor, how, kv):
    """100 tokens (over 6 windows) through every draft kind: perfect (the target itself), poor (random), partial
    (the target with a 6-bit KV cache of its own) and prompt lookup; float and 8-bit KV caches on the target."""
    model, tok = tiny
    kvkw = {} if kv is None else {"kv_bits": kv, "kv_group_size": 32}
    plain, _ = tokens_of(model, tok, PROMPT, 100, **kvkw)
    spec = {"itself": {"draft_model": model}, "poor": {"draft_model": poor},
            "quantized-self": {"draft_model": ModelDraft(model, kv_bits=6, kv_group_size=32)},
            "lookup": {"prompt_lookup": True}, "lookup-k8": {"prompt_lookup": True, "num_draft_tokens": 8}}[how]
    toks, last = tokens_of(model, tok, PROMPT, 100, **kvkw, **spec)
    assert toks == plain, f"first difference at {first_difference(toks, plain)}"
    s = last.speculative
    assert s.rounds > 0 and s.drafted >= s.accepted
    if how == "itself" and kv is None:  # (with kv 8 the draft's own cache is float: a near-perfect draft)
        assert s.acceptance_rate == 1.0 and s.tokens_per_round > 3.9  # (the last round drafts fewer)
    if how == "poor":
        assert s.acceptance_rate < 0.2
    if how == "quantized-self":
        assert 0.1 < s.acceptance_rate < 1.0  # accepts and rejects: both rollbacks run


def test_a_draft_of_another_width(tiny):
    """A draft with fewer logits than the target (as the 270M for a 4B: 262,144 vs 262,208) never drafts the
    target's extra ids, and the output is still the target's."""
    model, tok = tiny
    narrow = random_model(tiny_config(vocab_size=500, sliding_window=8), seed=7)
    plain, _ = tokens_of(model, tok, PROMPT, 60)
    draft = ModelDraft(narrow)
    seen = []
    orig = draft.propose

    def spy(*a, **k):
        d = orig(*a, **k)
        seen.extend(np.array(d.tokens).tolist())
        return d

    draft.propose = spy
    toks, last = tokens_of(model, tok, PROMPT, 60, draft_model=draft)
    assert toks == plain and seen and max(seen) < 500


def test_chat_turns_with_an_image(vlm, poor):
    """Turns of a chat, with an image, under a text-only draft (image soft tokens are skipped for it), the model's
    own text part and prompt lookup: each reply is the one a plain session gives, and each session's cache record
    stays true (a random model's replies rarely re-tokenize the same, so its turns start over: the next test reuses
    a cache past the window as a chat does)."""
    _, model, tok = vlm
    turns = [("hello there", [IMAGES / "a.png"]), ("and then", []), ("more", [])]
    # replies of lower-case words: text the template re-tokenizes as generated, so each turn reuses the cache
    words = compile_constraint(regex="[a-z]+( [a-z]+){1,6}")
    plain = ChatSession(model, tok, system="Be brief.")
    sessions = {"draft": ChatSession(model, tok, system="Be brief.", draft_model=poor),
                "self": ChatSession(model, tok, system="Be brief.", draft_model=model.language_model),
                "lookup": ChatSession(model, tok, system="Be brief.", prompt_lookup=True)}
    for k, (text, images) in enumerate(turns):
        want = [r.token for r in plain.send(text, images, max_tokens=24, constraint=words)]
        for name, s in sessions.items():
            rs = list(s.send(text, images, max_tokens=24, constraint=words))
            assert [r.token for r in rs] == want, (name, k)
            assert s.reused_tokens == plain.reused_tokens and s.cache[0].offset == len(s.cached_ids)
            assert rs[-1].speculative is not None
    d = sessions["draft"].drafter
    assert d.tokens and model.mcfg.image_token_index not in d.tokens  # the draft never saw the soft tokens


def test_turns_that_reuse_the_cache_past_the_window(tiny, poor):
    """What a chat does: a second and third turn continue a cache that holds the earlier turns (given with its ids,
    ``cache_ids``, so a draft model follows); each turn equals plain decoding on the same reused cache. The draft's
    own cache carries over too (a ModelDraft kept across calls): its sync only prefills what it has not seen."""
    model, tok = tiny
    turns = [PROMPT, [7, 8, 9, 10, 11], [12, 13]]
    for spec in ({"draft_model": ModelDraft(poor)}, {"draft_model": ModelDraft(model)}, {"prompt_lookup": True}):
        caches = {"plain": model.make_cache(), "spec": model.make_cache()}
        held = []
        for k, turn in enumerate(turns):
            plain, _ = tokens_of(model, tok, turn, 30, cache=caches["plain"])
            toks, last = tokens_of(model, tok, turn, 30, cache=caches["spec"], cache_ids=list(held), **spec)
            assert toks == plain, (spec, k)
            held = (held + turn + toks)[: caches["spec"][0].offset]
            assert caches["spec"][0].offset == caches["plain"][0].offset > (WINDOW if k else 0)
            assert last.speculative.rounds > 0
        draft = spec.get("draft_model")
        if draft is not None:
            assert draft.tokens == held[: len(draft.tokens)] and len(draft.tokens) > WINDOW


def test_prompt_cache_file(tiny, tmp_path):
    model, tok = tiny
    pc = cache_prompt(model, tok, "one two three four five six seven eight nine ten eleven twelve", chat=False)
    assert len(pc.tokens) > 8
    plain, _ = tokens_of(model, tok, " thirteen", 60, prompt_cache=pc)
    for spec in ({"draft_model": model}, {"prompt_lookup": True}):
        toks, last = tokens_of(model, tok, " thirteen", 60, prompt_cache=pc, **spec)
        assert toks == plain and last.speculative.rounds > 0


def test_stopping_mid_round_keeps_the_cache_to_what_was_yielded(tiny):
    """A consumer that stops while a round's accepted drafts are still to come leaves a cache that holds exactly
    the prompt and the tokens it took (a chat's next turn reuses it)."""
    model, tok = tiny
    plain, _ = tokens_of(model, tok, PROMPT, 40)
    for stop_at in (1, 2, 3, 5, 6, 7):
        cache = model.make_cache()
        steps = speculative_step(mx.array(PROMPT), model, ModelDraft(model), num_draft=3, sampler=Sampler(),
                                 max_tokens=40, cache=cache)
        got = [t for t, _ in (next(steps) for _ in range(stop_at))]
        steps.close()
        assert got == plain[:stop_at]
        # the cache holds the prompt and what was taken: the last one too when it was a kept draft (trimmed back
        # to it), not when it began a round (it is fed with the round's drafts), as plain decoding leaves it
        held = cache[0].offset
        assert held in (len(PROMPT) + stop_at - 1, len(PROMPT) + stop_at)
        if held == len(PROMPT) + stop_at:
            trim_cache(cache, 1)
        # and the cache continues as plain decoding does from there
        rest, _ = tokens_of(model, tok, [got[-1]], 10, cache=cache)
        assert rest == plain[stop_at : stop_at + 10]


def test_max_tokens_and_stop_strings_end_as_plain(tiny):
    model, tok = tiny
    for n in (1, 2, 3, 4, 5, 9):
        a, ra = tokens_of(model, tok, PROMPT, n)
        b, rb = tokens_of(model, tok, PROMPT, n, draft_model=model)
        assert a == b and ra.finish_reason == rb.finish_reason
    text = "".join(r.text for r in stream_generate(model, tok, PROMPT, 60))
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    a = "".join(r.text for r in stream_generate(model, tok, PROMPT, 60, stop_strings=[stop]))
    b = "".join(r.text for r in stream_generate(model, tok, PROMPT, 60, stop_strings=[stop], draft_model=model))
    assert a == b and len(a) < len(text)


def test_constrained_output_with_drafts(tiny, poor):
    """Drafts are drawn under the grammar and checked against it; the output is the plain constrained one."""
    model, tok = tiny
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string", "maxLength": 12}},
              "required": ["a", "b"]}
    c = compile_constraint(json_schema=schema)
    plain, pr = tokens_of(model, tok, PROMPT, 80, constraint=c)
    for spec in ({"draft_model": model}, {"draft_model": poor}, {"prompt_lookup": True}):
        toks, last = tokens_of(model, tok, PROMPT, 80, constraint=c, **spec)
        assert toks == plain and last.finish_reason == pr.finish_reason, spec


def test_a_forked_matcher_walks_drafts_and_leaves_the_original(tiny):
    """Drafts are walked on a fork: the fork's masks are those of a matcher that consumed the same tokens, and the
    original keeps its own state (a fork may run into the grammar's stop; the original never has to step back)."""
    model, tok = tiny
    c = compile_constraint(json_schema={"type": "object", "properties": {"n": {"type": "number"}}})

    def walk(m, steps):
        out = []
        for _ in range(steps):
            allowed = m.allowed()
            digit = [t for t in allowed if tok.decode([int(t)]).strip().isdigit()]
            t = int((digit or allowed)[0])
            out.append((t, allowed))
            m.consume(t)
        return out

    m = c.matcher(tok, logits_width(model))
    walk(m, 5)
    before = m.allowed()
    fork = m.fork()
    ahead = walk(fork, 14)  # into the number: the digit cap's state is forked too
    assert np.array_equal(m.allowed(), before) and m.tokens == 5 and fork.tokens == 19
    again = walk(m, 14)
    assert [t for t, _ in again] == [t for t, _ in ahead]
    assert all(np.array_equal(x, y) for (_, x), (_, y) in zip(again, ahead))


def test_prompt_lookup_finds_the_latest_longest_match():
    pl = PromptLookup(max_ngram=3)
    ctx = [5, 6, 7, 8, 9, 1, 6, 7, 2, 3, 6, 7]
    assert pl.lookup(ctx, 2) == [2, 3]  # "6 7" last seen before 2 3 (latest match wins)
    assert pl.lookup([1, 2, 3, 4, 9, 2, 3, 4, 5, 1, 2, 3], 3) == [4, 9, 2]  # the 3-gram "1 2 3" beats "2 3"
    assert pl.lookup([1, 2, 3], 4) == []
    assert pl.lookup([4, 4, 4, 4], 3) == [4]  # what follows the latest earlier match, up to the end


def brute_lookup(ctx, k, max_n):
    for n in range(min(max_n, len(ctx) - 1), 0, -1):
        for s in range(len(ctx) - n - 1, -1, -1):
            if ctx[s : s + n] == ctx[-n:]:
                return ctx[s + n : s + n + k]
    return []


def test_prompt_lookup_matches_a_brute_force_search():
    rng = np.random.default_rng(0)
    for _ in range(300):
        ctx = rng.integers(0, 4, rng.integers(1, 30)).tolist()
        assert PromptLookup(3).lookup(ctx, 4) == brute_lookup(ctx, 4, 3), ctx


def test_vocabulary_check(tiny, tiny_folder, tmp_path):
    import json
    import shutil

    model, tok = tiny
    check_vocab(tok, tok)
    _, tok2 = load(tiny_folder)
    check_vocab(tok, tok2)
    other = tmp_path / "other"
    shutil.copytree(tiny_folder, other)
    tj = json.loads((other / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    if isinstance(vocab, dict):
        k = next(p for p, i in vocab.items() if i == 300)
        vocab["zzqx"] = vocab.pop(k)
    else:
        vocab[300] = ["zzqx", vocab[300][1]]
    (other / "tokenizer.json").write_text(json.dumps(tj))
    _, tok3 = load(other)
    with pytest.raises(DraftError, match="id 300"):
        check_vocab(tok, tok3)
    r = CliRunner().invoke(main, ["generate", "-m", str(tiny_folder), "-p", "hi", "-n", "3",
                                  "--draft-model", str(other)])
    assert r.exit_code == 1 and "Error:" in r.output and "id 300" in r.output


def test_bad_arguments(tiny):
    model, tok = tiny
    with pytest.raises(DraftError, match="not both"):
        make_drafter(model, model, prompt_lookup=True)
    with pytest.raises(DraftError, match="num_draft_tokens"):
        list(stream_generate(model, tok, PROMPT, 3, prompt_lookup=True, num_draft_tokens=40))
    with pytest.raises(ValueError, match="custom sampler"):
        list(stream_generate(model, tok, PROMPT, 3, prompt_lookup=True, sampler=Sampler()))
    cache = model.make_cache()
    list(stream_generate(model, tok, PROMPT, 3, cache=cache))
    with pytest.raises(ValueError, match="cache_ids"):
        list(stream_generate(model, tok, [5], 3, cache=cache, draft_model=model))
    with pytest.raises(DraftError, match="loaded Gemma 3"):
        make_drafter(model, "a path")


def test_cli_generate_and_chat_speculate(tiny_folder):
    r = CliRunner().invoke(main, ["generate", "-m", str(tiny_folder), "-p", "one two three", "-n", "20", "--raw"])
    s = CliRunner().invoke(main, ["generate", "-m", str(tiny_folder), "-p", "one two three", "-n", "20", "--raw",
                                  "--draft-model", str(tiny_folder), "--num-draft-tokens", "2"])
    assert r.exit_code == 0 and s.exit_code == 0, s.output
    assert s.output.split("==========")[0] == r.output.split("==========")[0]
    assert "Speculative: " in s.output and "drafts accepted (100.0%)" in s.output
    c = CliRunner().invoke(main, ["chat", "-m", str(tiny_folder), "-n", "8", "--prompt-lookup", "--stats"],
                           input="hi\nagain\n")
    assert c.exit_code == 0 and c.output.count("Speculative: ") == 2
    bad = CliRunner().invoke(main, ["generate", "-m", str(tiny_folder), "-p", "x", "--prompt-lookup",
                                    "--draft-model", str(tiny_folder)])
    assert bad.exit_code != 0 and "not both" in bad.output


# -- the distribution ------------------------------------------------------------------------------------------

class Bigram:
    """A Markov chain as a model: the next token's logits are ``table[previous token]``, so the target's true
    distribution at every step is known exactly, and a step costs a table lookup (20,000 tokens in seconds). Its
    cache is a real rotating one (window 4): the rollbacks run as they do for Gemma."""

    def __init__(self, table: np.ndarray):
        self.table = mx.array(table.astype(np.float32))
        self.cfg = type("Cfg", (), {"vocab_size": table.shape[0]})

    def make_cache(self, kv_bits=None, kv_group_size=64, slack=0):
        from mlx_gemma_qat.model.cache import RotatingKVCache

        return [RotatingKVCache(4, slack=slack)]

    def model(self, tokens, cache, embeddings=None, groups=None):
        z = mx.zeros((1, 1, tokens.shape[1], 1))
        cache[0].update_and_fetch(z, z)
        return tokens[..., None]

    def head(self, h):
        return self.table[h[..., 0]]

    def __call__(self, tokens, cache):
        return self.head(self.model(tokens, cache))


V = 16


def _bigrams():
    rng = np.random.default_rng(0)
    target = Bigram(rng.normal(size=(V, V)) * 1.5)
    poor = Bigram(rng.normal(size=(V, V)) * 3.0)  # peaky where the target is not: many rejections
    return target, poor


def _sample(model, drafter, n, sampler_kw, seed, k=3):
    """``n`` tokens sampled after token 0, with their randomized probability integral transforms u = F(x - 1) +
    V p(x) under the target's true distribution p (the sampler's filters applied to the table's row; V uniform):
    exact sampling makes the u independent uniforms."""
    from mlx_gemma_qat.generate import generate_step

    mx.random.seed(seed)
    rng = np.random.default_rng(seed)
    sampler = Sampler(**sampler_kw)
    rows = np.array(sampler.probs(model.table - mx.logsumexp(model.table, axis=-1, keepdims=True)), np.float64)
    cache = model.make_cache()
    if drafter is None:
        steps = generate_step(mx.array([0]), model, max_tokens=n, sampler=sampler, cache=cache)
    else:
        steps = speculative_step(mx.array([0]), model, drafter, num_draft=k, sampler=sampler, max_tokens=n,
                                 cache=cache)
    prev, us = 0, []
    for t, _ in steps:
        p = rows[prev]
        us.append(p[:t].sum() + rng.random() * p[t])
        prev = t
    return np.array(us)


CHI2_19_999 = 43.820  # the 0.999 quantile of chi-square with 19 degrees of freedom (published tables)


def _uniform_chi2(u, bins=20):
    """Pearson's statistic of ``u``'s histogram against the uniform (19 degrees of freedom)."""
    counts = np.histogram(u, bins=bins, range=(0, 1))[0]
    expected = len(u) / bins
    return float(((counts - expected) ** 2 / expected).sum()), counts


def _two_sample_chi2(a, b):
    """Pearson's statistic of a 2 x bins contingency table (bins - 1 degrees of freedom)."""
    table = np.stack([a, b]).astype(np.float64)
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    return float(((table - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("sampler_kw", [{"temp": 1.0}, {"temp": 1.0, "top_p": 0.9}])
def test_sampled_tokens_follow_the_target_distribution(sampler_kw):
    """10,000 tokens at temperature 1 (3,000 with top-p 0.9) sampled speculatively with a poor draft model, as many
    sampled plainly, and 3,000 with prompt lookup (point-mass drafts): the transforms of each are uniform
    (chi-square at the 0.001 level), and the speculative histograms agree with the plain one (two-sample). A
    sampler that keeps every draft fails at 5,000 by over 3x the critical value (the test below)."""
    target, poor = _bigrams()
    n = 10000 if sampler_kw == {"temp": 1.0} else 3000
    plain = _uniform_chi2(_sample(target, None, n, sampler_kw, seed=2))
    assert plain[0] < CHI2_19_999, plain
    for name, drafter, m in (("draft", ModelDraft(poor), n), ("lookup", PromptLookup(), 3000)):
        spec = _uniform_chi2(_sample(target, drafter, m, sampler_kw, seed=1))
        two = _two_sample_chi2(spec[1], plain[1])
        assert spec[0] < CHI2_19_999 and two < CHI2_19_999, (name, spec, two)


def test_the_distribution_test_catches_a_sampler_that_keeps_every_draft(monkeypatch):
    """The same statistic on a broken acceptance (every draft kept: the draft's distribution, not the target's)
    fails clearly, so the test above can fail."""
    import mlx_gemma_qat.speculative as spec

    real = spec._accept

    def keep_all(lps, d, sampler):
        n = len(d)
        return (n, int(sampler(lps[n : n + 1]).item())) if n else real(lps, d, sampler)

    monkeypatch.setattr(spec, "_accept", keep_all)
    target, poor = _bigrams()
    assert _uniform_chi2(_sample(target, ModelDraft(poor), 5000, {"temp": 1.0}, seed=3))[0] > 3 * CHI2_19_999


# the real 270M past its window under prompt lookup: tests/test_real_past_window.py
