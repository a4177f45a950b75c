"""KV caches kept across server requests, so a request that extends an earlier one prefills only its new tokens.

Each kept entry is a finished request's cache and the key of every token in it (its prompt, then the tokens it
generated and fed back). A new request starts from the entry sharing its longest prefix: the entry's cache is
copied (MLX arrays are immutable: the copy shares them until either side writes) and trimmed back to the
shared prefix. Sliding-window layers can be trimmed only ``slack`` tokens back once their window has filled
(see ``model.cache.RotatingKVCache``), enough for a chat client that re-renders the end of the last reply
differently (the template trims trailing spaces; a reply cut at max_tokens); an entry that cannot be trimmed
that far is skipped. The result equals a fresh prefill of the whole prompt: the cache holds exactly the keys
and values of the shared tokens, at their positions.

Image tokens are keyed by a hash of the image's pixels, so two prompts that differ only in an image never
share its tokens, and a shared prefix never ends inside an image (its tokens attend to each other both ways,
so an image is prefilled whole).

Memory is bounded by ``max_entries`` and ``max_bytes`` (the bytes each cache holds, counted per entry even
where copies share arrays: an upper bound; by default ``default_cache_bytes()``, an eighth of the memory the
device reports); the least recently used entry goes first.

Reuse crosses clients: a request may start from another client's kept cache, and its usage then reports those
tokens as cached (``cached_tokens``), which tells a client that someone sent that prefix before. Each entry has
an ``owner`` (the server's ``--no-cross-client-reuse`` makes it the client's API key): a request reuses only
entries of its own owner.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..model.cache import cache_nbytes, can_trim, copy_cache, trim_cache
from ..model.multimodal import image_groups


def device_memory() -> int:
    """Bytes of memory the device reports (a GPU's own size where MLX gives it, else the machine's RAM)."""
    size = mx.device_info().get("memory_size")
    return int(size) if size else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_cache_bytes() -> int:
    """The kept caches' default byte bound: an eighth of ``device_memory()``."""
    return device_memory() // 8


def prompt_key(ids: list[int], pixels: np.ndarray | None, image_token: int | None) -> np.ndarray:
    """Reuse key of a prompt: its token ids, each image token replaced by a negative number identifying the
    image's pixels (images are consecutive runs of ``image_token``, in the order of ``pixels``)."""
    key = np.asarray(ids, dtype=np.int64).copy()
    if image_token is None or pixels is None or not len(pixels):
        return key
    groups = image_groups(key, image_token)
    for k in range(int(groups.max(initial=-1)) + 1):
        digest = hashlib.sha1(np.ascontiguousarray(pixels[k]).tobytes()).digest()
        key[groups == k] = -1 - (int.from_bytes(digest[:7], "little"))
    return key


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


def image_safe(key: np.ndarray, p: int) -> int:
    """``p`` moved back to the start of the image it would split (image keys are negative)."""
    while 0 < p < len(key) and key[p] < 0 and key[p - 1] == key[p]:
        p -= 1
    return p


@dataclass
class _Entry:
    key: np.ndarray
    cache: list
    nbytes: int
    owner: str


class CachePool:
    """Finished requests' KV caches, least recently used dropped first."""

    def __init__(self, max_entries: int = 8, max_bytes: int | None = None):
        if max_entries < 0:
            raise ValueError("max_entries must be >= 0")
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._next = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def take(self, key: np.ndarray, owner: str = "") -> tuple[list | None, int]:
        """A cache of ``owner``'s holding the longest reusable prefix of ``key`` (a copy: the entry stays) and
        that prefix's length, or (None, 0). At least the last token of ``key`` is left to prefill."""
        scored = sorted(((common_prefix(e.key, key), i) for i, e in self._entries.items() if e.owner == owner),
                        reverse=True)
        for p, i in scored:
            p = image_safe(key, min(p, len(key) - 1))
            if p == 0:
                break
            e = self._entries[i]
            drop = len(e.key) - p
            if can_trim(e.cache, drop):
                self._entries.move_to_end(i)
                cache = copy_cache(e.cache)
                trim_cache(cache, drop)
                return cache, p
        return None, 0

    def put(self, key: np.ndarray, cache: list, owner: str = "") -> None:
        """Keep ``owner``'s ``cache``, which holds the tokens of ``key`` (their entry with the same key is
        replaced)."""
        if not self.max_entries or not len(key):
            return
        for i, e in list(self._entries.items()):
            if e.owner == owner and len(e.key) == len(key) and common_prefix(e.key, key) == len(key):
                del self._entries[i]
        n = cache_nbytes(cache)
        if self.max_bytes is not None and n > self.max_bytes:
            return
        self._entries[self._next] = _Entry(key, cache, n, owner)
        self._next += 1
        while len(self._entries) > self.max_entries or (self.max_bytes is not None and self.nbytes > self.max_bytes):
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()
