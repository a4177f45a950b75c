"""A model's log-probabilities at the scored positions of each window, computed through the KV cache.

Each window is run in chunks of ``chunk`` tokens through a fresh cache (rotating on sliding layers), so a
window may be longer than the sliding window and memory stays bounded; the result equals one full forward
pass. The output head runs only on scored positions (half of them under llama.cpp's scheme): at a 262,144
vocabulary the head is most of the cost of a small model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import mlx.core as mx
import numpy as np

from ..model.multimodal import text_model
from .windows import Windows


@dataclass
class Piece:
    window: int
    logprobs: mx.array  # (n, vocab) float32 log-softmax at n consecutive scored positions
    targets: np.ndarray  # (n,) int32: the tokens those positions predict


def window_tokens(ids: np.ndarray, windows: Windows, k: int, bos_id: int) -> np.ndarray:
    s = windows.start(k)
    w = np.array(ids[s : s + windows.context], dtype=np.int32)
    w[0] = bos_id
    return w


def scored_logprobs(model, ids: np.ndarray, windows: Windows, *, bos_id: int, chunk: int = 256,
                    kv_bits: int | None = None, kv_group_size: int = 64, start_window: int = 0) -> Iterator[Piece]:
    """Yield the scored log-probabilities window by window, in order, at most ``chunk`` positions at a time."""
    text = text_model(model)
    ids = np.asarray(ids, dtype=np.int32)
    C = windows.context
    for k in range(start_window, windows.count):
        x = mx.array(window_tokens(ids, windows, k, bos_id))
        first, s = windows.first(k), windows.start(k)
        cache = model.make_cache(kv_bits, kv_group_size)
        for a in range(0, C, chunk):
            b = min(a + chunk, C)
            h = text.model(x[None, a:b], cache)
            lo, hi = max(a, first), min(b, C - 1)  # logits positions [lo, hi) are scored in this chunk
            if lo >= hi:
                mx.eval([c.state for c in cache])
                continue
            logits = text.head(h[0, lo - a : hi - a]).astype(mx.float32)
            lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            mx.eval(lp, [c.state for c in cache])
            yield Piece(k, lp, ids[s + lo + 1 : s + hi + 1])


class Tally:
    """Progress of a scoring run: a bar of scored tokens, the clock and peak memory, and which windows are
    complete, so that Ctrl-C yields statistics over completed windows only (a window cut short is dropped)."""

    def __init__(self, windows: Windows, desc: str, show: bool):
        from tqdm import tqdm

        self.ends = windows.scored_ends()  # scored tokens in windows 0..k
        self.n = self.done = 0
        self.interrupted = False
        self.bar = tqdm(total=windows.total_scored, unit="tok", desc=desc, disable=not show, leave=False)
        mx.reset_peak_memory()
        self.t0 = time.perf_counter()

    def add(self, piece: Piece) -> None:
        self.n += piece.targets.size
        self.bar.update(piece.targets.size)
        self.done = piece.window + int(self.n == self.ends[piece.window])

    def close(self) -> int:
        """Stop the clock; return how many scored tokens the completed windows hold."""
        self.bar.close()
        self.seconds = time.perf_counter() - self.t0
        self.peak_memory_gb = mx.get_peak_memory() / 1e9
        if self.done == 0:
            raise KeyboardInterrupt("interrupted before the first window finished")
        return self.ends[self.done - 1]


def token_nll(model, ids, chunk: int = 256, kv_bits: int | None = None, kv_group_size: int = 64) -> np.ndarray:
    """Negative log-likelihood of ids[1:] given all their prefixes (one window over the whole sequence;
    ids[0] should be BOS). The simple form the benchmark scripts use."""
    ids = np.asarray(ids, dtype=np.int32)
    if ids.size < 2:
        raise ValueError("need at least two tokens")
    w = Windows(ids.size, ids.size, ids.size - 1)  # one window scoring every position
    out = []
    for p in scored_logprobs(model, ids, w, bos_id=int(ids[0]), chunk=chunk, kv_bits=kv_bits, kv_group_size=kv_group_size):
        t = mx.array(p.targets)[:, None]
        out.append(np.array(-mx.take_along_axis(p.logprobs, t, axis=-1)[:, 0]))
    return np.concatenate(out)
