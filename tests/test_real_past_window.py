"""The real Gemma 3 270M past its sliding window (512), from one 599-token prompt cache of the committed GPL-3
(BOS + 598 text tokens, prefilled in chunks of 256 by ``cache_prompt``, about a minute on 2 cores): against
transformers float32 (scripts/make_reference_270m.py), through a prompt-cache file, and under speculative decoding.

The tests that need this cache live in one module, so that the suite's parallel workers build it once (the tiny
tests cover the same mechanics with a window of 16)."""

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma_qat import load, stream_generate
from mlx_gemma_qat.generate import prefill
from mlx_gemma_qat.prompt_cache import cache_prompt, load_prompt_cache

pytestmark = pytest.mark.real
FIX = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def ref():
    return np.load(FIX / "gemma3_270m_reference.npz")


@pytest.fixture(scope="module")
def gpl3(real_270m_exact):
    """The exact-route real 270M, its tokenizer, the text token ids of the GPL-3 and the 599-token PromptCache.
    A PromptCache is never changed: each use takes a copy (``make_cache``)."""
    model, tok = load(real_270m_exact)
    ids = tok.encode((FIX / "texts" / "GPL-3").read_text(encoding="utf-8"), add_special_tokens=False)
    pc = cache_prompt(model, tok, tok.decode(ids[:598]), chat=False)
    assert pc.tokens == [tok.bos_token_id] + ids[:598]
    return model, tok, pc, ids


def test_tokens_past_the_window_match_transformers(gpl3, ref):
    """After the 599 prefilled tokens: token 599 alone into the full rings gives transformers' logits of the
    600-token pass; the next 40 as one chunk (it drops keys inside the chunk, as a perplexity window does) give
    transformers' log-probs of the 1,024-token pass at each position 599..638, and the sliding layers hold
    exactly the window."""
    model, _, pc, _ = gpl3
    assert pc.tokens == ref["long600_ids"][:599].tolist() == ref["gpl3_ids"][:599].tolist()
    cache = pc.make_cache()
    logits = prefill(model, mx.array(ref["long600_ids"][599:]), cache, step=256)
    np.testing.assert_allclose(np.array(logits[0]), ref["long600_last_logits"], atol=2e-3, rtol=0)
    assert cache[0].keys.shape[2] == 512 and cache[0].offset == 600  # the sliding layers hold exactly the window
    rest = model(mx.array(ref["gpl3_ids"][600:639])[None], cache=cache)[0].astype(mx.float32)
    lp = mx.concatenate([logits.reshape(1, -1).astype(mx.float32), rest])
    lp = lp - mx.logsumexp(lp, axis=-1, keepdims=True)
    nll = -np.array(mx.take_along_axis(lp, mx.array(ref["gpl3_ids"][600:640])[:, None], axis=-1)[:, 0])
    assert np.abs(nll - ref["gpl3_nll"][599:639]).max() < 0.005  # measured: 3e-4 (as the perplexity test's)


def test_prompt_cache_file_past_the_window(gpl3, tmp_path):
    """The 599-token prefix saved and loaded continues exactly as the prefix kept in memory does, which is what a
    fresh run of the whole prompt computes when its first chunk is the prefix (the tiny tests check that)."""
    model, tok, pc, ids = gpl3
    prefix = tok.decode(ids[:598])
    pc.save(tmp_path / "gpl.safetensors")
    assert len(pc.tokens) > model.cfg.sliding_window
    cont = tok.decode(ids[598:610])
    in_memory = list(stream_generate(model, tok, cont, 6, prompt_cache=pc))
    rs = list(stream_generate(model, tok, cont, 6, prompt_cache=tmp_path / "gpl.safetensors"))
    assert [r.token for r in rs] == [r.token for r in in_memory]
    assert rs[-1].prompt_tokens == len(tok.encode(prefix + cont)) - len(pc.tokens)
    # the loaded caches hold exactly what the prefill left, layer by layer (greedy tokens alone can miss a
    # sliding layer whose keys are restored out of order: the global layers still see every token)
    loaded = load_prompt_cache(tmp_path / "gpl.safetensors", model)
    for mine, theirs in zip(pc.make_cache(), loaded.make_cache()):
        assert mine.offset == theirs.offset == len(pc.tokens)
        assert all(mx.array_equal(x, y).item() for x, y in zip(mine.fetch(), theirs.fetch()))


def test_lookup_decoding_past_the_window_is_plain_decoding(gpl3):
    """Continuing the 599 tokens, greedy decoding with prompt lookup gives plain decoding's tokens, with drafts
    accepted (the licence repeats itself). The full matrix (100, 600 and 1,500-token prompts, 8-bit caches, a Q4_0
    draft model, chat turns, prompt-cache files) is scripts/check_speculative_real.py's, results beside it."""
    model, tok, pc, ids = gpl3
    cont = tok.decode(ids[598:606])
    plain = list(stream_generate(model, tok, cont, 16, prompt_cache=pc))
    spec = list(stream_generate(model, tok, cont, 16, prompt_cache=pc, prompt_lookup=True))
    assert [r.token for r in spec] == [r.token for r in plain]
    s = spec[-1].speculative
    assert s.rounds > 0 and s.accepted > 0
