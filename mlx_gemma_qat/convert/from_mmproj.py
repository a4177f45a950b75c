"""Read llama.cpp's Gemma 3 vision projector file (``mmproj-*.gguf``) into our vision config and tensors.

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

Every tensor comes out dense (F32 -> float32, F16 -> float16, BF16 -> float32 holding the bfloat16
values, quantized types -> gguf-py's float32 dequantization, exact).
"""

from __future__ import annotations

import os
import re
from typing import Iterator

import gguf
import numpy as np

from ..model.vision import VisionConfig
from .from_gguf import GGUFError, guarded, meta, read_gguf, reading, where
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
_BLK = re.compile(r"^v\.blk\.(\d+)\.([a-z0-9_]+)\.(weight|bias)$")
_SOFT_NORM = "mm.soft_emb_norm.weight"
DEFAULT_SCALE_FACTOR = 4


def mmproj_name(gguf_name: str) -> str:
    """llama.cpp mmproj tensor name -> ours; MmprojError for a name Gemma 3 does not use."""
    if gguf_name in _PROJ:
        return _PROJ[gguf_name]
    stem, _, kind = gguf_name.rpartition(".")
    if kind in ("weight", "bias") and stem in _TOP:
        return f"{_TOP[stem]}.{kind}"
    m = _BLK.match(gguf_name)
    if m and m.group(2) in _BLOCK:
        return f"vision_tower.encoder.layers.{m.group(1)}.{_BLOCK[m.group(2)]}.{m.group(3)}"
    raise MmprojError(f"unexpected tensor {gguf_name!r} in a Gemma 3 mmproj GGUF")


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


def vision_config_from_mmproj(reader: gguf.GGUFReader) -> tuple[dict, int, int]:
    """(vision_config dict, mm_tokens_per_image, text hidden size) from ``clip.vision.*`` metadata."""

    path = where(reader)

    def need(key, kind=int, default=None, lo=1, hi=2**31 - 1):
        v = meta(reader, f"clip.vision.{key}", kind, default, MmprojError)
        if v is None:
            raise MmprojError(f"{path}: mmproj metadata lacks clip.vision.{key}")
        if not lo <= v <= hi:
            raise MmprojError(f"{path}: mmproj metadata clip.vision.{key} = {v} is out of range [{lo}, {hi}]")
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
    scale = need("projector.scale_factor", int, DEFAULT_SCALE_FACTOR)
    if side % scale:
        raise MmprojError(f"{path}: projector scale_factor {scale} does not pool a {side}x{side} patch grid evenly")
    tokens = (side // scale) ** 2
    proj = next((t for t in reader.tensors if t.name == "mm.input_projection.weight"), None)
    if proj is None:
        raise MmprojError(f"{path}: mmproj GGUF lacks mm.input_projection.weight")
    text_hidden = int(proj.shape[0])  # GGUF dims fastest-first: (text, vision)
    pd = meta(reader, "clip.vision.projection_dim", int, None, MmprojError)
    if pd is not None and pd != text_hidden:
        raise MmprojError(f"{path}: clip.vision.projection_dim {pd} != projector width {text_hidden}")
    return cfg.to_dict(), tokens, text_hidden


def iter_mmproj_tensors(reader: gguf.GGUFReader, vision_config: dict | None = None) -> Iterator[tuple[str, MLXTensor]]:
    """Yield (our_name, dense MLXTensor) for every tensor; the soft-embedding norm gets its +1 removed."""
    cfg = VisionConfig.from_dict(vision_config) if vision_config else None
    for t in reader.tensors:
        name = mmproj_name(t.name)
        shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists dims fastest-first
        mt = ggml_to_mlx(np.asarray(t.data), t.tensor_type, shape, q6k="float32", name=t.name)
        if mt.quantized:
            mt = MLXTensor(mt.dequantize(), None, None, None, None, mt.exact, mt.source_type)
        if t.name == _SOFT_NORM:
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
        vcfg, tokens, _ = vision_config_from_mmproj(reader)
        names = {t.name for t in reader.tensors}
        expected = {f"{k}.{s}" for k in _TOP for s in ("weight", "bias") if k != "v.position_embd"}
        expected |= {"v.position_embd.weight", *_PROJ}
        expected |= {f"v.blk.{i}.{b}.{s}" for i in range(vcfg["num_hidden_layers"]) for b in _BLOCK for s in ("weight", "bias")}
        missing = sorted(expected - names)
        if missing:
            more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
            raise MmprojError(f"{path}: mmproj GGUF lacks tensors {', '.join(missing[:5])}{more}")
        cfg = VisionConfig.from_dict(vcfg)
        for t in reader.tensors:  # every shape, before any data is read
            _check_shape(t.name, mmproj_name(t.name), tuple(reversed(t.shape)), cfg, None, path)
    return vcfg, tokens, guarded(iter_mmproj_tensors(reader, vcfg), path, MmprojError)
