"""What precision are you running? Per-tensor-group types, bits per weight, sizes and memory estimates.

Works on a GGUF file (GGML block types as stored) and on an MLX folder (MLX quantization as loaded,
plus the GGML types it was converted from and any tensor whose conversion was not bit-exact). Memory once
loaded and the bytes a decoded token reads come from model/bandwidth.py, per way of holding the weights.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .model.bandwidth import HOLDINGS, Weight, bytes_per_token, held_bytes, kv_bytes_per_token
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
    loaded: dict = field(default_factory=lambda: {h: 0 for h in HOLDINGS})  # bytes once loaded, per holding

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
    notes: list[str] = field(default_factory=list)
    weights: list[Weight] = field(default_factory=list)  # the text tensors, for bytes per decoded token

    @property
    def params(self) -> int:
        return sum(g.params for g in self.groups)

    def memory(self, holding: str) -> int:
        """Bytes once loaded under a holding (model/bandwidth.py): "widen" is the CPU default (float32 compute,
        float16/bfloat16 tensors and scales widened), "stored" the file's precision, "float32" stored but with
        float32 quantized scales. The vision tower runs (and is held) in the compute dtype."""
        return sum(g.loaded[holding] for g in self.groups)

    @property
    def weight_memory(self) -> int:  # the CPU defaults
        return self.memory("widen")

    @property
    def weight_memory_stored(self) -> int:  # the stored precision (bfloat16 compute; the CPU with --no-widen)
        return self.memory("stored")

    def kv_cache_bytes(self, context: int, bytes_per_element: int = 4, kv_bits: int | None = None,
                       kv_group_size: int = 64) -> int:
        return self.config.kv_cache_bytes(context, bytes_per_element, kv_bits, kv_group_size)


def _loaded_bytes(w: Weight | None, vision_params: int = 0) -> dict:
    """Bytes held once loaded, per holding; a vision tensor (``w`` None) is held in the compute dtype."""
    if w is None:
        return {h: vision_params * (4 if h == "widen" else 2) for h in HOLDINGS}
    return {h: held_bytes(w, h) for h in HOLDINGS}


def _use(name: str, ndim: int, tied: bool) -> str:
    if name.startswith(("token_embd.", "model.embed_tokens.", "language_model.model.embed_tokens.")):
        return "tied" if tied else "lookup"
    return "matmul" if ndim == 2 else "vector"


def _group_name(name: str) -> str:
    name = _VISION_LAYER.sub("vision_tower.layers.*.", _LAYER.sub("layers.*.", name))
    return name.removesuffix(".weight")


def _add(groups: dict, key: tuple[str, str], params: int, nbytes: int, loaded: dict):
    g = groups.get(key)
    if g is None:
        g = groups[key] = Group(key[0], key[1])
    g.tensors += 1
    g.params += params
    g.bytes += nbytes
    for k, v in loaded.items():
        g.loaded[k] += v


def inspect_gguf(path: Path) -> Report:
    from .convert.from_gguf import config_from_gguf, open_gguf

    reader = open_gguf(path)
    cfg = config_from_gguf(reader)
    groups: dict = {}
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    weights = []
    for t in reader.tensors:
        kind, n = t.tensor_type.name, int(t.n_elements)
        use = _use(t.name, len(t.shape), tied)
        if kind in _BITS:  # the converter's MLX form (convert/grids.py): simple types keep f16 scales
            w = Weight(n, "F16" if kind in _F16_SCALES else "F32", _BITS[kind], 32, use, int(t.shape[-1]))
        else:
            w = Weight(n, kind if kind in ("F16", "BF16") else "F32", use=use, rows=int(t.shape[-1]))
        weights.append(w)
        _add(groups, (_group_name(t.name), kind), n, int(t.n_bytes), _loaded_bytes(w))
    rep = Report(str(path), "gguf", cfg, list(groups.values()), path.stat().st_size, weights=weights)
    rep.notes.append("memory = after conversion to MLX (packed bits + a scale and bias per 32: f16 for the simple "
                     "types, f32 for K-quants and the Q6_K/Q2_K/Q3_K 8-bit grids)")
    return rep


_BITS = {"Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8, "Q4_K": 4, "Q5_K": 5, "Q6_K": 8, "Q3_K": 8, "Q2_K": 8}
_F16_SCALES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")


def _safetensors_header(path: Path) -> dict:
    """The tensor entries of a safetensors file, checked (SafetensorsError naming the file when corrupt, or
    holding a dtype no MLX model folder holds: load_model refuses those too)."""
    from .convert.safetensors_check import SafetensorsError, read_header

    header = read_header(path)
    for name, info in header.items():
        if info["dtype"] not in ("U32", "F16", "BF16", "F32"):
            raise SafetensorsError(f"{path}: tensor {name} has dtype {info['dtype']}, not one an MLX model folder "
                                   "holds (packed U32, F16, BF16, F32)")
    return header


_ITEM = {"U32": 4, "F32": 4, "F16": 2, "BF16": 2, "U8": 1, "I8": 1}


def inspect_mlx(path: Path) -> Report:
    from .convert.safetensors_check import SafetensorsError

    config = json.loads((path / "config.json").read_text())
    cfg = TextConfig.from_dict(config)
    quant = config.get("quantization") or {}
    tensors: dict[str, dict] = {}
    file_bytes = 0
    for f in sorted(path.glob("*.safetensors")):
        file_bytes += f.stat().st_size
        tensors.update(_safetensors_header(f))
    groups: dict = {}
    weights = []
    for name, info in tensors.items():
        if name.endswith((".scales", ".biases")):
            continue
        base = name.removesuffix(".weight")
        nbytes = _nbytes(info)
        scales = tensors.get(f"{base}.scales")
        if (info["dtype"] == "U32") != (scales is not None) or scales is not None and scales["dtype"] == "U32":
            raise SafetensorsError(f"{path}: tensor {name} is {info['dtype']}"
                                   f"{' with ' + scales['dtype'] + ' scales' if scales is not None else ''}: packed "
                                   "weights, and only they, are U32, with float scales (load_model refuses it too)")
        use = _use(name, len(info["shape"]), cfg.tie_word_embeddings)
        if scales is not None:
            q = quant.get(base, quant)
            bits, gs = q.get("bits"), q.get("group_size")
            params = nbytes * 8 // bits
            extra = _nbytes(scales) + _nbytes(tensors.get(f"{base}.biases", {"shape": [0], "dtype": "F32"}))
            kind = f"{bits}-bit g{gs} ({scales['dtype'].lower()} scales)"
            w = Weight(params, scales["dtype"], bits, gs, use, info["shape"][0])
            weights.append(w)
            _add(groups, (_group_name(name), kind), params, nbytes + extra, _loaded_bytes(w))
        else:
            params = _numel(info)
            if name.startswith(("vision_tower.", "multi_modal_projector.")):
                loaded = _loaded_bytes(None, params)
            else:
                w = Weight(params, info["dtype"], use=use, rows=info["shape"][0])
                weights.append(w)
                loaded = _loaded_bytes(w)
            _add(groups, (_group_name(name), info["dtype"].lower()), params, nbytes, loaded)
    rep = Report(str(path), "mlx", cfg, list(groups.values()), file_bytes, weights=weights)
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


def format_report(rep: Report, context: int, kv_bits: int | None = None, kv_group_size: int = 64,
                  scales: str | None = None) -> str:
    c = rep.config
    context = min(context, c.max_position_embeddings)
    n_sliding = sum(c.is_sliding(i) for i in range(c.num_hidden_layers))
    mib = 2**20
    lines = [
        f"{rep.path}  [{rep.fmt}]",
        f"architecture: Gemma 3 text, {c.num_hidden_layers} layers ({n_sliding} sliding window {c.sliding_window}, "
        f"{c.num_hidden_layers - n_sliding} global), hidden {c.hidden_size}, heads {c.num_attention_heads}/"
        f"{c.num_key_value_heads} kv x {c.head_dim}, vocab {c.vocab_size}, context {c.max_position_embeddings}",
        f"rope: local base {c.rope_local_base_freq:g}, global base {c.rope_theta:g}"
        + (f", global scaling {c.rope_scaling}" if c.rope_scaling else ""),
        f"parameters: {rep.params:,}",
        "",
        f"{'':40s} {'':28s} {'':7s} {'':13s} {'on disk':>16s} {'loaded MiB':>19s}",
        f"{'tensor group':40s} {'type':28s} {'tensors':>7s} {'params':>13s} {'MiB':>9s} {'bpw':>6s} "
        f"{'CPU f32':>9s} {'stored':>9s}",
    ]

    def row(name, kind, tensors, params, nbytes, loaded):
        return (f"{name:40s} {kind:28s} {tensors:>7} {params:13,d} {nbytes / mib:9.2f} "
                f"{8 * nbytes / max(params, 1):6.2f} {loaded['widen'] / mib:9.2f} {loaded['stored'] / mib:9.2f}")

    for g in sorted(rep.groups, key=lambda g: (-g.bytes, g.name)):
        lines.append(row(g.name, g.kind, g.tensors, g.params, g.bytes, g.loaded))
    total_bytes = sum(g.bytes for g in rep.groups)
    totals = {h: rep.memory(h) for h in HOLDINGS}
    kv = [f"{rep.kv_cache_bytes(context) / mib:.1f} MiB float32", f"{rep.kv_cache_bytes(context, 2) / mib:.1f} MiB bfloat16"]
    for bits in [kv_bits] if kv_bits else [8, 4]:
        kv.append(f"{rep.kv_cache_bytes(context, 2, bits, kv_group_size) / mib:.1f} MiB {bits}-bit g{kv_group_size} "
                  f"(bfloat16 scales; {rep.kv_cache_bytes(context, 4, bits, kv_group_size) / mib:.1f} MiB with float32)")
    lines += [
        row("total", "", "", rep.params, total_bytes, totals),
        "",
        f"size on disk: {rep.file_bytes / mib:.1f} MiB",
        f"memory for weights: {rep.weight_memory_stored / mib:.1f} MiB at the stored precision (bfloat16 compute "
        f"with --scales stored; the CPU with --no-widen), {rep.memory('float32') / mib:.1f} MiB with float32 "
        f"quantized scales (--scales float32: the GPU default where it fits), {rep.weight_memory / mib:.1f} MiB "
        "with the CPU defaults "
        "(float32 compute, float16/bfloat16 tensors and scales widened to float32 for speed)",
        f"KV cache at context {context}: " + ", ".join(kv),
        "",
        *format_bytes_per_token(rep, context, kv_bits, kv_group_size, scales),
    ]
    lines += [f"note: {n}" for n in rep.notes]
    return "\n".join(lines)


_HOLDING_LABELS = {
    "stored": "stored (f16 scales widened to f32 per call)",
    "float32": "float32 scales, held (--scales float32)",
    "float16": "f16 activations into quantized matmuls *",
    "widen": "widen: float32 compute (the CPU default)",
}


def format_bytes_per_token(rep: Report, context: int, kv_bits: int | None = None, kv_group_size: int = 64,
                           scales: str | None = None) -> list[str]:
    """The bytes a decoded token moves per way of holding the weights (model/bandwidth.py), and the loader's
    choice: by default on a GPU, and on this device (or with ``scales`` forced)."""
    import mlx.core as mx

    from .model.load import FIT_FRACTION, default_dtype, memory_budget, resolve_scales, resolve_widen

    mib = 2**20
    c = rep.config
    quantized = sum(w.numel for w in rep.weights if w.bits and w.use == "matmul")
    lines = ["bytes per decoded token (weights; decode on a GPU is memory-bound, its speed about bandwidth / bytes):",
             f"  {'holding':46s} {'read MiB':>9s} {'widened':>9s} {'moved MiB':>10s} {'bits/q.w.':>9s} "
             f"{'loaded MiB':>10s}"]
    for h in HOLDINGS:
        t = bytes_per_token(rep.weights, h)
        q = bytes_per_token([w for w in rep.weights if w.bits and w.use == "matmul"], h)
        bits = f"{8 * q.moved / quantized:9.2f}" if quantized else f"{'-':>9s}"
        lines.append(f"  {_HOLDING_LABELS[h]:46s} {t.read / mib:9.2f} {t.written / mib:9.2f} {t.moved / mib:10.2f} "
                     f"{bits} {rep.memory(h) / mib:10.2f}")
    kv = [f"{kv_bytes_per_token(c, context, 'stored') / mib:.1f} MiB bfloat16",
          f"{kv_bytes_per_token(c, context, 'widen') / mib:.1f} MiB float32"]
    if kv_bits:
        kv.append(f"{kv_bytes_per_token(c, context, 'stored', kv_bits, kv_group_size) / mib:.1f} MiB {kv_bits}-bit")
    full = c.max_position_embeddings
    device = "gpu" if mx.default_device() == mx.gpu else "cpu"
    need = rep.memory("float32") + kv_bytes_per_token(c, full, "stored")
    dtype = default_dtype()
    here = resolve_scales(scales, dtype, resolve_widen(None, dtype), rep.memory("float32"),
                          kv_bytes_per_token(c, full, "stored"))
    lines += [
        f"  + KV cache read per token at context {context}: " + ", ".join(kv),
        "  * modelled only, not a loader option: exact only in Metal's decode kernel, and the matmuls' float16 "
        "outputs have no bound below 65504 (scripts/check_f16_decode_results.md)",
        "  widened = written by the per-call astype (read again by the kernel); bits/q.w. = moved per weight of the "
        "quantized linears",
        f"loader default on a GPU (bfloat16 compute): float32 scales when the weights held so plus a bfloat16 KV cache "
        f"at the full context {full} ({need / mib:,.0f} MiB) fit {FIT_FRACTION:.0%} of the device's memory "
        f"budget, stored otherwise; here ({device}{', --scales ' + scales if scales else ''}): {here}",
    ]
    budget = memory_budget()
    if budget:
        lines[-1] += f" (budget {budget / mib:,.0f} MiB)"
    return lines

