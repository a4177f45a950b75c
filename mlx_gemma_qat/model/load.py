"""Load an MLX Gemma 3 folder: build the model, quantize the layers the config says, load weights.

The compute dtype follows the device: float32 on the CPU (MLX's CPU kernels are far slower in bf16 and
never safe in fp16), bfloat16 on a GPU. Quantized layers keep their packed weights; their scales and
biases are held in float32 so that every dequantized weight equals the GGML value bit for bit
(Q4_K/Q5_K scales need 17 significant bits; MLX's CPU dequantize computes in the scale dtype).
"""

from __future__ import annotations

import glob
import hashlib
import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path

from .config import TextConfig
from .multimodal import Model as MultimodalModel
from .multimodal import MultimodalConfig, is_multimodal
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
    files = sorted(glob.glob(str(Path(path) / "*.safetensors")))
    if not files:
        raise ModelLoadError(f"{path}: no *.safetensors weights")
    weights = {}
    for f in files:
        weights.update(mx.load(f))
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


def _quantize_as_config(model: nn.Module, config: dict, weights: dict):
    quant = config.get("quantization")
    if not quant:
        return

    def predicate(path, module):
        if path in quant:
            return quant[path]
        if not hasattr(module, "to_quantized"):
            return False
        return f"{path}.scales" in weights

    nn.quantize(
        model,
        group_size=quant["group_size"],
        bits=quant["bits"],
        mode=quant.get("mode", "affine"),
        class_predicate=predicate,
    )


def load_model(path: str | Path, dtype: str | mx.Dtype | None = None, lazy: bool = False):
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
    _quantize_as_config(model, config, weights)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise ModelLoadError(f"{path}: weights do not match the config: {e}") from None

    def cast(name, a):
        if a.dtype == mx.uint32:
            return a  # packed quantized weights
        if name.endswith((".scales", ".biases")):
            return a.astype(mx.float32)
        return a.astype(dtype)

    model.update(tree_map_with_path(cast, model.parameters()))
    text.model.compute_dtype = dtype
    model.path = path
    model.identity = model_identity(path)
    if text is not model:
        model.vision_dtype = dtype  # the compute dtype (float16, refused above, would overflow SigLIP too)
    model.eval()
    if not lazy:
        mx.eval(model.parameters())
    return model
