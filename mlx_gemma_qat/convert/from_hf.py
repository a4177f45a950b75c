"""Read a Hugging Face Gemma 3 folder (safetensors + config.json) into MLX tensors.

A bf16 QAT ("unquantized") checkpoint was trained against the symmetric Q4_0 grid (group 32), so by
default its linear weights are put back on that grid: 4-bit, group 32, scale d, bias -8d. mlx-lm's
min/max affine grid is available for comparison (``mode="affine"``), and ``mode="none"`` keeps the
floats. The embedding (also the output head) stays in its float dtype unless ``embed_bits`` is
given, as Google's own Q4_0 QAT files keep it in F16.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

import mlx.core as mx
import numpy as np

from ..model.config import TextConfig
from .grids import MLXTensor, quantize_affine, quantize_q4_0_grid
from .safetensors_check import SafetensorsError, load_checked

TOKENIZER_FILES = (
    "preprocessor_config.json",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
_LINEAR = re.compile(r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$")
# Multimodal checkpoints nest the text model under one of these prefixes (transformers version dependent)
_TEXT_PREFIXES = ("language_model.model.", "model.language_model.", "language_model.")
_SKIP_PREFIXES = ("vision_tower.", "model.vision_tower.", "multi_modal_projector.", "model.multi_modal_projector.")


class HFError(ValueError):
    """A folder that is not a usable Hugging Face Gemma 3 checkpoint."""


def read_config(folder: Path) -> tuple[dict, TextConfig]:
    p = folder / "config.json"
    if not p.is_file():
        raise HFError(f"{folder}: no config.json")
    try:
        raw = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise HFError(f"{p}: not valid JSON ({e})") from None
    return raw, TextConfig.from_dict(raw)


def weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise HFError(f"{folder}: no *.safetensors weights")
    return files


_VISION_PREFIXES = ("model.vision_tower.vision_model.", "vision_tower.vision_model.", "model.vision_tower.", "vision_tower.")
_PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")


def vision_name(name: str) -> str | None:
    """Vision tower / projector tensor name -> ours (``vision_tower.*``, ``multi_modal_projector.*``)."""
    for p in _VISION_PREFIXES:
        if name.startswith(p):
            rest = name[len(p) :]
            # SigLIP's attention-pooling head is not used by Gemma 3 (it pools by averaging): drop it
            return "vision_tower." + rest if not rest.startswith("head.") else ""
    for p in _PROJECTOR_PREFIXES:
        if name.startswith(p):
            return "multi_modal_projector." + name[len(p) :]
    return None


def text_name(name: str) -> str | None:
    """Hugging Face tensor name -> our text-model name; None for tensors the text model does not use."""
    if name.startswith(_SKIP_PREFIXES):
        return None
    for p in _TEXT_PREFIXES:
        if name.startswith(p):
            name = "model." + name[len(p) :]
            break
    if name == "lm_head.weight" or name.startswith("model."):
        return name
    return None


def _load_arrays(path: Path) -> dict[str, mx.array]:
    try:
        return load_checked(path)
    except SafetensorsError as e:
        raise HFError(str(e)) from None


def _float_tensor(a: mx.array) -> MLXTensor:
    if a.dtype == mx.bfloat16:
        return MLXTensor(np.array(a.astype(mx.float32)), None, None, None, None, True, "BF16")
    if a.dtype == mx.float16:
        return MLXTensor(np.array(a), None, None, None, None, True, "F16")
    return MLXTensor(np.array(a.astype(mx.float32)), None, None, None, None, True, "F32")


def iter_tensors(
    folder: Path,
    cfg: TextConfig,
    *,
    mode: str = "q4_0",
    bits: int = 4,
    group_size: int = 32,
    embed_bits: int | None = None,
    vision: bool = False,
) -> Iterator[tuple[str, MLXTensor]]:
    """Text tensors (quantized as asked); with ``vision``, also the vision tower and projector, kept in
    their float dtype, and the text tensors named ``language_model.*``."""
    if mode not in ("q4_0", "affine", "none"):
        raise HFError(f"unknown quantization mode {mode!r} (q4_0, affine or none)")
    if mode == "q4_0" and (bits, group_size) != (4, 32):
        raise HFError("the Q4_0 grid is 4-bit with group size 32; use --mode affine for other shapes")
    seen = set()
    for f in weight_files(folder):
        arrays = _load_arrays(f)
        for raw_name in list(arrays):
            a = arrays.pop(raw_name)
            vname = vision_name(raw_name)
            if vname is not None:
                if vision and vname:
                    yield vname, _float_tensor(a)
                continue
            name = text_name(raw_name)
            if name is None:
                continue
            if cfg.tie_word_embeddings and name == "lm_head.weight":
                continue
            seen.add(name)
            t = _float_tensor(a)
            is_embed = name == "model.embed_tokens.weight"
            if mode != "none" and (_LINEAR.search(name) or is_embed and embed_bits):
                gs = 32 if mode == "q4_0" else group_size
                if t.weight.ndim != 2 or t.weight.shape[1] % gs:
                    raise HFError(f"{f}: {raw_name} has shape {list(t.weight.shape)}, not a matrix whose rows are "
                                  f"a multiple of the group size {gs}")
            if mode != "none" and _LINEAR.search(name):
                w = t.weight.astype(np.float32)
                t = quantize_q4_0_grid(w) if mode == "q4_0" else quantize_affine(w, bits, group_size)
            elif is_embed and embed_bits:
                t = quantize_affine(t.weight.astype(np.float32), embed_bits, group_size)
            yield ("language_model." + name if vision else name), t
    if "model.embed_tokens.weight" not in seen:
        raise HFError(f"{folder}: no embedding weight (model.embed_tokens.weight) in the safetensors files")
    n_layers_seen = len({n.split(".")[2] for n in seen if n.startswith("model.layers.")})
    if n_layers_seen != cfg.num_hidden_layers:
        raise HFError(f"{folder}: weights cover {n_layers_seen} layers, config says {cfg.num_hidden_layers}")
