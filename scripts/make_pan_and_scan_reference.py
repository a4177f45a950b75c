#!/usr/bin/env python3
"""Reference outputs for pan and scan, from transformers' Gemma 3 processor and model.

Reads the tiny vision-language checkpoint tests/fixtures/tiny_gemma3_vlm (made by
scripts/make_tiny_gemma3_vlm.py) and writes

  tests/fixtures/images/wide.png                 800 x 300 RGB PNG (smooth gradients + stripes): 3 crops
  tests/fixtures/images/tall.png                 300 x 700 RGB PNG: 2 crops
  tests/fixtures/pan_and_scan_boxes.json         crop boxes transformers' pan_and_scan cuts for 300 image
                                                 sizes (default settings, and min crop 64 / max 3 crops /
                                                 ratio 1.5), as [left, top, right, bottom]
  tests/fixtures/tiny_gemma3_vlm_pan_and_scan.npz
      ids [L]              Gemma3Processor(do_pan_and_scan=True) input ids for the raw prompt PROMPT with
                           the images wide.png and a.png (the tiny model's context is 256 tokens)
      num_crops [2]        the processor's crops per image (3 and 0)
      pixels_uint8 [5,112,112,3]  each processed image (whole image, then its crops) as the resized uint8
                           image; the processor's pixel values are exactly
                           (float32(u8 * (1/255)) - 0.5) / 0.5, channels first (checked here)
      tall_uint8 [3,112,112,3]    the same for tall.png alone (2 crops, cut across its height)
      last_logits [V]      float32 logits at the last prompt position (transformers, float32, eager)
      gen_ids [8]          greedy continuation (model.generate)

Needs torch, transformers 5.x (checked with 5.23.0) and Pillow. The tests need none of them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures"
VLM_DIR = FIX / "tiny_gemma3_vlm"
IMG_DIR = FIX / "images"
PROMPT = "Compare <start_of_image> and <start_of_image>."
SETTINGS = {
    "default": {"pan_and_scan_min_crop_size": 256, "pan_and_scan_max_num_crops": 4,
                "pan_and_scan_min_ratio_to_activate": 1.2},
    "small": {"pan_and_scan_min_crop_size": 64, "pan_and_scan_max_num_crops": 3,
              "pan_and_scan_min_ratio_to_activate": 1.5},
}


def make_image(w: int, h: int, k: int):
    from PIL import Image

    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 127 + 120 * np.sin(x / (17 + 5 * k))
    g = 255 * y / h
    b = 255 * ((x // 40 + y // 40) % 2) * 0.7
    return Image.fromarray(np.clip(np.stack([r, g, b], -1), 0, 255).astype(np.uint8))


def boxes_table(improc) -> list:
    rng = np.random.default_rng(0)
    sizes = [(int(w), int(h)) for w, h in rng.integers(60, 2200, (280, 2))]
    sizes += [(512, 256), (511, 256), (256, 512), (1024, 1024), (307, 256), (308, 256), (900, 256), (2000, 100),
              (100, 2000), (1200, 1000), (1201, 1000), (768, 256), (769, 256), (1000, 250), (64, 64),
              (130, 64), (200, 64), (5000, 300), (4000, 900), (640, 480)]
    table = []
    for w, h in sizes:
        # pixel values encode their own coordinates, so each crop tells where it was cut
        img = np.stack(np.mgrid[0:h, 0:w]).astype(np.int32)
        for name, s in SETTINGS.items():
            crops = improc.pan_and_scan(img, s["pan_and_scan_min_crop_size"], s["pan_and_scan_max_num_crops"],
                                        s["pan_and_scan_min_ratio_to_activate"])
            boxes = [[int(c[1, 0, 0]), int(c[0, 0, 0]), int(c[1, 0, 0]) + c.shape[2], int(c[0, 0, 0]) + c.shape[1]]
                     for c in crops]
            table.append({"size": [w, h], "settings": name, "boxes": boxes})
    return table


def uint8_images(improc, images, crops, pv) -> np.ndarray:
    """Each image and its crops (cut by transformers) resized by PIL, as uint8; checked to give ``pv``."""
    from PIL import Image

    parts = []
    for img, k in zip(images, crops):
        cut = improc.pan_and_scan(np.asarray(img).transpose(2, 0, 1), 256, 4, 1.2)
        assert len(cut) == k, (img.size, len(cut), k)
        pieces = [img] + [Image.fromarray(np.ascontiguousarray(c.transpose(1, 2, 0))) for c in cut]
        parts += [np.asarray(p.resize((112, 112), Image.BILINEAR)) for p in pieces]
    u8 = np.stack(parts)
    rebuilt = (((u8.astype(np.float64) * (1 / 255)).astype(np.float32) - np.float32(0.5)) / np.float32(0.5))
    assert pv.shape == (len(parts), 3, 112, 112), pv.shape
    assert np.array_equal(rebuilt.transpose(0, 3, 1, 2), np.asarray(pv)), "processor arithmetic changed"
    return u8


def main() -> None:
    import torch
    from PIL import Image
    from transformers import AutoTokenizer, Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    make_image(800, 300, 1).save(IMG_DIR / "wide.png", optimize=True)
    make_image(300, 700, 2).save(IMG_DIR / "tall.png", optimize=True)
    images = [Image.open(IMG_DIR / n).convert("RGB") for n in ("wide.png", "a.png")]
    tall = Image.open(IMG_DIR / "tall.png").convert("RGB")

    improc = Gemma3ImageProcessorPil.from_pretrained(VLM_DIR)
    table = boxes_table(improc)
    (FIX / "pan_and_scan_boxes.json").write_text(json.dumps(
        {"settings": SETTINGS, "cases": table}, separators=(",", ":")) + "\n")

    proc = Gemma3Processor(image_processor=improc, tokenizer=AutoTokenizer.from_pretrained(VLM_DIR),
                           image_seq_length=16)
    inputs = proc(text=PROMPT, images=[images], do_pan_and_scan=True, return_tensors="pt")
    pv = inputs["pixel_values"].numpy()
    crops = [int(c) for c in improc(images=images, do_pan_and_scan=True, pan_and_scan_min_crop_size=256,
                                    pan_and_scan_max_num_crops=4, pan_and_scan_min_ratio_to_activate=1.2,
                                    return_tensors="np")["num_crops"]]
    assert crops == [3, 0], crops
    u8 = uint8_images(improc, images, crops, pv)
    tall_pv = improc(images=[tall], do_pan_and_scan=True, pan_and_scan_min_crop_size=256, pan_and_scan_max_num_crops=4,
                     pan_and_scan_min_ratio_to_activate=1.2, return_tensors="np")["pixel_values"]
    tall_u8 = uint8_images(improc, [tall], [2], tall_pv)

    model = Gemma3ForConditionalGeneration.from_pretrained(VLM_DIR, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    kw = {k: v for k, v in inputs.items() if k != "num_crops"}
    with torch.no_grad():
        logits = model(**kw).logits[0, -1].numpy().astype(np.float32)
        gen = model.generate(**kw, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1]:].numpy()
    ids = inputs["input_ids"][0].numpy().astype(np.int32)
    np.savez_compressed(FIX / "tiny_gemma3_vlm_pan_and_scan.npz", ids=ids, num_crops=np.array(crops), tall_uint8=tall_u8,
                        pixels_uint8=u8, last_logits=logits, gen_ids=gen.astype(np.int32))
    print(f"ids {len(ids)}, num_crops {crops}, pixel_values {pv.shape}, greedy {gen.tolist()}")


if __name__ == "__main__":
    main()
