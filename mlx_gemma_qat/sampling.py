"""Sampling: mlx-lm's filters and temperature as one distribution, drawn from the global or a private generator.

``Sampler.logits`` gives the distribution a sampler draws from (top-p, min-p and top-k, in mlx-lm's
``make_sampler`` order, then the temperature), so plain decoding, the server and speculative rejection
sampling (``speculative.py``), which needs the distribution itself and not only a draw, all sample the same one.
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p


class Sampler:
    """Picks tokens from log-probabilities (..., vocab). ``temp`` 0 is greedy (argmax); ``top_p`` 0 or 1, ``top_k``
    0 and ``min_p`` 0 are off. ``key``: an ``mx.random.key`` to draw from (split once per draw, so the draws depend
    on it alone); None draws from MLX's global generator (``mx.random.seed``)."""

    def __init__(self, temp: float = 0.0, top_p: float = 0.0, top_k: int = 0, min_p: float = 0.0, key=None):
        self.temp, self.top_p, self.top_k, self.min_p = float(temp), float(top_p), int(top_k), float(min_p)
        self.key = key

    @property
    def greedy(self) -> bool:
        return self.temp == 0

    def logits(self, logprobs: mx.array) -> mx.array:
        """Logits (up to a constant per row) of the distribution a draw takes from ``logprobs``; not for greedy."""
        lp = logprobs
        if 0 < self.top_p < 1:
            lp = apply_top_p(lp, self.top_p)
        if self.min_p > 0:
            lp = apply_min_p(lp, self.min_p)
        if 0 < self.top_k < lp.shape[-1]:
            lp = apply_top_k(lp, self.top_k)
        return lp * (1.0 / self.temp)

    def probs(self, logprobs: mx.array) -> mx.array:
        """The distribution itself (float32; one-hot at the argmax when greedy)."""
        if self.greedy:
            return (mx.arange(logprobs.shape[-1]) == mx.argmax(logprobs, axis=-1, keepdims=True)).astype(mx.float32)
        return mx.softmax(self.logits(logprobs).astype(mx.float32), axis=-1)

    def _next_key(self):
        if self.key is None:
            return None
        self.key, sub = mx.random.split(self.key)
        return sub

    def categorical(self, logits: mx.array) -> mx.array:
        return mx.random.categorical(logits, key=self._next_key())

    def uniform(self, shape: tuple[int, ...]) -> mx.array:
        return mx.random.uniform(shape=shape, key=self._next_key())

    def __call__(self, logprobs: mx.array) -> mx.array:
        if self.greedy:
            return mx.argmax(logprobs, axis=-1)
        return self.categorical(self.logits(logprobs))
