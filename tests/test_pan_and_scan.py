"""Pan and scan against transformers' Gemma 3 processor and model (scripts/make_pan_and_scan_reference.py)."""

import json
import re
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from mlx_gemma_qat import stream_generate
from mlx_gemma_qat.cli import main
from mlx_gemma_qat.generate import ContextLengthError, encode_prompt, generate_step, image_token_ids
from mlx_gemma_qat.image import PanAndScan, pan_and_scan_boxes, preprocess_all

FIX = Path(__file__).parent / "fixtures"
IMAGES = FIX / "images"
PROMPT = "Compare <start_of_image> and <start_of_image>."


@pytest.fixture(scope="module")
def ref():
    return np.load(FIX / "tiny_gemma3_vlm_pan_and_scan.npz")


def _pixel_values(u8):
    return ((u8.astype(np.float64) * (1 / 255)).astype(np.float32) - np.float32(0.5)) / np.float32(0.5)


def test_crop_boxes_match_transformers():
    data = json.loads((FIX / "pan_and_scan_boxes.json").read_text())
    opts = {name: PanAndScan(s["pan_and_scan_min_crop_size"], s["pan_and_scan_max_num_crops"],
                             s["pan_and_scan_min_ratio_to_activate"]) for name, s in data["settings"].items()}
    cropped = 0
    for case in data["cases"]:
        got = [list(b) for b in pan_and_scan_boxes(*case["size"], opts[case["settings"]])]
        assert got == case["boxes"], case
        cropped += bool(got)
    assert 50 < cropped < len(data["cases"]) - 50  # both outcomes are well covered


def test_pixels_of_images_and_crops_match_transformers(ref):
    pixels, crops = preprocess_all([IMAGES / "wide.png", IMAGES / "a.png"], 112, pan_and_scan=True)
    assert crops == [3, 0] and crops == ref["num_crops"].tolist()
    np.testing.assert_allclose(pixels, _pixel_values(ref["pixels_uint8"]).transpose(0, 3, 1, 2), atol=1e-6)
    pixels, crops = preprocess_all([IMAGES / "tall.png"], 112, pan_and_scan=True)
    assert crops == [2]
    np.testing.assert_allclose(pixels, _pixel_values(ref["tall_uint8"]).transpose(0, 3, 1, 2), atol=1e-6)
    # off by default: one picture per image
    pixels, crops = preprocess_all([IMAGES / "wide.png", IMAGES / "tall.png"], 112)
    assert pixels.shape == (2, 3, 112, 112) and crops == [0, 0]


def test_prompt_logits_and_greedy_match_transformers(vlm, ref):
    _, model, tok = vlm
    ids = encode_prompt(tok, PROMPT, chat=False, n_images=2, crops=[3, 0],
                        image_ids=image_token_ids(model))
    assert ids == ref["ids"].tolist()
    pixels, _ = preprocess_all([IMAGES / "wide.png", IMAGES / "a.png"], 112, pan_and_scan=True)
    h, groups = model.embed_prompt(ids, mx.array(pixels))
    assert int(np.array(groups).max()) == 4  # five separate images: each attends within itself only
    logits = np.array(model(None, input_embeddings=h, image_groups=groups)[0, -1])
    np.testing.assert_allclose(logits, ref["last_logits"], atol=5e-4, rtol=0)
    out = [t for t, _ in generate_step(mx.array(ids), model, max_tokens=8, embeddings=h, groups=groups)]
    assert out == ref["gen_ids"].tolist()
    # the same through the public API
    rs = list(stream_generate(model, tok, PROMPT, 8, chat=False, images=[IMAGES / "wide.png", IMAGES / "a.png"],
                              pan_and_scan=True))
    assert rs[-1].prompt_tokens == len(ids)
    assert [r.token for r in rs] == ref["gen_ids"].tolist()


def test_cli_flag_and_context_error(vlm):
    folder, model, tok = vlm
    base = ["generate", "-m", str(folder), "--image", str(IMAGES / "wide.png"), "--prompt", "What?", "-n", "2", "--raw"]
    n = {}
    for flag in ([], ["--pan-and-scan"]):
        r = CliRunner().invoke(main, base + flag)
        assert r.exit_code == 0, r.output
        n[bool(flag)] = int(re.search(r"Prompt: (\d+) tokens", r.output).group(1))
    # 3 crops of 20 tokens each, and the processor's two sentences (one token a character here)
    sentences = len("Here is the original image  and here are some crops to help you see better " + "  ")
    assert n[True] - n[False] == 3 * 20 + sentences
    # two wide images fit without crops (2 x 20 tokens) but not with them (2 x 80 + text > 256)
    two = list(stream_generate(model, tok, "Hi", 1, chat=False, images=[IMAGES / "wide.png"] * 2))
    assert two[-1].prompt_tokens < 256
    with pytest.raises(ContextLengthError, match="2 image.*6 crop"):
        list(stream_generate(model, tok, "Hi", 1, chat=False, images=[IMAGES / "wide.png"] * 2, pan_and_scan=True))
