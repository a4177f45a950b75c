"""Adapter layers around the frozen, quantized base layers (model/quantized.py).

Two kinds, both ``y = base(x) + scale * u(x)`` with the base untouched:

- ``lora``: the standard low-rank update ``u(x) = dropout(x) @ A @ B`` (A: in x r, B: r x out; B starts at 0).
- ``pooled`` (group-pooled, as in QA-LoRA): ``u(x) = pool(dropout(x)) @ A @ B`` where ``pool`` sums ``x`` over each
  quantization group of the base layer (A: in/g x r). The update is then constant within each group of a
  weight row, so it folds *exactly* into that group's affine bias: ``sum_i x_i (s q_i + b + c) = s x.q +
  (b + c) sum_i x_i``. After fusing, the packed integers and scales are the base's, bit for bit.

The tied embedding (also the output head) is adapted through both of its uses: the lookup adds
``scale * A[ids] @ B`` (pooled: expanded over each group) and the head adds the transposed update, so the
adapted table is one matrix, as after a fuse.

Adapter parameters are float32 whatever the compute dtype (they are small; their updates stay exact).
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from ..model.quantized import Embedding, Linear, QuantizedEmbedding, QuantizedLinear

KINDS = ("lora", "pooled")


class AdapterError(ValueError):
    """An adapter that does not fit this model, or options that cannot build one."""


def _dims(base: nn.Module) -> tuple[int, int]:
    """(rows, columns) of the base weight as a matrix: (out, in) for a linear, (vocab, hidden) for an embedding."""
    rows, cols = base.weight.shape
    if isinstance(base, (QuantizedLinear, QuantizedEmbedding)):
        cols = cols * 32 // base.bits
    return rows, cols


def group_size_of(base: nn.Module) -> int | None:
    return getattr(base, "group_size", None) if isinstance(base, (QuantizedLinear, QuantizedEmbedding)) else None


def _pool(x: mx.array, g: int) -> mx.array:
    """Sum over consecutive groups of ``g`` along the last axis."""
    return x.reshape(*x.shape[:-1], x.shape[-1] // g, g).sum(axis=-1)


class _Adapter(nn.Module):
    def __init__(self, base: nn.Module, rank: int, scale: float, dropout: float, kind: str):
        super().__init__()
        if kind not in KINDS:
            raise AdapterError(f"unknown adapter kind {kind!r} (one of {', '.join(KINDS)})")
        if rank < 1:
            raise AdapterError(f"rank must be >= 1, got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise AdapterError(f"dropout must be in [0, 1), got {dropout}")
        self.base = base
        self.kind, self.rank, self.scale, self.dropout_p = kind, rank, float(scale), float(dropout)
        self.group = group_size_of(base) if kind == "pooled" else None
        if kind == "pooled" and self.group is None:
            raise AdapterError("a group-pooled adapter needs a quantized base layer (its groups are what it pools)")

    def _drop(self, x: mx.array) -> mx.array:
        if self.dropout_p == 0.0 or not self.training:
            return x
        keep = mx.random.bernoulli(1.0 - self.dropout_p, x.shape)
        return mx.where(keep, x / (1.0 - self.dropout_p), mx.zeros_like(x))


class LoRALinear(_Adapter):
    """A frozen (quantized or dense) linear layer plus a trainable low-rank or group-pooled update."""

    def __init__(self, base: nn.Module, rank: int = 8, scale: float = 20.0, dropout: float = 0.0, kind: str = "lora"):
        super().__init__(base, rank, scale, dropout, kind)
        out_dims, in_dims = _dims(base)
        a_in = in_dims // self.group if self.group else in_dims
        bound = 1.0 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(-bound, bound, (a_in, rank))
        self.lora_b = mx.zeros((rank, out_dims))

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        z = self._drop(x.astype(mx.float32))
        if self.group:
            z = _pool(z, self.group)
        return (y + self.scale * ((z @ self.lora_a) @ self.lora_b)).astype(x.dtype)

    def delta(self) -> mx.array:
        """The update of the weight as (out, in/g) for pooled (per group), (out, in) for lora, float32, scaled."""
        return self.scale * (self.lora_a @ self.lora_b).T


class LoRAEmbedding(_Adapter):
    """A frozen embedding that is also the tied output head, plus one update applied to both uses."""

    def __init__(self, base: nn.Module, rank: int = 8, scale: float = 20.0, dropout: float = 0.0, kind: str = "lora"):
        super().__init__(base, rank, scale, dropout, kind)
        vocab, dims = _dims(base)
        b_out = dims // self.group if self.group else dims
        self.lora_a = mx.zeros((vocab, rank))  # zero: the untrained adapter changes neither use
        self.lora_b = mx.random.uniform(-1.0 / math.sqrt(rank), 1.0 / math.sqrt(rank), (rank, b_out))

    def __call__(self, ids: mx.array) -> mx.array:
        rows = self.base(ids)
        d = self.scale * (self.lora_a[ids] @ self.lora_b)
        if self.group:
            d = mx.repeat(d, self.group, axis=-1)
        return rows.astype(mx.float32) + d  # float32 rows, as QuantizedEmbedding's; embed() casts them

    def as_linear(self, x: mx.array) -> mx.array:
        y = self.base.as_linear(x)
        z = self._drop(x.astype(mx.float32))
        if self.group:
            z = _pool(z, self.group)
        return (y + self.scale * ((z @ self.lora_b.T) @ self.lora_a.T)).astype(y.dtype)

    def delta(self) -> mx.array:
        """The update of the table as (vocab, hidden/g) for pooled, (vocab, hidden) for lora, float32, scaled."""
        return self.scale * (self.lora_a @ self.lora_b)


def wrap(base: nn.Module, rank: int, scale: float, dropout: float, kind: str) -> _Adapter:
    """The adapter for one base layer (a linear, or the tied embedding)."""
    if isinstance(base, (QuantizedEmbedding, Embedding)):
        return LoRAEmbedding(base, rank, scale, dropout, kind)
    if isinstance(base, (QuantizedLinear, Linear)):
        return LoRALinear(base, rank, scale, dropout, kind)
    raise AdapterError(f"cannot adapt a {type(base).__name__}")
