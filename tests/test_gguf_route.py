"""GGUF route end to end on tiny files written like llama.cpp's: converted model == gguf-py's values."""

import json

import gguf
import mlx.core as mx
import numpy as np
import pytest

from gguf_factory import TINY, write_tiny_gguf
from mlx_gemma_qat.convert import convert
from mlx_gemma_qat.model.load import load_model

QT = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def dense_model(tmp_path_factory):
    return load_model(convert(TINY, tmp_path_factory.mktemp("d") / "m", mode="none", progress=False))


@pytest.mark.parametrize(
    "linear,embed",
    [(QT.Q4_0, QT.F16), (QT.Q4_1, QT.Q8_0), (QT.Q5_0, QT.BF16), (QT.Q5_1, QT.F32), (QT.Q8_0, QT.Q4_0)],
)
def test_converted_model_equals_gguf_py_weights(tmp_path, dense_model, linear, embed):
    """Logits of the converted (quantized) model equal a float model holding gguf-py's dequantized weights."""
    expected = write_tiny_gguf(tmp_path / "t.gguf", linear, embed)
    model = load_model(convert(tmp_path / "t.gguf", tmp_path / "m", progress=False))
    dense_model.load_weights([(k, mx.array(v)) for k, v in expected.items()])
    x = mx.array(np.random.default_rng(0).integers(0, 512, (1, 40)))
    np.testing.assert_allclose(np.array(model(x)), np.array(dense_model(x)), atol=2e-5, rtol=0)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["mlx_gemma_qat"]["inexact_tensors"] == []
    assert cfg["sliding_window"] == 16 and cfg["num_hidden_layers"] == 8


def test_google_qat_layout_keeps_f16_embedding(tmp_path):
    write_tiny_gguf(tmp_path / "t.gguf", QT.Q4_0, QT.F16)
    out = convert(tmp_path / "t.gguf", tmp_path / "m", progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert "model.embed_tokens" not in cfg["quantization"]
    assert cfg["quantization"]["model.layers.0.self_attn.q_proj"] == {"group_size": 32, "bits": 4, "mode": "affine"}
    w = mx.load(str(next(out.glob("*.safetensors"))))
    assert w["model.embed_tokens.weight"].dtype == mx.float16
    assert w["model.layers.0.self_attn.q_proj.scales"].dtype == mx.float16  # as stored in the GGUF


def test_norms_lose_llama_cpp_plus_one(tmp_path):
    expected = write_tiny_gguf(tmp_path / "t.gguf")
    out = convert(tmp_path / "t.gguf", tmp_path / "m", progress=False)
    w = mx.load(str(next(out.glob("*.safetensors"))))
    np.testing.assert_array_equal(np.array(w["model.norm.weight"]), expected["model.norm.weight"])
    hf = mx.load(str(TINY / "model.safetensors"))
    np.testing.assert_array_equal(np.array(w["model.norm.weight"]), np.array(hf["model.norm.weight"].astype(mx.float32)))


def test_dequantize_export_is_hf_form(tmp_path):
    expected = write_tiny_gguf(tmp_path / "t.gguf")
    out = convert(tmp_path / "t.gguf", tmp_path / "hf", dequantize=True, progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization" not in cfg
    w = mx.load(str(next(out.glob("*.safetensors"))))
    np.testing.assert_array_equal(np.array(w["model.layers.2.mlp.up_proj.weight"]), expected["model.layers.2.mlp.up_proj.weight"])


def test_base_gguf_gets_no_chat_template(tmp_path):
    write_tiny_gguf(tmp_path / "t.gguf")
    out = convert(tmp_path / "t.gguf", tmp_path / "m", progress=False)
    tcfg = json.loads((out / "tokenizer_config.json").read_text())
    assert "chat_template" not in tcfg


def _same_parse(ours, theirs) -> None:
    assert list(ours.fields) == list(theirs.fields)
    for key, a in ours.fields.items():
        b = theirs.fields[key]
        assert (a.offset, a.data, a.types) == (b.offset, b.data, b.types), key
        assert len(a.parts) == len(b.parts) and all(
            x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(a.parts, b.parts)), key
    assert ours.data_offset == theirs.data_offset and len(ours.tensors) == len(theirs.tensors)
    for a, b in zip(ours.tensors, theirs.tensors):
        assert (a.name, a.tensor_type, list(a.shape), a.n_elements, a.n_bytes, a.data_offset) == (
            b.name, b.tensor_type, list(b.shape), b.n_elements, b.n_bytes, b.data_offset)
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape and np.array_equal(a.data, b.data)


def test_our_reader_parses_what_gguf_py_parses(tmp_path):
    """read_gguf's reader (gguf-py's, over a plain ndarray view of the map: ~3x faster on a 262k vocabulary)
    gives every field part, tensor and tensor byte gguf-py's own reader gives: a text GGUF (scalars, strings,
    string, float and int arrays, quantized and float tensors) and a vision mmproj."""
    from pathlib import Path

    from mlx_gemma_qat.convert.from_gguf import read_gguf

    fixtures = Path(__file__).parent / "fixtures"
    write_tiny_gguf(tmp_path / "spm.gguf", QT.Q4_0, QT.F16)
    files = [tmp_path / "spm.gguf", *sorted((fixtures / "tiny_gemma3_vlm_gguf").glob("*.gguf"))]
    assert len(files) == 2
    for path in files:
        ours = read_gguf(path)
        assert type(ours.data) is np.ndarray and ours.memmap.filename == str(path.resolve())
        _same_parse(ours, gguf.GGUFReader(str(path)))


def _header_only(path, n_layers: int, **kv):
    """A gemma3 GGUF of the given depth, 8 wide, with only the metadata Ollama's multimodal branch writes."""
    w = gguf.GGUFWriter(str(path), "gemma3")
    for key, value in {"block_count": n_layers, "embedding_length": 8, "feed_forward_length": 16,
                       "attention.head_count": 2, "attention.head_count_kv": 1, "attention.key_length": 4,
                       "context_length": 131072, "attention.sliding_window": 1024}.items():
        w.add_uint32(f"gemma3.{key}", value)
    for key, value in kv.items():
        (w.add_string if isinstance(value, str) else w.add_array)(f"gemma3.{key}", value)
    f = np.zeros
    w.add_tensor("token_embd.weight", f((16, 8), np.float32))
    w.add_tensor("output_norm.weight", f(8, np.float32))
    shapes = {"attn_q": (8, 8), "attn_k": (4, 8), "attn_v": (4, 8), "attn_output": (8, 8), "attn_q_norm": (4,),
              "attn_k_norm": (4,), "ffn_gate": (16, 8), "ffn_up": (16, 8), "ffn_down": (8, 16), "attn_norm": (8,),
              "post_attention_norm": (8,), "ffn_norm": (8,), "post_ffw_norm": (8,)}
    for i in range(n_layers):
        for name, shape in shapes.items():
            w.add_tensor(f"blk.{i}.{name}.weight", f(shape, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_keys_ollama_leaves_out_take_gemma3_values(tmp_path):
    """Ollama's converter writes no rope bases, rms eps or rope scaling for a vision model; its runner (model/
    models/gemma3/model_text.go) then uses 1e6 / 1e4 / 1e-6 and linear scaling by 8 on the 4B/12B/27B depths,
    as Google's configs say. Its per-layer sliding_window_pattern, where written, gives the layer types."""
    from mlx_gemma_qat.convert.from_gguf import config_from_gguf, read_gguf

    _header_only(tmp_path / "4b.gguf", 34)
    cfg = config_from_gguf(read_gguf(tmp_path / "4b.gguf"))
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 8.0}
    assert (cfg.rope_theta, cfg.rope_local_base_freq, cfg.rms_norm_eps) == (1e6, 1e4, 1e-6)
    assert cfg.layer_types.count("full_attention") == 5 and cfg.layer_types[5] == "full_attention"
    _header_only(tmp_path / "none.gguf", 34, **{"rope.scaling.type": "none"})  # llama.cpp's explicit "none"
    assert config_from_gguf(read_gguf(tmp_path / "none.gguf")).rope_scaling is None
    _header_only(tmp_path / "1b.gguf", 26)
    assert config_from_gguf(read_gguf(tmp_path / "1b.gguf")).rope_scaling is None
    pattern = [True, False, True, True, False, True]
    _header_only(tmp_path / "pat.gguf", 6, **{"attention.sliding_window_pattern": pattern})
    assert config_from_gguf(read_gguf(tmp_path / "pat.gguf")).layer_types == [
        "sliding_attention" if p else "full_attention" for p in pattern]
    _header_only(tmp_path / "bad.gguf", 6, **{"attention.sliding_window_pattern": pattern[:5]})
    with pytest.raises(ValueError, match="sliding_window_pattern is not 6 booleans"):
        config_from_gguf(read_gguf(tmp_path / "bad.gguf"))
