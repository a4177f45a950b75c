"""SigLIP vision tower and the Gemma 3 multimodal projector, in MLX.

Vision tower (Hugging Face ``SiglipVisionModel``): non-overlapping patches -> linear patch embedding (the
conv weight kept in its (hidden, 3, p, p) layout and applied as a matmul) + learned position embeddings,
pre-norm encoder layers with bidirectional attention and a GELU(tanh) MLP, a final layer norm.
Projector: average-pool the patch grid down to ``mm_tokens_per_image`` soft tokens, Gemma RMSNorm (1 + w),
then a linear map to the text width. Image features are not multiplied by the text embedding scale.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import mlx.core as mx
import mlx.nn as nn

from .text import RMSNorm


@dataclass
class VisionConfig:
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    image_size: int = 896
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    model_type: str = "siglip_vision_model"

    @classmethod
    def from_dict(cls, d: dict) -> "VisionConfig":
        keys = cls.__dataclass_fields__
        return cls(**{k: d[k] for k in keys if k in d})

    def to_dict(self) -> dict:
        return {**asdict(self), "hidden_act": "gelu_pytorch_tanh"}

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size


class SiglipAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.n_heads = cfg.num_attention_heads
        self.scale = (d // self.n_heads) ** -0.5
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def __call__(self, x):
        B, L, D = x.shape

        def heads(t):
            return t.reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, L, D))


class SiglipMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def __call__(self, x):
        return self.fc2(nn.gelu_approx(self.fc1(x)))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg)

    def __call__(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class PatchEmbedding(nn.Module):
    """Conv2d(kernel = stride = patch) as a matmul over flattened patches; weight (hidden, C, p, p)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        p = cfg.patch_size
        self.patch = p
        self.weight = mx.zeros((cfg.hidden_size, cfg.num_channels, p, p))
        self.bias = mx.zeros((cfg.hidden_size,))

    def __call__(self, pixels: mx.array) -> mx.array:
        # pixels: (B, C, H, W) -> (B, rows*cols, C*p*p), patches in row-major order
        B, C, H, W = pixels.shape
        p = self.patch
        x = pixels.reshape(B, C, H // p, p, W // p, p).transpose(0, 2, 4, 1, 3, 5)
        x = x.reshape(B, (H // p) * (W // p), C * p * p)
        w = self.weight.reshape(self.weight.shape[0], -1)
        return x @ w.T + self.bias


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_embedding = PatchEmbedding(cfg)
        self.position_embedding = nn.Embedding(cfg.patches_per_side**2, cfg.hidden_size)

    def __call__(self, pixels):
        return self.patch_embedding(pixels) + self.position_embedding.weight


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = [SiglipEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)]


class SiglipVisionModel(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = SiglipEmbeddings(cfg)
        self.encoder = SiglipEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def __call__(self, pixels: mx.array) -> mx.array:
        h = self.embeddings(pixels)
        for layer in self.encoder.layers:
            h = layer(h)
        return self.post_layernorm(h)


class MultiModalProjector(nn.Module):
    def __init__(self, vcfg: VisionConfig, text_hidden: int, tokens_per_image: int, eps: float):
        super().__init__()
        side = int(math.isqrt(tokens_per_image))
        if side * side != tokens_per_image or vcfg.patches_per_side % side:
            raise ValueError(
                f"mm_tokens_per_image={tokens_per_image} does not pool a {vcfg.patches_per_side}x"
                f"{vcfg.patches_per_side} patch grid evenly"
            )
        self.side = side
        self.kernel = vcfg.patches_per_side // side
        self.mm_soft_emb_norm = RMSNorm(vcfg.hidden_size, eps)
        self.mm_input_projection_weight = mx.zeros((vcfg.hidden_size, text_hidden))

    def __call__(self, x: mx.array) -> mx.array:
        # x: (B, P*P, D) row-major patch grid -> average over k x k blocks -> (B, side*side, D)
        B, N, D = x.shape
        k, s = self.kernel, self.side
        x = x.reshape(B, s, k, s, k, D).mean(axis=(2, 4)).reshape(B, s * s, D)
        return self.mm_soft_emb_norm(x) @ self.mm_input_projection_weight
