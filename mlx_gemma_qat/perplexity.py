"""Perplexity of a token sequence, evaluated in chunks through the KV cache (one pass, bounded memory)."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np


def token_nll(model, ids, chunk: int = 256) -> np.ndarray:
    """Negative log-likelihood of ids[1:] given their prefixes (float32, len(ids) - 1 values)."""
    ids = mx.array(np.asarray(ids, dtype=np.int32))
    if ids.size < 2:
        raise ValueError("need at least two tokens")
    cache = model.make_cache()
    out = []
    for start in range(0, ids.size - 1, chunk):
        x = ids[start : min(start + chunk, ids.size - 1)]
        targets = ids[start + 1 : start + 1 + x.size]
        logits = model(x[None], cache=cache)[0].astype(mx.float32)
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        nll = -mx.take_along_axis(logp, targets[:, None], axis=-1)[:, 0]
        mx.eval(nll)
        out.append(np.array(nll))
    return np.concatenate(out)


def perplexity(model, ids, chunk: int = 256) -> float:
    return float(math.exp(token_nll(model, ids, chunk).mean()))
