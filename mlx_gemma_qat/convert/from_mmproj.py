"""Read Gemma 3's vision tower from a GGUF into our vision config and tensors: llama.cpp's projector file
(``mmproj-*.gguf``), or Ollama's one-file layout (the tower inside the model GGUF).

llama.cpp splits a Gemma 3 vision-language checkpoint into a text GGUF (``general.architecture`` gemma3,
read by :mod:`.from_gguf`) and an ``mmproj`` GGUF (``general.architecture`` "clip", ``general.type``
"mmproj", ``clip.projector_type`` "gemma3") holding the SigLIP tower and the projector.

Metadata (``clip.vision.*``) -> :class:`~mlx_gemma_qat.model.vision.VisionConfig`:

=======================================  =============================================
image_size / patch_size                  image_size / patch_size
embedding_length                         hidden_size
feed_forward_length                      intermediate_size
block_count                              num_hidden_layers
attention.head_count                     num_attention_heads
attention.layer_norm_epsilon             layer_norm_eps (stored as float32; rounded back)
projection_dim                           text hidden size (checked against the projector)
projector.scale_factor (default 4)       pooling kernel: mm_tokens_per_image =
                                         (image_size // patch_size // scale_factor) ** 2
=======================================  =============================================

llama.cpp's converter (``Gemma3VisionModel``) writes ``projector.scale_factor`` only when it is not 4
(896 / 14 = 64 patches per side pooled 4x4 -> 256 tokens in every released Gemma 3).

Tensors (``v.blk.N.*`` -> ``vision_tower.encoder.layers.N.*``; ``.weight`` and ``.bias`` alike):

==========================  =====================================================
v.patch_embd                vision_tower.embeddings.patch_embedding (hidden, 3, p, p)
v.position_embd             vision_tower.embeddings.position_embedding
v.blk.N.ln1 / ln2           ...layer_norm1 / layer_norm2
v.blk.N.attn_q/k/v          ...self_attn.q_proj / k_proj / v_proj
v.blk.N.attn_out            ...self_attn.out_proj
v.blk.N.ffn_up / ffn_down   ...mlp.fc1 / mlp.fc2
v.post_ln                   vision_tower.post_layernorm
mm.input_projection.weight  multi_modal_projector.mm_input_projection_weight (vision, text)
mm.soft_emb_norm.weight     multi_modal_projector.mm_soft_emb_norm.weight
==========================  =====================================================

Transforms undone: the converter stores ``mm.soft_emb_norm.weight`` as w + 1 (Gemma's (1 + w) RMSNorm as
a plain kernel); we subtract 1 in float32 (exact for stored values in [0.5, 2]). No layout changes: the
numpy shapes (GGUF dims reversed) equal the Hugging Face ones, including the (vision, text) projection
(not transposed) and the (hidden, 3, p, p) patch convolution. The converter forces the projection to F16
(llama.cpp issue 13025) and the ``.embeddings.`` tensors to F32 whatever ``--outtype`` says.

**Ollama's one-file layout** (its converter, ``convert/convert_gemma3.go``: the Hugging Face names through a
replacement table, ``vision_tower.vision_model`` -> ``v``, ``encoder.layers`` -> ``blk``, ``self_attn.X_proj``
-> ``attn_X``, ``out_proj`` -> ``attn_output``, ``multi_modal_projector`` -> ``mm``; read by Ollama's
``model/models/gemma3``). Metadata ``gemma3.vision.*`` with the same key names as above, and
``gemma3.mm.tokens_per_image`` (default 256) for the pooling:

==============================  ======================================================
v.patch_embedding               vision_tower.embeddings.patch_embedding
v.position_embedding            vision_tower.embeddings.position_embedding
v.blk.N.layer_norm1 / 2         ...layer_norm1 / layer_norm2
v.blk.N.attn_q/k/v/output       ...self_attn.q_proj / k_proj / v_proj / out_proj
v.blk.N.mlp.fc1 / fc2           ...mlp.fc1 / mlp.fc2
v.post_layernorm                vision_tower.post_layernorm
mm.mm_input_projection.weight   multi_modal_projector.mm_input_projection_weight (vision, text)
mm.mm_soft_emb_norm.weight      multi_modal_projector.mm_soft_emb_norm.weight (stored w + 1: every
                                ``*_norm.weight`` outside ``v.`` gets Ollama's + 1)
==============================  ======================================================

Every tensor comes out dense (F32 -> float32, F16 -> float16, BF16 -> float32 holding the bfloat16
values, quantized types -> gguf-py's float32 dequantization, exact).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Iterator

import gguf
import numpy as np

from ..model.vision import VisionConfig
from .from_gguf import GGUFError, guarded, is_text_tensor, meta, read_gguf, reading, where
from .grids import MLXTensor, ggml_to_mlx


class MmprojError(GGUFError):
    """A file that is not a usable llama.cpp Gemma 3 ``mmproj`` GGUF."""


_BLOCK = {
    "ln1": "layer_norm1",
    "ln2": "layer_norm2",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_out": "self_attn.out_proj",
    "ffn_up": "mlp.fc1",
    "ffn_down": "mlp.fc2",
}
_TOP = {
    "v.patch_embd": "vision_tower.embeddings.patch_embedding",
    "v.position_embd": "vision_tower.embeddings.position_embedding",
    "v.post_ln": "vision_tower.post_layernorm",
}
_PROJ = {
    "mm.input_projection.weight": "multi_modal_projector.mm_input_projection_weight",
    "mm.soft_emb_norm.weight": "multi_modal_projector.mm_soft_emb_norm.weight",
}
_BLK = re.compile(r"^v\.blk\.(\d+)\.([a-z0-9_.]+)\.(weight|bias)$")
DEFAULT_SCALE_FACTOR = 4
DEFAULT_TOKENS_PER_IMAGE = 256


@dataclass(frozen=True)
class _Layout:
    """How one tool names Gemma 3's vision tensors and metadata in a GGUF."""

    what: str  # for messages
    keys: str  # metadata key prefix
    top: dict[str, str]
    block: dict[str, str]
    proj: dict[str, str]
    projection: str  # the (vision, text) projection's GGUF name
    soft_norm: str  # the soft-embedding norm's GGUF name (stored w + 1)

    def name(self, gguf_name: str) -> str:
        """This layout's tensor name -> ours; MmprojError for a name Gemma 3 does not use."""
        if gguf_name in self.proj:
            return self.proj[gguf_name]
        stem, _, kind = gguf_name.rpartition(".")
        if kind in ("weight", "bias") and stem in self.top:
            return f"{self.top[stem]}.{kind}"
        m = _BLK.match(gguf_name)
        if m and m.group(2) in self.block:
            return f"vision_tower.encoder.layers.{m.group(1)}.{self.block[m.group(2)]}.{m.group(3)}"
        raise MmprojError(f"unexpected tensor {gguf_name!r} in {self.what}")

    def expected(self, n_layers: int) -> set[str]:
        """Every tensor name a tower of ``n_layers`` blocks has (the position embedding has no bias)."""
        pos = next(k for k, v in self.top.items() if v.endswith("position_embedding"))
        names = {f"{k}.{s}" for k in self.top for s in ("weight", "bias") if k != pos} | {f"{pos}.weight", *self.proj}
        return names | {f"v.blk.{i}.{b}.{s}" for i in range(n_layers) for b in self.block for s in ("weight", "bias")}


LLAMA_CPP = _Layout("a Gemma 3 mmproj GGUF", "clip.vision.", _TOP, _BLOCK, _PROJ, "mm.input_projection.weight",
                    "mm.soft_emb_norm.weight")
OLLAMA = _Layout(
    "the vision tower of an Ollama Gemma 3 GGUF", "gemma3.vision.",
    {"v.patch_embedding": "vision_tower.embeddings.patch_embedding",
     "v.position_embedding": "vision_tower.embeddings.position_embedding",
     "v.post_layernorm": "vision_tower.post_layernorm"},
    {"layer_norm1": "layer_norm1", "layer_norm2": "layer_norm2", "attn_q": "self_attn.q_proj",
     "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.out_proj",
     "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"},
    {"mm.mm_input_projection.weight": "multi_modal_projector.mm_input_projection_weight",
     "mm.mm_soft_emb_norm.weight": "multi_modal_projector.mm_soft_emb_norm.weight"},
    "mm.mm_input_projection.weight", "mm.mm_soft_emb_norm.weight")


def mmproj_name(gguf_name: str) -> str:
    """llama.cpp mmproj tensor name -> ours; MmprojError for a name Gemma 3 does not use."""
    return LLAMA_CPP.name(gguf_name)


def open_mmproj(path: str | os.PathLike) -> gguf.GGUFReader:
    """Open and check an mmproj GGUF: readable, complete, a CLIP vision file with the gemma3 projector."""
    reader = read_gguf(path, MmprojError)
    arch = meta(reader, "general.architecture", str, error=MmprojError)
    if arch != "clip":
        hint = " (this looks like a text model GGUF; pass llama.cpp's mmproj-*.gguf file)" if arch else ""
        raise MmprojError(f"{path}: architecture {arch!r} is not an mmproj vision file (expected 'clip'){hint}")
    if meta(reader, "clip.has_vision_encoder", bool, True, MmprojError) is False:
        raise MmprojError(f"{path}: mmproj file has no vision encoder")
    proj = meta(reader, "clip.projector_type", str, error=MmprojError)
    if proj is None:
        proj = meta(reader, "clip.vision.projector_type", str, error=MmprojError)
    if proj != "gemma3":
        raise MmprojError(f"{path}: projector type {proj!r} is not Gemma 3's (expected 'gemma3')")
    return reader


def _eps(v: float) -> float:
    """float32-stored epsilon back to its short decimal (9.99999997e-07 -> 1e-06)."""
    f32 = np.float32(v)
    for digits in range(1, 10):
        short = float(f"{float(f32):.{digits}g}")
        if np.float32(short) == f32:
            return short
    return float(f32)


def vision_config_from_mmproj(reader: gguf.GGUFReader, layout: _Layout = LLAMA_CPP) -> tuple[dict, int, int]:
    """(vision_config dict, mm_tokens_per_image, text hidden size) from the layout's metadata."""

    path = where(reader)

    def need(key, kind=int, default=None, lo=1, hi=2**31 - 1):
        v = meta(reader, layout.keys + key, kind, default, MmprojError)
        if v is None:
            raise MmprojError(f"{path}: metadata lacks {layout.keys}{key}")
        if not lo <= v <= hi:
            raise MmprojError(f"{path}: metadata {layout.keys}{key} = {v} is out of range [{lo}, {hi}]")
        return v

    # every block has 16 tensors: a block count the file cannot hold is refused before anything is sized by it
    n_layers = need("block_count", hi=max(1, len(reader.tensors) // 16))
    cfg = VisionConfig(
        hidden_size=need("embedding_length"),
        intermediate_size=need("feed_forward_length"),
        num_hidden_layers=n_layers,
        num_attention_heads=need("attention.head_count"),
        image_size=need("image_size"),
        patch_size=need("patch_size"),
        layer_norm_eps=_eps(need("attention.layer_norm_epsilon", float, 1e-6, lo=1e-30, hi=1.0)),
    )
    if cfg.hidden_size % cfg.num_attention_heads:
        raise MmprojError(f"{path}: clip.vision.embedding_length {cfg.hidden_size} is not a multiple of "
                          f"attention.head_count {cfg.num_attention_heads}")
    side = cfg.image_size // cfg.patch_size
    if side * cfg.patch_size != cfg.image_size:
        raise MmprojError(f"{path}: image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
    if layout is LLAMA_CPP:
        scale = need("projector.scale_factor", int, DEFAULT_SCALE_FACTOR)
    else:  # Ollama: the pooled token count; its runner reads "mm_tokens_per_image", its converter writes this
        tokens = meta(reader, "gemma3.mm.tokens_per_image", int, None, MmprojError)
        tokens = tokens or meta(reader, "gemma3.mm_tokens_per_image", int, DEFAULT_TOKENS_PER_IMAGE, MmprojError)
        per_side = math.isqrt(max(tokens, 1))
        if per_side * per_side != tokens or side % per_side:
            raise MmprojError(f"{path}: {tokens} tokens per image do not pool a {side}x{side} patch grid evenly")
        scale = side // per_side
    if side % scale:
        raise MmprojError(f"{path}: projector scale_factor {scale} does not pool a {side}x{side} patch grid evenly")
    tokens = (side // scale) ** 2
    proj = next((t for t in reader.tensors if t.name == layout.projection), None)
    if proj is None:
        raise MmprojError(f"{path}: {layout.what} lacks {layout.projection}")
    text_hidden = int(proj.shape[0])  # GGUF dims fastest-first: (text, vision)
    pd = meta(reader, layout.keys + "projection_dim", int, None, MmprojError)
    if pd is not None and pd != text_hidden:
        raise MmprojError(f"{path}: {layout.keys}projection_dim {pd} != projector width {text_hidden}")
    return cfg.to_dict(), tokens, text_hidden


def iter_mmproj_tensors(reader: gguf.GGUFReader, vision_config: dict | None = None,
                        layout: _Layout = LLAMA_CPP) -> Iterator[tuple[str, MLXTensor]]:
    """Yield (our_name, dense MLXTensor) for every vision tensor; the soft-embedding norm gets its +1 removed."""
    cfg = VisionConfig.from_dict(vision_config) if vision_config else None
    for t in reader.tensors:
        if layout is OLLAMA and is_text_tensor(t.name):
            continue
        name = layout.name(t.name)
        shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists dims fastest-first
        mt = ggml_to_mlx(np.asarray(t.data), t.tensor_type, shape, q6k="float32", name=t.name)
        if mt.quantized:
            mt = MLXTensor(mt.dequantize(), None, None, None, None, mt.exact, mt.source_type)
        if t.name == layout.soft_norm:
            w = np.asarray(mt.weight, dtype=np.float32).reshape(-1) - np.float32(1.0)
            mt = MLXTensor(w, None, None, None, None, mt.exact, mt.source_type)
        if cfg is not None:
            _check_shape(t.name, name, mt.shape, cfg)
        yield name, mt


def _expected_shape(name: str, cfg: VisionConfig, text_hidden: int | None) -> tuple[int, ...]:
    """The shape the vision config implies for one of our tensor names (weights as our model holds them)."""
    d, side, inter = cfg.hidden_size, cfg.image_size // cfg.patch_size, cfg.intermediate_size
    if name.endswith("patch_embedding.weight"):
        return (d, cfg.num_channels, cfg.patch_size, cfg.patch_size)
    if name.endswith("position_embedding.weight"):
        return (side * side, d)
    if name.endswith("fc1.weight"):
        return (inter, d)
    if name.endswith("fc1.bias"):
        return (inter,)
    if name.endswith("fc2.weight"):
        return (d, inter)
    if name.endswith("_proj.weight"):
        return (d, d)
    if name.endswith("mm_input_projection_weight"):
        return (d, text_hidden if text_hidden is not None else -1)
    return (d,)  # biases, layer norms, the soft-embedding norm


def _check_shape(gname: str, name: str, shape: tuple[int, ...], cfg: VisionConfig, text_hidden: int | None = None,
                 path=None) -> None:
    want = _expected_shape(name, cfg, text_hidden)
    shape = tuple(int(s) for s in shape)
    if len(want) == 1 and len(shape) == 2 and shape[0] == 1:
        shape = shape[1:]
    if want[-1] == -1 and len(shape) == 2:  # the projector's text width is checked against the text model
        want = (want[0], shape[1])
    where = f"{path}: " if path else ""
    if shape != want:
        raise MmprojError(f"{where}{gname}: shape {shape} does not match the metadata (expected {want})")
    m = re.match(r"vision_tower\.encoder\.layers\.(\d+)\.", name)
    if m and int(m.group(1)) >= cfg.num_hidden_layers:
        raise MmprojError(f"{where}{gname}: block {m.group(1)} beyond block_count {cfg.num_hidden_layers}")


def read_mmproj(path: str | os.PathLike) -> tuple[dict, int, Iterator[tuple[str, MLXTensor]]]:
    """(vision_config dict, mm_tokens_per_image, iterator of (our_name, dense MLXTensor)).

    Raises :class:`MmprojError` (a ``ValueError``) for a file that is not a Gemma 3 mmproj GGUF.
    The iterator reads the tensors lazily from the memory-mapped file.
    """
    with reading(path, MmprojError):
        reader = open_mmproj(path)
        return _read(reader, LLAMA_CPP)


def read_embedded_vision(reader: gguf.GGUFReader) -> tuple[dict, int, Iterator[tuple[str, MLXTensor]]]:
    """As :func:`read_mmproj`, for the vision tower inside an (Ollama) gemma3 GGUF already open as ``reader``."""
    with reading(where(reader), MmprojError):
        return _read(reader, OLLAMA)


def _read(reader: gguf.GGUFReader, layout: _Layout):
    path = where(reader)
    vcfg, tokens, _ = vision_config_from_mmproj(reader, layout)
    vision = [t for t in reader.tensors if layout is LLAMA_CPP or not is_text_tensor(t.name)]
    missing = sorted(layout.expected(vcfg["num_hidden_layers"]) - {t.name for t in vision})
    if missing:
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise MmprojError(f"{path}: {layout.what} lacks tensors {', '.join(missing[:5])}{more}")
    cfg = VisionConfig.from_dict(vcfg)
    for t in vision:  # every shape, before any data is read
        _check_shape(t.name, layout.name(t.name), tuple(reversed(t.shape)), cfg, None, path)
    return vcfg, tokens, guarded(iter_mmproj_tensors(reader, vcfg, layout), path, MmprojError)
