"""Load an MLX Gemma 3 folder: build the model, quantize the layers the config says, load weights.

The compute dtype follows the device: float32 on the CPU (MLX's CPU kernels are far slower in bf16 and
never safe in fp16), bfloat16 on a GPU. Text weights are held as the folder stores them: packed integers
with their scales and biases in the stored dtype (float16 for the simple GGML types, float32 for K-quants),
dense tensors in theirs; the layers in model/quantized.py compute with them exactly. On the CPU, float16 and
bfloat16 tensors are widened to float32 by default (exact, faster there; ``widen=False`` keeps them narrow).

On a GPU (bfloat16 compute), decode is memory-bound, and ``mx.quantized_matmul`` widens float16 scales to float32
on every call (model/bandwidth.py counts the bytes): ``scales="float32"`` holds them widened once instead (exact:
the same float32 values the per-call astype makes, so bit-identical logits; 6 bits read per Q4_0 weight instead of
9), at 1 bit per weight more memory. The default (``scales=None``) holds them so when the model held that way plus
its KV cache at its full context fits ``FIT_FRACTION`` of the device's memory budget (``memory_budget``), and as
stored otherwise.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map_with_path, tree_unflatten

from ..world import World
from .bandwidth import held_bytes, model_weights
from .config import TextConfig
from .multimodal import Model as MultimodalModel
from .multimodal import MultimodalConfig, is_multimodal
from .quantized import Embedding, Linear, QuantizedEmbedding, QuantizedLinear, quantized_like
from .shard import MODES, ShardError, ShardInfo, check_split, memory_counts, shard_pipeline, shard_tensor
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


def _hold_scales_widened(text: nn.Module, dtype: mx.Dtype, every_layer: bool) -> None:
    """Hold quantized scales and biases narrower than the matmul's type (float16 under bfloat16 compute) widened
    to float32 once, instead of MLX widening them on every call. Always for a quantized embedding that is also
    the output head (a per-token transient of 8 bytes per 32 weights over the whole vocabulary); for every
    quantized layer with ``every_layer`` (``scales="float32"``)."""
    tied = text.cfg.tie_word_embeddings
    for _, m in text.named_modules():
        head = tied and m is text.model.embed_tokens
        if isinstance(m, (QuantizedLinear, QuantizedEmbedding)) and (every_layer or head) and \
                m.scales.dtype not in (mx.float32, dtype):
            m.scales, m.biases = m.scales.astype(mx.float32), m.biases.astype(mx.float32)


def resolve_widen(widen: bool | None, dtype: mx.Dtype) -> bool:
    """Keep float32 copies of float16/bfloat16 text tensors? Default: when computing in float32 (the CPU)."""
    return dtype == mx.float32 if widen is None else bool(widen)


SCALES = ("stored", "float32")
FIT_FRACTION = 0.8  # of memory_budget() that the weights held with float32 scales plus the full KV cache may take


def memory_budget() -> int | None:
    """Bytes the default device may hold: Metal's recommended working set, a CUDA device's total memory, the
    machine's RAM on the CPU (None where neither MLX nor the OS says)."""
    info = mx.device_info()
    for key in ("max_recommended_working_set_size", "total_memory", "memory_size"):
        if key in info:
            return int(info[key])
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def float32_scales_fit(weights_bytes: int, kv_bytes: int, budget: int | None) -> bool:
    """The GPU default's rule: float32 scales when the weights held so plus the KV cache fit the budget's share."""
    return budget is not None and weights_bytes + kv_bytes <= FIT_FRACTION * budget


def resolve_scales(scales: str | None, dtype: mx.Dtype, wide: bool, weights_bytes: int, kv_bytes: int) -> str:
    """How quantized scales are held: "widen" (everything float32, the CPU default), "stored" or "float32".
    Default: with float32 compute (the CPU), today's rule (widen, or stored with ``widen=False``); with bfloat16
    compute (a GPU), "float32" when ``float32_scales_fit`` the device, "stored" otherwise."""
    if scales is not None and scales not in SCALES:
        raise ValueError(f"unknown scales {scales!r} ({', '.join(SCALES)})")
    if wide:
        if scales == "stored":
            raise ValueError("scales='stored' keeps float16 scales, widen=True holds float32 copies: give one")
        return "widen"
    if scales is not None:
        return scales
    if dtype == mx.float32:
        return "stored"
    return "float32" if float32_scales_fit(weights_bytes, kv_bytes, memory_budget()) else "stored"


def _split(text: nn.Module, mode: str, group, counts: list[int] | None) -> ShardInfo:
    """Cut this rank's part out of the lazily loaded text model (collective)."""
    if mode == "tensor":
        shard_tensor(text, group)
        return ShardInfo(mode, group.rank(), group.size(), None)
    if counts is None:
        budget = memory_budget() or 0
        budgets = mx.distributed.all_gather(mx.array([budget / 2**20], mx.float32), group=group).tolist()
        layer = sum(a.nbytes for _, a in tree_flatten(text.model.layers[0].parameters()))  # lazy: sizes only
        first = sum(a.nbytes for _, a in tree_flatten(text.model.embed_tokens.parameters()))
        counts = memory_counts(text.cfg.num_hidden_layers, layer, first, budgets)
    shard_pipeline(text, group, counts)
    return ShardInfo(mode, group.rank(), group.size(), tuple(counts))


def load_model(path: str | Path, dtype: str | mx.Dtype | None = None, lazy: bool = False,
               widen: bool | None = None, scales: str | None = None, shard: str | None = None,
               pipeline_split: list[int] | None = None, world=None):
    """Build the model of an MLX folder. ``dtype``: compute dtype (default by device). Text weights stay in
    the dtype the folder stores them in (quantized scales too); ``widen`` (default: when computing in
    float32, i.e. on the CPU) keeps float32 copies of float16/bfloat16 tensors instead, for speed (exact).
    ``scales``: "stored" or "float32" (quantized scales held widened once, see above); the default picks by
    compute dtype and device memory (``resolve_scales``); the choice is ``model.holding``.

    ``shard`` ("tensor" or "pipeline", over ``world``, a ``world.World``, default the launched group): keep only
    this rank's part (model/shard.py), read from the files and nothing else; ``pipeline_split``: layers per rank
    (default: in proportion to each rank's memory). A split the model cannot take is refused before any weight is
    read. Collective under ``shard``: every rank must call it; a rank that fails makes every rank raise
    (``world.PeerFailed`` on the others), none waits."""
    if shard is not None:
        if shard not in MODES:
            raise ShardError(f"unknown shard mode {shard!r} ({', '.join(MODES)})")
        world = world if world is not None else World()
        if world.size > 1:
            with world.together("reading the model"):
                model = _load(path, dtype, True, widen, scales, shard, pipeline_split, world.size)
            model.shard = _split(getattr(model, "language_model", model), shard, world.group, pipeline_split)
            if hasattr(model, "keep_vision_on_rank0"):
                model.keep_vision_on_rank0(shard, world.group)
            with world.together("reading its part of the weights"):
                for layer in getattr(model, "language_model", model).model.layers:
                    mx.eval(layer.parameters())  # layer by layer: never more than one whole tensor extra
                if not lazy:
                    mx.eval(model.parameters())
            return model
    return _load(path, dtype, lazy, widen, scales)


def _load(path, dtype, lazy, widen, scales, shard=None, pipeline_split=None, size=1):
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
    if shard is not None:
        check_split(text.cfg, shard, size, config.get("quantization"),
                    "language_model." if text is not model else "", pipeline_split)
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
    vision = sum(a.nbytes for k, a in tree_flatten(model.parameters()) if not k.startswith(("model.", "lm_head.",
                                                                                            "language_model.")))
    held = vision + sum(held_bytes(w, "float32") for w in model_weights(model))
    model.holding = resolve_scales(scales, dtype, wide, held,
                                  text.cfg.kv_cache_bytes(text.cfg.max_position_embeddings, dtype.size))
    _hold_scales_widened(text, dtype, every_layer=model.holding == "float32")
    text.model.compute_dtype = dtype
    model.shard = None
    model.path = path
    model.identity = model_identity(path)
    if text is not model:
        model.vision_dtype = dtype  # the compute dtype (float16, refused above, would overflow SigLIP too)
    model.eval()
    if not lazy and shard is None:
        mx.eval(model.parameters())
    return model
