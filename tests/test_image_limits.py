"""Decompression bombs and broken files on every path that opens images (``image.open_image``): refused from
the header, before any pixel is decoded, with an ``ImageError``; the CLI prints one line for it. (The server:
tests/test_server_limits.py; LoRA data: tests/test_lora*.py.)"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from mlx_gemma_qat.image import MAX_IMAGE_PIXELS, ImageError, ImageTooLarge, open_image


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, "PNG")
    return buf.getvalue()


def test_the_cap_is_the_documented_one():
    assert MAX_IMAGE_PIXELS == 50_000_000


def test_images_over_the_cap_are_refused_from_their_header(tmp_path, monkeypatch):
    bomb = _png(10_000, 6_000)  # 60 MP in 58 KB
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb)
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self) or None)
    for src in (bomb, path, str(path)):
        with pytest.raises(ImageTooLarge, match="10000x6000"):
            open_image(src)
    assert decoded == []  # refused before decoding
    monkeypatch.undo()
    with pytest.raises(ImageTooLarge):
        open_image(Image.new("1", (8_000, 7_000)))
    with pytest.raises(ImageTooLarge):
        open_image(np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (8_000, 7_000, 3)))
    assert open_image(_png(7_000, 7_000)).size == (7_000, 7_000)  # 49 MP: under the cap


def test_broken_files_are_image_errors():
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(buf, "PNG")
    good = buf.getvalue()
    assert open_image(good).size == (40, 30)
    for bad in (good[: len(good) // 2], b"\x89PNG\r\n\x1a\n" + b"\0" * 40, b"GIF89a" + b"\xff" * 20, b""):
        with pytest.raises(ImageError, match="not a readable image"):
            open_image(bad)


def test_cli_generate_refuses_a_bomb_in_one_line(vlm, tmp_path):
    from click.testing import CliRunner

    from mlx_gemma_qat import cli

    path = tmp_path / "bomb.png"
    path.write_bytes(_png(10_000, 6_000))
    res = CliRunner().invoke(cli.main, ["generate", "-m", str(vlm[0]), "--image", str(path), "--prompt", "x"])
    assert res.exit_code == 1 and "50,000,000" in res.output and "Traceback" not in res.output
