"""Gemma 3 with image input: vision tower + projector feeding soft tokens into the text model.

A prompt lays an image out as "\\n\\n" <start_of_image> + ``mm_tokens_per_image`` image tokens +
<end_of_image> "\\n\\n". The image tokens' embeddings are replaced by the projected image features
(unscaled); the tokens of one image attend to each other both ways, on sliding and global layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .config import TextConfig
from .text import Model as TextModel
from .vision import MultiModalProjector, SiglipVisionModel, VisionConfig


def text_model(model) -> nn.Module:
    """The text model (a multimodal model's language model; a text-only model itself)."""
    return getattr(model, "language_model", model)


@dataclass
class MultimodalConfig:
    text: TextConfig
    vision: VisionConfig
    mm_tokens_per_image: int = 256
    image_token_index: int = 262144
    boi_token_index: int = 255999
    eoi_token_index: int = 256000

    @classmethod
    def from_dict(cls, d: dict) -> "MultimodalConfig":
        return cls(
            text=TextConfig.from_dict(d),
            vision=VisionConfig.from_dict(d["vision_config"]),
            mm_tokens_per_image=int(d.get("mm_tokens_per_image", 256)),
            image_token_index=int(d.get("image_token_index", d.get("image_token_id", 262144))),
            boi_token_index=int(d.get("boi_token_index", d.get("boi_token_id", 255999))),
            eoi_token_index=int(d.get("eoi_token_index", d.get("eoi_token_id", 256000))),
        )

    def to_dict(self) -> dict:
        return {
            "model_type": "gemma3",
            "architectures": ["Gemma3ForConditionalGeneration"],
            "text_config": self.text.to_dict(),
            "vision_config": self.vision.to_dict(),
            "mm_tokens_per_image": self.mm_tokens_per_image,
            "image_token_index": self.image_token_index,
            "boi_token_index": self.boi_token_index,
            "eoi_token_index": self.eoi_token_index,
        }


def is_multimodal(config: dict) -> bool:
    return isinstance(config.get("vision_config"), dict)


def image_groups(ids: np.ndarray, image_token: int) -> np.ndarray:
    """-1 for text tokens, k for the tokens of the k-th image (each contiguous run is one image)."""
    ids = np.asarray(ids).reshape(-1)
    is_img = ids == image_token
    starts = is_img & ~np.concatenate([[False], is_img[:-1]])
    return np.where(is_img, np.cumsum(starts) - 1, -1).astype(np.int32)


class Model(nn.Module):
    def __init__(self, mcfg: MultimodalConfig):
        super().__init__()
        self.mcfg = mcfg
        self.cfg = mcfg.text  # what generation reads (context, window, ...)
        self.model_type = "gemma3"
        self.language_model = TextModel(mcfg.text)
        self.vision_tower = SiglipVisionModel(mcfg.vision)
        self.multi_modal_projector = MultiModalProjector(
            mcfg.vision, mcfg.text.hidden_size, mcfg.mm_tokens_per_image, mcfg.vision.layer_norm_eps
        )  # the soft-embedding norm uses the vision config's eps, as transformers does
        self.vision_dtype = mx.float32
        self.split = None  # a split model (model/shard.py): (mode, group); the vision tower is then rank 0's only

    def keep_vision_on_rank0(self, mode: str, group) -> None:
        """Split over ``group``: the vision tower stays on rank 0 (the others drop it unread), which sends its
        features to the others under tensor parallelism (pipeline ranks after the first need none)."""
        self.split = (mode, group)
        if group.rank() != 0:
            self.vision_tower, self.multi_modal_projector = nn.Module(), nn.Module()

    # the text model's interface, so generation and perplexity work unchanged
    @property
    def model(self):
        return self.language_model.model

    @property
    def layers(self):
        return self.language_model.layers

    def head(self, h):
        return self.language_model.head(h)

    def make_cache(self, kv_bits: int | None = None, kv_group_size: int = 64, slack: int = 0):
        return self.language_model.make_cache(kv_bits, kv_group_size, slack)

    def __call__(self, inputs, cache=None, input_embeddings=None, image_groups=None):
        return self.language_model(inputs, cache, input_embeddings, image_groups)

    def encode_images(self, pixel_values: mx.array) -> mx.array:
        """(n, 3, H, W) pixels -> (n, mm_tokens_per_image, text hidden) soft tokens in the compute dtype."""
        dtype = self.language_model.model.compute_dtype
        group = self.split[1] if self.split is not None and self.split[0] == "tensor" else None
        if group is not None and group.rank() != 0:  # rank 0's features, received by adding zeros to them (exact)
            shape = (pixel_values.shape[0], self.mcfg.mm_tokens_per_image, self.cfg.hidden_size)
            return mx.distributed.all_sum(mx.zeros(shape, dtype), group=group)
        feats = self.vision_tower(pixel_values.astype(self.vision_dtype))
        out = self.multi_modal_projector(feats).astype(dtype)
        return out if group is None else mx.distributed.all_sum(out, group=group)

    def embed_prompt(self, ids, pixel_values: mx.array | None = None):
        """Embeddings for a prompt with image tokens, and their image groups (None for text only)."""
        ids_np = np.asarray(ids, dtype=np.int32).reshape(-1)
        groups = image_groups(ids_np, self.mcfg.image_token_index)
        # image-token rows are overwritten below; look up id 0 there, since the image token can lie
        # one past the embedding table (llama.cpp text GGUFs keep only the SentencePiece pieces)
        if self.split is not None and self.split[0] == "pipeline" and self.split[1].rank() != 0:
            h = mx.zeros((1, ids_np.size, self.cfg.hidden_size), self.language_model.model.compute_dtype)
        else:
            h = self.language_model.model.embed(mx.array(np.where(groups >= 0, 0, ids_np))[None])
        n_tokens = int((groups >= 0).sum())
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        if n_tokens != n_images * self.mcfg.mm_tokens_per_image:
            raise ValueError(
                f"the prompt has {n_tokens} image tokens for {n_images} image(s) of "
                f"{self.mcfg.mm_tokens_per_image} tokens each"
            )
        if n_images == 0:
            return h, None
        if self.split is not None and self.split[0] == "pipeline" and self.split[1].rank() != 0:
            return h, mx.array(groups)  # only rank 0's stage reads embeddings: the others need their shape only
        feats = self.encode_images(pixel_values).reshape(-1, h.shape[-1])
        positions = mx.array(np.nonzero(groups >= 0)[0])
        h[0, positions] = feats
        return h, mx.array(groups)
