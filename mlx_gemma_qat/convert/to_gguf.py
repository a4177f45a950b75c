"""Export an MLX folder (typically a LoRA-fused one) back to a llama.cpp GGUF, exactly where GGML can hold it.

``export_gguf(folder, out, base_gguf=...)`` writes a GGUF with every metadata key/value of the base GGUF
(tokenizer included) and every tensor of the base GGUF in the same order.  Each tensor of the folder is
compared with what converting the base tensor gives (:func:`.grids.ggml_to_mlx`, as the converter did):

* unchanged -> the base tensor's raw bytes, bit for bit (``how="copied"``);
* changed -> the folder's values, ``w = scale*q + bias`` (float32, as MLX and gguf-py compute), written in
  the first of these forms that gguf-py's dequantizer reproduces EXACTLY (``how="exact"``), else in the
  candidate with the smallest max abs error (``how="requantized"``, error reported):

  ==================  ===============================================================================
  base type           candidates, in order of preference
  ==================  ===============================================================================
  Q4_0 / Q5_0         same type, the new integers (bias still -8*scale / -16*scale, scale an f16);
                      Q4_1 / Q5_1 with d = scale, m = bias (exact when both are f16 values);
                      gguf-py's Q4_0 / Q5_0 quantization of the values
  Q4_1 / Q5_1         same type (d, m rounded to f16: exact when they are f16 values); re-quantized
  Q8_0                same type (bias still -128*scale); gguf-py's Q8_0 quantization of the values
  Q4_K / Q5_K         same type with the base block's header (d, dmin, 12 scale bytes) and the new
                      integers, when scales and biases are the base's; else Q4_1 / Q5_1 with the
                      (f32) scale/bias rounded to f16, or gguf-py's Q8_0 quantization: smaller error
  Q6_K / Q3_K / Q2_K  Q8_0 with the folder's 8-bit integers (when bias = -128*scale, as Q6_K's form
                      has) or gguf-py's Q8_0 quantization: smaller error (gguf-py cannot make K types)
  F32 / F16 / BF16    the base type (rounding to F16 / BF16 reported as max abs error)
  ==================  ===============================================================================

  Every written tensor is checked by dequantizing the written bytes with gguf-py (``gguf.quants``)
  and comparing with the folder's float32 values: ``how``/``max_abs_error`` are measured, not assumed.
* Norms: the converter stores llama.cpp's ``1 + w`` as ``w`` (float32 subtraction); an unchanged norm is
  copied (bit for bit), a changed one is written as ``w + 1`` in the base type, checked the same way.

Vision tensors of a multimodal folder are not exported (llama.cpp keeps them in a separate ``mmproj``
GGUF); the report says so.  The output is written to a temporary file beside ``out_path`` and renamed into
place, so nothing is left at ``out_path`` on any error.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from math import prod
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT

from ..atomic import atomic_file
from .grids import GROUP, MLXTensor, ggml_to_mlx, unpack_bits

__all__ = ["GGUFExportError", "export_gguf"]


class GGUFExportError(ValueError):
    """The folder cannot be exported against this base GGUF (or the output cannot be written)."""


_LEGACY_SYM = {QT.Q4_0: (4, 8), QT.Q5_0: (5, 16), QT.Q8_0: (8, 128)}  # type -> (bits, offset)
_LEGACY_ASYM = {4: QT.Q4_1, 5: QT.Q5_1}
_K_TYPES = {QT.Q4_K: 4, QT.Q5_K: 5}
_DENSE = (QT.F32, QT.F16, QT.BF16)
_GGUFPY_QUANTIZES = (QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0)
_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.")


# ------------------------------------------------------------------------------------------ GGML encoders
#
# Each takes the MLX integers q (nb, block) uint8 and per-block header values; returns (nb, type_size) uint8.


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, dtype="<f2").reshape(-1, 1)).view(np.uint8)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """Legacy 32-element block: byte j = element j (low nibble) | element j+16 (high nibble)."""
    return (q[:, :16] & 15) | ((q[:, 16:] & 15) << 4)


def _qh32(q: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1: bit j of a little-endian uint32 = 5th bit of element j."""
    bits = ((q >> 4) & 1).astype(np.uint32)
    word = (bits << np.arange(32, dtype=np.uint32)).sum(axis=1, dtype=np.uint32)
    return np.ascontiguousarray(word.astype("<u4").reshape(-1, 1)).view(np.uint8)


def _enc_legacy(qtype: QT, q: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
    if qtype == QT.Q4_0:
        parts = [_f16_bytes(d), _nibbles(q)]
    elif qtype == QT.Q4_1:
        parts = [_f16_bytes(d), _f16_bytes(m), _nibbles(q)]
    elif qtype == QT.Q5_0:
        parts = [_f16_bytes(d), _qh32(q), _nibbles(q)]
    elif qtype == QT.Q5_1:
        parts = [_f16_bytes(d), _f16_bytes(m), _qh32(q), _nibbles(q)]
    elif qtype == QT.Q8_0:
        parts = [_f16_bytes(d), q ^ np.uint8(0x80)]  # MLX q = x + 128 -> int8 x
    else:  # pragma: no cover
        raise AssertionError(qtype)
    return np.ascontiguousarray(np.concatenate(parts, axis=1), dtype=np.uint8)


def _enc_k(qtype: QT, q: np.ndarray, base_blocks: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K: the base blocks' header (d, dmin, 12 scale/min bytes) with new integers q (nb, 256)."""
    nb = q.shape[0]
    q4 = q.reshape(nb, 4, 2, 32)  # chunk c of 32 bytes: sub-block 2c low nibbles, 2c+1 high nibbles
    qs = ((q4[:, :, 0] & 15) | ((q4[:, :, 1] & 15) << 4)).reshape(nb, 128)
    if qtype == QT.Q4_K:
        return np.ascontiguousarray(np.concatenate([base_blocks[:, :16], qs], axis=1))
    hi = ((q.reshape(nb, 8, 32) >> 4) & 1).astype(np.uint8)  # bit j of byte l: element 32j + l
    qh = (hi << np.arange(8, dtype=np.uint8)[None, :, None]).sum(axis=1, dtype=np.uint8)
    return np.ascontiguousarray(np.concatenate([base_blocks[:, :16], qh, qs], axis=1))


# ------------------------------------------------------------------------------------------ folder reading


def _safetensors_header(path: Path) -> dict:
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise GGUFExportError(f"{path}: truncated safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > 100 << 20 or n > path.stat().st_size - 8:
            raise GGUFExportError(f"{path}: corrupt safetensors header")
        try:
            header = json.loads(fh.read(n))
        except (ValueError, UnicodeDecodeError):
            raise GGUFExportError(f"{path}: corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise GGUFExportError(f"{path}: corrupt safetensors header")
    header.pop("__metadata__", None)
    return header


class _Folder:
    """An MLX folder's arrays, read lazily shard by shard (names without a multimodal prefix)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.files: dict[str, Path] = {}  # key -> shard
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.vision: list[str] = []
        self.keys: dict[str, str] = {}  # name -> key in the shard
        shards = sorted(folder.glob("*.safetensors"))
        if not shards:
            raise GGUFExportError(f"{folder}: no .safetensors files")
        for shard in shards:
            for key, info in _safetensors_header(shard).items():
                if key.startswith(_VISION_PREFIXES):
                    self.vision.append(key)
                    continue
                name = key[len("language_model."):] if key.startswith("language_model.") else key
                if name in self.files:
                    raise GGUFExportError(f"{folder}: tensor {key} appears twice")
                self.files[name] = shard
                self.shapes[name] = tuple(int(s) for s in info.get("shape", ()))
                self.keys[name] = key
        self._cache: tuple[Path, dict] | None = None

    def array(self, name: str) -> np.ndarray:
        import mlx.core as mx

        shard = self.files[name]
        if self._cache is None or self._cache[0] != shard:
            self._cache = None
            try:
                self._cache = (shard, mx.load(str(shard)))
            except Exception as e:
                raise GGUFExportError(f"{shard}: cannot read ({type(e).__name__}: {e})") from None
        a = self._cache[1][self.keys[name]]
        if a.dtype == mx.bfloat16:
            a = a.astype(mx.float32)
        return np.array(a)

    def tensor(self, name: str, logical: tuple[int, ...]) -> MLXTensor:
        """The folder's form of weight ``name`` (``...weight``): quantized (bits/group from the shapes) or dense."""
        base = name[: -len(".weight")]
        w = self.array(name)
        if f"{base}.scales" not in self.files:
            return MLXTensor(w.reshape(logical), None, None, None, None, True, "folder")
        s, b = self.array(f"{base}.scales"), self.array(f"{base}.biases")
        cols = logical[-1]
        if w.dtype != np.uint32 or w.shape[:-1] != logical[:-1] or (w.shape[-1] * 32) % cols:
            raise GGUFExportError(f"{self.folder}: {base}: packed weight {w.shape} {w.dtype} does not fit {logical}")
        bits = w.shape[-1] * 32 // cols
        if s.shape != b.shape or s.shape[:-1] != logical[:-1] or cols % s.shape[-1]:
            raise GGUFExportError(f"{self.folder}: {base}: scales {s.shape} / biases {b.shape} do not fit {logical}")
        return MLXTensor(w, s, b, bits, cols // s.shape[-1], True, "folder")


def _norm_name(name: str) -> bool:
    return name.endswith("norm.weight")


# ------------------------------------------------------------------------------------------ comparison


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return False
    if a.dtype.kind == "f" or b.dtype.kind == "f":
        return np.array_equal(a.astype(np.float32), b.astype(np.float32), equal_nan=True)
    return np.array_equal(a, b)


def _unchanged(f: MLXTensor, base: MLXTensor) -> bool:
    if f.quantized != base.quantized:
        return False
    if not f.quantized:
        return _same(f.weight, base.weight)
    return (f.bits, f.group_size) == (base.bits, base.group_size) and _same(f.weight, base.weight) and _same(
        f.scales, base.scales) and _same(f.biases, base.biases)


def _error(got: np.ndarray, want: np.ndarray) -> float:
    """Max abs difference (0.0 when equal as values; NaN/inf where only one side is finite -> inf)."""
    got, want = got.astype(np.float32).reshape(-1), want.astype(np.float32).reshape(-1)
    if np.array_equal(got, want, equal_nan=True):
        return 0.0
    with np.errstate(invalid="ignore", over="ignore"):
        d = np.abs(got.astype(np.float64) - want.astype(np.float64))
    d = np.where(np.isnan(got) & np.isnan(want), 0.0, d)
    d = np.where(np.isnan(d), np.inf, d)
    return float(d.max())


# ------------------------------------------------------------------------------------------ one tensor


def _f16_exact(x: np.ndarray) -> bool:
    with np.errstate(over="ignore"):
        return np.array_equal(x.astype(np.float16).astype(np.float32), x, equal_nan=True)


def _decode(blocks: np.ndarray, qtype: QT, shape: tuple[int, ...]) -> np.ndarray:
    """gguf-py's float32 dequantization of our bytes (what llama.cpp computes)."""
    if qtype == QT.F32:
        return blocks.view("<f4").reshape(shape)
    if qtype == QT.F16:
        return blocks.view("<f2").astype(np.float32).reshape(shape)
    if qtype == QT.BF16:
        return (blocks.view("<u2").astype(np.uint32) << np.uint32(16)).view(np.float32).reshape(shape)
    return gguf.quants.dequantize(blocks.reshape(prod(shape[:-1]), -1), qtype).reshape(shape).astype(np.float32)


def _dense_bytes(v: np.ndarray, qtype: QT) -> np.ndarray:
    v = np.ascontiguousarray(v, dtype=np.float32)
    if qtype == QT.F32:
        return v.view(np.uint8)
    if qtype == QT.F16:
        with np.errstate(over="ignore"):
            return np.ascontiguousarray(v.astype("<f2")).view(np.uint8)
    # BF16: round to nearest even (as gguf-py / llama.cpp), NaN kept quiet
    u = v.view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    r = np.where(np.isnan(v), ((u >> 16) | 64).astype(np.uint16), r)
    return np.ascontiguousarray(r.astype("<u2")).view(np.uint8)


def _candidates(f: MLXTensor, base_type: QT, base_form: MLXTensor, base_blocks: np.ndarray, values: np.ndarray):
    """Yield (qtype, bytes (rows, row_bytes)) for a changed tensor, best first (see the module docstring)."""
    shape = values.shape
    rows, cols = prod(shape[:-1]), shape[-1]
    if f.quantized and f.group_size == GROUP:
        nb = rows * cols // GROUP
        q = unpack_bits(f.weight.reshape(rows, -1), f.bits, cols).reshape(nb, GROUP)
        s = f.scales.astype(np.float32).reshape(nb)
        b = f.biases.astype(np.float32).reshape(nb)
        if base_type in _K_TYPES and f.bits == _K_TYPES[base_type] and base_form.quantized \
                and _same(f.scales, base_form.scales) and _same(f.biases, base_form.biases):
            kb = base_blocks.reshape(-1, gguf.GGML_QUANT_SIZES[base_type][1])
            yield base_type, _enc_k(base_type, q.reshape(-1, 256), kb).reshape(rows, -1)
        sym = {4: QT.Q4_0, 5: QT.Q5_0, 8: QT.Q8_0}.get(f.bits)
        forms = []
        if sym is not None:
            off = _LEGACY_SYM[sym][1]
            if np.array_equal(b, s * np.float32(-off), equal_nan=True):
                forms.append(sym)
        if f.bits in _LEGACY_ASYM:
            forms.append(_LEGACY_ASYM[f.bits])
        forms.sort(key=lambda t: t != base_type)  # the base type first
        for t in forms:
            with np.errstate(over="ignore"):
                d = s.astype(np.float16)
                m = b.astype(np.float16) if t in (QT.Q4_1, QT.Q5_1) else None
            if not np.all(np.isfinite(d)) or (m is not None and not np.all(np.isfinite(m))):
                continue
            yield t, _enc_legacy(t, q, d, m).reshape(rows, -1)
    if cols % 32 == 0 and np.all(np.isfinite(values)):
        t = base_type if base_type in _GGUFPY_QUANTIZES else QT.Q8_0
        yield t, np.asarray(gguf.quants.quantize(values.reshape(rows, cols), t), dtype=np.uint8)


def _export_tensor(name: str, t, f: MLXTensor, base_form: MLXTensor, shape: tuple[int, ...]):
    """(qtype, data array for GGUFWriter, how, max_abs_error) for one tensor of the base GGUF ``t``."""
    base_type = QT(t.tensor_type)
    if _unchanged(f, base_form):
        return base_type, t.data, "copied", 0.0
    norm = _norm_name(name)
    values = f.dequantize().reshape(shape).astype(np.float32)  # what the folder computes with
    if base_type in _DENSE:
        target = values + np.float32(1.0) if norm else values
        data = _dense_bytes(target, base_type).reshape(*shape[:-1], -1)
        back = _decode(data, base_type, shape)
        if norm:
            back = back - np.float32(1.0)
        err = _error(back, values)
        return base_type, _writer_array(data, base_type, shape), "exact" if err == 0 else "requantized", err
    if norm:
        raise GGUFExportError(f"{name}: quantized norm weights are not supported")
    best = None
    for qtype, data in _candidates(f, base_type, base_form, np.asarray(t.data), values):
        err = _error(_decode(data, qtype, shape), values)
        if best is None or err < best[2]:
            best = (qtype, data, err)
        if err == 0:
            break
    if best is None:
        raise GGUFExportError(f"{name}: changed values cannot be written as a GGML type (non-finite values?)")
    qtype, data, err = best
    return qtype, _writer_array(data, qtype, shape), "exact" if err == 0 else "requantized", err


def _writer_array(data: np.ndarray, qtype: QT, shape: tuple[int, ...]) -> np.ndarray:
    """The array GGUFWriter takes: float arrays for F32/F16, uint8 (..., row_bytes) otherwise."""
    data = np.ascontiguousarray(data, dtype=np.uint8)
    if qtype == QT.F32:
        return data.view("<f4").reshape(shape)
    if qtype == QT.F16:
        return data.view("<f2").reshape(shape)
    return data.reshape(*shape[:-1], -1)


# ------------------------------------------------------------------------------------------ export


def _default_base(folder: Path, cfg: dict) -> Path:
    prov = cfg.get("mlx_gemma_qat") or {}
    src = prov.get("source")
    if src and prov.get("source_format", "gguf") == "gguf":
        p = Path(src)
        if not p.is_absolute() and not p.is_file():
            p = folder / p
        if p.is_file():
            with open(p, "rb") as fh:
                if fh.read(4) == b"GGUF":
                    return p
    raise GGUFExportError(
        f"{folder}: the base model's GGUF is needed (it supplies the tokenizer and all metadata) and the folder's "
        f"recorded source ({src!r}) is not a GGUF file here: pass base_gguf (--base-gguf) explicitly")


def _field_args(field):
    vt = field.types[0]
    sub = field.types[-1] if vt == gguf.GGUFValueType.ARRAY else None
    return field.contents(), vt, sub


def export_gguf(mlx_folder, out_path, *, base_gguf=None, force: bool = False, progress: bool = True) -> dict:
    """Write the text model of ``mlx_folder`` as a GGUF at ``out_path`` in the base GGUF's layout.

    Returns a report: ``tensors`` (per tensor ``name``, ``base_type``, ``out_type``, ``how`` =
    ``copied``/``exact``/``requantized``, ``max_abs_error``), ``counts`` by ``how``, ``max_abs_error``,
    ``exact`` (every tensor bit-exact to the folder), ``vision`` (a note when vision tensors were left out),
    ``base_gguf``, ``out_path``.
    """
    from . import from_gguf

    folder = Path(mlx_folder)
    out = Path(out_path)
    if not folder.is_dir():
        raise GGUFExportError(f"{folder}: not an MLX model folder")
    try:
        cfg = json.loads((folder / "config.json").read_text())
        if not isinstance(cfg, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise GGUFExportError(f"{folder}: cannot read config.json ({e})") from None
    base_path = Path(base_gguf) if base_gguf is not None else _default_base(folder, cfg)
    if out.exists() and not force:
        raise GGUFExportError(f"{out} already exists (use force=True / --force to replace it)")
    if out.exists() and out.is_dir():
        raise GGUFExportError(f"{out} is a folder")
    if out.exists() and base_path.exists() and os.path.samefile(out, base_path):
        raise GGUFExportError(f"{out} is the base GGUF itself: write the export elsewhere")

    try:
        with from_gguf.reading(base_path, GGUFExportError):
            reader = from_gguf.read_gguf(base_path, GGUFExportError)
            arch = from_gguf.meta(reader, "general.architecture", str, error=GGUFExportError)
            if arch != "gemma3":
                raise GGUFExportError(f"{base_path}: architecture {arch!r} is not Gemma 3 (expected 'gemma3'); "
                                      "pass the GGUF this folder was converted from")
            from_gguf.config_from_gguf(reader)  # checks every tensor's shape against the metadata
    except from_gguf.GGUFError as e:
        raise GGUFExportError(str(e)) from None
    weights = _Folder(folder)
    plan = _match(reader, weights, base_path, folder)

    tensors_report = []
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as tmp, \
            tempfile.TemporaryDirectory(prefix=f".{out.name}.scratch-", dir=out.parent) as scratch:
        arrays = []
        it = plan
        if progress:
            from tqdm import tqdm

            it = tqdm(plan, desc="exporting", unit="tensor")
        for i, (t, name, shape) in enumerate(it):
            with from_gguf.reading(folder, GGUFExportError):
                f = weights.tensor(name, shape)
                base_form = _base_form(t, shape, f)
                qtype, data, how, err = _export_tensor(name, t, f, base_form, shape)
            if how != "copied":  # spill: a big model's changed tensors never sit in memory together
                p = Path(scratch) / f"{i}.npy"
                np.save(p, data)
                data = np.load(p, mmap_mode="r")
            arrays.append((t.name, qtype, data))
            tensors_report.append({"name": t.name, "base_type": QT(t.tensor_type).name, "out_type": qtype.name,
                                   "how": how, "max_abs_error": err})
        changed = any(r["how"] != "copied" for r in tensors_report)
        all_exact = all(r["how"] != "requantized" for r in tensors_report)
        _write(reader, tmp, arrays, folder, base_path, changed, all_exact)

    counts = {k: sum(r["how"] == k for r in tensors_report) for k in ("copied", "exact", "requantized")}
    norms = [r["name"] for r in tensors_report if r["how"] != "copied" and r["name"].endswith("norm.weight")]
    report = {
        "out_path": str(out),
        "base_gguf": str(base_path),
        "mlx_folder": str(folder),
        "tensors": tensors_report,
        "counts": counts,
        "max_abs_error": max((r["max_abs_error"] for r in tensors_report), default=0.0),
        "exact": counts["requantized"] == 0,
        "vision": (f"{len(weights.vision)} vision tensors not exported: llama.cpp keeps the vision tower in a "
                   "separate mmproj GGUF (use the base model's mmproj)") if weights.vision else None,
        "warning": (f"{len(norms)} norm weights differ from the base GGUF's (a LoRA fuse leaves them alone): is "
                    f"{base_path} the model this folder was made from?") if norms else None,
    }
    if progress:
        print(_summary(report))
    return report


def _summary(report: dict) -> str:
    c = report["counts"]
    lines = [f"wrote {report['out_path']}: {c['copied']} tensors copied from the base, {c['exact']} changed and "
             f"exact, {c['requantized']} changed and re-quantized"]
    for r in report["tensors"]:
        if r["how"] == "requantized":
            lines.append(f"  {r['name']}: {r['base_type']} -> {r['out_type']}, max abs error {r['max_abs_error']:.3g}")
        elif r["how"] == "exact" and r["out_type"] != r["base_type"]:
            lines.append(f"  {r['name']}: {r['base_type']} -> {r['out_type']} (exact)")
    for k in ("vision", "warning"):
        if report[k]:
            lines.append("  " + report[k])
    return "\n".join(lines)


def _match(reader, weights: _Folder, base_path: Path, folder: Path) -> list:
    """[(gguf tensor, hf name, logical shape)] in the base's order; refuses a folder of another model."""
    from . import from_gguf

    plan, names = [], set()
    for t in reader.tensors:
        with from_gguf.reading(base_path, GGUFExportError):
            name = from_gguf.hf_name(t.name)
        shape = tuple(int(s) for s in reversed(t.shape))
        if len(shape) == 2 and shape[0] == 1 and _norm_name(name):
            shape = shape[1:]
        if name not in weights.files:
            raise GGUFExportError(f"{folder} does not match {base_path}: the folder lacks {name} ({t.name}); was it "
                                  "made from another model?")
        fs = weights.shapes[name]
        base = name[: -len(".weight")]
        if f"{base}.scales" in weights.files:
            ok = fs[:-1] == shape[:-1] and weights.shapes[f"{base}.scales"][:-1] == shape[:-1]
        else:
            ok = fs == shape
        if not ok:
            raise GGUFExportError(f"{folder} does not match {base_path}: {name} has shape {fs} in the folder, "
                                  f"{shape} in the GGUF ({t.name}); was it made from another model?")
        plan.append((t, name, shape))
        names |= {name, f"{base}.scales", f"{base}.biases"}
    extra = sorted(set(weights.files) - names)
    if extra:
        more = f" (+{len(extra) - 3} more)" if len(extra) > 3 else ""
        raise GGUFExportError(f"{folder} does not match {base_path}: the folder has tensors the GGUF lacks: "
                              f"{', '.join(extra[:3])}{more}")
    return plan


def _base_form(t, shape, f: MLXTensor) -> MLXTensor:
    """The converter's form of the base tensor, in the form the folder holds (quantized, or dense float32
    when the folder was converted with dequantize / q6k='float32'); norms get llama.cpp's +1 removed."""
    data = np.asarray(t.data)
    mt = ggml_to_mlx(data, t.tensor_type, shape, q6k="int8" if f.quantized else "float32", name=t.name)
    if mt.quantized and not f.quantized:
        mt = MLXTensor(mt.dequantize(), None, None, None, None, mt.exact, mt.source_type)
    if t.name.endswith("norm.weight") and not mt.quantized:
        w = np.asarray(mt.weight, dtype=np.float32).reshape(-1) - np.float32(1.0)
        mt = MLXTensor(w, None, None, None, None, mt.exact, mt.source_type)
    return mt


def _write(reader, tmp: Path, arrays, folder: Path, base_path: Path, changed: bool, all_exact: bool) -> None:
    from . import from_gguf

    arch = from_gguf.meta(reader, "general.architecture", str)
    w = gguf.GGUFWriter(str(tmp), arch=arch, endianess=reader.endianess)
    align = from_gguf.field(reader, "general.alignment")
    if align is not None:
        w.data_alignment = int(align)
    ours = {"mlx_gemma_qat.fused_from", "mlx_gemma_qat.base_gguf", "mlx_gemma_qat.exact"}
    new_name = None
    if changed:
        old = reader.fields.get("general.name")
        old = old.contents() if old is not None and old.types == [gguf.GGUFValueType.STRING] else None
        new_name = f"{old or 'Gemma 3'} (fine-tuned: {folder.name})"
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF.") or field.name in ours:
            continue
        if field.name == "general.name" and new_name is not None:
            w.add_name(new_name)  # in the base's place
            new_name = None
            continue
        value, vt, sub = _field_args(field)
        w.add_key_value(field.name, value, vt, sub_type=sub)
    if new_name is not None:
        w.add_name(new_name)
    w.add_string("mlx_gemma_qat.fused_from", str(folder.resolve()))
    w.add_string("mlx_gemma_qat.base_gguf", base_path.name)
    w.add_bool("mlx_gemma_qat.exact", bool(all_exact))
    for tname, qtype, data in arrays:
        w.add_tensor_info(tname, data.shape, data.dtype, data.nbytes, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for _, _, data in arrays:
        w.write_tensor_data(np.asarray(data), tensor_endianess=reader.endianess)
    w.close()
