"""Load an MLX Gemma 3 folder: build the model, quantize the layers the config says, load weights.

The compute dtype follows the device: float32 on the CPU (MLX's CPU kernels are far slower in bf16 and
never safe in fp16), bfloat16 on a GPU. Text weights are held as the folder stores them: packed integers
with their scales and biases in the stored dtype (float16 for the simple GGML types, float32 for K-quants),
dense tensors in theirs; the layers in model/quantized.py compute with them exactly. On the CPU, float16 and
bfloat16 tensors are widened to float32 by default (exact, faster there; ``widen=False`` keeps them narrow).
"""

from __future__ import annotations

import glob
import hashlib
import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path, tree_unflatten

from .config import TextConfig
from .multimodal import Model as MultimodalModel
from .multimodal import MultimodalConfig, is_multimodal
from .quantized import Embedding, Linear, QuantizedEmbedding, quantized_like
from .text import Model


class ModelLoadError(ValueError):
    pass


def default_dtype() -> mx.Dtype:
    return mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16


def parse_dtype(name: str | mx.Dtype | None) -> mx.Dtype:
    if name is None:
        return default_dtype()
    if isinstance(name, mx.Dtype):
        return name
    table = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r} (float32, bfloat16, float16)")
    return table[name]


def read_config(path: Path) -> dict:
    p = Path(path) / "config.json"
    if not p.is_file():
        raise ModelLoadError(f"{path}: no config.json (not an MLX model folder)")
    return json.loads(p.read_text())


def load_weights(path: Path) -> dict[str, mx.array]:
    """Every tensor of the folder's ``*.safetensors`` files; each file's header is checked before MLX maps it
    (convert/safetensors_check.py), and a corrupt file, a tensor named twice, a dtype no MLX model folder
    holds (packed uint32, float16/bfloat16/float32) or a packed weight without scales (or scales without a
    packed weight) is a ModelLoadError naming the file."""
    from ..convert.safetensors_check import SafetensorsError, load_checked

    files = sorted(glob.glob(str(Path(path) / "*.safetensors")))
    if not files:
        raise ModelLoadError(f"{path}: no *.safetensors weights")
    weights = {}
    for f in files:
        try:
            arrays = load_checked(f)
        except SafetensorsError as e:
            raise ModelLoadError(str(e)) from None
        for name, a in arrays.items():
            if name in weights:
                raise ModelLoadError(f"{f}: tensor {name} is also in another weight file")
            if a.dtype not in (mx.uint32, mx.float16, mx.bfloat16, mx.float32):
                dtype = str(a.dtype).removeprefix("mlx.core.")
                raise ModelLoadError(f"{f}: tensor {name} has dtype {dtype}, not one an MLX model folder holds "
                                     "(packed uint32, float16, bfloat16, float32)")
        weights.update(arrays)
    for name, a in weights.items():  # packed weights come with scales, and only they are uint32
        base = name.removesuffix(".weight")
        packed = name.endswith(".weight") and f"{base}.scales" in weights
        if (a.dtype == mx.uint32) != packed:
            what = "a packed (uint32) weight without scales" if not packed else (
                f"quantized, but stored as {str(a.dtype).removeprefix('mlx.core.')}")
            raise ModelLoadError(f"{path}: tensor {name} is {what}")
    return weights


def model_identity(path: str | Path) -> str:
    """A short fingerprint of an MLX folder: its config.json and, for every weight file, its size and first
    and last MiB. Prompt-cache files and adapters record it, to refuse being used with another model."""
    path = Path(path)
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.name}|{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def _exact_layers(text: nn.Module, prefix: str, config: dict, weights: dict) -> None:
    """Swap the text model's nn.Linear / nn.Embedding for layers that keep the stored precision (see
    model/quantized.py): quantized where the config (or a ``.scales`` tensor) says so, dense otherwise."""
    quant = config.get("quantization") or {}
    swaps = []
    for path, m in text.named_modules():
        if not isinstance(m, (nn.Linear, nn.Embedding)):
            continue
        full = prefix + path
        q = quant.get(full)
        if q is None and f"{full}.scales" in weights:
            q = quant
        if isinstance(q, dict) and q:
            if q.get("mode", "affine") != "affine":
                raise ModelLoadError(f"{full}: quantization mode {q.get('mode')!r} is not supported (affine only)")
            swaps.append((path, quantized_like(m, q["group_size"], q["bits"])))
        elif isinstance(m, nn.Embedding):
            swaps.append((path, Embedding(*m.weight.shape)))
        else:
            swaps.append((path, Linear(m.weight.shape[1], m.weight.shape[0], bias="bias" in m)))
    text.update_modules(tree_unflatten(swaps))


def _widen_tied_head_scales(text: nn.Module, dtype: mx.Dtype) -> None:
    """A quantized embedding that is also the output head, with scales narrower than the matmul's type:
    MLX would widen its scales and biases for every token (a transient of 8 bytes per 32 weights over the
    whole vocabulary); they are widened once here instead, half that size, held (shown by inspect)."""
    emb = text.model.embed_tokens
    if text.cfg.tie_word_embeddings and isinstance(emb, QuantizedEmbedding) and emb.scales.dtype not in (
            mx.float32, dtype):
        emb.scales, emb.biases = emb.scales.astype(mx.float32), emb.biases.astype(mx.float32)


def resolve_widen(widen: bool | None, dtype: mx.Dtype) -> bool:
    """Keep float32 copies of float16/bfloat16 text tensors? Default: when computing in float32 (the CPU)."""
    return dtype == mx.float32 if widen is None else bool(widen)


def load_model(path: str | Path, dtype: str | mx.Dtype | None = None, lazy: bool = False,
               widen: bool | None = None):
    """Build the model of an MLX folder. ``dtype``: compute dtype (default by device). Text weights stay in
    the dtype the folder stores them in (quantized scales too); ``widen`` (default: when computing in
    float32, i.e. on the CPU) keeps float32 copies of float16/bfloat16 tensors instead, for speed (exact)."""
    path = Path(path)
    config = read_config(path)
    dtype = parse_dtype(dtype)
    if dtype == mx.float16:
        raise ValueError("float16 compute overflows Gemma 3 activations; use float32 or bfloat16")
    if is_multimodal(config):
        model = MultimodalModel(MultimodalConfig.from_dict(config))
        text = model.language_model
    else:
        model = text = Model(TextConfig.from_dict(config))
    weights = load_weights(path)
    if text.cfg.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
        weights.pop("language_model.lm_head.weight", None)
    _exact_layers(text, "language_model." if text is not model else "", config, weights)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise ModelLoadError(f"{path}: weights do not match the config: {e}") from None

    wide = resolve_widen(widen, dtype)
    narrow = (mx.float16, mx.bfloat16)

    def cast(name, a):
        if name.startswith(("vision_tower.", "multi_modal_projector.")):
            return a.astype(dtype)  # the vision tower runs in the compute dtype
        if a.dtype == mx.uint32:
            return a  # packed quantized weights
        return a.astype(mx.float32) if wide and a.dtype in narrow else a  # stored precision, or widened

    model.update(tree_map_with_path(cast, model.parameters()))
    model.widened = wide
    _widen_tied_head_scales(text, dtype)
    text.model.compute_dtype = dtype
    model.path = path
    model.identity = model_identity(path)
    if text is not model:
        model.vision_dtype = dtype  # the compute dtype (float16, refused above, would overflow SigLIP too)
    model.eval()
    if not lazy:
        mx.eval(model.parameters())
    return model
