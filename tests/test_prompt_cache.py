"""Prompt-cache files: a saved prefix resumes exactly (also past the sliding window and with a quantized cache),
reuse never changes the loaded prefix, files from another model / kv-bits / dtype or corrupt files are refused."""

import json
import struct
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten

from gguf_factory import TINY
from mlx_gemma_qat import load, stream_generate
from mlx_gemma_qat.cli import main
from mlx_gemma_qat.generate import ContextLengthError, prefill
from mlx_gemma_qat.prompt_cache import (
    PromptCacheError, cache_prompt, load_prompt_cache, save_prompt_cache)

TEXT = "the quick brown fox jumps over the lazy dog while the cat sleeps "  # ~65 tokens: 4x the window (16)


def letters(lp):  # random weights would emit lone UTF-8 bytes; keep to plain pieces
    return mx.argmax(lp[:, 107:200], axis=-1) + 107


@pytest.fixture(scope="module")
def tiny():
    from mlx_gemma_qat.convert import convert

    folder = convert(TINY, Path(tempfile.mkdtemp()) / "m", mode="none", progress=False)
    return (folder, *load(folder))


def tokens_of(rs):
    return [r.token for r in rs]


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_resume_equals_the_whole_prompt_fresh(tiny, tmp_path, bits):
    """Raw prefix longer than the window: a continuation, or the full prompt, from the file gives the greedy
    tokens of the whole prompt run fresh, and prefills only the tokens after the prefix."""
    _, model, tok = tiny
    f = tmp_path / "p.safetensors"
    pc = cache_prompt(model, tok, TEXT, f, chat=False, kv_bits=bits, kv_group_size=32)
    n = len(pc.tokens)
    assert n > 3 * model.cfg.sliding_window and pc.tokens == [2] + tok.encode(TEXT, add_special_tokens=False)
    whole = TEXT + "and then"
    ids = tok.encode(whole)
    # the same chunk boundaries as the resumed run (prefix, rest): identical computations, identical keys
    fresh = tokens_of(stream_generate(model, tok, whole, 12, chat=False, sampler=letters, kv_bits=bits,
                                      kv_group_size=32, prefill_step_size=n))
    loaded = load_prompt_cache(f, model)
    assert (loaded.kv_bits, loaded.tokens, loaded.chat, loaded.text) == (bits, pc.tokens, False, TEXT)
    for prompt in ("and then", whole):  # a continuation, or the full prompt
        rs = list(stream_generate(model, tok, prompt, 12, sampler=letters, prompt_cache=loaded))
        assert tokens_of(rs) == fresh
        assert rs[-1].prompt_tokens == len(ids) - n
    rs = list(stream_generate(model, tok, "and then", 12, sampler=letters, prompt_cache=f))  # a path
    assert tokens_of(rs) == fresh


def test_restored_state_is_exact_with_a_wrapped_ring(tiny, tmp_path):
    """A cache saved mid-decode (the sliding layers' rings wrapped at an arbitrary index) loads unrolled, holding
    the same keys, and continues with the same logits (to float rounding: a ring sums its keys in another
    order) and, after a multi-token chunk (which unrolls the ring too), bit-identical ones."""
    _, model, tok = tiny
    ids = tok.encode(TEXT)
    for bits in (None, 4):
        cache = model.make_cache(bits, 32)
        prefill(model, mx.array(ids[:30]), cache)
        for t in ids[30:37]:  # 7 decode steps: every ring starts at index 7
            mx.eval(model(mx.array([[t]]), cache=cache))
        assert cache[0]._start == 7 and cache[0].offset == 37
        save_prompt_cache(tmp_path / "r.safetensors", model, cache, ids[:37])
        cache2, toks = load_prompt_cache(tmp_path / "r.safetensors", model)
        assert toks == ids[:37] and cache2[0]._start == 0
        for c, c2 in zip(cache, cache2):
            for a, b in zip(c.fetch(), c2.fetch()):
                assert all(np.array_equal(np.array(x), np.array(y))
                           for (_, x), (_, y) in zip(tree_flatten(a), tree_flatten(b)))
        a, b = [c.copy() for c in cache], [c.copy() for c in cache2]
        for t in ids[37:45]:  # decode from the saved state: the ring against its unrolled copy
            np.testing.assert_allclose(np.array(model(mx.array([[t]]), cache=a)),
                                       np.array(model(mx.array([[t]]), cache=b)), atol=1e-4)
        rest = mx.array(ids[37:50])  # a multi-token chunk from the saved state
        assert np.array_equal(np.array(prefill(model, rest, cache)), np.array(prefill(model, rest, cache2)))
        for t in ids[50:55]:
            assert np.array_equal(np.array(model(mx.array([[t]]), cache=cache)),
                                  np.array(model(mx.array([[t]]), cache=cache2)))


def test_chat_prefix_is_the_system_part(tiny, tmp_path):
    """Chat: the cached text is the system part of the first user turn; the answer equals a fresh chat prompt
    with that system text."""
    _, model, tok = tiny
    pc = cache_prompt(model, tok, TEXT, tmp_path / "c.safetensors", chat=True)
    assert tok.decode(pc.tokens) == f"<bos><start_of_turn>user\n{TEXT}\n\n"
    loaded = load_prompt_cache(tmp_path / "c.safetensors", model)
    ids = tok.encode(f"<start_of_turn>user\n{TEXT}\n\nwhat is it?<end_of_turn>\n<start_of_turn>model\n")
    fresh = list(stream_generate(model, tok, "what is it?", 10, chat=True, system=TEXT, sampler=letters,
                                 prefill_step_size=len(pc.tokens)))
    rs = list(stream_generate(model, tok, "what is it?", 10, sampler=letters, prompt_cache=loaded))
    assert tokens_of(rs) == tokens_of(fresh) and rs[-1].prompt_tokens == len(ids) - len(pc.tokens)
    with pytest.raises(PromptCacheError, match="with the chat template: generate with --chat"):
        list(stream_generate(model, tok, "x", 2, chat=False, prompt_cache=loaded))
    with pytest.raises(ValueError, match="no system prompt"):
        list(stream_generate(model, tok, "x", 2, system="s", prompt_cache=loaded))


def test_reusing_a_loaded_file_never_changes_it(tiny, tmp_path):
    _, model, tok = tiny
    cache_prompt(model, tok, TEXT, tmp_path / "p.safetensors", chat=False, kv_bits=8, kv_group_size=32)
    loaded = load_prompt_cache(tmp_path / "p.safetensors", model)
    before = [np.array(a) for c in loaded._cache for a in c.state]
    runs = [tokens_of(stream_generate(model, tok, p, 12, sampler=letters, prompt_cache=loaded))
            for p in ("and then", "so that", "and then")]
    assert runs[0] == runs[2] and runs[0] != runs[1]
    after = [np.array(a) for c in loaded._cache for a in c.state]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
    assert all(c.offset == len(loaded.tokens) for c in loaded._cache)
    cache, toks = loaded  # mlx-lm's shape: a fresh copy each time
    assert cache is not loaded._cache and toks == loaded.tokens


def test_context_check_counts_the_cached_tokens(tiny, tmp_path):
    _, model, tok = tiny
    prefix = list(range(3, 203))  # 200 cached tokens of a 256-token context
    cache = model.make_cache()
    prefill(model, mx.array(prefix), cache)
    save_prompt_cache(tmp_path / "p.safetensors", model, cache, prefix)
    with pytest.raises(ContextLengthError, match="after 200 tokens already in the cache; the model's context is 256"):
        list(stream_generate(model, tok, list(range(3, 63)), 5, prompt_cache=tmp_path / "p.safetensors"))
    rs = list(stream_generate(model, tok, list(range(3, 53)), 100, prompt_cache=tmp_path / "p.safetensors"))
    assert rs[-1].generation_tokens == 256 - 250
    # token ids that start with the cached ones are the full prompt
    rs2 = list(stream_generate(model, tok, prefix + list(range(3, 53)), 100, prompt_cache=tmp_path / "p.safetensors"))
    assert tokens_of(rs2) == tokens_of(rs) and rs2[-1].prompt_tokens == 50
    with pytest.raises(PromptCacheError, match="adds no tokens"):
        list(stream_generate(model, tok, [], 3, prompt_cache=tmp_path / "p.safetensors"))


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    _, model, tok = tiny
    f = tmp_path_factory.mktemp("pc") / "p8.safetensors"
    cache_prompt(model, tok, TEXT, f, chat=False, kv_bits=8, kv_group_size=32)
    return f


def test_wrong_model_kv_bits_or_dtype_is_refused(tiny, saved, tmp_path):
    folder, model, tok = tiny
    with pytest.raises(PromptCacheError, match=r"holds 8-bit keys and values \(group 32\), not kv_bits=4"):
        load_prompt_cache(saved, model, kv_bits=4)
    with pytest.raises(PromptCacheError, match="not a float cache"):
        load_prompt_cache(saved, model, kv_bits=None)
    with pytest.raises(PromptCacheError, match="not group size 64"):
        load_prompt_cache(saved, model, kv_bits=8, kv_group_size=64)
    load_prompt_cache(saved, model, kv_bits=8, kv_group_size=32)  # as asked
    with pytest.raises(PromptCacheError, match="not kv_bits=4"):
        list(stream_generate(model, tok, "x", 2, prompt_cache=saved, kv_bits=4, kv_group_size=32))
    # another model: the linear-RoPE fixture has the same shapes but other weights
    from mlx_gemma_qat.convert import convert

    other = convert(TINY.parent / "tiny_gemma3_linear_rope", tmp_path / "o", mode="none", progress=False)
    m2, _ = load(other)
    assert m2.identity != model.identity
    with pytest.raises(PromptCacheError, match="made with another model"):
        load_prompt_cache(saved, m2)
    m3, _ = load(folder, dtype="bfloat16")
    with pytest.raises(PromptCacheError, match="holds a float32 cache; this model computes in bfloat16"):
        load_prompt_cache(saved, m3)
    assert issubclass(PromptCacheError, ValueError)


def test_corrupt_files_are_refused(tiny, saved, tmp_path):
    _, model, _ = tiny
    data = saved.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    cases = {
        "empty": b"",
        "garbage": b"hello, not a cache at all",
        "truncated": data[: len(data) - 100],
        "truncated header": data[: 8 + n // 2],
        "padded": data + b"\0" * 16,
        "huge header length": struct.pack("<Q", 1 << 40) + data[8:],
        "flipped header byte": data[:20] + bytes([data[20] ^ 0x55]) + data[21:],
    }
    header = json.loads(data[8 : 8 + n])
    info = json.loads(header["__metadata__"]["info"])

    def with_meta(**changes):
        h = json.loads(json.dumps(header))
        h["__metadata__"].update(changes)
        raw = json.dumps(h).encode()
        raw += b" " * (-len(raw) % 8)
        return struct.pack("<Q", len(raw)) + raw + data[8 + n :]

    cases["other format"] = with_meta(format="something-else")
    cases["future version"] = with_meta(format_version="99")
    cases["bad metadata"] = with_meta(info="{not json")
    cases["offset mismatch"] = with_meta(info=json.dumps(dict(info, num_tokens=info["num_tokens"] - 1)))
    cases["fewer layers"] = with_meta(info=json.dumps(dict(info, layers=info["layers"][:-1])))
    for name, blob in cases.items():
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(blob)
        with pytest.raises(PromptCacheError) as e:
            load_prompt_cache(p, model)
        assert str(p) in str(e.value), name
    with pytest.raises(PromptCacheError, match="not an mlx-gemma-qat prompt-cache file"):
        load_prompt_cache(TINY / "model.safetensors", model)
    with pytest.raises(PromptCacheError, match="no such prompt-cache file"):
        load_prompt_cache(tmp_path / "missing.safetensors", model)


def test_writes_are_atomic(tiny, tmp_path, monkeypatch):
    _, model, tok = tiny
    f = tmp_path / "p.cache"  # any name: the format is fixed, not taken from the extension
    pc = cache_prompt(model, tok, TEXT, f, chat=False)
    good = f.read_bytes()

    def boom(path, *a, **kw):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(mx, "save_safetensors", boom)
    with pytest.raises(OSError, match="disk full"):
        pc.save(f)
    assert f.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == ["p.cache"]
    monkeypatch.undo()
    assert load_prompt_cache(f, model).tokens == pc.tokens
    with pytest.raises(ValueError, match="holds 3 tokens, the prefix has 4"):
        cache = model.make_cache()
        prefill(model, mx.array([2, 5, 6]), cache)
        save_prompt_cache(tmp_path / "x.safetensors", model, cache, [2, 5, 6, 7])
    assert not (tmp_path / "x.safetensors").exists()


def test_cli_cache_prompt_and_generate(tiny, tmp_path):
    folder = str(tiny[0])
    f = str(tmp_path / "doc.safetensors")
    run = CliRunner().invoke
    r = run(main, ["cache-prompt", "-m", folder, "--prompt", "-", "-o", f, "--raw", "--kv-bits", "8",
                   "--kv-group-size", "32"], input=TEXT)
    assert r.exit_code == 0, r.output
    assert "cached" in r.output and "raw" in r.output and "8-bit g32" in r.output
    full = run(main, ["generate", "-m", folder, "--prompt", TEXT + "and then", "-n", "8", "--raw", "--kv-bits", "8",
                      "--kv-group-size", "32", "--no-stats", "--prefill-step", "1000"])
    cont = run(main, ["generate", "-m", folder, "--prompt-cache", f, "--prompt", "and then", "-n", "8", "--no-stats"])
    assert full.exit_code == 0 and cont.exit_code == 0, (full.output, cont.output)
    assert cont.output == full.output
    r = run(main, ["generate", "-m", folder, "--prompt-cache", f, "--prompt", "x", "-n", "2", "--kv-bits", "4",
                   "--kv-group-size", "32"])
    assert r.exit_code == 1 and r.output.startswith("Error: ") and "not kv_bits=4" in r.output
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 40)
    r = run(main, ["generate", "-m", folder, "--prompt-cache", str(tmp_path / "bad.safetensors"), "--prompt", "x"])
    assert r.exit_code == 1 and "corrupt" in r.output
