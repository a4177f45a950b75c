"""Layers that hold weights at the precision the file stores, and compute with them exactly.

Quantized layers keep their packed integers and their scales and biases in the stored dtype: float16 for
the GGML types whose scale and bias are float16 values (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the Q4_0 re-grid),
float32 where the products need it (Q4_K/Q5_K ``d*sc``). ``mx.quantized_matmul`` computes in
``promote_types(x, scales)``: float16 scales with float32 or bfloat16 activations compute in float32, so
every dequantized weight is the GGML value exactly (MLX casts the scales of that one matmul to float32 on every
call, unless the loader holds them widened: ``scales="float32"``, the GPU default where it fits; bytes per token in
model/bandwidth.py). Outputs are handed back in the activations' dtype.

``mx.dequantize`` computes in the scales' dtype (float16 would round ``d*q``), so an embedding lookup
dequantizes only the gathered rows, with their scales widened to float32: exact, and never the whole table.

Dense float16/bfloat16 tensors (Google's QAT GGUFs keep the token embedding, which is also the output head,
in F16) stay in their stored dtype. The head then multiplies in that dtype (activations rounded to it, no
full-size float copy per token). On the CPU, where MLX's float16 matmul is ~2.4x slower than float32, the
loader may instead keep a float32 copy (exact: widening) for speed: ``load(..., widen=True)``, the CPU
default, shown by ``mlx-gemma inspect``.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


class QuantizedLinear(nn.Module):
    """``x @ dequantize(W).T`` (+ bias) with W held packed, scales and biases as stored."""

    def __init__(self, in_dims: int, out_dims: int, group_size: int, bits: int, bias: bool = False):
        super().__init__()
        self.group_size, self.bits = group_size, bits
        self.weight = mx.zeros((out_dims, in_dims * bits // 32), dtype=mx.uint32)
        self.scales = mx.zeros((out_dims, in_dims // group_size))
        self.biases = mx.zeros((out_dims, in_dims // group_size))
        if bias:
            self.bias = mx.zeros((out_dims,))
        self.freeze()

    def __call__(self, x: mx.array) -> mx.array:
        y = mx.quantized_matmul(x, self.weight, self.scales, self.biases, transpose=True,
                                group_size=self.group_size, bits=self.bits)
        if "bias" in self:
            y = y + self.bias
        return y.astype(x.dtype)


class QuantizedEmbedding(nn.Module):
    """Embedding table held packed; lookups dequantize the gathered rows in float32 (exact)."""

    def __init__(self, num_embeddings: int, dims: int, group_size: int, bits: int):
        super().__init__()
        self.group_size, self.bits = group_size, bits
        self.weight = mx.zeros((num_embeddings, dims * bits // 32), dtype=mx.uint32)
        self.scales = mx.zeros((num_embeddings, dims // group_size))
        self.biases = mx.zeros((num_embeddings, dims // group_size))
        self.freeze()

    def __call__(self, ids: mx.array) -> mx.array:
        """float32 rows (the caller casts them to the compute dtype)."""
        s, b = self.scales[ids], self.biases[ids]
        return mx.dequantize(self.weight[ids], s.astype(mx.float32), b.astype(mx.float32),
                             group_size=self.group_size, bits=self.bits)

    def as_linear(self, x: mx.array) -> mx.array:
        """The tied output head: logits in ``promote_types(x, scales)`` (float32 for float16 scales)."""
        return mx.quantized_matmul(x, self.weight, self.scales, self.biases, transpose=True,
                                   group_size=self.group_size, bits=self.bits)


class Embedding(nn.Module):
    """Dense embedding in its stored dtype; as the tied head it multiplies in that dtype."""

    def __init__(self, num_embeddings: int, dims: int):
        super().__init__()
        self.weight = mx.zeros((num_embeddings, dims))

    def __call__(self, ids: mx.array) -> mx.array:
        return self.weight[ids]

    def as_linear(self, x: mx.array) -> mx.array:
        """Logits (float32 for float16/bfloat16 weights, so sampling sees no further rounding)."""
        w = self.weight
        return (x.astype(w.dtype) @ w.T).astype(mx.float32)  # the activations, not the table, take its dtype


class Linear(nn.Module):
    """Dense linear layer in its stored dtype; returns the activations' dtype."""

    def __init__(self, in_dims: int, out_dims: int, bias: bool = False):
        super().__init__()
        self.weight = mx.zeros((out_dims, in_dims))
        if bias:
            self.bias = mx.zeros((out_dims,))

    def __call__(self, x: mx.array) -> mx.array:
        y = x @ self.weight.T
        if "bias" in self:
            y = y + self.bias
        return y.astype(x.dtype)


def quantized_like(module: nn.Module, group_size: int, bits: int) -> nn.Module:
    """The exact quantized counterpart of an ``nn.Linear`` / ``nn.Embedding`` (weights loaded later)."""
    if isinstance(module, nn.Embedding):
        n, d = module.weight.shape
        return QuantizedEmbedding(n, d, group_size, bits)
    out_dims, in_dims = module.weight.shape
    return QuantizedLinear(in_dims, out_dims, group_size, bits, bias="bias" in module)
