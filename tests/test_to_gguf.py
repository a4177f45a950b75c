"""MLX folder -> GGUF export (mlx_gemma_qat.convert.to_gguf): simulated LoRA fuses on tiny GGUFs, checked
with gguf-py's own dequantizer against the folder's ``mx.dequantize`` in float32."""

import json
import shutil
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf_factory import TINY, write_tiny_gguf

from mlx_gemma_qat.convert import convert, grids
from mlx_gemma_qat.convert.to_gguf import GGUFExportError, _enc_k, _enc_legacy, export_gguf

RNG = np.random.default_rng(0)


# ---------------------------------------------------------------------------------------------- helpers


def _make(tmp_path, linear=QT.Q4_0, embed=QT.F16, override=None, source=TINY, name="base"):
    src = tmp_path / f"{name}.gguf"
    write_tiny_gguf(src, linear, embed, override=override, source=source)
    return src, convert(src, tmp_path / f"{name}-mlx", progress=False)


def _shard(folder: Path) -> Path:
    (shard,) = sorted(folder.glob("*.safetensors"))
    return shard


def _edit(folder: Path, fn):
    """Apply fn(dict of mx arrays) to the folder's (single) shard, as a fuse would rewrite it."""
    shard = _shard(folder)
    w = dict(mx.load(str(shard)))
    fn(w)
    mx.save_safetensors(str(shard), w, metadata={"format": "mlx"})


def _bias_delta(w, base, scale=0.01):
    """Add a random float16-representable delta to ``base.biases`` (a group-pooled adapter, folded)."""
    b = w[f"{base}.biases"]
    delta = mx.array((RNG.standard_normal(b.shape) * scale).astype(np.float16))
    w[f"{base}.biases"] = (b.astype(mx.float32) + delta.astype(mx.float32)).astype(b.dtype)


def _int_change(w, base, bits, frac=0.3):
    """Change some packed integers of ``base.weight`` (a LoRA re-rounded onto the layer's own grid)."""
    packed = np.array(w[f"{base}.weight"])
    n = packed.shape[-1] * 32 // bits
    q = grids.unpack_bits(packed, bits, n).astype(np.int32)
    mask = RNG.random(q.shape) < frac
    q = np.where(mask, (q + RNG.integers(1, 1 << bits, q.shape)) % (1 << bits), q)
    w[f"{base}.weight"] = mx.array(grids.pack_bits(q.astype(np.uint8), bits))


def _mx_dequant_f32(folder: Path, base: str) -> np.ndarray:
    w = mx.load(str(_shard(folder)))
    q = w[f"{base}.weight"]
    s, b = w[f"{base}.scales"].astype(mx.float32), w[f"{base}.biases"].astype(mx.float32)
    bits = q.shape[-1] * 32 // (s.shape[-1] * 32)
    return np.array(mx.dequantize(q, s, b, group_size=32, bits=bits))


def _tensors(path):
    r = gguf.GGUFReader(str(path))
    return r, {t.name: t for t in r.tensors}


def _bytes(t) -> bytes:
    return np.asarray(t.data).tobytes()


def _deq(t) -> np.ndarray:
    shape = tuple(int(s) for s in reversed(t.shape))
    return gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape).astype(np.float32)


def _check_others_copied(base, out, changed: set):
    rb, tb = _tensors(base)
    ro, to = _tensors(out)
    assert [t.name for t in rb.tensors] == [t.name for t in ro.tensors]  # same order
    for name, t in tb.items():
        if name not in changed:
            assert to[name].tensor_type == t.tensor_type and _bytes(to[name]) == _bytes(t), name
    return tb, to


def _row(report, name):
    return next(r for r in report["tensors"] if r["name"] == name)


# ---------------------------------------------------------------------------------------------- encoders


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0])
def test_legacy_encoders_invert_the_converter(qtype):
    bs, ts = gguf.GGML_QUANT_SIZES[qtype]
    blocks = RNG.integers(0, 256, (64, ts), dtype=np.uint8)
    hdr = 4 if qtype in (QT.Q4_1, QT.Q5_1) else 2
    blocks[:, :hdr] = np.ascontiguousarray(RNG.standard_normal((64, hdr // 2)).astype("<f2")).view(np.uint8)
    decode = grids._QUANT[qtype][1]
    q, d, m = decode(blocks)
    m16 = m.astype(np.float16) if qtype in (QT.Q4_1, QT.Q5_1) else None
    assert np.array_equal(_enc_legacy(qtype, q, d.astype(np.float16), m16), blocks)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # random header bytes: NaN/inf scales
@pytest.mark.parametrize("qtype", [QT.Q4_K, QT.Q5_K])
def test_k_encoders_invert_the_converter(qtype):
    _, ts = gguf.GGML_QUANT_SIZES[qtype]
    blocks = RNG.integers(0, 256, (16, ts), dtype=np.uint8)
    q, _, _ = grids._QUANT[qtype][1](blocks)
    assert np.array_equal(_enc_k(qtype, q, blocks), blocks)


# ---------------------------------------------------------------------------------------------- unchanged


@pytest.mark.parametrize("linear,embed", [(QT.Q4_0, QT.F16), (QT.Q5_0, QT.Q8_0), (QT.Q8_0, QT.F32),
                                          (QT.Q4_1, QT.BF16), (QT.Q5_1, QT.Q4_0)])
def test_unchanged_folder_exports_the_base_bit_for_bit(tmp_path, linear, embed):
    src, folder = _make(tmp_path, linear, embed)
    out = tmp_path / "out.gguf"
    report = export_gguf(folder, out, progress=False)  # base from config's mlx_gemma_qat.source
    assert report["counts"] == {"copied": len(report["tensors"]), "exact": 0, "requantized": 0}
    assert report["exact"] and report["vision"] is None and report["warning"] is None
    _check_others_copied(src, out, set())
    rb, ro = gguf.GGUFReader(str(src)), gguf.GGUFReader(str(out))
    for k, f in rb.fields.items():  # every key/value of the base, tokenizer included, unchanged
        if not k.startswith("GGUF."):
            assert ro.fields[k].contents() == f.contents(), k
    added = set(ro.fields) - set(rb.fields)
    assert added == {"mlx_gemma_qat.fused_from", "mlx_gemma_qat.base_gguf", "mlx_gemma_qat.exact"}
    assert ro.fields["mlx_gemma_qat.exact"].contents() is True


# ---------------------------------------------------------------------------------------------- fuses


def test_q4_0_qat_fuse(tmp_path):
    """QAT layout: F16 tied embedding + Q4_0 linears. Bias deltas -> Q4_1, new integers -> Q4_0, dense -> F16,
    all exact; the rest byte-identical."""
    src, folder = _make(tmp_path)
    q, v, o = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.2.mlp.down_proj"
    emb_delta = (RNG.standard_normal((512, 64)) * 0.01).astype(np.float16)

    def fuse(w):
        _bias_delta(w, q)
        _int_change(w, v, 4)
        _bias_delta(w, o)
        _int_change(w, o, 4)
        e = w["model.embed_tokens.weight"]
        w["model.embed_tokens.weight"] = (e + mx.array(emb_delta)).astype(mx.float16)

    _edit(folder, fuse)
    out = tmp_path / "fused.gguf"
    report = export_gguf(folder, out, progress=False)
    changed = {"blk.0.attn_q.weight", "blk.1.attn_v.weight", "blk.2.ffn_down.weight", "token_embd.weight"}
    _, to = _check_others_copied(src, out, changed)
    assert report["counts"] == {"copied": len(report["tensors"]) - 4, "exact": 4, "requantized": 0}
    for gname, base, want in [("blk.0.attn_q.weight", q, QT.Q4_1), ("blk.1.attn_v.weight", v, QT.Q4_0),
                              ("blk.2.ffn_down.weight", o, QT.Q4_1)]:
        assert to[gname].tensor_type == want, gname
        got = _deq(to[gname])
        assert got.dtype == np.float32 and np.array_equal(got, _mx_dequant_f32(folder, base)), gname
        assert _row(report, gname) == {"name": gname, "base_type": "Q4_0", "out_type": want.name, "how": "exact",
                                       "max_abs_error": 0.0}
    emb = np.array(mx.load(str(_shard(folder)))["model.embed_tokens.weight"])
    te = to["token_embd.weight"]
    assert te.tensor_type == QT.F16 and np.array_equal(np.asarray(te.data), emb)
    r = gguf.GGUFReader(str(out))
    assert "fine-tuned" in r.fields["general.name"].contents()
    assert r.fields["mlx_gemma_qat.exact"].contents() is True


def test_q5_0_bias_fuse_is_q5_1(tmp_path):
    src, folder = _make(tmp_path, QT.Q5_0, QT.F16)
    base = "model.layers.3.mlp.up_proj"
    _edit(folder, lambda w: (_bias_delta(w, base), _int_change(w, "model.layers.4.mlp.gate_proj", 5)))
    out = tmp_path / "o.gguf"
    report = export_gguf(folder, out, progress=False)
    _, to = _check_others_copied(src, out, {"blk.3.ffn_up.weight", "blk.4.ffn_gate.weight"})
    assert to["blk.3.ffn_up.weight"].tensor_type == QT.Q5_1
    assert np.array_equal(_deq(to["blk.3.ffn_up.weight"]), _mx_dequant_f32(folder, base))
    assert to["blk.4.ffn_gate.weight"].tensor_type == QT.Q5_0
    assert np.array_equal(_deq(to["blk.4.ffn_gate.weight"]), _mx_dequant_f32(folder, "model.layers.4.mlp.gate_proj"))
    assert report["exact"]


def test_q8_0_fuse(tmp_path):
    """New integers on Q8_0 stay Q8_0 exactly; a bias change has no exact GGML type: re-quantized, error reported."""
    src, folder = _make(tmp_path, QT.Q8_0, QT.F16)
    ints, bias = "model.layers.0.self_attn.k_proj", "model.layers.5.self_attn.o_proj"
    _edit(folder, lambda w: (_int_change(w, ints, 8), _bias_delta(w, bias, 0.002)))
    out = tmp_path / "o.gguf"
    report = export_gguf(folder, out, progress=False)
    _, to = _check_others_copied(src, out, {"blk.0.attn_k.weight", "blk.5.attn_output.weight"})
    assert to["blk.0.attn_k.weight"].tensor_type == QT.Q8_0
    assert np.array_equal(_deq(to["blk.0.attn_k.weight"]), _mx_dequant_f32(folder, ints))
    row = _row(report, "blk.5.attn_output.weight")
    assert row["how"] == "requantized" and row["out_type"] == "Q8_0"
    want = _mx_dequant_f32(folder, bias)
    err = float(np.abs(_deq(to["blk.5.attn_output.weight"]) - want).max())
    assert row["max_abs_error"] == pytest.approx(err) and 0 < err < 0.01 * np.abs(want).max()
    assert not report["exact"] and report["counts"]["requantized"] == 1
    assert gguf.GGUFReader(str(out)).fields["mlx_gemma_qat.exact"].contents() is False


def _k_source(tmp_path) -> Path:
    """The tiny fixture with intermediate_size 256, so ffn_down rows (256) hold one K-quant super-block."""
    src = tmp_path / "tiny256"
    shutil.copytree(TINY, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 256
    (src / "config.json").write_text(json.dumps(cfg))
    w = dict(mx.load(str(src / "model.safetensors")))
    for k in list(w):
        if ".mlp." in k:
            shape = (256, 64) if "down" not in k else (64, 256)
            w[k] = mx.array((RNG.standard_normal(shape) * 0.05).astype(np.float32)).astype(w[k].dtype)
    mx.save_safetensors(str(src / "model.safetensors"), w)
    return src


def _sane_k_headers(path: Path, qtype):
    """gguf-py cannot make K-quants (the factory writes random bytes): give every block small finite d/dmin."""
    r = gguf.GGUFReader(str(path), "r+")
    _, ts = gguf.GGML_QUANT_SIZES[qtype]
    for t in r.tensors:
        if t.tensor_type == qtype:
            b = t.data.reshape(-1, ts)
            dd = (RNG.random((b.shape[0], 2)) * 1e-3 + 1e-4).astype("<f2")
            off = 208 if qtype == QT.Q6_K else 0
            b[:, off:off + (2 if qtype == QT.Q6_K else 4)] = np.ascontiguousarray(
                dd[:, :1] if qtype == QT.Q6_K else dd).view(np.uint8)
    r.data.flush()
    del r


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the factory's random K blocks, before they are fixed
@pytest.mark.parametrize("qtype", [QT.Q4_K, QT.Q5_K])
def test_k_quant_fuse(tmp_path, qtype):
    """K-quants: new integers -> same type with the base header (exact); new biases -> no exact GGML form:
    the smaller error of Q4_1/Q5_1 (f16-rounded scale/bias) and Q8_0, reported."""
    source = _k_source(tmp_path)
    src = tmp_path / "k.gguf"
    write_tiny_gguf(src, QT.Q8_0, QT.F16, override={f"blk.{i}.ffn_down.weight": qtype for i in range(8)},
                    source=source)
    _sane_k_headers(src, qtype)
    folder = convert(src, tmp_path / "k-mlx", progress=False)
    bits = 4 if qtype == QT.Q4_K else 5
    ints, bias = "model.layers.1.mlp.down_proj", "model.layers.6.mlp.down_proj"
    _edit(folder, lambda w: (_int_change(w, ints, bits), _bias_delta(w, bias, 1e-3)))
    out = tmp_path / "o.gguf"
    report = export_gguf(folder, out, progress=False)
    tb, to = _check_others_copied(src, out, {"blk.1.ffn_down.weight", "blk.6.ffn_down.weight"})
    t = to["blk.1.ffn_down.weight"]
    assert t.tensor_type == qtype and _row(report, t.name)["how"] == "exact"
    assert np.array_equal(_deq(t), _mx_dequant_f32(folder, ints))
    hdr = np.asarray(t.data).reshape(-1, gguf.GGML_QUANT_SIZES[qtype][1])[:, :16]
    assert np.array_equal(hdr, np.asarray(tb[t.name].data).reshape(hdr.shape[0], -1)[:, :16])  # header kept
    row = _row(report, "blk.6.ffn_down.weight")
    assert row["how"] == "requantized" and row["out_type"] in ({QT.Q4_K: "Q4_1", QT.Q5_K: "Q5_1"}[qtype], "Q8_0")
    want = _mx_dequant_f32(folder, bias)
    err = float(np.abs(_deq(to["blk.6.ffn_down.weight"]) - want).max())
    assert row["max_abs_error"] == pytest.approx(err) and err < 1e-3 * np.abs(want).max()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_q6_k_changed_is_q8_0(tmp_path):
    source = _k_source(tmp_path)
    src = tmp_path / "k.gguf"
    write_tiny_gguf(src, QT.Q8_0, QT.F16, override={"blk.2.ffn_down.weight": QT.Q6_K}, source=source)
    _sane_k_headers(src, QT.Q6_K)
    folder = convert(src, tmp_path / "k-mlx", progress=False)
    base = "model.layers.2.mlp.down_proj"
    _edit(folder, lambda w: _int_change(w, base, 8, 0.05))
    out = tmp_path / "o.gguf"
    report = export_gguf(folder, out, progress=False)
    _, to = _check_others_copied(src, out, {"blk.2.ffn_down.weight"})
    row = _row(report, "blk.2.ffn_down.weight")
    assert row["base_type"] == "Q6_K" and row["out_type"] == "Q8_0" and row["how"] == "requantized"
    err = float(np.abs(_deq(to["blk.2.ffn_down.weight"]) - _mx_dequant_f32(folder, base)).max())
    assert row["max_abs_error"] == pytest.approx(err) and err > 0


def test_changed_norm_is_written_with_the_plus_one(tmp_path):
    src, folder = _make(tmp_path)
    key = "model.layers.0.input_layernorm.weight"
    delta = mx.array(np.full(64, 0.125, np.float32))
    _edit(folder, lambda w: w.__setitem__(key, w[key] + delta))
    out = tmp_path / "o.gguf"
    report = export_gguf(folder, out, progress=False)
    _, to = _check_others_copied(src, out, {"blk.0.attn_norm.weight"})
    t = to["blk.0.attn_norm.weight"]
    want = np.array(mx.load(str(_shard(folder)))[key])
    assert t.tensor_type == QT.F32 and np.array_equal(np.asarray(t.data) - np.float32(1), want)
    assert _row(report, t.name)["how"] == "exact" and report["warning"]  # a norm changed: says so


def test_multimodal_folder_exports_text_only(tmp_path):
    src = tmp_path / "vlm.gguf"
    write_tiny_gguf(src, source=TINY.parent / "tiny_gemma3_vlm")
    folder = convert(src, tmp_path / "vlm-mlx", mmproj=TINY.parent / "tiny_gemma3_vlm_gguf" / "mmproj-f32.gguf",
                     progress=False)
    out = tmp_path / "o.gguf"
    report = export_gguf(folder, out, progress=False)
    assert report["vision"] and "mmproj" in report["vision"]
    _check_others_copied(src, out, set())


# ---------------------------------------------------------------------------------------------- errors


def _no_leftovers(d: Path, keep: set):
    assert {p.name for p in d.iterdir()} == keep


def test_missing_base_is_refused(tmp_path):
    src, folder = _make(tmp_path)
    src.unlink()
    with pytest.raises(GGUFExportError, match="base_gguf"):
        export_gguf(folder, tmp_path / "o.gguf", progress=False)
    assert not (tmp_path / "o.gguf").exists()


def test_mismatched_base_is_refused(tmp_path):
    _, folder = _make(tmp_path)
    other = tmp_path / "other.gguf"
    write_tiny_gguf(other, source=_k_source(tmp_path))  # another model: intermediate size 256
    with pytest.raises(GGUFExportError, match="does not match"):
        export_gguf(folder, tmp_path / "o.gguf", base_gguf=other, progress=False)
    llama = tmp_path / "llama.gguf"
    write_tiny_gguf(llama, arch="llama")
    with pytest.raises(GGUFExportError, match="not Gemma 3"):
        export_gguf(folder, tmp_path / "o.gguf", base_gguf=llama, progress=False)
    assert not (tmp_path / "o.gguf").exists()


def test_existing_output_needs_force(tmp_path):
    src, folder = _make(tmp_path)
    out = tmp_path / "o.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(GGUFExportError, match="exists"):
        export_gguf(folder, out, progress=False)
    assert out.read_bytes() == b"keep me"
    export_gguf(folder, out, force=True, progress=False)
    assert out.read_bytes()[:4] == b"GGUF"
    with pytest.raises(GGUFExportError, match="base GGUF itself"):
        export_gguf(folder, src, base_gguf=src, force=True, progress=False)


@pytest.mark.parametrize("damage", ["truncate", "drop_biases", "bad_shape"])
def test_corrupt_folder_leaves_nothing(tmp_path, damage):
    _, folder = _make(tmp_path)
    shard = _shard(folder)
    if damage == "truncate":
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) // 2])
    elif damage == "drop_biases":
        _edit(folder, lambda w: w.pop("model.layers.3.mlp.up_proj.biases"))
    else:
        _edit(folder, lambda w: w.__setitem__("model.layers.3.mlp.up_proj.scales",
                                              w["model.layers.3.mlp.up_proj.scales"][:, :1]))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(GGUFExportError):
        export_gguf(folder, out_dir / "o.gguf", progress=False)
    _no_leftovers(out_dir, set())


def test_widened_f32_scales(tmp_path):
    """A folder holding Q4_0 scales/biases as float32 (as the CPU loader widens them): f16 values are still
    exact (Q4_1); values f16 cannot hold are rounded and reported."""
    src, folder = _make(tmp_path)
    ok, off = "model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"

    def fuse(w):
        _bias_delta(w, ok)
        for base in (ok, off):
            for k in ("scales", "biases"):
                w[f"{base}.{k}"] = w[f"{base}.{k}"].astype(mx.float32)
        w[f"{off}.biases"] = w[f"{off}.biases"] + mx.array(np.float32(1e-5))  # not an f16 value any more

    _edit(folder, fuse)
    out = tmp_path / "o.gguf"
    report = export_gguf(folder, out, progress=False)
    _, to = _check_others_copied(src, out, {"blk.0.ffn_up.weight", "blk.1.ffn_up.weight"})
    assert _row(report, "blk.0.ffn_up.weight")["how"] == "exact"
    assert np.array_equal(_deq(to["blk.0.ffn_up.weight"]), _mx_dequant_f32(folder, ok))
    row = _row(report, "blk.1.ffn_up.weight")
    err = float(np.abs(_deq(to["blk.1.ffn_up.weight"]) - _mx_dequant_f32(folder, off)).max())
    assert row["how"] == "requantized" and row["max_abs_error"] == pytest.approx(err) and 0 < err < 1e-4
