"""KV caches for Gemma 3: a rotating window-sized cache for sliding layers, a growing one for global layers.

Both caches know the absolute position of every key they hand back, so the attention mask is computed
from positions (query i sees key j iff j <= i, and i - j < window on sliding layers) and never from
assumptions about the order of the buffer. That keeps chunked prefill, single-token decode and a
wrapped ring buffer equally correct.

Quantized (``bits`` = 2, 3, 4, 5, 6 or 8): both kinds can hold keys and values as MLX affine groups of
``group_size`` elements along head_dim, each tensor a ``(packed, scales, biases)`` triple with scales and
biases in the key dtype (the compute dtype). New keys and values are quantized as they enter, before
attention, so chunked prefill, single-token decode and a resumed prompt cache all attend to identically
quantized keys; ``update_and_fetch`` then hands back triples and attention uses quantized matmuls. One code
path serves both forms: stored k/v are an array or a tuple of arrays, handled leaf by leaf (``tree_map``).
Unlike mlx-lm (whose rotating cache cannot be quantized), the sliding layers keep their window bound.

Memory: a sliding layer never holds more than ``window`` keys and values (``window + slack`` when made
with ``slack``: the extra keys, masked out by position, let ``trim`` step back ``slack`` tokens after the
window has filled, which a server needs to reuse a conversation whose last tokens it re-renders
differently); a global layer holds the context rounded up to ``step`` tokens. ``cache_nbytes`` reports what is allocated (packed words, scales
and biases included), not an estimate.
"""

from __future__ import annotations

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map

KV_BITS = (2, 3, 4, 5, 6, 8)  # MLX's affine widths (1-bit is refused: it keeps nothing of a key)
KV_GROUP_SIZES = (32, 64, 128)  # what mx.quantize / quantized_matmul accept


def check_kv_quantization(bits: int | None, group_size: int, head_dim: int | None = None) -> None:
    """Raise ValueError unless ``bits``/``group_size`` are a KV quantization MLX can run on ``head_dim``."""
    if bits is None:
        return
    if isinstance(bits, bool) or bits not in KV_BITS:
        raise ValueError(f"kv_bits must be one of {', '.join(map(str, KV_BITS))} (or None for a float cache), "
                         f"not {bits!r}")
    if group_size not in KV_GROUP_SIZES:
        raise ValueError(f"kv_group_size must be one of {', '.join(map(str, KV_GROUP_SIZES))}, not {group_size!r}")
    if head_dim is not None and head_dim % group_size:
        raise ValueError(f"kv_group_size {group_size} does not divide the model's head_dim {head_dim} "
                         f"(keys are quantized along head_dim)")


def _length(x) -> int:
    """Tokens in a stored k or v (an array, or the packed array of a quantized triple)."""
    return (x[0] if isinstance(x, tuple) else x).shape[2]


def _cat(a, b):
    return tree_map(lambda x, y: mx.concatenate([x, y], axis=2), a, b)


class _Cache:
    keys = None  # mx.array, or (packed, scales, biases) when quantized; None before the first token
    values = None
    bits: int | None = None
    group_size: int = 64

    def _init_quant(self, bits: int | None, group_size: int) -> None:
        check_kv_quantization(bits, group_size)
        self.bits, self.group_size = bits, group_size

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    def _quantize(self, x: mx.array):
        if self.bits is None:
            return x
        return tuple(mx.quantize(x, group_size=self.group_size, bits=self.bits))

    @property
    def state(self) -> list:
        """Every array the cache holds (for mx.eval)."""
        if self.keys is None:
            return []
        return [a for _, a in tree_flatten([self.keys, self.values])]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state)

    def _size(self) -> int:
        return 0 if self.keys is None else _length(self.keys)

    def copy(self):
        """An independent cache with the same contents (arrays are shared until one side writes)."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        if self.keys is not None:
            new.keys, new.values = tree_map(mx.array, self.keys), tree_map(mx.array, self.values)
        return new


class KVCache(_Cache):
    """Growing cache for global-attention layers (pre-allocated in steps)."""

    step = 256

    def __init__(self, bits: int | None = None, group_size: int = 64):
        self._init_quant(bits, group_size)
        self.keys = None
        self.values = None
        self.offset = 0  # number of tokens seen

    def key_positions(self, length: int) -> mx.array | None:
        """Absolute positions of the keys the next ``update_and_fetch`` of ``length`` tokens returns (None
        for one new token: it sees every key)."""
        return None if length == 1 else mx.arange(self.offset + length)

    def can_trim(self, n: int) -> bool:
        return 0 <= n <= self.offset

    def trim(self, n: int) -> None:
        """Forget the newest ``n`` tokens (the buffer keeps them until overwritten; ``fetch`` stops before)."""
        if not self.can_trim(n):
            raise ValueError(f"cannot trim {n} of {self.offset} tokens")
        self.offset -= n

    def update_and_fetch(self, k: mx.array, v: mx.array):
        self._append(self._quantize(k), self._quantize(v))
        return self.fetch()

    def _append(self, k, v) -> None:
        """Write stored-form keys and values (arrays or triples) after the ``offset`` tokens held."""
        end = self.offset + _length(k)
        if self.keys is None or end > self._size():
            cap = ((end + self.step - 1) // self.step) * self.step
            off = self.offset

            def grow(new, old=None):
                buf = mx.zeros(new.shape[:2] + (cap,) + new.shape[3:], new.dtype)
                if old is not None and off:
                    buf[..., :off, :] = old[..., :off, :]
                return buf

            if self.keys is None:
                self.keys, self.values = tree_map(grow, k), tree_map(grow, v)
            else:
                self.keys, self.values = tree_map(grow, k, self.keys), tree_map(grow, v, self.values)

        def put(buf, new):
            buf[..., self.offset : end, :] = new

        tree_map(put, self.keys, k)
        tree_map(put, self.values, v)
        self.offset = end

    def fetch(self):
        """The keys and values of every token seen, in order (views)."""
        end = self.offset
        return tree_map(lambda x: x[..., :end, :], self.keys), tree_map(lambda x: x[..., :end, :], self.values)

    def restore(self, keys, values, offset: int) -> None:
        """Hold ``keys``/``values`` (every token seen, in order; arrays or triples) after ``offset`` tokens."""
        n = 0 if keys is None else _length(keys)
        if n != offset:
            raise ValueError(f"a global-layer cache after {offset} tokens holds {offset} keys, not {n}")
        self.keys = self.values = None
        self.offset = 0
        if offset:
            self._append(keys, values)


class RotatingKVCache(_Cache):
    """Window-sized cache for sliding-window layers.

    Holds at most ``window + slack`` keys: the current token plus the ``window - 1`` before it, which is
    all a sliding layer can see, and ``slack`` older ones that only ``trim`` uses (masked by position).
    Single-token decode writes into a ring; a multi-token chunk is attended against the ordered history
    plus itself, and then the newest ``window + slack`` keys are kept.
    """

    def __init__(self, window: int, bits: int | None = None, group_size: int = 64, slack: int = 0):
        if window < 1:
            raise ValueError("window must be >= 1")
        if slack < 0:
            raise ValueError("slack must be >= 0")
        self._init_quant(bits, group_size)
        self.window = window
        self.slack = slack
        self.keys = None
        self.values = None
        self.offset = 0  # number of tokens seen
        self._start = 0  # ring index of the oldest key once the buffer is full

    @property
    def capacity(self) -> int:
        return self.window + self.slack

    def _ring_step(self, length: int) -> bool:
        return length == 1 and self._size() == self.capacity

    def key_positions(self, length: int) -> mx.array | None:
        """Absolute positions of the keys the next ``update_and_fetch`` of ``length`` tokens returns, in the
        order it returns them (None when one new token sees them all)."""
        n = self._size()
        if self._ring_step(length):
            if not self.slack:
                return None  # every key in the ring is visible to the new token
            # after the write, ring slot i holds position offset - ((start - i) mod capacity)
            return self.offset - (self._start - mx.arange(n)) % n
        if length == 1 and n < self.window:
            return None
        return mx.arange(self.offset - n, self.offset + length)

    def _ordered(self):
        if self._start == 0:
            return self.keys, self.values
        s = self._start

        def unroll(x):
            return mx.concatenate([x[..., s:, :], x[..., :s, :]], axis=2)

        return tree_map(unroll, self.keys), tree_map(unroll, self.values)

    def fetch(self):
        """The keys and values held (the last min(offset, window) tokens, or up to ``slack`` more), oldest first."""
        return self._ordered()

    def restore(self, keys, values, offset: int) -> None:
        """Hold ``keys``/``values`` (the last min(offset, window) tokens, or up to ``slack`` more; oldest first)
        after ``offset`` tokens."""
        n = 0 if keys is None else _length(keys)
        if not min(offset, self.window) <= n <= min(offset, self.capacity):
            raise ValueError(f"a window-{self.window} cache after {offset} tokens holds {min(offset, self.window)} "
                             f"keys, not {n}")
        self.keys, self.values = (keys, values) if n else (None, None)
        self.offset, self._start = offset, 0

    def can_trim(self, n: int) -> bool:
        """Whether the newest ``n`` tokens can be forgotten: what is left must still hold the window."""
        return 0 <= n <= self.offset and self._size() - n >= min(self.offset - n, self.window)

    def trim(self, n: int) -> None:
        """Forget the newest ``n`` tokens (possible for up to ``slack`` tokens once the window has filled)."""
        if not self.can_trim(n):
            raise ValueError(f"cannot trim {n} of {self.offset} tokens from a window-{self.window} cache holding "
                             f"{self._size()} (slack {self.slack})")
        if n == 0:
            return
        keys, values = self._ordered()
        keep = self._size() - n
        self.keys = tree_map(lambda x: x[..., :keep, :], keys) if keep else None
        self.values = tree_map(lambda x: x[..., :keep, :], values) if keep else None
        self.offset -= n
        self._start = 0

    def update_and_fetch(self, k: mx.array, v: mx.array):
        k, v = self._quantize(k), self._quantize(v)
        L = _length(k)
        if self._ring_step(L):
            s = self._start

            def put(buf, new):
                buf[..., s : s + 1, :] = new

            tree_map(put, self.keys, k)
            tree_map(put, self.values, v)
            self._start = (s + 1) % self.capacity
            self.offset += 1
            return self.keys, self.values
        if self.keys is None:
            keys, values = k, v
        else:
            ok, ov = self._ordered()
            keys, values = _cat(ok, k), _cat(ov, v)
        self.offset += L
        self._start = 0
        if _length(keys) > self.capacity:
            # a copy, not a view: a view would keep the whole (history + chunk) buffer alive
            c = self.capacity
            self.keys = tree_map(lambda x: mx.contiguous(x[..., -c:, :]), keys)
            self.values = tree_map(lambda x: mx.contiguous(x[..., -c:, :]), values)
        else:
            self.keys, self.values = keys, values
        return keys, values


def make_cache(config, kv_bits: int | None = None, kv_group_size: int = 64, slack: int = 0,
               layers: list[int] | None = None) -> list:
    """One cache per layer (``layers``: of those only, a pipeline stage's): rotating (window) on sliding layers,
    growing on global ones; ``kv_bits`` quantizes both kinds (groups of ``kv_group_size`` along head_dim);
    ``slack``: tokens a sliding layer keeps beyond its window so the cache can be trimmed back that far."""
    check_kv_quantization(kv_bits, kv_group_size, config.head_dim)
    return [
        RotatingKVCache(config.sliding_window, kv_bits, kv_group_size, slack) if config.is_sliding(i)
        else KVCache(kv_bits, kv_group_size)
        for i in (range(config.num_hidden_layers) if layers is None else layers)
    ]


def reserve_slack(cache: list, n: int) -> None:
    """Let every sliding layer keep at least ``n`` keys beyond its window from now on, so the newest ``n`` tokens
    can always be trimmed (speculative decoding rolls back its rejected drafts). The buffer grows to the new
    bound as tokens arrive; what it holds and the order it hands keys back stay correct on the way."""
    for c in cache:
        if isinstance(c, RotatingKVCache):
            c.slack = max(c.slack, n)


def cache_nbytes(cache: list) -> int:
    return sum(c.nbytes for c in cache)


def can_trim(cache: list, n: int) -> bool:
    return all(c.can_trim(n) for c in cache)


def trim_cache(cache: list, n: int) -> None:
    """Forget the newest ``n`` tokens on every layer (check ``can_trim`` first: a failure leaves layers
    trimmed)."""
    for c in cache:
        c.trim(n)


def copy_cache(cache: list) -> list:
    """Independent copies of a cache's layers (for reusing one prefix several times)."""
    return [c.copy() for c in cache]
