"""Weights held at the precision the file stores (issue 7, part 1).

Quantized scales and biases stay float16 where the GGML type stores float16 values, dense float16 tensors
stay float16 (the QAT layout's embedding, also the head), on the bfloat16 path and on the CPU with
``widen=False``; the CPU default widens them to float32 (exact). Every path computes the same dequantized
weights; ``inspect`` predicts the bytes MLX then holds.
"""

import gguf
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from gguf_factory import write_tiny_gguf
from mlx_gemma_qat.convert import convert
from mlx_gemma_qat.convert.from_gguf import read_gguf
from mlx_gemma_qat.inspect import inspect_path
from mlx_gemma_qat.model.load import load_model
from mlx_gemma_qat.model.quantized import Embedding, QuantizedEmbedding, QuantizedLinear

QT = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def qat_folder(tmp_path_factory):
    """A tiny model in Google's QAT layout: every linear Q4_0, token_embd F16 (tied head)."""
    d = tmp_path_factory.mktemp("qat")
    expected = write_tiny_gguf(d / "t.gguf", QT.Q4_0, QT.F16)
    return convert(d / "t.gguf", d / "m", progress=False), expected


@pytest.fixture(scope="module")
def q8_embed_folder(tmp_path_factory):
    """Q4_0 linears and a Q8_0 embedding (float16 scales) that is also the head."""
    d = tmp_path_factory.mktemp("q8")
    expected = write_tiny_gguf(d / "t.gguf", QT.Q4_0, QT.Q8_0, override={"blk.1.ffn_down.weight": QT.Q5_1})
    return convert(d / "t.gguf", d / "m", progress=False), expected


def _dtypes(model):
    return {k: v.dtype for k, v in tree_flatten(model.parameters())}


def _active_bytes(path, **kw):
    mx.clear_cache()
    base = mx.get_active_memory()
    m = load_model(path, **kw)
    return m, mx.get_active_memory() - base


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_stored_dtypes_kept_without_widening(qat_folder, dtype):
    folder, _ = qat_folder
    m = load_model(folder, dtype=dtype, widen=False, scales="stored")
    dt = _dtypes(m)
    assert dt["model.embed_tokens.weight"] == mx.float16
    assert dt["model.layers.0.self_attn.q_proj.scales"] == mx.float16
    assert dt["model.layers.0.self_attn.q_proj.biases"] == mx.float16
    assert dt["model.layers.0.self_attn.q_proj.weight"] == mx.uint32
    assert dt["model.norm.weight"] == mx.float32  # F32 in the GGUF: never rounded to bfloat16
    assert isinstance(m.model.layers[0].mlp.down_proj, QuantizedLinear)
    assert isinstance(m.model.embed_tokens, Embedding)
    assert m.widened is False


def test_cpu_default_widens_exactly(qat_folder):
    folder, expected = qat_folder
    wide = load_model(folder, dtype="float32")  # widen defaults to on with float32 compute
    assert wide.widened is True
    dt = _dtypes(wide)
    assert dt["model.embed_tokens.weight"] == mx.float32
    assert dt["model.layers.0.self_attn.q_proj.scales"] == mx.float32
    narrow = load_model(folder, dtype="float32", widen=False)
    # widening is exact: the float32 copy holds the float16 values
    np.testing.assert_array_equal(np.array(wide.model.embed_tokens.weight),
                                  np.array(narrow.model.embed_tokens.weight.astype(mx.float32)))
    np.testing.assert_array_equal(np.array(wide.model.embed_tokens.weight), expected["model.embed_tokens.weight"])
    # float16 scales compute in float32 (promote_types): the hidden states are identical, not just close
    ids = mx.array([[2, 17, 99, 300, 5, 42, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]])
    np.testing.assert_array_equal(np.array(wide.model(ids)), np.array(narrow.model(ids)))
    # the float16 head multiplies in float16 (activations rounded to it): logits close, not equal
    lw, ln = np.array(wide(ids)), np.array(narrow(ids))
    assert ln.dtype == np.float32
    np.testing.assert_allclose(ln, lw, atol=2e-2 * np.abs(lw).max(), rtol=0)


def test_bfloat16_path_logits_close_to_float32(qat_folder):
    folder, _ = qat_folder
    ids = mx.array([[2, 17, 99, 300, 5, 42, 7, 8, 9, 10, 11, 12]])
    f32 = np.array(load_model(folder, dtype="float32")(ids))
    bf = load_model(folder, dtype="bfloat16")
    assert bf.widened is False
    out = bf(ids)
    assert out.dtype == mx.float32  # logits leave the head in float32
    rel = np.sqrt(np.mean((np.array(out) - f32) ** 2)) / np.sqrt(np.mean(f32**2))
    assert 0 < rel < 0.1, rel  # random tiny weights amplify rounding; the real 270M: see bench_memory


def test_quantized_embedding_lookup_is_exact_with_float16_scales():
    """MLX's dequantize computes in the scales' dtype; the lookup widens the gathered rows' scales first."""
    rng = np.random.default_rng(0)
    n, d = 64, 64
    q = rng.integers(0, 256, (n, d)).astype(np.uint8)
    s = (rng.uniform(1, 2, (n, d // 32)) * 2.0**-7).astype(np.float16)  # full 11-bit mantissas
    b = (-128 * s.astype(np.float32)).astype(np.float16)  # Q8_0's bias -128 d, exact in float16
    from mlx_gemma_qat.convert.grids import pack_bits

    emb = QuantizedEmbedding(n, d, 32, 8)
    emb.weight, emb.scales, emb.biases = mx.array(pack_bits(q, 8)), mx.array(s), mx.array(b)
    ids = mx.array([3, 0, 63, 3])
    got = np.array(emb(ids))
    want = (s.astype(np.float32).repeat(32, 1) * q + b.astype(np.float32).repeat(32, 1))[[3, 0, 63, 3]]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
    # what a float16 dequantize gives instead: rounded (the bug this avoids)
    half = np.array(mx.dequantize(emb.weight[ids], emb.scales[ids], emb.biases[ids], group_size=32, bits=8))
    assert not np.array_equal(half.astype(np.float32), want)


def test_tied_quantized_head_holds_float32_scales(q8_embed_folder):
    """The Q8_0 embedding is also the head: its scales are widened once at load, not on every token."""
    folder, expected = q8_embed_folder
    m = load_model(folder, dtype="bfloat16", scales="stored")
    assert m.model.embed_tokens.scales.dtype == mx.float32
    assert m.model.layers[0].self_attn.q_proj.scales.dtype == mx.float16
    assert m.model.layers[1].mlp.down_proj.scales.dtype == mx.float16  # Q5_1: d and m are float16 values
    rows = np.array(m.model.embed_tokens(mx.arange(8)))
    np.testing.assert_array_equal(rows, expected["model.embed_tokens.weight"][:8])


@pytest.mark.parametrize("kw,load", [({"dtype": "float32"}, "cpu"), ({"dtype": "float32", "widen": False}, "stored"),
                                     ({"dtype": "bfloat16", "scales": "stored"}, "stored")])
@pytest.mark.parametrize("which", ["qat", "q8"])
def test_inspect_predicts_loaded_bytes(qat_folder, q8_embed_folder, kw, load, which):
    folder = (qat_folder if which == "qat" else q8_embed_folder)[0]
    rep = inspect_path(folder)
    predicted = {"cpu": rep.weight_memory, "stored": rep.weight_memory_stored}[load]
    m, held = _active_bytes(folder, **kw)
    params = sum(v.nbytes for _, v in tree_flatten(m.parameters()))
    assert params == predicted
    assert abs(held - predicted) <= 0.01 * predicted + 65536
    # the GGUF's own report predicts the same as the converted folder's
    assert inspect_path(folder.parent / "t.gguf").weight_memory_stored == rep.weight_memory_stored


def test_quantized_linears_at_stored_size(qat_folder):
    """Q4_0 in MLX's affine form: 4 bits + a float16 scale and bias per 32 = 5.0 bits (GGML: 4.5)."""
    folder, _ = qat_folder
    m = load_model(folder, dtype="bfloat16", scales="stored")
    layer = m.model.layers[0].mlp.gate_proj
    n = layer.weight.shape[0] * layer.weight.shape[1] * 32 // 4
    held = layer.weight.nbytes + layer.scales.nbytes + layer.biases.nbytes
    assert held * 8 / n == 5.0
    assert held / (n // 32 * 18) <= 1.12


def test_cli_inspect_shows_loaded_memory_and_kv_bits(qat_folder):
    from click.testing import CliRunner

    from mlx_gemma_qat.cli import main

    folder, _ = qat_folder
    r = CliRunner().invoke(main, ["inspect", str(folder), "--context", "256", "--kv-bits", "4"])
    assert r.exit_code == 0, r.output
    assert "CPU f32" in r.output and "stored" in r.output
    assert "at the stored precision" in r.output
    rep = inspect_path(folder)
    kv4 = rep.kv_cache_bytes(256, 2, 4, 64) / 2**20
    assert f"{kv4:.1f} MiB 4-bit g64" in r.output


# ------------------------------------------------------------------ the real 270M, both layouts


def _linear_bytes(model) -> int:
    return sum(m.weight.nbytes + m.scales.nbytes + m.biases.nbytes
               for _, m in model.named_modules() if isinstance(m, QuantizedLinear))


def _gguf_linear_bytes(r: gguf.GGUFReader) -> int:
    return sum(int(t.n_bytes) for t in r.tensors if t.name.startswith("blk.") and t.tensor_type not in (QT.F32, QT.F16))


@pytest.mark.real
def test_real_qat_layout_held_at_its_stored_size(real_qat_gguf, real_qat_270m):
    """Google's layout: Q4_0 linears at 5.0/4.5 = 1.11x their GGUF bytes, the F16 embedding at 1.00x and
    bit-exact, on the bfloat16 path; inspect's prediction is what MLX holds."""
    m, held = _active_bytes(real_qat_270m, dtype="bfloat16", scales="stored")
    r = read_gguf(real_qat_gguf)  # gguf-py's reader, faster on its 262k-token vocabulary (the same parse)
    assert _linear_bytes(m) / _gguf_linear_bytes(r) == pytest.approx(5.0 / 4.5)
    emb = m.model.embed_tokens.weight
    assert emb.dtype == mx.float16
    t = next(t for t in r.tensors if t.name == "token_embd.weight")
    assert emb.nbytes == int(t.n_bytes)
    rows = [0, 2, 818, 262143]
    np.testing.assert_array_equal(np.array(emb[mx.array(rows)]), np.asarray(t.data)[rows])
    assert held == pytest.approx(inspect_path(real_qat_270m).weight_memory_stored, rel=0.01)
    assert held < 1.001 * real_qat_gguf.stat().st_size


@pytest.mark.real
def test_real_qat_layout_paths_agree(real_qat_270m):
    """CPU default (widened), stored precision in float32 and the bfloat16 path: same next token; the
    float32 paths differ only by the float16 head's rounding of the activations."""
    ids = mx.array([[2, 818, 5279, 529, 7001, 563]])  # <bos>The capital of France is
    wide = np.array(load_model(real_qat_270m)(ids)[0, -1])
    narrow = np.array(load_model(real_qat_270m, widen=False)(ids)[0, -1])
    bf16 = np.array(load_model(real_qat_270m, dtype="bfloat16")(ids)[0, -1])
    assert np.abs(narrow - wide).max() < 0.05
    assert np.abs(bf16 - wide).max() < 1.0
    assert int(wide.argmax()) == int(narrow.argmax()) == int(bf16.argmax())


@pytest.mark.real
def test_real_k_quant_mix_keeps_float32_scales_only_where_needed(real_270m):
    m, held = _active_bytes(real_270m, dtype="bfloat16", scales="stored")
    layer = m.model.layers[0]
    assert layer.self_attn.q_proj.scales.dtype == mx.float16  # Q5_0
    assert layer.self_attn.o_proj.scales.dtype == mx.float32  # Q4_K: d*sc needs 17 bits
    assert held == pytest.approx(inspect_path(real_270m).weight_memory_stored, rel=0.01)


def test_cli_generate_with_and_without_widening(qat_folder, loaded):
    """--no-widen/--widen reach the loader."""
    from click.testing import CliRunner

    from mlx_gemma_qat.cli import main

    folder, _ = qat_folder
    for flag in ("--no-widen", "--widen"):
        r = CliRunner().invoke(main, ["generate", "-m", str(folder), "-p", "hello", "-n", "4", "--raw", "--no-stats",
                                      flag])
        assert r.exit_code == 0, r.output
    assert [m.widened for m in loaded] == [False, True]
