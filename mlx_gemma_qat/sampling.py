"""Sampling: mlx-lm's filters and temperature as one distribution, drawn from the global or a private generator.

``Sampler.logits`` gives the distribution a sampler draws from (top-p, min-p and top-k, in mlx-lm's
``make_sampler`` order, then the temperature), so plain decoding, the server and speculative rejection
sampling (``speculative.py``), which needs the distribution itself and not only a draw, all sample the same one.

``choose_sampling`` picks each setting from what the user gave, else the model's default sampling (recorded at
conversion from an Ollama manifest's params), else the command's own default.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class Sampling:
    """Sampling settings and, in ``note``, which of them came from the model's defaults."""

    temp: float = 0.0
    top_p: float = 0.0
    top_k: int = 0
    min_p: float = 0.0
    stop: tuple[str, ...] = ()
    note: str | None = None


_FIELDS = {"temperature": "temp", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p"}


def model_sampling(model) -> dict:
    """The default sampling a converted model records (``config.json``: ``mlx_gemma_qat.sampling``; {} for none)."""
    import json
    from pathlib import Path

    path = getattr(model, "path", None)
    try:
        config = json.loads((Path(path) / "config.json").read_text()) if path is not None else {}
    except (OSError, ValueError):
        return {}
    found = (config.get("mlx_gemma_qat") or {}).get("sampling")
    return found if isinstance(found, dict) else {}


def choose_sampling(model, *, temp=None, top_p=None, top_k=None, min_p=None, off: Sampling = Sampling()) -> Sampling:
    """Each setting the caller gave (not None), else the model's default, else ``off``'s."""
    given = {"temp": temp, "top_p": top_p, "top_k": top_k, "min_p": min_p}
    defaults = model_sampling(model)
    used = {}
    values = {}
    for key, name in _FIELDS.items():
        if given[name] is not None:
            values[name] = given[name]
        elif key in defaults:
            values[name] = used[key] = defaults[key]
        else:
            values[name] = getattr(off, name)
    if float(values["temp"]) == 0:  # greedy: the filters change nothing
        used = {k: v for k, v in used.items() if k == "temperature"}
    stop = tuple(defaults.get("stop") or ())
    if stop:
        used["stop"] = list(stop)
    note = None
    if used:
        shown = ", ".join(f"{k} {v}" for k, v in used.items())
        note = f"sampling from the model's defaults (its Ollama params): {shown}; the options override them"
    return Sampling(float(values["temp"]), float(values["top_p"]), int(values["top_k"]), float(values["min_p"]),
                    stop, note)
