"""llama.cpp's Gemma 3 ``mmproj`` GGUF -> our vision tower / projector tensors.

Fixture: scripts/make_tiny_mmproj.py runs llama.cpp's own convert_hf_to_gguf.py (--mmproj --outtype f32)
on tests/fixtures/tiny_gemma3_vlm.
"""

from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma_qat.convert.from_hf import vision_name
from mlx_gemma_qat.convert.from_mmproj import MmprojError, mmproj_name, read_mmproj
from mlx_gemma_qat.model.vision import VisionConfig

FIX = Path(__file__).parent / "fixtures"
HF = FIX / "tiny_gemma3_vlm"
MMPROJ = FIX / "tiny_gemma3_vlm_gguf" / "mmproj-f32.gguf"

needs_fixture = pytest.mark.skipif(
    not (MMPROJ.is_file() and (HF / "model.safetensors").is_file()), reason="mmproj fixture missing"
)


def _hf_vision() -> dict[str, np.ndarray]:
    out = {}
    for k, v in mx.load(str(HF / "model.safetensors")).items():
        ours = vision_name(k)
        if ours:
            out[ours] = np.array(v.astype(mx.float32))
    return out


@needs_fixture
def test_config_matches_hf():
    import json

    raw = json.loads((HF / "config.json").read_text())
    vcfg, tokens, _ = read_mmproj(MMPROJ)
    assert tokens == raw["mm_tokens_per_image"] == 16
    assert VisionConfig.from_dict(vcfg) == VisionConfig.from_dict(raw["vision_config"])
    assert vcfg["layer_norm_eps"] == 1e-6


@needs_fixture
def test_tensors_equal_hf():
    hf = _hf_vision()
    _, _, it = read_mmproj(MMPROJ)
    got = dict(it)
    assert set(got) == set(hf)
    for name, mt in got.items():
        assert not mt.quantized
        w = np.asarray(mt.weight)
        assert w.shape == hf[name].shape, name
        if name.endswith("mm_input_projection_weight"):
            # llama.cpp forces this tensor to F16; bf16 -> f16 happens to be exact here (no tiny values)
            assert w.dtype == np.float16
            assert np.array_equal(hf[name].astype(np.float16), w)
        else:
            assert w.dtype == np.float32, name
        assert np.array_equal(w.astype(np.float32), hf[name]), name


@needs_fixture
def test_loaded_tower_matches_reference():
    """The mmproj weights in our vision tower + projector give transformers' image features."""
    from mlx_gemma_qat.model.vision import MultiModalProjector, SiglipVisionModel

    ref = np.load(FIX / "tiny_gemma3_vlm_reference.npz")
    vcfg, tokens, it = read_mmproj(MMPROJ)
    cfg = VisionConfig.from_dict(vcfg)
    tensors = {k: mx.array(np.asarray(m.weight, dtype=np.float32)) for k, m in it}
    tower, proj = SiglipVisionModel(cfg), MultiModalProjector(cfg, 64, tokens, 1e-6)
    strip = lambda p: {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}  # noqa: E731
    tower.load_weights(list(strip("vision_tower.").items()), strict=True)
    proj.load_weights(list(strip("multi_modal_projector.").items()), strict=True)
    px = mx.array(ref["pixel_values_a"][None])
    feats = proj(tower(px))
    np.testing.assert_allclose(np.array(feats)[0], ref["features_a"].reshape(-1, 64), atol=2e-4, rtol=2e-4)


def test_text_gguf_rejected(tmp_path):
    from gguf_factory import write_tiny_gguf

    p = tmp_path / "text.gguf"
    write_tiny_gguf(p)
    with pytest.raises(ValueError, match="not an mmproj vision file.*text model"):
        read_mmproj(p)


def test_not_gguf_and_missing(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"nope")
    with pytest.raises(MmprojError, match="not a GGUF"):
        read_mmproj(p)
    with pytest.raises(MmprojError, match="no such file"):
        read_mmproj(tmp_path / "absent.gguf")


def test_other_projector_rejected(tmp_path):
    import gguf

    p = tmp_path / "llava.gguf"
    w = gguf.GGUFWriter(str(p), "clip")
    w.add_string("clip.projector_type", "mlp")
    w.add_tensor("v.post_ln.weight", np.ones(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(MmprojError, match="projector type 'mlp' is not Gemma 3"):
        read_mmproj(p)


def test_names():
    assert mmproj_name("v.blk.3.attn_out.bias") == "vision_tower.encoder.layers.3.self_attn.out_proj.bias"
    assert mmproj_name("v.patch_embd.weight") == "vision_tower.embeddings.patch_embedding.weight"
    with pytest.raises(MmprojError, match="unexpected tensor"):
        mmproj_name("v.blk.0.attn_qkv.weight")


def test_text_gguf_plus_mmproj_equals_the_hf_route(tmp_path):
    """llama.cpp's pair (text GGUF + mmproj GGUF) converts to the model the HF folder gives: same logits."""
    import mlx.core as mx

    from gguf_factory import write_tiny_gguf
    from mlx_gemma_qat.convert import convert
    from mlx_gemma_qat.model.load import load_model

    vlm = Path(__file__).parent / "fixtures" / "tiny_gemma3_vlm"
    ref = np.load(Path(__file__).parent / "fixtures" / "tiny_gemma3_vlm_reference.npz")
    write_tiny_gguf(tmp_path / "text.gguf", gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F32, source=vlm)
    out = convert(tmp_path / "text.gguf", tmp_path / "m", mmproj=MMPROJ, progress=False)
    model = load_model(out)
    # ids from the GGUF vocabulary (a real Gemma 3 GGUF lacks <image_soft_token>: then 262144, past it)
    m = model.mcfg
    assert (m.boi_token_index, m.eoi_token_index, m.image_token_index, m.mm_tokens_per_image) == (255, 256, 257, 16)
    h, groups = model.embed_prompt(ref["p1_ids"], mx.array(ref["pixel_values_a"][None]))
    logits = np.array(model(None, input_embeddings=h, image_groups=groups)[0])
    np.testing.assert_allclose(logits, ref["p1_logits"], atol=5e-4, rtol=0)


def test_mmproj_with_a_mismatched_text_model(tmp_path):
    from click.testing import CliRunner

    from gguf_factory import write_tiny_gguf
    from mlx_gemma_qat.cli import main

    write_tiny_gguf(tmp_path / "text.gguf")  # the text-only tiny model: same width, fine
    r = CliRunner().invoke(main, ["convert", str(tmp_path / "text.gguf"), "--mmproj", str(MMPROJ), "-o",
                                  str(tmp_path / "ok"), "--quiet"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["convert", str(tmp_path / "text.gguf"), "--mmproj", str(tmp_path / "text.gguf"),
                                  "-o", str(tmp_path / "bad"), "--quiet"])
    assert r.exit_code != 0 and "clip" in r.output and not (tmp_path / "bad").exists()


def test_generate_with_gguf_and_mmproj(tmp_path, monkeypatch):
    """`generate -m text.gguf --mmproj mmproj.gguf --image ...`: converted once (keyed by both files), then reused."""
    from click.testing import CliRunner

    from gguf_factory import write_tiny_gguf
    from mlx_gemma_qat.cli import main

    monkeypatch.setenv("MLX_GEMMA_CACHE", str(tmp_path / "cache"))
    vlm = Path(__file__).parent / "fixtures" / "tiny_gemma3_vlm"
    text = tmp_path / "text.gguf"
    write_tiny_gguf(text, gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F32, source=vlm)
    image = str(Path(__file__).parent / "fixtures" / "images" / "a.png")
    args = ["generate", "-m", str(text), "--image", image, "--prompt", "What?", "-n", "2", "--raw"]
    r = CliRunner().invoke(main, args)  # the text GGUF alone has no vision tower
    assert r.exit_code == 1 and "text-only" in r.output
    for _ in range(2):
        r = CliRunner().invoke(main, args + ["--mmproj", str(MMPROJ)])
        assert r.exit_code == 0, r.output
        assert "Prompt: 26 tokens" in r.output, r.output  # BOS + 20 image tokens + "What?"
    folders = sorted(p.name for p in (tmp_path / "cache").iterdir() if p.name != ".locks")
    assert len(folders) == 2  # text alone, text + mmproj; the second run reused its folder
    r = CliRunner().invoke(main, ["generate", "-m", str(vlm), "--mmproj", str(MMPROJ), "--prompt", "x", "-n", "1"])
    assert r.exit_code == 1 and "--mmproj goes with a text GGUF" in r.output


def test_ollama_one_file_layout_equals_the_hf_route(tmp_path):
    """Ollama's own gemma3 GGUF (vision tower inside, its names and its few metadata keys; built as its converter
    does, tests/gguf_factory.write_ollama_gguf) converts to the model the HF folder gives: transformers' logits."""
    import mlx.core as mx

    from gguf_factory import go_replace, write_ollama_gguf
    from mlx_gemma_qat.convert import convert
    from mlx_gemma_qat.convert.from_gguf import GGUFError
    from mlx_gemma_qat.convert.from_mmproj import OLLAMA
    from mlx_gemma_qat.model.load import load_model

    # the replacement table gives the names Ollama's runner reads (model/models/gemma3 gguf tags)
    name = "vision_tower.vision_model.encoder.layers.3.self_attn.out_proj.bias"
    assert go_replace(name) == "v.blk.3.attn_output.bias"
    assert go_replace("multi_modal_projector.mm_input_projection_weight") == "mm.mm_input_projection.weight"
    assert OLLAMA.name("v.blk.3.mlp.fc2.weight") == "vision_tower.encoder.layers.3.mlp.fc2.weight"
    ref = np.load(FIX / "tiny_gemma3_vlm_reference.npz")
    write_ollama_gguf(tmp_path / "one.gguf")
    out = convert(tmp_path / "one.gguf", tmp_path / "m", progress=False)
    model = load_model(out)
    m = model.mcfg
    assert (m.boi_token_index, m.eoi_token_index, m.image_token_index, m.mm_tokens_per_image) == (255, 256, 257, 16)
    assert model.mcfg.text.rope_local_base_freq == 1e4 and model.mcfg.text.rms_norm_eps == 1e-6
    h, groups = model.embed_prompt(ref["p1_ids"], mx.array(ref["pixel_values_a"][None]))
    logits = np.array(model(None, input_embeddings=h, image_groups=groups)[0])
    np.testing.assert_allclose(logits, ref["p1_logits"], atol=5e-4, rtol=0)
    with pytest.raises(GGUFError, match="holds its own vision tower"):
        convert(tmp_path / "one.gguf", tmp_path / "m2", mmproj=MMPROJ, progress=False)
    write_ollama_gguf(tmp_path / "odd.gguf", tokens_per_image=15)
    with pytest.raises(MmprojError, match="15 tokens per image do not pool"):
        convert(tmp_path / "odd.gguf", tmp_path / "m3", progress=False)
    assert not (tmp_path / "m2").exists() and not (tmp_path / "m3").exists()
