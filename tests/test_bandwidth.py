"""Bytes read per decoded token, per way of holding the weights (issue 18, item 7), and ``scales="float32"``.

The model (model/bandwidth.py) is checked against an independent count: the nbytes of the arrays a loaded model
holds, plus numpy arithmetic for what MLX widens per call. Persistent float32 scales give bit-identical logits to
the stored form (bfloat16 compute on the CPU exercises the GPU's code path).
"""

import gguf
import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from gguf_factory import write_tiny_gguf
from mlx.utils import tree_flatten

from mlx_gemma_qat.cli import main
from mlx_gemma_qat.convert import convert
from mlx_gemma_qat.inspect import inspect_path
from mlx_gemma_qat.model import load as load_mod
from mlx_gemma_qat.model.bandwidth import (
    bytes_per_token,
    kv_bytes_per_token,
    model_weights,
)
from mlx_gemma_qat.model.load import load_model, resolve_scales
from mlx_gemma_qat.model.quantized import QuantizedEmbedding, QuantizedLinear

QT = gguf.GGMLQuantizationType


@pytest.fixture(scope="module", params=["qat", "q8"])
def folder(request, tmp_path_factory):
    """Google's QAT layout (Q4_0 linears, F16 tied embedding), or Q4_0 linears with a Q8_0 tied embedding."""
    d = tmp_path_factory.mktemp(request.param)
    embed = QT.F16 if request.param == "qat" else QT.Q8_0
    write_tiny_gguf(d / "t.gguf", QT.Q4_0, embed, override={"blk.1.ffn_down.weight": QT.Q5_1})
    return convert(d / "t.gguf", d / "m", progress=False)


def _independent(model) -> tuple[int, int]:
    """(read, written) per decoded token from the arrays the model holds: every array read once, the embedding
    once more for its lookup row (it is also the head); each quantized linear whose scales are narrower than
    float32 (with bfloat16 activations) has them widened per call: read narrow, write float32, read float32."""
    arrays = dict(tree_flatten(model.parameters()))
    read = sum(a.nbytes for a in arrays.values())
    emb = model.model.embed_tokens
    read += sum(np.array(a[0]).nbytes for a in (emb.weight, getattr(emb, "scales", None), getattr(emb, "biases", None))
                if a is not None)
    written = 0
    for _, m in model.named_modules():
        if isinstance(m, QuantizedLinear) and m.scales.dtype == mx.float16:
            narrow = m.scales.nbytes + m.biases.nbytes
            read += 2 * narrow  # the astype reads them; the kernel reads their float32 copy (twice the bytes) instead
            written += 2 * narrow
    return read, written


@pytest.mark.parametrize("holding,kw", [("stored", {"dtype": "bfloat16", "scales": "stored"}),
                                        ("float32", {"dtype": "bfloat16", "scales": "float32"}),
                                        ("widen", {"dtype": "float32"})])
def test_bytes_per_token_match_the_loaded_arrays(folder, holding, kw):
    rep = inspect_path(folder)
    m = load_model(folder, **kw)
    assert m.holding == holding
    t = bytes_per_token(rep.weights, holding)
    assert (t.read, t.written) == _independent(m)
    assert rep.memory(holding) == sum(a.nbytes for _, a in tree_flatten(m.parameters()))
    assert bytes_per_token(model_weights(m), holding) == t  # the loaded model's own count agrees
    assert bytes_per_token(inspect_path(folder.parent / "t.gguf").weights, holding) == t  # and the GGUF's
    if holding != "stored":
        assert t.written == t.transient == 0


def test_modelled_bits_per_q4_0_weight(folder):
    """The issue's figures: 9 bits moved per Q4_0 weight with per-call widening, 6 held float32, 5 in float16."""
    lin = [w for w in inspect_path(folder).weights if w.bits == 4 and w.use == "matmul"]
    n = sum(w.numel for w in lin)
    moved = {h: 8 * bytes_per_token(lin, h).moved / n for h in ("stored", "float32", "float16", "widen")}
    assert moved == {"stored": 9.0, "float32": 6.0, "float16": 5.0, "widen": 6.0}


def test_float16_holding_reads_the_stored_arrays(folder):
    rep = inspect_path(folder)
    m = load_model(folder, dtype="bfloat16", scales="stored")
    read, _ = _independent(m)
    widened = sum(mm.scales.nbytes + mm.biases.nbytes for _, mm in m.named_modules()
                  if isinstance(mm, QuantizedLinear) and mm.scales.dtype == mx.float16)
    t = bytes_per_token(rep.weights, "float16")
    assert (t.read, t.written) == (read - 2 * widened, 0)  # packed + float16 scales, as held


def test_mlx_widens_float16_scales_on_every_call():
    """What the model assumes of MLX: bfloat16 x with float16 scales adds astype nodes for the scales and biases
    (and x) before the quantized matmul, and computes in float32; float32 scales add only x's."""
    w, s, b = mx.quantize(mx.random.normal((64, 64)), group_size=32, bits=4)
    s16, b16, x = s.astype(mx.float16), b.astype(mx.float16), mx.ones((1, 64), dtype=mx.bfloat16)
    mx.eval(w, s, b, s16, b16, x)  # leaves: the graph below holds only the matmul's own nodes

    def astypes(scales, biases):
        import io

        y = mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=32, bits=4)
        f = io.StringIO()
        mx.export_to_dot(f, y)
        return y.dtype, f.getvalue().count('"AsType"')

    assert astypes(s16, b16) == (mx.float32, 3)
    assert astypes(s, b) == (mx.float32, 1)
    x16 = x.astype(mx.float16)
    y = mx.quantized_matmul(x16, w, s16, b16, transpose=True, group_size=32, bits=4)
    assert y.dtype == mx.float16  # float16 activations read float16 scales as stored


def test_float32_scales_are_bit_identical_to_stored(folder):
    """The bfloat16 path (the GPU's) on the CPU: a prompt and a few cached decode steps, logits equal bit for bit."""
    stored = load_model(folder, dtype="bfloat16", scales="stored")
    wide = load_model(folder, dtype="bfloat16", scales="float32")
    assert stored.model.layers[0].self_attn.q_proj.scales.dtype == mx.float16
    assert wide.model.layers[0].self_attn.q_proj.scales.dtype == mx.float32
    assert wide.model.layers[1].mlp.down_proj.scales.dtype == mx.float32  # Q5_1 too
    ids = mx.array([[2, 17, 99, 300, 5, 42, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]])
    caches = [stored.make_cache(), wide.make_cache()]
    outs = [m(ids, cache=c) for m, c in zip((stored, wide), caches)]
    np.testing.assert_array_equal(np.array(outs[0]), np.array(outs[1]))
    tok = mx.argmax(outs[0][:, -1:], axis=-1)
    for _ in range(4):
        a, b = (m(tok, cache=c) for m, c in zip((stored, wide), caches))
        np.testing.assert_array_equal(np.array(a), np.array(b))
        tok = mx.argmax(a, axis=-1)


def test_default_scales_by_device_memory(monkeypatch):
    assert resolve_scales(None, mx.float32, True, 10, 10) == "widen"  # the CPU default
    assert resolve_scales(None, mx.float32, False, 10, 10) == "stored"  # the CPU with --no-widen: as before
    monkeypatch.setattr(load_mod, "memory_budget", lambda: 100)
    assert resolve_scales(None, mx.bfloat16, False, 50, 30) == "float32"  # 80 <= 0.8 x 100
    assert resolve_scales(None, mx.bfloat16, False, 50, 31) == "stored"
    monkeypatch.setattr(load_mod, "memory_budget", lambda: None)
    assert resolve_scales(None, mx.bfloat16, False, 1, 1) == "stored"  # unknown memory: the smaller form
    assert resolve_scales("float32", mx.bfloat16, False, 10**15, 0) == "float32"  # forced
    assert resolve_scales("float32", mx.float32, True, 1, 1) == "widen"
    with pytest.raises(ValueError, match="give one"):
        resolve_scales("stored", mx.float32, True, 1, 1)
    with pytest.raises(ValueError, match="unknown scales"):
        resolve_scales("float16", mx.bfloat16, False, 1, 1)


def test_tied_quantized_head_holds_float32_scales_under_every_holding(folder):
    for scales in ("stored", "float32"):
        emb = load_model(folder, dtype="bfloat16", scales=scales).model.embed_tokens
        if isinstance(emb, QuantizedEmbedding):
            assert emb.scales.dtype == mx.float32


def test_cli_inspect_prints_bytes_per_token(folder):
    r = CliRunner().invoke(main, ["inspect", str(folder), "--context", "64", "--scales", "float32"])
    assert r.exit_code == 0, r.output
    for text in ("bytes per decoded token", "stored (f16 scales widened to f32 per call)",
                 "float32 scales, held (--scales float32)", "f16 activations into quantized matmuls",
                 "KV cache read per token at context 64", "loader default on a GPU", "here (cpu, --scales float32)"):
        assert text in r.output
    rep = inspect_path(folder)
    mib = 2**20
    line = next(x for x in r.output.splitlines() if x.strip().startswith("float32 scales, held"))
    assert f"{bytes_per_token(rep.weights, 'float32').read / mib:.2f}" in line
    assert f"{kv_bytes_per_token(rep.config, 64, 'stored') / mib:.1f} MiB bfloat16" in r.output
    r = CliRunner().invoke(main, ["inspect", str(folder), "--scales", "float16"])
    assert r.exit_code != 0


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_cli_scales_reach_the_loader(folder, loaded, command):
    """--scales on generate and chat (serve shares the option helper) reaches the loader, with bfloat16 compute;
    with the CPU's widening a forced "stored" is one error line."""
    args = {"generate": ["-p", "hello", "-n", "2", "--raw", "--no-stats"], "chat": ["-n", "2"]}[command]
    for scales in ("stored", "float32"):
        r = CliRunner().invoke(main, [command, "-m", str(folder), *args, "--dtype", "bfloat16", "--scales", scales],
                               input="hi\n/quit\n")
        assert r.exit_code == 0, r.output
    assert [m.holding for m in loaded] == ["stored", "float32"]
    r = CliRunner().invoke(main, [command, "-m", str(folder), *args, "--scales", "stored"], input="/quit\n")
    assert r.exit_code == 1 and "Error: scales='stored' keeps float16 scales" in r.output
