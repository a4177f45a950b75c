"""Read and check a safetensors header before any library maps the file.

A safetensors file is an 8-byte little-endian header length, a JSON header naming every tensor's dtype, shape
and [begin, end) byte range in the data section that follows, then the data. MLX's loader trusts much of it
(a corrupt header reaches C++ as a RuntimeError, or worse), so every reader here checks first: the length fits
the file, the JSON is an object of well-formed entries, dtypes are known, each byte range is inside the file,
matches its shape exactly and overlaps no other. A file that fails gets a ``SafetensorsError`` naming it.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
            "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}
MAX_HEADER = 100 << 20  # the format's own limit (100 MB)


class SafetensorsError(ValueError):
    """A safetensors file that is truncated, corrupt or malformed."""


def read_header(path: str | os.PathLike) -> dict[str, dict]:
    """The checked tensor entries of a safetensors file ({name: {"dtype", "shape", "data_offsets"}})."""
    path = Path(path)

    def bad(msg):
        return SafetensorsError(f"{path}: corrupt safetensors file ({msg})")

    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise bad("shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_HEADER, size - 8):
                raise bad(f"header length {n} runs past the end of the {size}-byte file")
            raw = fh.read(n)
    except OSError as e:
        raise SafetensorsError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except _Duplicate as e:
        raise bad(f"the header names {e.args[0]!r} twice") from None
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError, JSONDecodeError, too many digits
        raise bad(f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise bad("__metadata__ is not a map of strings")
    data_size = size - 8 - n
    spans = []
    for name, e in header.items():
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"tensor {name!r}: entry is not {{dtype, shape, data_offsets}}")
        dtype, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
        if not isinstance(dtype, str) or dtype not in ITEMSIZE:
            raise bad(f"tensor {name!r}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or len(shape) > 16 or not all(_is_count(s) for s in shape):
            raise bad(f"tensor {name!r}: bad shape {shape!r}")
        if not isinstance(offs, list) or len(offs) != 2 or not all(_is_count(o) for o in offs):
            raise bad(f"tensor {name!r}: bad data_offsets {offs!r}")
        begin, end = offs
        expected = ITEMSIZE[dtype]
        for s in shape:
            expected *= s
        if not begin <= end <= data_size:
            raise bad(f"tensor {name!r}: bytes [{begin}, {end}) are outside the {data_size}-byte data section")
        if end - begin != expected:
            raise bad(f"tensor {name!r}: {end - begin} bytes for shape {shape} of {dtype} ({expected} bytes)")
        spans.append((begin, end, name))
    spans.sort()
    for (_, e1, n1), (b2, e2, n2) in zip(spans, spans[1:]):
        if b2 < e1 and e2 > b2:
            raise bad(f"tensors {n1!r} and {n2!r} overlap")
    return header


class _Duplicate(Exception):
    pass


def _no_duplicates(pairs: list) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        raise _Duplicate(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return out


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < (1 << 62)


def load_checked(path: str | os.PathLike) -> dict:
    """``mx.load`` of a safetensors file whose header was checked first."""
    import mlx.core as mx

    read_header(path)
    try:
        return mx.load(str(path))
    except MemoryError:
        raise
    except Exception as e:  # what the check above cannot see (e.g. a dtype MLX does not read)
        raise SafetensorsError(f"{path}: unreadable safetensors ({type(e).__name__}: {e})") from None
