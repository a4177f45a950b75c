"""Generation API on a tiny converted model: streaming, stops, sampling, chat template, load()."""

import mlx.core as mx
import numpy as np
import pytest

from gguf_factory import TINY, write_tiny_gguf
from mlx_gemma_qat import generate, load, stream_generate
from mlx_gemma_qat.generate import ContextLengthError, encode_prompt


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from mlx_gemma_qat.convert import convert

    folder = convert(TINY, tmp_path_factory.mktemp("g") / "m", mode="none", progress=False)
    return load(folder)


def test_stream_text_equals_decoded_tokens(tiny):
    model, tok = tiny
    def letters_only(logprobs):  # random weights would emit lone UTF-8 bytes; keep to plain pieces
        return mx.argmax(logprobs[:, 107:200], axis=-1) + 107

    rs = list(stream_generate(model, tok, "hello world", 12, chat=False, sampler=letters_only))
    tokens = [r.token for r in rs]
    assert len(rs) == 12 and rs[-1].finish_reason == "length"
    assert all(r.finish_reason is None for r in rs[:-1])
    assert "".join(r.text for r in rs) == tok.decode(tokens)
    assert rs[-1].prompt_tokens == len(tok.encode("hello world")) and rs[-1].generation_tokens == 12
    assert rs[-1].peak_memory > 0 and rs[-1].cache_bytes > 0


def test_greedy_is_deterministic_and_seeded_sampling_reproducible(tiny):
    model, tok = tiny
    a = generate(model, tok, "abc", 10, chat=False)
    b = generate(model, tok, "abc", 10, chat=False)
    assert a == b
    s1 = generate(model, tok, "abc", 10, chat=False, temp=1.0, seed=7)
    s2 = generate(model, tok, "abc", 10, chat=False, temp=1.0, seed=7)
    s3 = generate(model, tok, "abc", 10, chat=False, temp=1.0, seed=8)
    assert s1 == s2 and s1 != s3


def test_stops_on_eos_and_end_of_turn(tiny):
    model, tok = tiny
    assert {1, 106} <= set(tok.eos_token_ids)
    for stop_id in (1, 106):
        calls = {"n": 0}

        def sampler(logprobs):
            calls["n"] += 1
            return mx.array([stop_id if calls["n"] == 3 else 200])

        rs = list(stream_generate(model, tok, "abc", 50, chat=False, sampler=sampler))
        assert rs[-1].finish_reason == "stop" and rs[-1].generation_tokens == 3
        assert all(r.token != stop_id for r in rs[:-1])


def test_stop_strings_cut_the_text(tiny):
    model, tok = tiny
    full = generate(model, tok, "abc", 20, chat=False)
    assert len(full) > 6
    stop = full[3:6]
    cut = generate(model, tok, "abc", 20, chat=False, stop_strings=[stop])
    assert cut == full[: full.index(stop)]


def test_chat_template_and_system_prompt(tiny):
    model, tok = tiny
    ids = encode_prompt(tok, "Hi", chat=True, system="Be brief.")
    text = tok.decode(ids)
    assert text == "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert encode_prompt(tok, "Hi", chat=False) == [2] + tok.encode("Hi", add_special_tokens=False)
    assert encode_prompt(tok, [5, 6, 7]) == [5, 6, 7]


def test_prompt_past_context_is_refused(tiny):
    model, tok = tiny
    with pytest.raises(ContextLengthError, match="context is 256"):
        generate(model, tok, list(range(3, 300)), 5)
    with pytest.raises(ValueError):
        generate(model, tok, "abc", 0)


def test_max_tokens_clipped_to_the_context(tiny):
    model, tok = tiny
    rs = list(stream_generate(model, tok, list(range(3, 250)), 100))
    assert rs[-1].generation_tokens == 256 - 247 and rs[-1].finish_reason == "length"


def test_load_converts_a_gguf_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_GEMMA_CACHE", str(tmp_path / "cache"))
    write_tiny_gguf(tmp_path / "t.gguf")
    m1, _ = load(tmp_path / "t.gguf")
    entries = [p for p in (tmp_path / "cache").iterdir() if p.name != ".locks"]
    m2, tok = load(str(tmp_path / "t.gguf"))
    assert [p for p in (tmp_path / "cache").iterdir() if p.name != ".locks"] == entries and len(entries) == 1
    x = mx.array([[2, 40, 41, 42]])
    np.testing.assert_array_equal(np.array(m1(x)), np.array(m2(x)))
    m3, _ = load(entries[0])  # the cached MLX folder loads directly
    np.testing.assert_array_equal(np.array(m1(x)), np.array(m3(x)))


def test_two_loads_at_once_convert_once(tmp_path, monkeypatch):
    """Two commands started together on the same GGUF: one converts, the other waits for it under the cache's
    lock and takes its folder (no second conversion over a half-written one)."""
    import threading
    import time

    from mlx_gemma_qat import models_cache
    from mlx_gemma_qat.convert import convert

    monkeypatch.setenv("MLX_GEMMA_CACHE", str(tmp_path / "cache"))
    write_tiny_gguf(tmp_path / "t.gguf")
    calls = []

    def slow_convert(*a, **kw):
        calls.append(a)
        time.sleep(0.5)  # the other thread arrives while this one converts
        return convert(*a, **kw)

    monkeypatch.setattr("mlx_gemma_qat.convert.convert", slow_convert)
    got = []
    threads = [threading.Thread(target=lambda: got.append(models_cache.resolve_model(tmp_path / "t.gguf",
                                                                                     progress=False)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(got) == 2 and got[0] == got[1] and (got[0] / "config.json").is_file()
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")] == [got[0].name]


def test_default_dtype_follows_device(tiny):
    model, _ = tiny
    expected = mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16
    assert model.model.compute_dtype == expected
    assert model(mx.array([[2, 3]])).dtype == expected
