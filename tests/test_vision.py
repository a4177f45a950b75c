"""Image input on a tiny random Gemma 3 vision-language checkpoint made by transformers.

Fixtures: scripts/make_tiny_gemma3_vlm.py (transformers 5.23 float32 from the bf16 weights; SigLIP tower
2 layers, 112x112 input, 8x8 patches pooled to 16 soft tokens; text window 16).
"""

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from mlx_gemma_qat import stream_generate
from mlx_gemma_qat.cli import main
from mlx_gemma_qat.convert import convert
from mlx_gemma_qat.generate import prefill
from mlx_gemma_qat.image import ImageError, preprocess

FIX = Path(__file__).parent / "fixtures"
IMAGES = FIX / "images"


@pytest.fixture(scope="module")
def ref():
    return np.load(FIX / "tiny_gemma3_vlm_reference.npz")


def _pixels(ref, names):
    return mx.array(np.stack([ref[f"pixel_values_{n}"] for n in names]))


def test_preprocessing_matches_transformers(ref):
    np.testing.assert_allclose(preprocess(IMAGES / "a.png", 112), ref["pixel_values_a"], atol=1e-6)
    # b.jpg carries an EXIF rotation: applied, as an upright photo needs
    np.testing.assert_allclose(preprocess(IMAGES / "b.jpg", 112), ref["pixel_values_b"], atol=1e-6)
    from PIL import Image

    np.testing.assert_allclose(preprocess(Image.open(IMAGES / "a.png"), 112), ref["pixel_values_a"], atol=1e-6)
    np.testing.assert_allclose(preprocess(ref["a_uint8"], 112), ref["pixel_values_a"], atol=1e-6)


def test_vision_tower_and_projector_match(vlm, ref):
    _, model, _ = vlm
    for n in ("a", "b"):
        px = _pixels(ref, [n])
        vis = model.vision_tower(px)
        np.testing.assert_allclose(np.array(vis[0]), ref[f"vision_{n}"], atol=1e-4)
        np.testing.assert_allclose(np.array(model.encode_images(px)[0]), ref[f"features_{n}"], atol=1e-4)


@pytest.mark.parametrize("case", ["p1", "p2", "p3"])  # one image; two images; an image across the window edge
def test_image_prompt_logits_match(vlm, ref, case):
    _, model, _ = vlm
    ids = ref[f"{case}_ids"]
    names = [str(x) for x in ref[f"{case}_images"]]
    h, groups = model.embed_prompt(ids, _pixels(ref, names))
    logits = np.array(model(None, input_embeddings=h, image_groups=groups)[0])
    # 5e-4: well under what the wrong GELU (exact instead of tanh) moves them, 0.027
    np.testing.assert_allclose(logits, ref[f"{case}_logits"], atol=5e-4, rtol=0)
    # the same through the caches, in chunks that would split an image if prefill allowed it
    for step in (3, 7, 16):
        cache = model.make_cache()
        last = prefill(model, None, cache, step, embeddings=h, groups=groups)
        np.testing.assert_allclose(np.array(last[0]), ref[f"{case}_logits"][-1], atol=5e-4, rtol=0)


def test_image_attention_is_bidirectional(vlm, ref):
    _, model, _ = vlm
    h, groups = model.embed_prompt(ref["p1_ids"], _pixels(ref, ["a"]))
    causal = np.array(model(None, input_embeddings=h)[0])
    assert np.abs(causal - ref["p1_logits"]).max() > 1.0


def test_greedy_continuation_with_an_image(vlm, ref):
    _, model, tok = vlm
    ids = [int(t) for t in ref["p1_ids"]]
    names = [str(x) for x in ref["p1_images"]]
    h, groups = model.embed_prompt(ids, _pixels(ref, names))  # the fixture's ids hold the soft tokens
    from mlx_gemma_qat.generate import generate_step

    out = [t for t, _ in generate_step(mx.array(ids), model, max_tokens=8, embeddings=h, groups=groups)]
    assert out == [int(t) for t in ref["p1_gen_ids"]]


def test_generate_api_and_cli_with_images(vlm):
    folder, model, tok = vlm
    rs = list(stream_generate(model, tok, "Describe.", 4, images=[IMAGES / "a.png", IMAGES / "b.jpg"], chat=True))
    assert rs[-1].prompt_tokens > 2 * model.mcfg.mm_tokens_per_image and rs[-1].generation_tokens == 4
    r = CliRunner().invoke(main, ["generate", "-m", str(folder), "--image", str(IMAGES / "a.png"),
                                  "--prompt", "What is it?", "-n", "3", "--raw"])
    assert r.exit_code == 0, r.output


def test_image_errors(vlm, tmp_path):
    folder, model, tok = vlm
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ImageError, match="not a readable image"):
        list(stream_generate(model, tok, "x", 2, images=[bad]))
    with pytest.raises(ImageError, match="no such image"):
        list(stream_generate(model, tok, "x", 2, images=[tmp_path / "missing.png"]))
    r = CliRunner().invoke(main, ["generate", "-m", str(folder), "--prompt", "x"] + ["--image", str(IMAGES / "a.png")] * 20)
    assert r.exit_code != 0 and "context is 256" in r.output
    with pytest.raises(ValueError, match="markers"):
        list(stream_generate(model, tok, "<start_of_image> and <start_of_image>", 2, images=[IMAGES / "a.png"], chat=False))


def test_text_only_model_refuses_images(tmp_path):
    from mlx_gemma_qat.model.load import load_model

    from mlx_lm.utils import load_tokenizer

    text_model = load_model(convert(FIX / "tiny_gemma3", tmp_path / "t", mode="none", progress=False))
    tok = load_tokenizer(tmp_path / "t")
    with pytest.raises(ValueError, match="text-only"):
        list(stream_generate(text_model, tok, "x", 2, images=[IMAGES / "a.png"]))


def test_quantized_text_keeps_vision_float(tmp_path):
    import json

    out = convert(FIX / "tiny_gemma3_vlm", tmp_path / "q", progress=False)
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert "language_model.model.layers.0.self_attn.q_proj" in q
    assert not any(k.startswith(("vision_tower", "multi_modal_projector")) for k in q)


def test_multi_turn_chat_with_images_in_several_turns(vlm):
    from mlx_gemma_qat.generate import encode_prompt, image_token_ids

    _, model, tok = vlm
    messages = [
        {"role": "user", "content": [{"type": "image", "image": str(IMAGES / "a.png")}, {"type": "text", "text": "A?"}]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "text", "text": "And"}, {"type": "image", "image": IMAGES / "b.jpg"}]},
    ]
    m = model.mcfg
    ids = encode_prompt(tok, messages, n_images=2, image_ids=image_token_ids(model))
    assert ids.count(m.image_token_index) == 32 and ids.count(m.boi_token_index) == 2
    text = tok.decode([t for t in ids if t != m.image_token_index])
    assert text.startswith("<bos><start_of_turn>user\n\n\n<start_of_image><end_of_image>\n\nA?<end_of_turn>")
    assert "<start_of_turn>model\nok<end_of_turn>" in text and text.endswith("<start_of_turn>model\n")
    rs = list(stream_generate(model, tok, messages, 3))
    assert rs[-1].prompt_tokens == len(ids) and rs[-1].generation_tokens == 3
    with pytest.raises(ValueError, match="inside its messages"):
        list(stream_generate(model, tok, messages, 3, images=[IMAGES / "a.png"]))


def test_inspect_reports_the_vision_tower(vlm):
    folder, _, _ = vlm
    r = CliRunner().invoke(main, ["inspect", str(folder)])
    assert r.exit_code == 0 and "vision: SigLIP 2 layers, hidden 32, 112px input" in r.output
    assert "37,008 parameters (with projector) stored bf16, never quantized" in r.output
    assert "vision_tower.layers.*.mlp.fc1" in r.output


def test_bfloat16_compute(vlm, ref):
    """bf16 (the GPU default) runs the tower in bf16 too; its features stay close to float32's."""
    from mlx_gemma_qat.model.load import load_model

    model = load_model(vlm[0], dtype="bfloat16")
    assert model.vision_dtype == mx.bfloat16
    feats = np.array(model.encode_images(_pixels(ref, ["a"]))[0].astype(mx.float32))
    err = np.abs(feats - ref["features_a"]).max() / np.abs(ref["features_a"]).max()
    assert 1e-4 < err < 0.05, err  # really bf16 (not silently float32), and still faithful
    with pytest.raises(ValueError, match="float16"):
        load_model(vlm[0], dtype="float16")
