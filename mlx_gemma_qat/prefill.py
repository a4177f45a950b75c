"""Prefill: run a prompt through a KV cache in chunks, and give the logits of its last position only.

A chunk never splits an image (its tokens attend to each other both ways, so they must enter the cache together).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np


def chunk_bounds(n: int, step: int, groups: np.ndarray | None = None) -> list[tuple[int, int]]:
    """Prefill chunks of about ``step`` tokens; a chunk is stretched so it never splits an image."""
    bounds, start = [], 0
    while start < n:
        end = min(start + step, n)
        if groups is not None:
            while end < n and groups[end] >= 0 and groups[end] == groups[end - 1]:
                end += 1
        bounds.append((start, end))
        start = end
    return bounds


def prefill(model, tokens: mx.array | None, cache: list, step: int = 256, *,
            embeddings: mx.array | None = None, groups: mx.array | None = None) -> mx.array:
    """Run the prompt through the cache in chunks; return the logits of its last position.

    ``embeddings`` (1, L, D) replace token lookup (image prompts); ``groups`` (L,) mark image tokens.
    """
    n = embeddings.shape[1] if embeddings is not None else tokens.size
    g_np = np.array(groups) if groups is not None else None
    bounds = chunk_bounds(n, step, g_np)
    for i, (a, b) in enumerate(bounds):
        h = model.model(
            tokens[None, a:b] if embeddings is None else None,
            cache,
            embeddings[:, a:b] if embeddings is not None else None,
            groups[a:b] if groups is not None and (g_np[a:b] >= 0).any() else None,
        )
        if i + 1 < len(bounds):
            mx.eval([c.state for c in cache])
    return model.head(h[:, -1:, :])[:, -1, :]
