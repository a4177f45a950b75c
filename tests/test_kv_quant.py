"""Quantized KV cache (kv_bits) on sliding and global layers: accuracy against the float cache, chunking
invariance, decode far past the window, memory equal to the theory, image prompts, chat reuse, bad options."""

import gc

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import random_model, tiny_config
from mlx_gemma_qat import ChatSession, stream_generate
from mlx_gemma_qat.cli import main
from mlx_gemma_qat.generate import prefill
from mlx_gemma_qat.model.cache import KVCache, RotatingKVCache, cache_nbytes, make_cache
from mlx_gemma_qat.model.config import TextConfig

W = 8  # the tiny model's sliding window


@pytest.fixture(scope="module")
def model():
    # head_dim 64: the default group size (64) applies
    return random_model(tiny_config(head_dim=64, sliding_window=W))


def tokens(n, seed=1):
    return mx.array(np.random.default_rng(seed).integers(0, 256, (1, n)))


def run(model, x, chunks, **kw):
    cache = model.make_cache(**kw)
    outs, pos = [], 0
    for n in chunks:
        outs.append(model(x[:, pos : pos + n], cache=cache))
        mx.eval(outs[-1])
        pos += n
    assert pos == x.shape[1]
    return np.array(mx.concatenate(outs, axis=1)), cache


def rel_rms(a, b):
    return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b**2)))


def test_quantized_logits_close_to_float(model):
    """Past the window (every sliding cache wrapped), 8-bit keys/values move the logits of this random model
    (which amplifies any perturbation through 8 random layers) by ~2% RMS, 4-bit by ~16x more, and the error
    shrinks with every added bit."""
    x = tokens(40)
    ref, _ = run(model, x, [40])
    errs = {}
    for bits in (2, 3, 4, 5, 6, 8):
        out, cache = run(model, x, [40], kv_bits=bits)
        assert all(c.quantized and isinstance(c.keys, tuple) and c.keys[0].dtype == mx.uint32 for c in cache)
        errs[bits] = rel_rms(out, ref)
    print(errs)
    assert errs[8] < 0.04, errs
    assert errs[4] < 0.5, errs
    assert errs[8] < errs[6] < errs[5] < errs[4] < errs[3] < errs[2], errs
    # each bit halves the rounding step: 4 more bits, about 16x less error
    assert 8 < errs[4] / errs[8] < 32, errs
    # the greedy choices barely move at 8 bits
    assert (out.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_attention_equals_float_attention_on_dequantized_keys(model, bits):
    """The quantized matmuls lose nothing beyond the rounding of the keys and values themselves: a cache that
    hands back their dequantized floats (to MLX's float attention) gives the same logits."""

    def dequantizing(c):
        fetch = c.update_and_fetch

        def update_and_fetch(k, v):
            k, v = fetch(k, v)
            return tuple(mx.dequantize(*t, group_size=c.group_size, bits=c.bits) for t in (k, v))

        c.update_and_fetch = update_and_fetch
        return c

    x = tokens(40, seed=4)
    for chunks in ([40], [13, 1, 1, 25]):
        got, _ = run(model, x, chunks, kv_bits=bits)
        cache = [dequantizing(c) for c in model.make_cache(bits)]
        want = []
        pos = 0
        for n in chunks:
            want.append(np.array(model(x[:, pos : pos + n], cache=cache)))
            pos += n
        np.testing.assert_allclose(got, np.concatenate(want, axis=1), atol=1e-4)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize(
    "chunks",
    [[5, 3, 1, 1, 12, 1, 17], [8, 8, 8, 8, 8], [20] + [1] * 20, [1] * 40],
)
def test_chunked_prefill_and_decode_equal_one_pass(model, bits, chunks):
    """Keys are quantized as they enter, one token at a time or in chunks: any chunking attends to the same
    quantized keys (up to a rare 1-step code flip where the float keys of two chunkings differ in the last
    bit), positions stay exact through the wrapped ring."""
    x = tokens(sum(chunks))
    one, _ = run(model, x, [sum(chunks)], kv_bits=bits)
    ref, _ = run(model, x, [sum(chunks)])
    got, cache = run(model, x, chunks, kv_bits=bits)
    diff = np.abs(got - one).max()
    assert diff < 0.1 * np.abs(one - ref).max() and diff < 1e-2, diff
    assert all(c.offset == x.shape[1] for c in cache)


def test_decode_far_past_the_window_keeps_the_window_bound(model):
    x = tokens(16 * W)
    one, _ = run(model, x, [16 * W], kv_bits=8)
    got, cache = run(model, x, [3 * W] + [1] * (13 * W), kv_bits=8)  # the ring wraps 13 times
    np.testing.assert_allclose(got, one, atol=1e-2)
    assert (got.argmax(-1) == one.argmax(-1)).all()
    for c in cache:
        n = c.keys[0].shape[2]
        assert n == (W if isinstance(c, RotatingKVCache) else 256)
        assert all(a.shape[2] == n for a in c.keys + c.values)


def geometry_270m(**kw) -> TextConfig:
    """Gemma 3 270M's attention geometry: 18 layers (every 6th global), window 512, 1 kv head of 256."""
    return tiny_config(num_hidden_layers=18, sliding_window=512, num_key_value_heads=1, head_dim=256,
                       max_position_embeddings=32768, **kw)


def feed(cfg, context, bits, gs=64, dtype=mx.float32, chunk=8192):
    cache = make_cache(cfg, bits, gs)
    for start in range(0, context, chunk):
        n = min(chunk, context - start)
        k = mx.random.normal((1, cfg.num_key_value_heads, n, cfg.head_dim)).astype(dtype)
        for c in cache:
            c.update_and_fetch(k, k)
        mx.eval([c.state for c in cache])
    return cache


@pytest.mark.parametrize("context", [8192, 32768])
@pytest.mark.parametrize("bits", [None, 8, 4])
def test_kv_bytes_equal_the_theory_at_270m_geometry(context, bits):
    """15 sliding layers x 512 + 3 global layers x context, at bits + a scale and a bias (float32, the cache
    dtype here) per 64 elements: within 5% (exact here: the contexts are multiples of the 256-token step)."""
    cfg = geometry_270m()
    cache = feed(cfg, context, bits)
    theory = cfg.kv_cache_bytes(context, 4, bits, 64)
    assert abs(cache_nbytes(cache) / theory - 1) < 0.05
    assert cache_nbytes(cache) == theory
    if bits is not None:  # by hand: 8-bit g64 in float32 = 1 + 8/64 bytes per element, 4-bit 0.5 + 8/64
        per_token = 2 * 256 * (bits / 8 + 8 / 64)
        assert cache_nbytes(cache) == per_token * (15 * 512 + 3 * context)
        assert all(c.keys[0].shape[2] == 512 for c in cache if isinstance(c, RotatingKVCache))


def test_bfloat16_scales_and_a_context_off_the_step():
    """A bfloat16 cache keeps bfloat16 scales; a context that is not a multiple of 256 is rounded up on the
    global layers, still within 5% of the theory at 8K."""
    cfg = geometry_270m()
    cache = feed(cfg, 8000, 8, dtype=mx.bfloat16)
    assert all(c.keys[1].dtype == mx.bfloat16 and c.keys[2].dtype == mx.bfloat16 for c in cache)
    theory = cfg.kv_cache_bytes(8000, 2, 8, 64)
    assert cache_nbytes(cache) == 2 * 256 * (1 + 4 / 64) * (15 * 512 + 3 * 8192)
    assert abs(cache_nbytes(cache) / theory - 1) < 0.05


def test_reported_bytes_are_what_mlx_holds():
    """After a chunked prefill and decode through a 4-bit cache, MLX's active memory grew by what it reports."""
    model = random_model(tiny_config(sliding_window=64, num_hidden_layers=6, head_dim=256, num_key_value_heads=2))
    x = mx.array(np.random.default_rng(0).integers(0, 256, 600))
    gc.collect()
    mx.clear_cache()
    base = mx.get_active_memory()
    cache = model.make_cache(kv_bits=4)
    mx.eval(prefill(model, x, cache, step=256))
    for _ in range(30):
        mx.eval(model(mx.array([[5]]), cache=cache))
    gc.collect()
    mx.clear_cache()
    held = mx.get_active_memory() - base
    assert abs(held - cache_nbytes(cache)) < 4096, (held, cache_nbytes(cache))
    per_token = 2 * 2 * 256 * (0.5 + 8 / 64)
    assert cache_nbytes(cache) == per_token * (5 * 64 + 1 * 768)


def test_bad_kv_options_are_refused(model):
    cfg = model.cfg
    for bits, gs, match in [(7, 64, "kv_bits must be one of"), (1, 64, "kv_bits"), (16, 64, "kv_bits"),
                            (True, 64, "kv_bits"), (8, 48, "kv_group_size must be one of"),
                            (8, 128, "does not divide the model's head_dim 64")]:
        with pytest.raises(ValueError, match=match):
            make_cache(cfg, bits, gs)
    with pytest.raises(ValueError):
        RotatingKVCache(8, bits=7)
    with pytest.raises(ValueError):
        KVCache(bits=4, group_size=16)


@pytest.fixture(scope="module")
def tiny():
    from gguf_factory import TINY
    from mlx_gemma_qat import load
    from mlx_gemma_qat.convert import convert
    import tempfile

    folder = convert(TINY, tempfile.mkdtemp() + "/m", mode="none", progress=False)
    return (folder, *load(folder))


def test_generate_with_kv_bits(tiny):
    """head_dim 32 here: group 32 runs; the default group (64) is refused before any work, as is 7 bits."""
    _, model, tok = tiny
    letters = lambda lp: mx.argmax(lp[:, 107:200], axis=-1) + 107  # noqa: E731
    prompt = "the quick brown fox jumps over the lazy dog " * 2  # past the window (16)
    rs = {b: list(stream_generate(model, tok, prompt, 12, chat=False, sampler=letters, kv_bits=b, kv_group_size=32))
          for b in (None, 8, 4)}
    assert rs[8][-1].cache_bytes < rs[None][-1].cache_bytes / 3 and rs[4][-1].cache_bytes < rs[8][-1].cache_bytes
    with pytest.raises(ValueError, match="does not divide the model's head_dim 32"):
        list(stream_generate(model, tok, prompt, 2, kv_bits=8))
    with pytest.raises(ValueError, match="kv_bits must be one of"):
        list(stream_generate(model, tok, prompt, 2, kv_bits=7, kv_group_size=32))


def test_cli_kv_bits(tiny):
    folder = tiny[0]
    r = CliRunner().invoke(main, ["generate", "-m", str(folder), "--prompt", "hello world", "-n", "3", "--raw",
                                  "--kv-bits", "8", "--kv-group-size", "32"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["generate", "-m", str(folder), "--prompt", "hello", "-n", "3", "--kv-bits", "4"])
    assert r.exit_code == 1 and "Error: kv_group_size 64 does not divide the model's head_dim 32" in r.output
    r = CliRunner().invoke(main, ["generate", "-m", str(folder), "--prompt", "hello", "-n", "3", "--kv-bits", "7",
                                  "--kv-group-size", "32"])
    assert r.exit_code == 1 and "kv_bits must be one of 2, 3, 4, 5, 6, 8" in r.output
    r = CliRunner().invoke(main, ["chat", "-m", str(folder), "--kv-bits", "8", "--kv-group-size", "32", "-n", "3"],
                           input="hi\n/quit\n")
    assert r.exit_code == 0, r.output


def test_image_prompt_with_kv_bits(vlm):
    """An image prompt (bidirectional image attention, crossing the sliding window) through an 8-bit cache:
    prefill in small chunks (never splitting the image) equals one pass, logits close to the float cache."""
    from mlx_gemma_qat.generate import encode_prompt, image_token_ids
    from mlx_gemma_qat.image import preprocess_all
    from test_chat import IMAGES

    _, model, tok = vlm
    pixels, _ = preprocess_all([IMAGES / "a.png"], model.mcfg.vision.image_size, False)
    ids = encode_prompt(tok, "Describe this picture in detail, please.", chat=True, n_images=1,
                        image_ids=image_token_ids(model))
    assert len(ids) > 2 * model.cfg.sliding_window
    emb, groups = model.embed_prompt(ids, mx.array(pixels))
    out = {}
    for name, bits, step in [("float", None, 512), ("q8", 8, 512), ("q8 chunks", 8, 5), ("q4", 4, 512)]:
        cache = model.make_cache(bits, 32)
        out[name] = np.array(prefill(model, None, cache, step, embeddings=emb, groups=groups))
        assert cache[0].offset == len(ids)
    assert np.abs(out["q8 chunks"] - out["q8"]).max() < 1e-2
    # this random checkpoint amplifies key noise (8-bit: ~8% RMS on the logits); 4 bits cost ~16x that
    assert rel_rms(out["q8"], out["float"]) < rel_rms(out["q4"], out["float"]) / 8
    rs = list(stream_generate(model, tok, "What is it?", 4, images=[IMAGES / "a.png"], kv_bits=8, kv_group_size=32))
    assert rs[-1].generation_tokens == 4


def test_chat_session_reuses_a_quantized_cache(vlm):
    """Each turn of a ChatSession with kv_bits prefills only the new tokens into its 8-bit cache and answers
    as a fresh 8-bit prompt of the whole conversation does."""
    from test_chat import IMAGES, letters_only

    _, model, tok = vlm
    sampler = letters_only(tok)
    s = ChatSession(model, tok, system="Be brief.", kv_bits=8, kv_group_size=32)
    history = [{"role": "system", "content": "Be brief."}]
    for k, (text, images) in enumerate([("hi", []), ("and this", [IMAGES / "a.png"]), ("thanks", [])]):
        before = len(s.cached_ids)
        rs = list(s.send(text, images, max_tokens=8, sampler=sampler))
        assert s.reused_tokens == before and (k == 0) == (before == 0)
        assert all(c.quantized for c in s.cache)
        history.append({"role": "user", "content": [{"type": "image", "image": i} for i in images]
                        + [{"type": "text", "text": text}]})
        fresh = list(stream_generate(model, tok, history, 8, sampler=sampler, kv_bits=8, kv_group_size=32))
        assert [r.token for r in rs] == [r.token for r in fresh], k
        history.append({"role": "assistant", "content": "".join(r.text for r in rs)})
    with pytest.raises(ValueError, match="does not divide"):
        ChatSession(model, tok, kv_bits=8)
