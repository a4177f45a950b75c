"""The KV caches: chunked prefill and decode through them equal one full forward without cache."""

import mlx.core as mx
import numpy as np
import pytest

from conftest import random_model, tiny_config
from mlx_gemma_qat.model.cache import KVCache, RotatingKVCache, cache_nbytes


def _run_chunks(model, tokens, chunks):
    cache = model.make_cache()
    outs, pos = [], 0
    for n in chunks:
        outs.append(model(tokens[:, pos : pos + n], cache=cache))
        mx.eval(outs[-1])
        pos += n
    assert pos == tokens.shape[1]
    return mx.concatenate(outs, axis=1), cache


@pytest.mark.parametrize(
    "chunks",
    [
        [40],  # one prefill, longer than the window
        [1] * 40,  # pure decode: the ring wraps several times
        [5, 3, 1, 1, 12, 1, 17],  # mixed chunks across window boundaries
        [8, 8, 8, 8, 8],  # chunks exactly the window
        [20] + [1] * 20,  # prefill past the window, then decode
    ],
)
def test_cached_equals_full_forward(tiny_model, chunks):
    tokens = mx.array(np.random.default_rng(1).integers(0, 256, (1, sum(chunks))))
    full = tiny_model(tokens)
    cached, _ = _run_chunks(tiny_model, tokens, chunks)
    np.testing.assert_allclose(np.array(cached), np.array(full), atol=2e-4, rtol=1e-4)


def test_sliding_window_changes_logits():
    """The same weights with a bigger window give different logits past the window: the mask matters."""
    tokens = mx.array(np.random.default_rng(2).integers(0, 256, (1, 30)))
    a = random_model(tiny_config(sliding_window=8))(tokens)
    b = random_model(tiny_config(sliding_window=64))(tokens)
    np.testing.assert_allclose(np.array(a[:, :8]), np.array(b[:, :8]), atol=1e-5)
    assert np.abs(np.array(a[:, 20:]) - np.array(b[:, 20:])).max() > 1e-3


def test_cache_memory_matches_theory(tiny_model):
    cfg = tiny_model.cfg
    tokens = mx.array(np.random.default_rng(3).integers(0, 256, (1, 256)))
    _, cache = _run_chunks(tiny_model, tokens, [100, 100, 56])
    for c in cache:
        mx.eval(c.state)
    # global layers hold exactly the context (256 = one step), sliding layers exactly the window
    assert cache_nbytes(cache) == cfg.kv_cache_bytes(256, bytes_per_element=4)
    sliding = [c for c in cache if isinstance(c, RotatingKVCache)]
    assert all(c.keys.shape[2] == cfg.sliding_window for c in sliding)
    assert all(isinstance(c, KVCache) for i, c in enumerate(cache) if not cfg.is_sliding(i))


def test_rotating_cache_positions():
    c = RotatingKVCache(4)
    k = mx.zeros((1, 1, 6, 2))
    assert c.key_positions(6).tolist() == list(range(6))
    c.update_and_fetch(k, k)
    assert c.keys.shape[2] == 4 and c.offset == 6
    assert c.key_positions(3).tolist() == [2, 3, 4, 5, 6, 7, 8]
    assert c.key_positions(1) is None  # full ring: a single token sees all of it
    with pytest.raises(ValueError):
        RotatingKVCache(0)


def test_reported_cache_memory_is_what_mlx_holds():
    """After a long chunked prefill and decode, MLX's active memory grows by exactly what the cache reports."""
    import gc

    from mlx_gemma_qat.generate import prefill

    model = random_model(tiny_config(sliding_window=64, num_hidden_layers=6, head_dim=256, num_key_value_heads=2))
    x = mx.array(np.random.default_rng(0).integers(0, 256, 1024))
    gc.collect()
    mx.clear_cache()
    base = mx.get_active_memory()
    cache = model.make_cache()
    mx.eval(prefill(model, x, cache, step=256))
    for _ in range(100):
        mx.eval(model(mx.array([[5]]), cache=cache))
    gc.collect()
    mx.clear_cache()
    held = mx.get_active_memory() - base
    assert abs(held - cache_nbytes(cache)) < 4096, (held, cache_nbytes(cache))
    # sliding layers: exactly the window; global layer: the context rounded up to the 256-token step
    step_ctx = -(-1124 // 256) * 256
    per_tok = 2 * 2 * 256 * 4
    assert cache_nbytes(cache) == per_tok * (5 * 64 + 1 * step_ctx)


def _run(model, cache, tokens, chunks):
    outs, pos = [], 0
    for n in chunks:
        outs.append(model(tokens[:, pos : pos + n], cache=cache))
        mx.eval(outs[-1])
        pos += n
    return mx.concatenate(outs, axis=1)


@pytest.mark.parametrize("kv_bits", [None, 8])
@pytest.mark.parametrize("chunks", [[1] * 40, [20] + [1] * 20, [5, 13, 1, 1, 9, 1, 10]])
def test_slack_cache_equals_plain(tiny_model, chunks, kv_bits):
    """Keys kept beyond the window (slack) are masked by position: logits equal a plain cache's."""
    tokens = mx.array(np.random.default_rng(4).integers(0, 256, (1, sum(chunks))))
    plain = _run(tiny_model, tiny_model.make_cache(kv_bits, 32), tokens, chunks)
    cache = tiny_model.make_cache(kv_bits, 32, slack=5)
    slack = _run(tiny_model, cache, tokens, chunks)
    np.testing.assert_allclose(np.array(slack), np.array(plain), atol=2e-5, rtol=1e-5)
    window = tiny_model.cfg.sliding_window
    from mlx_gemma_qat.model.cache import _length

    assert all(_length(c.keys) == window + 5 for c in cache if isinstance(c, RotatingKVCache))


@pytest.mark.parametrize("kv_bits", [None, 4])
@pytest.mark.parametrize("n", [1, 3, 5])
def test_trim_then_continue_equals_fresh(tiny_model, n, kv_bits):
    """Past the window, a cache with slack steps back n <= slack tokens; continuing on other tokens gives the
    logits of a fresh run over the new sequence. Without slack (or past it) trimming is refused."""
    rng = np.random.default_rng(5)
    a = mx.array(rng.integers(0, 256, (1, 30)))  # window is 8: well past it
    tail = mx.array(rng.integers(0, 256, (1, 6)))
    cache = tiny_model.make_cache(kv_bits, 32, slack=5)
    _run(tiny_model, cache, a, [12, 1, 1, 16])
    from mlx_gemma_qat.model.cache import can_trim, trim_cache

    assert can_trim(cache, n) and not can_trim(cache, 6)
    trim_cache(cache, n)
    assert cache[0].offset == 30 - n
    got = _run(tiny_model, cache, tail, [2, 1, 1, 1, 1])
    fresh_cache = tiny_model.make_cache(kv_bits, 32)
    want = _run(tiny_model, fresh_cache, mx.concatenate([a[:, : 30 - n], tail], axis=1), [30 - n, 2, 1, 1, 1, 1])
    np.testing.assert_allclose(np.array(got), np.array(want[:, 30 - n :]), atol=2e-4, rtol=1e-4)
    plain = tiny_model.make_cache(kv_bits, 32)
    _run(tiny_model, plain, a, [30])
    assert not can_trim(plain, 1) and can_trim(plain, 0)
    with pytest.raises(ValueError, match="cannot trim"):
        trim_cache(plain, 1)


def test_trim_before_window_fills(tiny_model):
    """Before the window fills, any step back is possible, also without slack."""
    cache = tiny_model.make_cache()
    tokens = mx.array(np.random.default_rng(6).integers(0, 256, (1, 7)))
    _run(tiny_model, cache, tokens, [7])
    from mlx_gemma_qat.model.cache import can_trim, trim_cache

    assert can_trim(cache, 7)
    trim_cache(cache, 4)
    got = _run(tiny_model, cache, tokens[:, 3:5], [2])
    want = tiny_model(tokens[:, :5])
    np.testing.assert_allclose(np.array(got), np.array(want[:, 3:5]), atol=2e-4, rtol=1e-4)
