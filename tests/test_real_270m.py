"""The real Gemma 3 270M (Q8_0/Q5_0/Q4_K/Q6_K GGUF) against transformers float32 on the same file.

Fixtures: scripts/make_reference_270m.py (transformers 5.23, torch 2.13 CPU, float32, eager attention,
weights dequantized by gguf-py). The MLX CPU backend is slow (~1 GFLOP/s quantized GEMM), so these
tests use short prompts; scripts/bench_generate.py measures perplexity over 1,024 tokens.
"""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma_qat.generate import generate_step
from mlx_gemma_qat.model.load import load_model

pytestmark = pytest.mark.real
FIX = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def ref():
    return np.load(FIX / "gemma3_270m_reference.npz")


def _greedy(model, prompt_ids, n):
    return [t for t, _ in generate_step(mx.array(prompt_ids), model, max_tokens=n)]


def test_logits_exact_route_match_transformers(real_270m_exact, ref):
    """With Q6_K kept exact (dense float32), every weight equals gguf-py's: logits agree to 1e-3."""
    model = load_model(real_270m_exact)
    out = np.array(model(mx.array(ref["capital_ids"][None]))[0, -1])
    np.testing.assert_allclose(out, ref["capital_last_logits"], atol=1e-3, rtol=0)


def test_logits_default_route_close_to_transformers(real_270m, ref):
    """Default route (Q6_K re-gridded to 8-bit, one sub-block in two exact): logits within 0.25."""
    model = load_model(real_270m)
    out = np.array(model(mx.array(ref["capital_ids"][None]))[0])
    ref_last = ref["capital_last_logits"]
    assert np.abs(out[-1] - ref_last).max() < 0.25
    # top-20 ids at every position agree with transformers' ranking
    for pos in range(out.shape[0]):
        top = set(np.argsort(out[pos])[-5:])
        assert top == set(ref["capital_top20_ids"][pos][:5])


@pytest.mark.parametrize("case", ["gen_raw_capital", "gen_raw_fibonacci", "gen_chat_boiling", "gen_chat_sky"])
def test_greedy_token_identical_exact_route(real_270m_exact, ref, case):
    """24 greedy tokens identical to transformers (its top-2 margins go down to 0.012 logits)."""
    model = load_model(real_270m_exact)
    expected = [int(t) for t in ref[f"{case}_ids"]]
    assert _greedy(model, ref[f"{case}_prompt_ids"], len(expected)) == expected


def test_greedy_default_route_identical_until_a_near_tie(real_270m, ref):
    """The default route differs from transformers by < 0.25 in logits: tokens agree until a tie that close."""
    model = load_model(real_270m)
    for case in ("gen_raw_capital", "gen_chat_boiling"):
        margins = ref[f"{case}_margins"]
        n = int(np.argmax(margins < 0.25)) if (margins < 0.25).any() else len(margins)
        n = max(n, 4)
        expected = [int(t) for t in ref[f"{case}_ids"][:n]]
        assert _greedy(model, ref[f"{case}_prompt_ids"], n) == expected


# perplexity against transformers and llama.cpp: tests/test_evaluate.py; past the window: test_real_past_window.py



def test_converted_folder_reports_exactness(real_270m):
    cfg = json.loads((real_270m / "config.json").read_text())
    prov = cfg["mlx_gemma_qat"]
    assert prov["source_types"] == {"F32": 109, "Q4_K": 27, "Q5_0": 81, "Q6_K": 9, "Q8_0": 10}
    assert len(prov["inexact_tensors"]) == 9 and all("down_proj" in n for n in prov["inexact_tensors"])
    assert cfg["quantization"]["model.embed_tokens"] == {"group_size": 32, "bits": 8, "mode": "affine"}


def test_mlx_lm_loads_the_converted_folder(real_270m, ref):
    """The folder is standard: mlx_lm.load reads it and predicts the same next token."""
    from mlx_lm import load as mlx_lm_load

    model, tokenizer = mlx_lm_load(str(real_270m))
    assert tokenizer.encode("The capital of France is") == [int(t) for t in ref["capital_ids"]]
    logits = model(mx.array(ref["capital_ids"][None]))
    assert int(mx.argmax(logits[0, -1]).item()) == int(np.argmax(ref["capital_last_logits"]))


def test_chat_second_turn_reuses_the_cache(real_270m):
    """The real tokenizer re-encodes the model's own reply to the ids it generated, so turn two prefills
    only its new tokens, and replies as a fresh prompt of the whole conversation would."""
    from mlx_gemma_qat import load, stream_generate
    from mlx_gemma_qat.chat import ChatSession

    model, tok = load(real_270m)
    s = ChatSession(model, tok)
    history = []
    for text in ("Name a colour.", "Another one?"):
        rs = list(s.send(text, max_tokens=6))
        history.append({"role": "user", "content": text})
        fresh = list(stream_generate(model, tok, history, 6))
        assert [r.token for r in rs] == [r.token for r in fresh]
        history.append({"role": "assistant", "content": "".join(r.text for r in rs)})
    assert s.reused_tokens > 10 and rs[-1].prompt_tokens == fresh[-1].prompt_tokens - s.reused_tokens
