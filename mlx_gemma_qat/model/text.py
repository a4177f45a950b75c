"""Gemma 3 text model in MLX (every size: 270M, 1B, 4B, 12B, 27B from their configs).

Per block: pre-norm attention with QK-norm and RoPE (local base on sliding layers, global base and
optional linear scaling on global ones), post-attention norm, pre-FFN norm, gated GELU(tanh) MLP,
post-FFN norm; (1 + w) RMSNorm everywhere; embeddings scaled by sqrt(hidden) in the compute dtype;
tied output head. Module names follow Hugging Face so weights load by name (mlx-lm reads them too).
"""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import quantized_scaled_dot_product_attention

from .cache import make_cache
from .config import TextConfig


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: the stored weight w scales by (1 + w)."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.zeros((dims,))
        self.eps = eps

    def __call__(self, x):
        # 1 + w in float32 (the weight stays as stored), then in the activations' dtype, as transformers
        return mx.fast.rms_norm(x, (1.0 + self.weight.astype(mx.float32)).astype(x.dtype), self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.head_dim = d = cfg.head_dim
        self.scale = cfg.query_pre_attn_scalar**-0.5
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * d, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.n_heads * d, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.sum_over = None  # tensor parallel (model/shard.py): this rank's heads only, outputs summed over the group
        if cfg.is_sliding(layer):
            self.rope_base, self.rope_scale = cfg.rope_local_base_freq, 1.0
        else:
            self.rope_base, self.rope_scale = cfg.rope_theta, cfg.rope_scale

    def _rope(self, x, offset):
        return mx.fast.rope(
            x, self.head_dim, traditional=False, base=self.rope_base, scale=self.rope_scale, offset=offset
        )

    def __call__(self, x: mx.array, mask: mx.array | None, cache: Any = None) -> mx.array:
        """``cache``: one layer cache, or a list of them for batched decode (row b of a one-token ``x``
        continues the sequence of ``cache[b]`` under ``mask[b]``; projections run batched, attention row by row)."""
        B, L, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(B, L, self.n_heads, -1)).transpose(0, 2, 1, 3)
        k = self.k_norm(self.k_proj(x).reshape(B, L, self.n_kv_heads, -1)).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        if isinstance(cache, list):
            out = mx.concatenate([self._attend(q[b : b + 1], k[b : b + 1], v[b : b + 1], m, c)
                                  for b, (m, c) in enumerate(zip(mask, cache))])
        else:
            out = self._attend(q, k, v, mask, cache)
        return _project(self.o_proj, out.transpose(0, 2, 1, 3).reshape(B, L, -1), self.sum_over)

    def _attend(self, q, k, v, mask, cache):
        offset = cache.offset if cache is not None else 0
        q, k = self._rope(q, offset), self._rope(k, offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        if isinstance(k, tuple):  # a quantized cache hands back (packed, scales, biases) triples
            return quantized_scaled_dot_product_attention(
                q, k, v, scale=self.scale, mask=mask, group_size=cache.group_size, bits=cache.bits)
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.sum_over = None  # tensor parallel: this rank's columns only, outputs summed over the group

    def __call__(self, x):
        return _project(self.down_proj, nn.gelu_approx(self.gate_proj(x)) * self.up_proj(x), self.sum_over)


def _project(proj: nn.Module, x: mx.array, group) -> mx.array:
    """A sublayer's output projection: this process's own, or (tensor parallel) the sum of every rank's partial
    one, taken in float32 and rounded to the activations' dtype once, as one process's matmul rounds its sum."""
    if group is None:
        return proj(x)
    return mx.distributed.all_sum(proj(x.astype(mx.float32)), group=group).astype(x.dtype)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        eps = cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps)

    def __call__(self, x, mask, cache=None):
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), mask, cache))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


def attention_mask(
    q_pos: mx.array, k_pos: mx.array | None, window: int | None, groups: mx.array | None = None
) -> mx.array | None:
    """Boolean (L, N) mask from absolute positions; None when every key is visible.

    ``groups`` (L,) labels the chunk's tokens with an image number (-1 for text): the tokens of one image
    also see each other both ways (keys in the cache are earlier chunks and never share an image, since
    prefill never splits an image across chunks).
    """
    if k_pos is None:
        return None
    qi, kj = q_pos[:, None], k_pos[None, :]
    visible = kj <= qi
    if groups is not None:
        hist = k_pos.size - groups.size
        kg = mx.concatenate([mx.full((hist,), -1, groups.dtype), groups]) if hist else groups
        visible = visible | ((groups[:, None] == kg[None, :]) & (groups[:, None] >= 0))
    if window is not None:
        visible = visible & (qi - kj < window)
    return visible


class Gemma3Model(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [TransformerBlock(cfg, i) for i in range(cfg.num_hidden_layers)]
        self.layer_ids = list(range(cfg.num_hidden_layers))  # of ``layers``; a pipeline stage holds a range
        self.stage = None  # pipeline parallel (model/shard.py): where activations come from and go to
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.compute_dtype = mx.float32  # set by the loader from the device

    def embed(self, ids: mx.array) -> mx.array:
        """Token embeddings in the compute dtype, scaled by sqrt(hidden) (in that dtype, as transformers)."""
        h = self.embed_tokens(ids).astype(self.compute_dtype)
        return h * mx.array(math.sqrt(self.cfg.hidden_size), dtype=h.dtype)

    def _masks(self, L: int, cache: list | None, groups: mx.array | None) -> dict[bool, mx.array | None]:
        """One mask per layer kind (keyed by is_sliding), from the positions its caches report (``cache``: one
        per layer held here)."""
        cfg = self.cfg
        offset = cache[0].offset if cache is not None else 0
        q_pos = mx.arange(offset, offset + L)
        masks = {}
        for sliding in (True, False):
            idx = next((j for j, i in enumerate(self.layer_ids) if cfg.is_sliding(i) == sliding), None)
            if idx is not None:
                k_pos = (mx.arange(L) if L > 1 else None) if cache is None else cache[idx].key_positions(L)
                masks[sliding] = attention_mask(q_pos, k_pos, cfg.sliding_window if sliding else None, groups)
        return masks

    def __call__(
        self,
        inputs: mx.array | None,
        cache: list | None = None,
        input_embeddings: mx.array | None = None,
        image_groups: mx.array | None = None,
    ):
        """``input_embeddings`` are used as given (already scaled; image features are never scaled).

        ``cache``: the sequence's caches (one per layer), or for batched decode a list of B such lists, one
        per row of a (B, 1) ``inputs``: each row continues its own sequence (own length, own cache)."""
        if self.stage is not None and not self.stage.first:
            given = input_embeddings if input_embeddings is not None else inputs
            h = self.stage.receive((*given.shape[:2], self.cfg.hidden_size), self.compute_dtype)
        elif input_embeddings is not None:
            h = input_embeddings.astype(self.compute_dtype)
        else:
            h = self.embed(inputs)
        kinds = [self.cfg.is_sliding(i) for i in self.layer_ids]
        if cache is not None and isinstance(cache[0], list):
            if h.shape[1] != 1 or h.shape[0] != len(cache):
                raise ValueError("batched decode takes one new token per sequence")
            rows = [self._masks(1, c, None) for c in cache]  # each row's masks, once for all layers
            for j, layer in enumerate(self.layers):
                h = layer(h, [m[kinds[j]] for m in rows], [c[j] for c in cache])
        else:
            masks = self._masks(h.shape[1], cache, image_groups)
            for j, layer in enumerate(self.layers):
                h = layer(h, masks[kinds[j]], cache[j] if cache is not None else None)
        return self.norm(h) if self.stage is None else self.stage.finish(h, self.norm)


class Model(nn.Module):
    """Gemma 3 causal LM with the output head tied to the (possibly quantized) embedding."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.model_type = cfg.model_type
        self.model = Gemma3Model(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache: list | None = None, input_embeddings: mx.array | None = None,
                 image_groups: mx.array | None = None):
        return self.head(self.model(inputs, cache, input_embeddings, image_groups))

    def head(self, h: mx.array) -> mx.array:
        """Logits from final hidden states (generation applies it to the last position only)."""
        if self.cfg.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    @property
    def layers(self):
        return self.model.layers

    def make_cache(self, kv_bits: int | None = None, kv_group_size: int = 64, slack: int = 0) -> list:
        """Fresh KV caches, one per layer; ``kv_bits`` (2-6 or 8) stores keys and values quantized in groups
        of ``kv_group_size`` along head_dim, on sliding and global layers alike; ``slack`` extra tokens on
        sliding layers make the cache trimmable that far back (see ``cache.RotatingKVCache``)."""
        return make_cache(self.cfg, kv_bits, kv_group_size, slack, layers=self.model.layer_ids)
