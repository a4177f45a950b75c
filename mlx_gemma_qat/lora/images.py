"""The images of LoRA training data: all checked before step 1, then preprocessed once per run.

``ImageCache.check`` opens, decodes and preprocesses every distinct image of the examples (image.preprocess:
``open_image`` refuses an image over ``MAX_IMAGE_PIXELS`` from its header and turns any decoder failure into an
ImageError), so an unreadable, missing or oversized image is a DataError naming the file and line of the first
record that uses it before training starts, not a crash at step 500. Every data-parallel rank checks every
image: the rows a rank gets change from step to step.

``ImageCache.pixels`` then serves the preprocessed pixels of a row's images from memory. Memory: the cache holds
float32 (3, S, S) arrays (S = the vision tower's input size: 896 on Gemma 3, 9.6 MB per image) for path and URL
sources, least recently used first out once ``max_bytes`` (default 2 GiB, about 220 images at 896 px) would be
exceeded. A data set with more images than that is decoded again (a URL fetched again) when an evicted image
comes back, about once per epoch rather than once per use; in-memory images (PIL, arrays) are not cached (they
need no decoding). The cache lives as long as the run that made it.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import numpy as np

from ..image import ImageError, preprocess
from .data import DataError, Example

MAX_BYTES = 2 << 30


class ImageCache:
    """Preprocessed pixels of training images at the tower's input ``size``, by source, up to ``max_bytes``."""

    def __init__(self, size: int, max_bytes: int = MAX_BYTES):
        self.size, self.max_bytes = size, max_bytes
        self._pixels: OrderedDict[str, np.ndarray] = OrderedDict()
        self.nbytes = 0
        self.decoded = 0  # images opened and preprocessed (misses), for tests and reports

    @staticmethod
    def _key(src) -> str | None:
        return str(src) if isinstance(src, (str, os.PathLike)) else None

    def _load(self, src) -> np.ndarray:
        key = self._key(src)
        if key is not None and key in self._pixels:
            self._pixels.move_to_end(key)
            return self._pixels[key]
        px = preprocess(src, self.size)
        self.decoded += 1
        if key is not None and px.nbytes <= self.max_bytes:
            while self._pixels and self.nbytes + px.nbytes > self.max_bytes:
                self.nbytes -= self._pixels.popitem(last=False)[1].nbytes
            self._pixels[key] = px
            self.nbytes += px.nbytes
        return px

    def check(self, examples: list[Example]) -> int:
        """Open, decode and preprocess each distinct image of ``examples`` (filling the cache); an image that
        cannot be used is a DataError naming the record (``Example.origin``). Returns the number checked."""
        seen = set()
        for ex in examples:
            for src in ex.images:
                key = self._key(src)
                if key is not None and key in seen:
                    continue
                seen.add(key if key is not None else id(src))
                try:
                    self._load(src)
                except ImageError as e:
                    raise DataError(f"{ex.origin or 'data'}: {e}") from None
        return len(seen)

    def pixels(self, sources) -> np.ndarray:
        """(n, 3, size, size) float32 pixels of ``sources``, as image.preprocess_all gives them (no pan and scan)."""
        if not sources:
            return np.zeros((0, 3, self.size, self.size), np.float32)
        return np.stack([self._load(src) for src in sources])


__all__ = ["ImageCache", "MAX_BYTES"]
