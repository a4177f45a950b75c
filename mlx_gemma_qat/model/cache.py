"""KV caches for Gemma 3: a rotating window-sized cache for sliding layers, a growing one for global layers.

Both caches know the absolute position of every key they hand back, so the attention mask is computed
from positions (query i sees key j iff j <= i, and i - j < window on sliding layers) and never from
assumptions about the order of the buffer. That keeps chunked prefill, single-token decode and a
wrapped ring buffer equally correct.

Memory: a sliding layer never holds more than ``window`` keys and values; a global layer holds the
context rounded up to ``step`` tokens. ``cache_nbytes`` reports what is allocated, not an estimate.
"""

from __future__ import annotations

import mlx.core as mx


class _Cache:
    keys: mx.array | None
    values: mx.array | None

    @property
    def state(self):
        if self.keys is None:
            return []
        return [self.keys, self.values]

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


class KVCache(_Cache):
    """Growing cache for global-attention layers (pre-allocated in steps)."""

    step = 256

    def __init__(self):
        self.keys = None
        self.values = None
        self.offset = 0  # number of tokens seen

    def key_positions(self, length: int) -> mx.array | None:
        """Absolute positions of the keys the next ``update_and_fetch`` of ``length`` tokens returns."""
        return mx.arange(self.offset + length)

    def update_and_fetch(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        B, H, L, D = k.shape
        end = self.offset + L
        if self.keys is None or end > self.keys.shape[2]:
            cap = ((end + self.step - 1) // self.step) * self.step
            nk = mx.zeros((B, H, cap, D), k.dtype)
            nv = mx.zeros((B, H, cap, v.shape[3]), v.dtype)
            if self.keys is not None:
                nk[..., : self.offset, :] = self.keys[..., : self.offset, :]
                nv[..., : self.offset, :] = self.values[..., : self.offset, :]
            self.keys, self.values = nk, nv
        self.keys[..., self.offset : end, :] = k
        self.values[..., self.offset : end, :] = v
        self.offset = end
        return self.keys[..., :end, :], self.values[..., :end, :]


class RotatingKVCache(_Cache):
    """Window-sized cache for sliding-window layers.

    Holds at most ``window`` keys: the current token plus the ``window - 1`` before it, which is all
    a sliding layer can see. Single-token decode writes into a ring; a multi-token chunk is attended
    against the ordered history plus itself, and then the newest ``window`` keys are kept.
    """

    def __init__(self, window: int):
        if window < 1:
            raise ValueError("window must be >= 1")
        self.window = window
        self.keys = None
        self.values = None
        self.offset = 0  # number of tokens seen
        self._start = 0  # ring index of the oldest key once the buffer is full

    def _size(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def _ring_step(self, length: int) -> bool:
        return length == 1 and self._size() == self.window

    def key_positions(self, length: int) -> mx.array | None:
        if self._ring_step(length):
            return None  # every key in the ring is visible to the new token
        n = self._size()
        return mx.arange(self.offset - n, self.offset + length)

    def _ordered(self):
        if self._start == 0:
            return self.keys, self.values
        s = self._start
        k = mx.concatenate([self.keys[..., s:, :], self.keys[..., :s, :]], axis=2)
        v = mx.concatenate([self.values[..., s:, :], self.values[..., :s, :]], axis=2)
        return k, v

    def update_and_fetch(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        L = k.shape[2]
        if self._ring_step(L):
            s = self._start
            self.keys[..., s : s + 1, :] = k
            self.values[..., s : s + 1, :] = v
            self._start = (s + 1) % self.window
            self.offset += 1
            return self.keys, self.values
        if self.keys is None:
            keys, values = k, v
        else:
            ok, ov = self._ordered()
            keys = mx.concatenate([ok, k], axis=2)
            values = mx.concatenate([ov, v], axis=2)
        self.offset += L
        self._start = 0
        if keys.shape[2] > self.window:
            # a copy, not a view: a view would keep the whole (history + chunk) buffer alive
            self.keys = mx.contiguous(keys[..., -self.window :, :])
            self.values = mx.contiguous(values[..., -self.window :, :])
        else:
            self.keys, self.values = keys, values
        return keys, values


def make_cache(config) -> list:
    return [
        RotatingKVCache(config.sliding_window) if config.is_sliding(i) else KVCache()
        for i in range(config.num_hidden_layers)
    ]


def cache_nbytes(cache: list) -> int:
    return sum(c.nbytes for c in cache)
