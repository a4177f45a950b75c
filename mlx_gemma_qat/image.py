"""Image preprocessing for Gemma 3 (Pillow + numpy), matching transformers' Gemma3ImageProcessor.

Steps: open (path, URL, PIL image or array), apply the EXIF orientation, convert to RGB, resize to the
tower's square input with Pillow's bilinear filter on 8-bit pixels, scale to [0, 1], normalize with mean
0.5 and std 0.5 per channel, channels first. A URL is fetched under ``fetch.CLI_POLICY`` (the local
user's: any address, 60 s, 100 MB, 5 redirects); a server fetches under its own policy and passes bytes.

Decompression bombs: an image larger than ``MAX_IMAGE_PIXELS`` (width x height, read from its header before
any pixel is decoded) is refused with an ``ImageError``, on every path that opens images (CLI, server, LoRA
data). Pillow's own limit only warns below twice its 89.5 MP default; this one is an error, and lower.

Pan and scan (optional, as Gemma 3's processor does it): an image whose aspect ratio is at least 1.2 is
also cut along its long side into 2 to 4 equal crops of at least 256 pixels; the crops follow the whole
image as extra images, and the prompt says so (``crop_prompt``).
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MEAN = np.array([0.5, 0.5, 0.5], dtype=np.float32)
STD = np.array([0.5, 0.5, 0.5], dtype=np.float32)


MAX_IMAGE_PIXELS = 50_000_000  # 50 MP (8,660 px square): any phone photo; decoded RGB <= 150 MB


class ImageError(ValueError):
    pass


class ImageTooLarge(ImageError):
    """An image over ``MAX_IMAGE_PIXELS`` (refused before decoding)."""


def _check_size(width: int, height: int, what: str) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageTooLarge(f"{what}: {width}x{height} pixels is more than the {MAX_IMAGE_PIXELS:,} an image may have")


def open_image(src):
    """A PIL RGB image from a path, URL, bytes, PIL image or HxWxC array, upright per its EXIF tag."""
    from PIL import Image, ImageOps

    if isinstance(src, Image.Image):
        _check_size(*src.size, "image")
        img = src
    elif isinstance(src, np.ndarray):
        a = src
        if a.ndim == 2:
            a = np.stack([a] * 3, axis=-1)
        if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
            raise ImageError(f"an image array must be HxW or HxWxC with C in 1, 3, 4; got shape {a.shape}")
        _check_size(a.shape[1], a.shape[0], "image array")
        if a.dtype != np.uint8:
            a = np.clip(np.round(a * 255.0 if a.max() <= 1.0 else a), 0, 255).astype(np.uint8)
        img = Image.fromarray(a.squeeze(-1) if a.shape[-1] == 1 else a)
    else:
        data = src
        if isinstance(src, (str, Path)):
            s = str(src)
            if s.startswith(("http://", "https://")):
                from .fetch import CLI_POLICY, FetchError, fetch

                try:
                    data = fetch(s, CLI_POLICY)
                except FetchError as e:  # the local user sees why
                    raise ImageError(f"{s}: could not download ({e.detail})") from None
            else:
                p = Path(s).expanduser()
                if not p.is_file():
                    raise ImageError(f"{s}: no such image file")
                data = p.read_bytes()
        what = src if isinstance(src, (str, Path)) else "image"
        try:
            with warnings.catch_warnings():  # Pillow warns of sizes this check refuses anyway
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data))  # reads the header only
            _check_size(*img.size, what)
            img.load()
        except ImageError:
            raise
        except Exception as e:  # noqa: BLE001 - decoders raise OSError, SyntaxError, ValueError, DecompressionBombError...
            raise ImageError(f"{what}: not a readable image ({type(e).__name__}: {e})") from None
        img = ImageOps.exif_transpose(img)
    return img.convert("RGB")


@dataclass(frozen=True)
class PanAndScan:
    """Gemma 3's pan-and-scan settings (transformers' Gemma3Processor defaults)."""

    min_crop_size: int = 256
    max_num_crops: int = 4
    min_ratio_to_activate: float = 1.2


def pan_and_scan_boxes(width: int, height: int, opts: PanAndScan = PanAndScan()) -> list[tuple[int, int, int, int]]:
    """Crop boxes (left, top, right, bottom) for an image, or [] when it is not elongated enough."""
    long, short = max(width, height), min(width, height)
    if long / short < opts.min_ratio_to_activate:
        return []
    n = min(int(math.floor(long / short + 0.5)), int(math.floor(long / opts.min_crop_size)))  # half rounds up
    n = min(opts.max_num_crops, max(2, n))
    step = int(math.ceil(long / n))
    if min(step, short) < opts.min_crop_size:
        return []
    if width >= height:
        return [(x, 0, min(x + step, width), height) for x in range(0, step * n, step)]
    return [(0, y, width, min(y + step, height)) for y in range(0, step * n, step)]


def _pan_and_scan_options(pan_and_scan: bool | PanAndScan) -> PanAndScan | None:
    return PanAndScan() if pan_and_scan is True else pan_and_scan or None


def _resize(img, size: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(img.resize((size, size), resample=Image.Resampling.BILINEAR))


def normalize(rgb: np.ndarray) -> np.ndarray:
    """8-bit RGB images (..., size, size, 3) as the tower's float32 pixel values (..., 3, size, size)."""
    x = np.asarray(rgb, dtype=np.float32) * np.float32(1 / 255)
    x = (x - MEAN) / STD
    return np.moveaxis(x, -1, -3).astype(np.float32)


def _pixels(img, size: int) -> np.ndarray:
    return normalize(_resize(img, size))


def resized(src, size: int) -> np.ndarray:
    """One image opened and resized to the tower's input as 8-bit RGB (size, size, 3): a quarter of the bytes
    of its pixel values, which ``normalize`` gives exactly as ``preprocess`` does."""
    return _resize(open_image(src), size)


def preprocess(src, size: int) -> np.ndarray:
    """(3, size, size) float32 pixel values for one image."""
    return _pixels(open_image(src), size)


def preprocess_all(images, size: int, pan_and_scan: bool | PanAndScan = False) -> tuple[np.ndarray, list[int]]:
    """Pixel values (n, 3, size, size) for the images, each followed by its pan-and-scan crops when
    asked, and the number of crops of each image."""
    opts = _pan_and_scan_options(pan_and_scan)
    out, crops = [], []
    for src in images or []:
        img = open_image(src)
        boxes = pan_and_scan_boxes(*img.size, opts) if opts else []
        out += [_pixels(img, size)] + [_pixels(img.crop(b), size) for b in boxes]
        crops.append(len(boxes))
    return (np.stack(out) if out else np.zeros((0, 3, size, size), np.float32)), crops


def crop_counts(images, pan_and_scan: bool | PanAndScan = False) -> list[int]:
    """The number of pan-and-scan crops each image gets (reads only the images' sizes)."""
    opts = _pan_and_scan_options(pan_and_scan)
    return [len(pan_and_scan_boxes(*open_image(src).size, opts)) if opts else 0 for src in images or []]


def crop_prompt(image: str, crops: int) -> str:
    """The text an image with pan-and-scan crops stands for (``image`` being one image's own layout)."""
    if not crops:
        return image
    return (f"Here is the original image {image} and here are some crops to help you see better "
            + " ".join([image] * crops))
