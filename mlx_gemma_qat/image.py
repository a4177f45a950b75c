"""Image preprocessing for Gemma 3 (Pillow + numpy), matching transformers' Gemma3ImageProcessor.

Steps: open (path, URL, PIL image or array), apply the EXIF orientation, convert to RGB, resize to the
tower's square input with Pillow's bilinear filter on 8-bit pixels, scale to [0, 1], normalize with mean
0.5 and std 0.5 per channel, channels first.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

MEAN = np.array([0.5, 0.5, 0.5], dtype=np.float32)
STD = np.array([0.5, 0.5, 0.5], dtype=np.float32)


class ImageError(ValueError):
    pass


def open_image(src):
    """A PIL RGB image from a path, URL, bytes, PIL image or HxWxC array, upright per its EXIF tag."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(src, Image.Image):
        img = src
    elif isinstance(src, np.ndarray):
        a = src
        if a.ndim == 2:
            a = np.stack([a] * 3, axis=-1)
        if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
            raise ImageError(f"an image array must be HxW or HxWxC with C in 1, 3, 4; got shape {a.shape}")
        if a.dtype != np.uint8:
            a = np.clip(np.round(a * 255.0 if a.max() <= 1.0 else a), 0, 255).astype(np.uint8)
        img = Image.fromarray(a.squeeze(-1) if a.shape[-1] == 1 else a)
    else:
        data = src
        if isinstance(src, (str, Path)):
            s = str(src)
            if s.startswith(("http://", "https://")):
                import urllib.request

                try:
                    with urllib.request.urlopen(s, timeout=30) as r:
                        data = r.read()
                except OSError as e:
                    raise ImageError(f"{s}: could not download ({e})") from None
            else:
                p = Path(s).expanduser()
                if not p.is_file():
                    raise ImageError(f"{s}: no such image file")
                data = p.read_bytes()
        try:
            img = Image.open(io.BytesIO(data))
            img.load()
        except (UnidentifiedImageError, OSError) as e:
            raise ImageError(f"{src if isinstance(src, (str, Path)) else 'image'}: not a readable image ({e})") from None
        img = ImageOps.exif_transpose(img)
    return img.convert("RGB")


def preprocess(src, size: int) -> np.ndarray:
    """(3, size, size) float32 pixel values for one image."""
    from PIL import Image

    img = open_image(src)
    img = img.resize((size, size), resample=Image.Resampling.BILINEAR)
    x = np.asarray(img, dtype=np.float32) * np.float32(1 / 255)
    x = (x - MEAN) / STD
    return x.transpose(2, 0, 1).astype(np.float32)


def preprocess_all(images, size: int) -> np.ndarray:
    return np.stack([preprocess(im, size) for im in images]) if images else np.zeros((0, 3, size, size), np.float32)
