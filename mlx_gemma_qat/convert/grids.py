"""Map GGML quantization blocks onto MLX affine quantization groups.

MLX's affine quantization stores, for every group of ``group_size`` consecutive
elements of a row, a ``scale`` and a ``bias``; element ``i`` is
``w = scale * q + bias`` with ``q`` an unsigned ``bits``-bit integer.  The ``q`` of a
row form ONE little-endian bit stream packed into ``uint32`` words (element ``i``
occupies bits ``[i*bits, (i+1)*bits)`` of the stream).  GGML stores its integers in
type-specific nibble / bit-plane orders, so every converter here unpacks GGML's bits
to integers and repacks them in MLX's order; nothing reinterprets bytes and nothing
dequantizes-then-requantizes an exactly representable type.

Exact forms (all group 32), checked against ``gguf.quants.dequantize``:

========  =====  ============================  ===============================  ======
GGML      bits   q (MLX)                       scale / bias                     dtype
========  =====  ============================  ===============================  ======
Q4_0      4      q                             d / -8d                          f16
Q4_1      4      q                             d / m                            f16
Q5_0      5      q                             d / -16d                         f16
Q5_1      5      q                             d / m                            f16
Q8_0      8      q + 128                       d / -128d                        f16
Q4_K      4      q (one 32-sub-block/group)    d*sc / -dmin*m                   f32
Q5_K      5      q                             d*sc / -dmin*m                   f32
Q3_K      8      sc*q + 124 (in [0, 252])      d / -124d                        f32
========  =====  ============================  ===============================  ======

Why these are exact.  ``d``, ``m``, ``dmin`` are float16 values (11 significant
bits).  For the legacy types the scale is ``d`` itself and the bias ``-8d``,
``-16d``, ``-128d`` or ``m``: multiplying a float16 by a power of two is exact, so the
scale and bias are represented exactly in float16 (a tensor whose bias would overflow
float16 falls back to float32 scales).  Evaluated in float32, ``d*q`` needs at most
11 + 8 bits, so it is exact, and ``d*q + (-8d)`` equals ``d*(q-8)``, itself exactly
representable, so it is exact as well; for Q4_1/Q5_1 MLX and gguf-py both compute
``d*q`` (exact) then add ``m`` (one rounding, the same one).  For Q4_K/Q5_K the
product ``d*sc`` (``sc`` 6 bits) needs up to 17 significant bits, which float16
cannot hold: the scales must be float32; ``d*sc*q`` then needs <= 22 bits (exact)
and the single rounding of ``- dmin*m`` is the same one gguf-py performs.  Q3_K has
16-element sub-blocks with signed 6-bit scales ``sc`` in [-32, 31] and ``q`` in
[-4, 3]; the integer product ``sc*q`` lies in [-124, 128], so ``d*(sc*q+124) - 124d``
on an 8-bit grid reproduces ``(d*sc)*q`` exactly (<= 19 significant bits).

Caveats: (1) equality is of float32 *values*: gguf-py may produce ``-0.0`` where MLX
produces ``+0.0`` (``x + (-x)`` rounds to ``+0``); ``np.array_equal`` treats them as
equal and so does every sum.  (2) With float16 scales ``mx.dequantize`` on CPU
computes in float16 (``d*q`` is then rounded): compare (or run) with float32
scales/activations; ``mx.quantized_matmul`` computes in ``promote_types(x, scales)``.

Inexact forms (``exact=False``):

Q6_K has 16 sub-blocks of 16 elements with int8 scales ``s`` and ``q`` in [-32, 31].
MLX's ``quantized_matmul`` supports group sizes 32/64/128 only, so two sub-blocks
share one MLX group.  ``q6k="int8"`` (default) uses an 8-bit group-32 grid whose step
is ``d*s_big/4`` where ``s_big`` is the sub-block scale of larger magnitude (the step
is negative when ``s_big`` is: MLX's affine form allows it) and the bias is
``-32*d*s_big``: the 64 lattice values of that sub-block land on levels
``0, 4, ..., 252`` (exact: every product needs <= 24 significant bits), and the other
sub-block is rounded to the nearest grid level (clipped to [0, 255], so the error is
at most half a step, one step in the clipped corner).  On the
real Gemma 3 270M Q4_K_M file (9 Q6_K ``ffn_down`` tensors, 11.8M weights; errors
are RMS over the tensor relative to the RMS of gguf-py's dequantized weights):

* int8 group-32 form (this module): 0.41 %, 54 % of the weights bit-exact;
* Q6_K's own quantization noise, estimated as ``d*|s|/sqrt(12)`` per weight (uniform
  rounding on its step): 2.05 %, so the int8 form adds about 0.20x Q6_K's own noise
  in RMS (0.04x in variance);
* plain MLX min/max 8-bit requantization of the dequantized values
  (``mx.quantize``): 0.49 % at group 32 (9 % of weights exact), 0.56 % at group 64.

``q6k="float32"`` returns the dense float32 dequantization instead (exact; 4 bytes
per weight against 1.25 for the int8 form).

Q2_K (16-element sub-blocks, 4-bit scale and min) uses an 8-bit group-32 grid with
step ``|d*sc_big|/K`` for the largest power of two ``K`` such that both sub-blocks
fit into 256 levels, bias aligned on the larger sub-block's lattice (falls back to
min/max when nothing fits); every element is rounded to the nearest level.

Dense types: F32 -> float32, F16 -> float16, BF16 -> float32 holding exactly the
bfloat16 values (``source_type="BF16"``; numpy has no bfloat16, the writer stores
it as MLX bfloat16).  ``gguf.GGUFReader`` returns BF16 tensors as raw ``uint8``
bytes with shape ``(rows, 2*cols)`` (it only maps F16/F32/F64/I* to numpy dtypes),
so BF16 input is accepted as uint8 bytes, uint16/int16 words, or float32 values
whose low 16 bits are zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import numpy as np

import gguf
from gguf import GGMLQuantizationType as QT

__all__ = [
    "MLXTensor",
    "UnsupportedQuantType",
    "pack_bits",
    "unpack_bits",
    "ggml_to_mlx",
    "quantize_q4_0_grid",
    "quantize_affine",
    "SUPPORTED_TYPES",
]

GROUP = 32
MLX_BITS = (2, 3, 4, 5, 6, 8)
_CHUNK_ELEMS = 1 << 22  # elements per row chunk while converting


class UnsupportedQuantType(ValueError):
    """A GGML tensor type with no MLX mapping here (IQ*, Q8_K, TQ*, MXFP4, ...)."""


@dataclass
class MLXTensor:
    """One converted tensor.

    ``weight`` is the packed ``uint32`` array of a quantized tensor (shape
    ``(rows, cols*bits//32)``) or the dense float array.  ``scales``/``biases`` have
    shape ``(rows, cols//group_size)``.  ``exact`` is True when MLX's dequantization
    (in float32) equals gguf-py's dequantization value for value.
    """

    weight: np.ndarray
    scales: np.ndarray | None
    biases: np.ndarray | None
    bits: int | None
    group_size: int | None
    exact: bool
    source_type: str

    @property
    def quantized(self) -> bool:
        return self.scales is not None

    @property
    def shape(self) -> tuple[int, ...]:
        """Logical (unpacked) shape."""
        if not self.quantized:
            return tuple(self.weight.shape)
        return (*self.weight.shape[:-1], self.weight.shape[-1] * 32 // self.bits)

    def dequantize(self) -> np.ndarray:
        """float32 dequantization (numpy, same arithmetic as MLX: scale*q + bias)."""
        if not self.quantized:
            return np.asarray(self.weight, dtype=np.float32)
        n = self.shape[-1]
        q = unpack_bits(self.weight, self.bits, n).astype(np.float32)
        q = q.reshape(*q.shape[:-1], n // self.group_size, self.group_size)
        s = self.scales.astype(np.float32)[..., None]
        b = self.biases.astype(np.float32)[..., None]
        return (s * q + b).reshape(self.shape)


# --------------------------------------------------------------------------- bits


def _check_bits(bits: int) -> None:
    if bits not in MLX_BITS:
        raise ValueError(f"bits must be one of {MLX_BITS}, got {bits}")


def _pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack uint8 q (m, n) into MLX's uint32 layout without range checks."""
    m, n = q.shape
    if bits == 8:
        return np.ascontiguousarray(q, dtype=np.uint8).view("<u4").astype(np.uint32, copy=False)
    if bits == 4:
        b = q[:, 0::2] | (q[:, 1::2] << np.uint8(4))
        return np.ascontiguousarray(b).view("<u4").astype(np.uint32, copy=False)
    # Generic: 8 elements of `bits` bits make exactly `bits` bytes of the stream.
    q8 = q.reshape(m, n // 8, 8)
    acc = np.zeros((m, n // 8), dtype="<u8")
    for k in range(8):
        acc |= q8[:, :, k].astype("<u8") << np.uint64(k * bits)
    by = acc.view(np.uint8).reshape(m, n // 8, 8)[:, :, :bits]
    return np.ascontiguousarray(by).reshape(m, n * bits // 8).view("<u4").astype(np.uint32, copy=False)


def pack_bits(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack integers ``q`` (..., n) with values in [0, 2**bits) into MLX's layout.

    Returns uint32 (..., n*bits//32): the row is one little-endian bit stream,
    element ``i`` at bits ``[i*bits, (i+1)*bits)``.  ``n*bits`` must be a multiple of 32.
    """
    _check_bits(bits)
    q = np.asarray(q)
    if q.ndim == 0:
        raise ValueError("pack_bits needs at least one dimension")
    n = q.shape[-1]
    if (n * bits) % 32:
        raise ValueError(f"row length {n} * bits {bits} is not a multiple of 32")
    if q.size and (q.min() < 0 or q.max() >= (1 << bits)):
        raise ValueError(f"values out of range [0, {1 << bits}) for {bits}-bit packing")
    lead = q.shape[:-1]
    out = _pack(q.reshape(-1, n).astype(np.uint8, copy=False), bits)
    return out.reshape(*lead, n * bits // 32)


def unpack_bits(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: uint32 (..., n*bits//32) -> uint8 (..., n)."""
    _check_bits(bits)
    packed = np.asarray(packed)
    if packed.shape[-1] * 32 != n * bits:
        raise ValueError(f"{packed.shape[-1]} words do not hold {n} x {bits}-bit values")
    lead = packed.shape[:-1]
    m = prod(lead)
    by = np.ascontiguousarray(packed.reshape(m, -1), dtype="<u4").view(np.uint8)
    if bits == 8:
        return by.reshape(*lead, n).copy()
    if bits == 4:
        out = np.empty((m, n), dtype=np.uint8)
        out[:, 0::2] = by & np.uint8(0x0F)
        out[:, 1::2] = by >> np.uint8(4)
        return out.reshape(*lead, n)
    by = by.reshape(m, n // 8, bits)
    wide = np.zeros((m, n // 8, 8), dtype=np.uint8)
    wide[:, :, :bits] = by
    acc = wide.view("<u8")[:, :, 0]
    mask = np.uint64((1 << bits) - 1)
    out = np.empty((m, n // 8, 8), dtype=np.uint8)
    for k in range(8):
        out[:, :, k] = (acc >> np.uint64(k * bits)) & mask
    return out.reshape(*lead, n)


# ------------------------------------------------------------------ GGML decoding
#
# Each decoder takes blocks (nb, type_size) uint8 and returns
#   q      uint8   (nb, block_size)        MLX integers
#   scale  float32 (nb, block_size // 32)
#   bias   float32 (nb, block_size // 32)


def _f16(b: np.ndarray) -> np.ndarray:
    """Two bytes per row -> float32 column (nb, 1)."""
    return np.ascontiguousarray(b).view("<f2").astype(np.float32)


def _nibbles_32(qs: np.ndarray) -> np.ndarray:
    """Legacy 32-element block: byte j holds element j (low) and j+16 (high)."""
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=1)


def _high_bits_32(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1: 32-bit little-endian word, bit j is the 5th bit of element j."""
    word = np.ascontiguousarray(qh).view("<u4").astype(np.uint32)  # (nb, 1)
    return ((word >> np.arange(32, dtype=np.uint32)) & np.uint32(1)).astype(np.uint8)


def _dec_q4_0(b):
    d = _f16(b[:, 0:2])
    return _nibbles_32(b[:, 2:18]), d, d * np.float32(-8)


def _dec_q4_1(b):
    return _nibbles_32(b[:, 4:20]), _f16(b[:, 0:2]), _f16(b[:, 2:4])


def _dec_q5_0(b):
    d = _f16(b[:, 0:2])
    q = _nibbles_32(b[:, 6:22]) | (_high_bits_32(b[:, 2:6]) << np.uint8(4))
    return q, d, d * np.float32(-16)


def _dec_q5_1(b):
    q = _nibbles_32(b[:, 8:24]) | (_high_bits_32(b[:, 4:8]) << np.uint8(4))
    return q, _f16(b[:, 0:2]), _f16(b[:, 2:4])


def _dec_q8_0(b):
    d = _f16(b[:, 0:2])
    return b[:, 2:34] ^ np.uint8(0x80), d, d * np.float32(-128)  # int8 x -> x + 128


def _k_scale_min(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K 12-byte field -> eight 6-bit scales and eight 6-bit mins.

    Sub-blocks 0-3: scale = low 6 bits of byte j, min = low 6 bits of byte j+4.
    Sub-blocks 4-7: low 4 bits from byte j+4 (scale: low nibble, min: high nibble),
    top 2 bits from the top 2 bits of byte j-4 (scale) / byte j (min).
    """
    lo, mid, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([lo & 63, (hi & 15) | ((lo >> 6) << 4)], axis=1)
    mn = np.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], axis=1)
    return sc, mn


def _k_low_nibbles(qs: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K 128 bytes: chunk c of 32 bytes holds sub-block 2c (low nibbles)
    and sub-block 2c+1 (high nibbles)."""
    nb = qs.shape[0]
    qs = qs.reshape(nb, 4, 1, 32)
    return np.concatenate([qs & np.uint8(15), qs >> np.uint8(4)], axis=2).reshape(nb, 256)


def _k_scales(b, sc, mn):
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    return d * sc.astype(np.float32), -(dmin * mn.astype(np.float32))


def _dec_q4_k(b):
    sc, mn = _k_scale_min(b[:, 4:16])
    scale, bias = _k_scales(b, sc, mn)
    return _k_low_nibbles(b[:, 16:144]), scale, bias


def _dec_q5_k(b):
    nb = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    scale, bias = _k_scales(b, sc, mn)
    qh = b[:, 16:48]  # bit j of byte l: 5th bit of element l of sub-block j
    hi = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & np.uint8(1)
    q = _k_low_nibbles(b[:, 48:176]) | (hi.reshape(nb, 256) << np.uint8(4))
    return q, scale, bias


def _q3_k_parts(b):
    """Q3_K -> signed q (nb, 256) int16 in [-4, 3], scales (nb, 16) int16 in [-32, 31], d."""
    nb = b.shape[0]
    hmask, qs, sraw = b[:, 0:32], b[:, 32:96], b[:, 96:108]
    d = _f16(b[:, 108:110])
    # 2-bit values: element 128h + 32k + l is bits 2k..2k+1 of qs[32h + l]
    sh2 = np.array([0, 2, 4, 6], dtype=np.uint8)
    low = (qs.reshape(nb, 2, 1, 32) >> sh2[None, None, :, None]) & np.uint8(3)
    # high bit: element 32j + l is bit j of hmask[l]; a SET bit means "no -4 offset"
    hb = (hmask[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & np.uint8(1)
    q = low.reshape(nb, 256).astype(np.int16) - 4 * (1 - hb.reshape(nb, 256).astype(np.int16))
    # 6-bit scales: low nibble from byte i (i<8) / high nibble of byte i-8 (i>=8);
    # top two bits from byte 8 + i%4, bit pair i//4.
    lo4 = np.concatenate([sraw[:, 0:8] & 15, sraw[:, 0:8] >> 4], axis=1)
    top = (sraw[:, None, 8:12] >> sh2[None, :, None]) & np.uint8(3)  # (nb, 4, 4): [i//4, i%4]
    sc = (lo4 | (top.reshape(nb, 16) << np.uint8(4))).astype(np.int16) - 32
    return q, sc, d


def _dec_q3_k(b):
    nb = b.shape[0]
    q, sc, d = _q3_k_parts(b)
    prod_ = q.reshape(nb, 16, 16) * sc[:, :, None]  # in [-124, 128]
    qm = (prod_ + 124).astype(np.uint8).reshape(nb, 256)
    d8 = np.repeat(d, 8, axis=1)
    return qm, d8, d8 * np.float32(-124)


def _q6_k_parts(b):
    """Q6_K -> q (nb, 256) uint8 in [0, 63] (signed value q-32), scales (nb, 16) int16, d."""
    nb = b.shape[0]
    ql, qh = b[:, 0:128], b[:, 128:192]
    sc = np.ascontiguousarray(b[:, 192:208]).view(np.int8).astype(np.int16)
    d = _f16(b[:, 208:210])
    # each half of 128 elements uses 64 ql bytes and 32 qh bytes:
    # element 32k + l (k=0..3): low nibble of ql[l], ql[32+l], high nibble of ql[l], ql[32+l];
    # bits 2k..2k+1 of qh[l] are its top two bits.
    ql = ql.reshape(nb, 2, 64)
    low = np.concatenate([ql & np.uint8(15), ql >> np.uint8(4)], axis=2)  # (nb, 2, 128)
    sh2 = np.array([0, 2, 4, 6], dtype=np.uint8)
    hi = (qh.reshape(nb, 2, 1, 32) >> sh2[None, None, :, None]) & np.uint8(3)  # (nb, 2, 4, 32)
    q = (low | (hi.reshape(nb, 2, 128) << np.uint8(4))).reshape(nb, 256)
    return q, sc, d


def _dec_q6_k_int8(b):
    nb = b.shape[0]
    q, sc, d = _q6_k_parts(b)
    q = q.reshape(nb, 8, 2, 16)
    s = sc.reshape(nb, 8, 2)
    big = (np.abs(s[:, :, 1]) > np.abs(s[:, :, 0])).astype(np.intp)[:, :, None]  # ties: first
    s_big = np.take_along_axis(s, big, axis=2)  # (nb, 8, 1) signed
    s_small = np.take_along_axis(s, 1 - big, axis=2)
    # grid: w = (d*s_big/4) * qm - 32*d*s_big; the big sub-block sits at qm = 4*q (exact).
    # A negative d*s_big gives a negative MLX scale, which keeps the 3 spare levels on
    # the side where that sub-block's lattice is shorter.
    qm = q << np.uint8(2)
    # small sub-block: qm = round_half_up((4*s_small*(q-32) + 128*s_big) / s_big).
    # The numerator is an integer below 2**16 (exact in float32) and the division is
    # correctly rounded, which cannot move a quotient across a .5 boundary (those are
    # at least 1/256 away), so this is the exact integer rounding.
    qs = np.take_along_axis(q, (1 - big)[..., None], axis=2).astype(np.float32) - np.float32(32)
    sbf = s_big.astype(np.float32)[..., None]
    num = np.float32(4) * s_small.astype(np.float32)[..., None] * qs + np.float32(128) * sbf
    quot = num / np.where(sbf == 0, np.float32(1), sbf)
    qsm = np.clip(np.floor(quot + np.float32(0.5)), 0, 255).astype(np.uint8)
    np.put_along_axis(qm, (1 - big)[..., None], qsm, axis=2)
    sb = s_big[:, :, 0].astype(np.float32)
    scale = (d * sb) * np.float32(0.25)
    bias = d * (np.float32(-32) * sb)
    return qm.reshape(nb, 256), scale, bias


def _dec_q6_k_dense(b):
    q, sc, d = _q6_k_parts(b)
    nb = b.shape[0]
    ds = (d * sc.astype(np.float32)).reshape(nb, 16, 1)
    return (ds * (q.astype(np.float32) - np.float32(32)).reshape(nb, 16, 16)).reshape(nb, 256)


def _dec_q2_k(b):
    nb = b.shape[0]
    sraw, qs = b[:, 0:16], b[:, 16:80]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    sh2 = np.array([0, 2, 4, 6], dtype=np.uint8)
    # element 128h + 32k + l: bits 2k..2k+1 of qs[32h + l]
    q = ((qs.reshape(nb, 2, 1, 32) >> sh2[None, None, :, None]) & np.uint8(3)).reshape(nb, 8, 2, 16)
    a = (d * (sraw & 15).astype(np.float32)).reshape(nb, 8, 2).astype(np.float64)
    m = (dmin * (sraw >> 4).astype(np.float32)).reshape(nb, 8, 2).astype(np.float64)
    # target values exactly as gguf-py computes them (float32)
    v = (a.astype(np.float32)[..., None] * q.astype(np.float32) - m.astype(np.float32)[..., None]).astype(np.float64)
    vmin, vmax = v.min(axis=(2, 3)), v.max(axis=(2, 3))
    big = (np.abs(a[:, :, 1]) > np.abs(a[:, :, 0])).astype(np.intp)
    ab = np.abs(np.take_along_axis(a, big[:, :, None], axis=2)[:, :, 0])
    mb = np.take_along_axis(m, big[:, :, None], axis=2)[:, :, 0]
    ab_signed = np.take_along_axis(a, big[:, :, None], axis=2)[:, :, 0]
    bmin = -mb + np.minimum(0.0, 3 * ab_signed)  # lowest lattice value of the big sub-block
    # choose the finest power-of-two subdivision K that keeps everything in 256 levels
    step = np.zeros_like(ab)
    lo = vmin.copy()
    found = np.zeros(ab.shape, dtype=bool)
    with np.errstate(divide="ignore", invalid="ignore"):
        for K in (64, 32, 16, 8, 4, 2, 1):
            t = ab / K
            c = np.ceil(np.maximum(bmin - vmin, 0) / t)
            top = np.ceil(np.maximum(vmax - bmin, 0) / t)
            ok = (~found) & (ab > 0) & (c + top <= 255) & np.isfinite(c + top)
            step = np.where(ok, t, step)
            lo = np.where(ok, bmin - c * t, lo)
            found |= ok
    # fallback: min/max over the group
    rng_ = vmax - vmin
    step = np.where(found, step, rng_ / 255)
    scale = step.astype(np.float32)
    bias = lo.astype(np.float32)
    s64, b64 = scale.astype(np.float64)[..., None, None], bias.astype(np.float64)[..., None, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        qm = np.where(s64 > 0, np.rint((v - b64) / np.where(s64 > 0, s64, 1)), 0)
    qm = np.clip(qm, 0, 255).astype(np.uint8).reshape(nb, 256)
    return qm, scale, bias


# qtype -> (bits, decoder, exact, f16-scales-possible)
_QUANT = {
    QT.Q4_0: (4, _dec_q4_0, True, True),
    QT.Q4_1: (4, _dec_q4_1, True, True),
    QT.Q5_0: (5, _dec_q5_0, True, True),
    QT.Q5_1: (5, _dec_q5_1, True, True),
    QT.Q8_0: (8, _dec_q8_0, True, True),
    QT.Q2_K: (8, _dec_q2_k, False, False),
    QT.Q3_K: (8, _dec_q3_k, True, False),
    QT.Q4_K: (4, _dec_q4_k, True, False),
    QT.Q5_K: (5, _dec_q5_k, True, False),
    QT.Q6_K: (8, _dec_q6_k_int8, False, False),
}
_DENSE = (QT.F32, QT.F16, QT.BF16)
SUPPORTED_TYPES = frozenset(_QUANT) | frozenset(_DENSE)


def _where(name: str | None) -> str:
    return f" (tensor {name!r})" if name else ""


def _dense(data: np.ndarray, qtype: QT, shape: tuple[int, ...], name: str | None) -> MLXTensor:
    n = prod(shape)
    data = np.asarray(data)
    if qtype == QT.BF16:
        if data.dtype == np.float32:
            if data.size != n:
                raise ValueError(f"BF16 data has {data.size} values, shape {shape} needs {n}{_where(name)}")
            bits = np.ascontiguousarray(data).view(np.uint32)
            if np.any(bits & np.uint32(0xFFFF)):
                raise ValueError(f"float32 data given as BF16 is not bfloat16-representable{_where(name)}")
            w = data.reshape(shape).copy()
        else:
            if data.nbytes != 2 * n:
                raise ValueError(
                    f"BF16 data is {data.nbytes} bytes, shape {shape} needs {2 * n}{_where(name)}"
                )
            u16 = np.ascontiguousarray(data).view("<u2").reshape(shape)
            w = (u16.astype(np.uint32) << np.uint32(16)).view(np.float32)
        return MLXTensor(w, None, None, None, None, True, "BF16")
    dt = np.dtype("<f4") if qtype == QT.F32 else np.dtype("<f2")
    if data.dtype == dt:
        if data.size != n:
            raise ValueError(f"{qtype.name} data has {data.size} values, shape {shape} needs {n}{_where(name)}")
        w = np.array(data, dtype=dt).reshape(shape)
    else:
        if data.dtype.kind == "f":
            raise ValueError(f"{qtype.name} data has dtype {data.dtype}{_where(name)}")
        if data.nbytes != n * dt.itemsize:
            raise ValueError(
                f"{qtype.name} data is {data.nbytes} bytes, shape {shape} needs {n * dt.itemsize}{_where(name)}"
            )
        w = np.ascontiguousarray(data).view(dt).reshape(shape).copy()
    w = w.astype(np.float32 if qtype == QT.F32 else np.float16, copy=False)
    return MLXTensor(w, None, None, None, None, True, qtype.name)


def _as_qtype(qtype) -> QT:
    try:
        return QT(qtype)
    except ValueError:
        raise UnsupportedQuantType(f"unknown GGML type {qtype!r}") from None


def ggml_to_mlx(
    data: np.ndarray,
    qtype: gguf.GGMLQuantizationType,
    shape: tuple[int, ...],
    *,
    q6k: str = "int8",
    name: str | None = None,
) -> MLXTensor:
    """Convert one GGUF tensor to its MLX form.

    ``data`` is ``GGUFReader(...).tensors[i].data`` (uint8 (rows, row_bytes) for
    quantized types and BF16; float arrays for F32/F16), ``shape`` the numpy-order
    shape (GGUF's ``tensor.shape`` reversed), e.g. ``(rows, cols)``.  Quantized
    results are group 32 (see the module docstring for each type's form).
    ``q6k`` selects the Q6_K form: ``"int8"`` (8-bit group 32, inexact) or
    ``"float32"`` (dense, exact).  ``name`` only improves error messages.
    """
    qtype = _as_qtype(qtype)
    shape = tuple(int(x) for x in (shape if not isinstance(shape, int) else (shape,)))
    if not shape or any(x <= 0 for x in shape):
        raise ValueError(f"invalid shape {shape}{_where(name)}")
    if qtype in _DENSE:
        return _dense(data, qtype, shape, name)
    if qtype not in _QUANT:
        raise UnsupportedQuantType(
            f"GGML type {qtype.name}{_where(name)} has no MLX mapping; supported: "
            + ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
        )
    if q6k not in ("int8", "float32"):
        raise ValueError(f"q6k must be 'int8' or 'float32', got {q6k!r}")

    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    cols = shape[-1]
    rows = prod(shape[:-1])
    if cols % block:
        raise ValueError(
            f"{qtype.name}{_where(name)}: row length {cols} is not a multiple of the block size {block}"
        )
    row_bytes = cols // block * type_size
    data = np.asarray(data)
    if data.dtype != np.uint8:
        raise ValueError(f"{qtype.name}{_where(name)}: expected uint8 block data, got {data.dtype}")
    if data.nbytes != rows * row_bytes:
        raise ValueError(
            f"{qtype.name}{_where(name)}: data is {data.nbytes} bytes, shape {shape} needs "
            f"{rows} rows x {row_bytes} bytes = {rows * row_bytes}"
        )
    data = data.reshape(rows, row_bytes)  # a view for contiguous reader memmaps
    chunk = max(1, _CHUNK_ELEMS // cols)

    if qtype == QT.Q6_K and q6k == "float32":
        out = np.empty((rows, cols), dtype=np.float32)
        for r0 in range(0, rows, chunk):
            r1 = min(rows, r0 + chunk)
            blocks = np.ascontiguousarray(data[r0:r1]).reshape(-1, type_size)
            out[r0:r1] = _dec_q6_k_dense(blocks).reshape(r1 - r0, cols)
        return MLXTensor(out.reshape(shape), None, None, None, None, True, qtype.name)

    bits, decode, exact, f16_ok = _QUANT[qtype]
    weight = np.empty((rows, cols * bits // 32), dtype=np.uint32)
    scales = np.empty((rows, cols // GROUP), dtype=np.float32)
    biases = np.empty((rows, cols // GROUP), dtype=np.float32)
    for r0 in range(0, rows, chunk):
        r1 = min(rows, r0 + chunk)
        blocks = np.ascontiguousarray(data[r0:r1]).reshape(-1, type_size)
        q, s, b = decode(blocks)
        weight[r0:r1] = _pack(q.reshape(r1 - r0, cols), bits)
        scales[r0:r1] = s.reshape(r1 - r0, -1)
        biases[r0:r1] = b.reshape(r1 - r0, -1)
    if f16_ok:
        with np.errstate(over="ignore"):
            s16, b16 = scales.astype(np.float16), biases.astype(np.float16)
        if np.array_equal(s16.astype(np.float32), scales, equal_nan=True) and np.array_equal(
            b16.astype(np.float32), biases, equal_nan=True
        ):
            scales, biases = s16, b16
    lead = shape[:-1]
    return MLXTensor(
        weight.reshape(*lead, -1),
        scales.reshape(*lead, -1),
        biases.reshape(*lead, -1),
        bits,
        GROUP,
        exact,
        qtype.name,
    )


# ------------------------------------------------------------ float checkpoints


def quantize_q4_0_grid(w: np.ndarray) -> MLXTensor:
    """Quantize float weights on llama.cpp's symmetric Q4_0 grid (group 32).

    Same algorithm and float32 arithmetic as llama.cpp's reference
    ``quantize_row_q4_0`` (and gguf-py's ``quants.quantize(w, Q4_0)``): per block,
    ``max`` is the signed value of largest magnitude (first one on ties),
    ``d = max / -8`` (float32), ``id = 1/d`` (0 when d == 0),
    ``q = min(15, trunc(x*id + 8.5))``; ``d`` is stored rounded to float16 (nearest
    even) while ``q`` uses the unrounded float32 ``d``.  The MLX form is 4-bit with
    scale ``d`` and bias ``-8d`` (float16), so MLX's float32 dequantization equals
    gguf-py's Q4_0 quantize+dequantize bit for bit (``exact=True`` refers to that
    grid, not to the input floats).  Rows must be multiples of 32.
    """
    w = np.asarray(w)
    if w.ndim < 1 or w.shape[-1] % 32:
        raise ValueError(f"Q4_0 needs rows that are multiples of 32, got shape {w.shape}")
    shape = w.shape
    cols = shape[-1]
    rows = prod(shape[:-1])
    x2 = w.reshape(rows, cols)
    chunk = max(1, _CHUNK_ELEMS // cols)
    weight = np.empty((rows, cols // 8), dtype=np.uint32)
    scales = np.empty((rows, cols // 32), dtype=np.float16)
    for r0 in range(0, rows, chunk):
        r1 = min(rows, r0 + chunk)
        x = x2[r0:r1].astype(np.float32).reshape(-1, 32)
        imax = np.abs(x).argmax(axis=1)[:, None]
        mx_ = np.take_along_axis(x, imax, axis=1)
        d = mx_ / np.float32(-8)
        with np.errstate(divide="ignore"):
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
        q = np.trunc(x * inv + np.float32(8.5)).astype(np.uint8)
        q = np.minimum(q, np.uint8(15))
        weight[r0:r1] = _pack(q.reshape(r1 - r0, cols), 4)
        scales[r0:r1] = d.astype(np.float16).reshape(r1 - r0, -1)
    biases32 = scales.astype(np.float32) * np.float32(-8)
    with np.errstate(over="ignore"):
        biases = biases32.astype(np.float16)
    if not np.array_equal(biases.astype(np.float32), biases32, equal_nan=True):
        scales, biases = scales.astype(np.float32), biases32
    lead = shape[:-1]
    return MLXTensor(
        weight.reshape(*lead, -1), scales.reshape(*lead, -1), biases.reshape(*lead, -1), 4, 32, True, "Q4_0"
    )


def quantize_affine(w: np.ndarray, bits: int, group_size: int) -> MLXTensor:
    """MLX's own min/max affine quantization (``mx.quantize``), for comparison.

    Scales/biases come back in ``w``'s float dtype (float32 for non-float input).
    """
    import mlx.core as mx

    _check_bits(bits)
    w = np.asarray(w)
    if w.dtype not in (np.float16, np.float32):
        w = w.astype(np.float32)
    wq, s, b = mx.quantize(mx.array(w), group_size=group_size, bits=bits)
    return MLXTensor(
        np.array(wq), np.array(s), np.array(b), bits, group_size, False, {np.float16: "F16"}.get(w.dtype.type, "F32")
    )
