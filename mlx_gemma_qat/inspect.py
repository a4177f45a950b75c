"""What precision are you running? Per-tensor-group types, bits per weight, sizes and memory estimates.

Works on a GGUF file (GGML block types as stored) and on an MLX folder (MLX quantization as loaded,
plus the GGML types it was converted from and any tensor whose conversion was not bit-exact).
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from .model.config import TextConfig

_LAYER = re.compile(r"^(blk|model\.layers|language_model\.model\.layers)\.\d+\.")
_VISION_LAYER = re.compile(r"^vision_tower\.encoder\.layers\.\d+\.")


@dataclass
class Group:
    name: str
    kind: str  # e.g. "Q4_K" or "4-bit g32 (f16 scales)" or "bfloat16"
    tensors: int = 0
    params: int = 0
    bytes: int = 0

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes / self.params if self.params else 0.0


@dataclass
class Report:
    path: str
    fmt: str
    config: TextConfig
    groups: list[Group] = field(default_factory=list)
    file_bytes: int = 0
    weight_memory: int = 0  # bytes once loaded for compute (see model.load)
    notes: list[str] = field(default_factory=list)

    @property
    def params(self) -> int:
        return sum(g.params for g in self.groups)

    def kv_cache_bytes(self, context: int, bytes_per_element: int = 4) -> int:
        return self.config.kv_cache_bytes(context, bytes_per_element)


def _group_name(name: str) -> str:
    name = _VISION_LAYER.sub("vision_tower.layers.*.", _LAYER.sub("layers.*.", name))
    return name.removesuffix(".weight")


def _add(groups: dict, key: tuple[str, str], params: int, nbytes: int):
    g = groups.get(key)
    if g is None:
        g = groups[key] = Group(key[0], key[1])
    g.tensors += 1
    g.params += params
    g.bytes += nbytes


def inspect_gguf(path: Path) -> Report:
    from .convert.from_gguf import config_from_gguf, open_gguf

    reader = open_gguf(path)
    cfg = config_from_gguf(reader)
    groups: dict = {}
    for t in reader.tensors:
        _add(groups, (_group_name(t.name), t.tensor_type.name), int(t.n_elements), int(t.n_bytes))
    rep = Report(str(path), "gguf", cfg, list(groups.values()), path.stat().st_size)
    # the converted model holds scales and biases in float32: 64 bits per group of 32
    rep.weight_memory = sum(_converted_bytes(g) for g in rep.groups)
    rep.notes.append("memory = after conversion to MLX (K/simple quants: packed bits + f32 scale and bias per 32)")
    return rep


_BITS = {"Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8, "Q4_K": 4, "Q5_K": 5, "Q6_K": 8, "Q3_K": 8, "Q2_K": 8}


def _converted_bytes(g: Group) -> int:
    if g.kind in _BITS:
        return g.params * _BITS[g.kind] // 8 + g.params // 32 * 8
    if g.kind in ("F16", "BF16", "F32"):
        return g.params * 4  # float32 compute on the CPU
    return g.bytes


def _safetensors_header(path: Path) -> dict:
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    return header


_ITEM = {"U32": 4, "F32": 4, "F16": 2, "BF16": 2, "U8": 1, "I8": 1}


def inspect_mlx(path: Path) -> Report:
    config = json.loads((path / "config.json").read_text())
    cfg = TextConfig.from_dict(config)
    quant = config.get("quantization") or {}
    tensors: dict[str, dict] = {}
    file_bytes = 0
    for f in sorted(path.glob("*.safetensors")):
        file_bytes += f.stat().st_size
        tensors.update(_safetensors_header(f))
    groups: dict = {}
    memory = 0
    for name, info in tensors.items():
        if name.endswith((".scales", ".biases")):
            continue
        base = name.removesuffix(".weight")
        nbytes = _nbytes(info)
        scales = tensors.get(f"{base}.scales")
        if scales is not None:
            q = quant.get(base, quant)
            bits, gs = q.get("bits"), q.get("group_size")
            params = nbytes * 8 // bits
            extra = _nbytes(scales) + _nbytes(tensors.get(f"{base}.biases", {"shape": [0], "dtype": "F32"}))
            kind = f"{bits}-bit g{gs} ({scales['dtype'].lower()} scales)"
            _add(groups, (_group_name(name), kind), params, nbytes + extra)
            memory += nbytes + params // gs * 8
        else:
            params = _numel(info)
            _add(groups, (_group_name(name), info["dtype"].lower()), params, nbytes)
            memory += params * 4
    rep = Report(str(path), "mlx", cfg, list(groups.values()), file_bytes, memory)
    v = config.get("vision_config")
    if isinstance(v, dict):
        vis = {n: i for n, i in tensors.items() if n.startswith(("vision_tower.", "multi_modal_projector."))}
        stored = "/".join(sorted({i["dtype"].lower() for i in vis.values()})) or "?"
        rep.notes.insert(0, (
            f"vision: SigLIP {v.get('num_hidden_layers')} layers, hidden {v.get('hidden_size')}, "
            f"{v.get('image_size')}px input, {v.get('patch_size')}px patches, "
            f"{config.get('mm_tokens_per_image')} soft tokens per image; {sum(_numel(i) for i in vis.values()):,} "
            f"parameters (with projector) stored {stored}, never quantized, run in the compute dtype "
            "(float32 on CPU, bfloat16 on GPU)"
        ))
    prov = config.get("mlx_gemma_qat")
    if prov:
        rep.notes.append(f"converted from {prov.get('source_format')}: {prov.get('source')}")
        rep.notes.append("source types: " + ", ".join(f"{k} x{v}" for k, v in prov.get("source_types", {}).items()))
        inexact = prov.get("inexact_tensors", [])
        if inexact:
            kinds = sorted({_group_name(n) for n in inexact})
            rep.notes.append(f"not bit-exact ({len(inexact)} tensors, re-gridded): " + ", ".join(kinds))
        else:
            rep.notes.append("every tensor is bit-exact to its source")
    rep.notes.append("memory = as loaded on the CPU (float32 compute, float32 scales and biases)")
    return rep


def _numel(info: dict) -> int:
    n = 1
    for s in info["shape"]:
        n *= s
    return n


def _nbytes(info: dict) -> int:
    return _numel(info) * _ITEM[info["dtype"]]


def inspect_path(path: str | Path) -> Report:
    from .convert import is_gguf

    path = Path(path)
    if is_gguf(path):
        return inspect_gguf(path)
    if path.is_dir() and (path / "config.json").is_file():
        return inspect_mlx(path)
    raise ValueError(f"{path}: not a GGUF file or an MLX model folder")


def format_report(rep: Report, context: int) -> str:
    c = rep.config
    context = min(context, c.max_position_embeddings)
    n_sliding = sum(c.is_sliding(i) for i in range(c.num_hidden_layers))
    lines = [
        f"{rep.path}  [{rep.fmt}]",
        f"architecture: Gemma 3 text, {c.num_hidden_layers} layers ({n_sliding} sliding window {c.sliding_window}, "
        f"{c.num_hidden_layers - n_sliding} global), hidden {c.hidden_size}, heads {c.num_attention_heads}/"
        f"{c.num_key_value_heads} kv x {c.head_dim}, vocab {c.vocab_size}, context {c.max_position_embeddings}",
        f"rope: local base {c.rope_local_base_freq:g}, global base {c.rope_theta:g}"
        + (f", global scaling {c.rope_scaling}" if c.rope_scaling else ""),
        f"parameters: {rep.params:,}",
        "",
        f"{'tensor group':40s} {'type':28s} {'tensors':>7s} {'params':>13s} {'MiB':>9s} {'bpw':>6s}",
    ]
    for g in sorted(rep.groups, key=lambda g: (-g.bytes, g.name)):
        lines.append(
            f"{g.name:40s} {g.kind:28s} {g.tensors:7d} {g.params:13,d} {g.bytes / 2**20:9.2f} {g.bits_per_weight:6.2f}"
        )
    total_bytes = sum(g.bytes for g in rep.groups)
    lines += [
        f"{'total':40s} {'':28s} {'':7s} {rep.params:13,d} {total_bytes / 2**20:9.2f} "
        f"{8 * total_bytes / max(rep.params, 1):6.2f}",
        "",
        f"size on disk: {rep.file_bytes / 2**20:.1f} MiB",
        f"memory for weights: {rep.weight_memory / 2**20:.1f} MiB",
        f"KV cache at context {context}: {rep.kv_cache_bytes(context) / 2**20:.1f} MiB float32, "
        f"{rep.kv_cache_bytes(context, 2) / 2**20:.1f} MiB bfloat16",
    ]
    lines += [f"note: {n}" for n in rep.notes]
    return "\n".join(lines)
