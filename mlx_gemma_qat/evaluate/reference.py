"""Reference log-probabilities for KL divergence: from a model in memory, or from a file saved once.

Two file formats, told apart by their first 8 bytes:

* ``_logits_``: llama.cpp's ``--kl-divergence-base`` format, byte for byte: u32 context, i32 vocab, i32
  windows, the windows' int32 tokens, then for every scored token two float32 (scale, min) and ``vocab``
  uint16 log-probabilities on a uniform 16-nat grid below the top (step 16/65535 = 0.00024 nats; lower values
  are clamped to that floor, so a reference's perplexity read back from such a file is lower where the text
  has tokens more than 16 nats below the top one), padded to an even count. Files are interchangeable with ``llama-perplexity`` both ways. Size:
  2 bytes x vocab per scored token, 512 KiB at Gemma 3's 262,144 tokens (a 2,048-context window scores
  1,023 tokens: 0.5 GiB per window). llama.cpp's windows only (no ``--stride``).
* ``_mgtopk_``: the reference's top-K log-probabilities as float32 with their int32 token ids, plus the float32
  log-probability of the token that came next: 4 + 8K bytes per scored token (K=64: 516 bytes). Any
  windows. KL divergence from it sums the K entries and the rest of the distribution as one bucket, a lower
  bound of the true value, equal to it where the K tokens hold all the reference's mass.

Files are written to a temporary name and renamed when complete: an interrupted run leaves none.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..atomic import commit, temp_sibling
from .windows import Windows

LLAMA_MAGIC = b"_logits_"
TOPK_MAGIC = b"_mgtopk_"
LOG_PROB_RANGE = 16.0  # llama.cpp keeps log-probs within 16 nats of the top one


class LogitsFileError(ValueError):
    """A logits file that is not one, is truncated, or does not fit the model or text."""


def _row_width(vocab: int) -> int:
    return 2 * ((vocab + 1) // 2) + 4  # uint16 per token: 2 float32 + vocab values, padded even


@dataclass
class RefPiece:
    """The reference at n scored positions: full log-probs (n, vocab) or top-K (ids, log-probs)."""

    target_logprobs: mx.array  # (n,) reference log-prob of the token that came next
    full: mx.array | None = None
    top_ids: mx.array | None = None
    top_logprobs: mx.array | None = None
    floor: float | None = None  # ignore reference log-probs at or below this (llama.cpp's -16 rule)


# ------------------------------------------------------------------------------------------- writing

def encode_llama_rows(lp: mx.array) -> np.ndarray:
    """(n, vocab) float32 log-probs -> (n, row_width) uint16 rows as llama-perplexity writes them."""
    n, vocab = lp.shape
    top = lp.max(axis=-1, keepdims=True)
    low = mx.maximum(lp.min(axis=-1, keepdims=True), top - LOG_PROB_RANGE)
    scale = (top - low) / 65535.0
    safe = mx.where(scale > 0, scale, 1.0)
    q = mx.where(lp > low, mx.round((lp - low) / safe), 0).astype(mx.uint16)
    q = mx.where(scale > 0, q, 0).astype(mx.uint16)
    head = np.concatenate([np.array(scale, dtype=np.float32), np.array(low, dtype=np.float32)], axis=1).view(np.uint16)
    rows = np.zeros((n, _row_width(vocab)), dtype=np.uint16)
    rows[:, :4] = head
    rows[:, 4 : 4 + vocab] = np.array(q)
    return rows


class LogitsWriter:
    """Streams a reference's scored log-probs to ``path`` (full llama.cpp format, or top-K when top_k > 0)."""

    def __init__(self, path, ids: np.ndarray, windows: Windows, vocab: int, top_k: int = 0):
        if top_k == 0 and not windows.llama_cpp:
            raise LogitsFileError("full logits files use llama.cpp's format, which has no --stride: "
                                  "drop --stride or save the top-K (--logits-top-k K)")
        if top_k < 0 or top_k > vocab:
            raise LogitsFileError(f"--logits-top-k must be between 0 (full) and the vocabulary ({vocab})")
        self.path, self.top_k = Path(path), top_k
        self.tmp = temp_sibling(self.path)
        self.f = open(self.tmp, "wb")
        used = np.asarray(ids[: windows.start(windows.count - 1) + windows.context], dtype=np.int32)
        if top_k:
            hdr = json.dumps({"context": windows.context, "stride": windows.stride, "vocab": vocab,
                              "windows": windows.count, "top_k": top_k, "tokens": int(used.size)}).encode()
            self.f.write(TOPK_MAGIC + struct.pack("<I", len(hdr)) + hdr)
        else:
            self.f.write(LLAMA_MAGIC + struct.pack("<Iii", windows.context, vocab, windows.count))
        self.f.write(used.tobytes())

    def add(self, lp: mx.array, targets: np.ndarray) -> None:
        if self.top_k:
            ids = mx.argpartition(-lp, self.top_k - 1, axis=-1)[:, : self.top_k]
            vals = mx.take_along_axis(lp, ids, axis=-1)
            order = mx.argsort(-vals, axis=-1)
            ids, vals = mx.take_along_axis(ids, order, axis=-1), mx.take_along_axis(vals, order, axis=-1)
            tgt = mx.take_along_axis(lp, mx.array(targets)[:, None], axis=-1)
            rec = np.concatenate([np.array(tgt, np.float32).view(np.uint32), np.array(ids.astype(mx.uint32)),
                                  np.array(vals, np.float32).view(np.uint32)], axis=1)
            self.f.write(rec.astype(np.uint32).tobytes())
        else:
            self.f.write(encode_llama_rows(lp).tobytes())

    def close(self, complete: bool) -> None:
        self.f.close()
        if complete:
            commit(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------- reading

class LogitsFile:
    """A saved reference: its tokens and windows, and its log-probs read in order, piece by piece."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            self.f = open(self.path, "rb")
        except OSError as e:
            raise LogitsFileError(f"{path}: cannot read ({e.strerror})") from None
        size = self.path.stat().st_size
        magic = self.f.read(8)
        if magic == LLAMA_MAGIC:
            self.top_k = 0
            hdr = self.f.read(12)
            if len(hdr) < 12:
                raise LogitsFileError(f"{path}: truncated header")
            ctx, self.vocab, n = struct.unpack("<Iii", hdr)
            stride, n_tok = ctx, ctx * n
            self.row_bytes = 2 * _row_width(self.vocab) if self.vocab > 0 else 0
        elif magic == TOPK_MAGIC:
            try:
                (hl,) = struct.unpack("<I", self.f.read(4))
                h = json.loads(self.f.read(hl))
                ctx, stride, self.vocab, n, self.top_k, n_tok = (int(h[k]) for k in
                                                                  ("context", "stride", "vocab", "windows", "top_k", "tokens"))
            except (struct.error, ValueError, KeyError, TypeError):
                raise LogitsFileError(f"{path}: damaged header") from None
            self.row_bytes = 4 * (1 + 2 * self.top_k)
        else:
            raise LogitsFileError(f"{path}: not a logits file (saved by `mlx-gemma perplexity --save-logits` or "
                                  "llama-perplexity --kl-divergence-base)")
        if ctx < 4 or n < 1 or self.vocab < 2 or not 1 <= stride <= ctx:
            raise LogitsFileError(f"{path}: damaged header (context {ctx}, windows {n}, vocab {self.vocab})")
        self.windows = Windows(n_tok, ctx, stride)
        if self.windows.count != n:
            raise LogitsFileError(f"{path}: damaged header ({n} windows do not fit {n_tok} tokens)")
        raw = self.f.read(4 * n_tok)
        self.ids = np.frombuffer(raw, dtype=np.int32).copy()
        expected = self.f.tell() + self.windows.total_scored * self.row_bytes
        if len(raw) < 4 * n_tok or size < expected:
            raise LogitsFileError(f"{path}: truncated ({size} bytes, expected {expected})")
        if size > expected:
            raise LogitsFileError(f"{path}: {size - expected} unexpected bytes after the data")
        if self.ids.size and (self.ids.min() < 0 or self.ids.max() >= self.vocab):
            raise LogitsFileError(f"{path}: token ids outside the vocabulary of {self.vocab}")

    def read(self, n: int) -> RefPiece:
        buf = self.f.read(n * self.row_bytes)
        if len(buf) < n * self.row_bytes:
            raise LogitsFileError(f"{self.path}: truncated")
        if self.top_k:
            rec = np.frombuffer(buf, dtype=np.uint32).reshape(n, 1 + 2 * self.top_k)
            k = self.top_k
            return RefPiece(target_logprobs=mx.array(rec[:, 0].view(np.float32)),
                            top_ids=mx.array(rec[:, 1 : 1 + k].astype(np.int32)),
                            top_logprobs=mx.array(rec[:, 1 + k :].copy().view(np.float32)))
        rows = np.frombuffer(buf, dtype=np.uint16).reshape(n, -1)
        head = rows[:, :4].copy().view(np.float32)  # (n, 2): scale, min log-prob
        lp = mx.array(rows[:, 4 : 4 + self.vocab]).astype(mx.float32) * mx.array(head[:, :1]) + mx.array(head[:, 1:])
        return RefPiece(target_logprobs=None, full=lp, floor=-LOG_PROB_RANGE)

    def close(self):
        self.f.close()


def check_vocab(ref_vocab: int, vocab: int, what: str) -> None:
    if ref_vocab != vocab:
        raise LogitsFileError(f"{what} has a vocabulary of {ref_vocab} tokens, the model {vocab}: "
                              "KL divergence needs the same tokenizer")
