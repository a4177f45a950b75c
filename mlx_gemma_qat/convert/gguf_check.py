"""Walk and check a GGUF header before any library parses it.

gguf-py's ``GGUFReader`` trusts the counts and lengths a file states: an absurd array length makes it loop,
one Python object per element, for as long as the file lasts (or longer); absurd dims overflow its element
counts; a tensor past the end of the file fails deep inside numpy. So every GGUF reader in this package walks
the header here first, with cheap checks against the file size before anything is allocated:

* the magic, a supported version (2 or 3), and the two counts: ``n_kv`` and ``n_tensors`` times the smallest
  entry each could be fit in the bytes left;
* every key: a UTF-8 name, unique, a known value type; every string and array length fits in the bytes left
  (an array's count times its element's smallest size); arrays of arrays are refused (llama.cpp refuses them
  too), and so are more metadata array elements in all than :data:`MAX_ARRAY_ELEMENTS`;
* ``general.alignment``, when present, a ``uint32`` power of two;
* every tensor: a UTF-8 name shorter than ggml's 64-byte limit, unique; 1 to 4 dims, each positive; a known
  GGML type whose block size divides the row length; its offset aligned, its bytes inside the file and
  overlapping no other tensor's.

A file that fails gets a :class:`GGUFFormatError` (or the ``error`` class the caller passes) naming it.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import gguf

SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME = 64  # GGML_MAX_NAME, counting the terminating zero: names are at most 63 bytes
# gguf-py's reader makes a few numpy objects per metadata array element (~1 KB, ~20 us each): a Gemma 3
# vocabulary (262,144 tokens, scores and types) is 786k of them. Far more is no Gemma file, and would take
# minutes and gigabytes to parse.
MAX_ARRAY_ELEMENTS = 1 << 22
DEFAULT_ALIGNMENT = 32

# value types: struct formats of the scalars, the string and array ids
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_MIN_SIZE = {**{t: struct.calcsize("<" + f) for t, f in _SCALAR.items()}, _STRING: 8}
_TYPE_NAME = {t.value: t.name for t in gguf.GGUFValueType}


class GGUFFormatError(ValueError):
    """A GGUF file whose header is truncated, corrupt or inconsistent with its size."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]  # GGUF order: fastest-varying first
    ggml_type: int
    offset: int  # from the start of the data section
    n_bytes: int


@dataclass(frozen=True)
class GGUFLayout:
    """What the header says, checked: the keys and their value types, the tensors, where the data starts."""

    version: int
    byte_order: str  # "<" or ">"
    keys: dict[str, tuple[int, int | None]]  # key -> (value type, element type of an array or None)
    tensors: tuple[TensorInfo, ...]
    alignment: int
    data_offset: int
    file_size: int


def check_gguf(path: str | os.PathLike, error: type[ValueError] | None = None) -> GGUFLayout:
    """Walk the header of the GGUF at ``path`` and check it against the file's size (see the module doc).

    Raises ``error`` (default :class:`GGUFFormatError`), naming the file, for anything a reader would trip on.
    """
    path = Path(path)
    error = error or GGUFFormatError
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            if size == 0:
                raise error(f"{path}: empty file (not a GGUF)")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:  # no views of it outlive the walk
                return _Walker(mm, size, path, error).walk()
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None


class _Walker:
    def __init__(self, buf: mmap.mmap, size: int, path: Path, error: type[ValueError]):
        self.buf, self.size, self.path, self.error = buf, size, path, error
        self.pos = 0
        self.e = "<"
        self.elements = 0

    def fail(self, msg: str) -> ValueError:
        return self.error(f"{self.path}: corrupt or truncated GGUF ({msg})")

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.fail(f"{what} at byte {self.pos} needs {n} bytes, {self.size - self.pos} are left")

    def unpack(self, fmt: str, what: str):
        s = struct.calcsize(self.e + fmt)
        self.need(s, what)
        v = struct.unpack_from(self.e + fmt, self.buf, self.pos)
        self.pos += s
        return v if len(v) > 1 else v[0]

    def string(self, what: str, decode: bool) -> str | None:
        n = self.unpack("Q", f"{what} length")
        self.need(n, f"{what} of {n} bytes")
        raw = self.buf[self.pos : self.pos + n] if decode else None  # a copy (bytes), not a view
        self.pos += n
        if not decode:
            return None
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} at byte {self.pos - n} is not UTF-8") from None

    def value(self, vtype: int, key: str) -> int | None:
        """Skip a value; an array's element type is returned."""
        if vtype in _SCALAR:
            self.need(_MIN_SIZE[vtype], f"value of {key!r}")
            self.pos += _MIN_SIZE[vtype]
        elif vtype == _STRING:
            self.string(f"string value of {key!r}", decode=False)
        elif vtype == _ARRAY:
            etype, count = self.unpack("IQ", f"array header of {key!r}")
            if etype == _ARRAY:
                raise self.fail(f"{key!r} is an array of arrays (not supported by GGUF readers)")
            if etype not in _MIN_SIZE:
                raise self.fail(f"{key!r}: unknown array element type {etype}")
            self.need(count * _MIN_SIZE[etype], f"{count} {_TYPE_NAME[etype]} elements of {key!r}")
            self.elements += count
            if self.elements > MAX_ARRAY_ELEMENTS:
                raise self.fail(f"metadata arrays hold more than {MAX_ARRAY_ELEMENTS:,} elements (at {key!r}), "
                                "far beyond any model vocabulary")
            if etype == _STRING:
                unpack, e8 = struct.Struct(self.e + "Q").unpack_from, self.size
                buf, pos = self.buf, self.pos
                for i in range(count):
                    if pos + 8 > e8:
                        self.pos = pos
                        raise self.fail(f"string {i} of {key!r} runs past the end of the file")
                    (n,) = unpack(buf, pos)
                    pos += 8 + n
                    if pos > e8:
                        self.pos = pos - n
                        raise self.fail(f"string {i} of {key!r} ({n} bytes) runs past the end of the file")
                self.pos = pos
            else:
                self.pos += count * _MIN_SIZE[etype]
            return etype
        else:
            raise self.fail(f"{key!r}: unknown value type {vtype}")
        return None

    def walk(self) -> GGUFLayout:
        self.need(4, "magic")
        if self.buf[:4] != b"GGUF":
            raise self.error(f"{self.path}: not a GGUF file (bad magic)")
        self.pos = 4
        self.need(20, "header")
        (version,) = struct.unpack_from("<I", self.buf, 4)
        if version & 0xFFFF == 0:  # written with the other byte order (as gguf-py reads it)
            self.e = ">"
            (version,) = struct.unpack_from(">I", self.buf, 4)
        if version not in SUPPORTED_VERSIONS:
            raise self.error(f"{self.path}: GGUF version {version} is not supported (only 2 and 3)")
        self.pos = 8
        n_tensors, n_kv = self.unpack("QQ", "counts")
        left = self.size - self.pos
        if n_kv * 13 > left:  # key length (8) + type (4) + the smallest value (1)
            raise self.fail(f"{n_kv} metadata keys cannot fit in {left} bytes")
        if n_tensors * 32 > left:  # name length (8) + n_dims (4) + one dim (8) + type (4) + offset (8)
            raise self.fail(f"{n_tensors} tensors cannot fit in {left} bytes")

        keys: dict[str, tuple[int, int | None]] = {}
        alignment = DEFAULT_ALIGNMENT
        for i in range(n_kv):
            key = self.string(f"key {i}", decode=True)
            if key in keys:
                raise self.fail(f"duplicate key {key!r}")
            vtype, etype = self.unpack("I", f"value type of {key!r}"), None
            if key == "general.alignment":
                if vtype != 4:
                    raise self.fail(f"general.alignment has type {_TYPE_NAME.get(vtype, vtype)}, not UINT32")
                alignment = self.unpack("I", "general.alignment")
                if alignment == 0 or alignment & (alignment - 1):
                    raise self.fail(f"general.alignment {alignment} is not a power of two")
            else:
                etype = self.value(vtype, key)
            keys[key] = (vtype, etype)

        infos = []
        names: set[str] = set()
        for i in range(n_tensors):
            name = self.string(f"name of tensor {i}", decode=True)
            if len(name.encode()) >= MAX_NAME:
                raise self.fail(f"tensor {i}: name of {len(name.encode())} bytes (ggml allows {MAX_NAME - 1})")
            if name in names:
                raise self.fail(f"duplicate tensor {name!r}")
            names.add(name)
            n_dims = self.unpack("I", f"n_dims of {name!r}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise self.fail(f"tensor {name!r}: {n_dims} dims (1 to {MAX_DIMS} allowed)")
            dims = self.unpack(f"{n_dims}Q", f"dims of {name!r}")
            dims = (dims,) if n_dims == 1 else tuple(dims)
            ggml_type, offset = self.unpack("IQ", f"type and offset of {name!r}")
            infos.append((name, dims, ggml_type, offset))

        data_offset = -(-self.pos // alignment) * alignment
        tensors = []
        for name, dims, ggml_type, offset in infos:
            tensors.append(self.tensor(name, dims, ggml_type, offset, alignment, data_offset))
        spans = sorted((t.offset, t.offset + t.n_bytes, t.name) for t in tensors)
        for (_, end1, n1), (b2, _, n2) in zip(spans, spans[1:]):
            if b2 < end1:
                raise self.fail(f"tensors {n1!r} and {n2!r} overlap")
        return GGUFLayout(version, self.e, keys, tuple(tensors), alignment, data_offset, self.size)

    def tensor(self, name, dims, ggml_type, offset, alignment, data_offset) -> TensorInfo:
        try:
            qt = gguf.GGMLQuantizationType(ggml_type)
            block, type_size = gguf.GGML_QUANT_SIZES[qt]
        except (ValueError, KeyError):
            raise self.fail(f"tensor {name!r}: unknown GGML type id {ggml_type}") from None
        if any(d == 0 for d in dims):
            raise self.fail(f"tensor {name!r}: a zero dim in {list(dims)}")
        if dims[0] % block:
            raise self.fail(f"tensor {name!r}: row length {dims[0]} is not a multiple of {qt.name}'s block size {block}")
        n_bytes = dims[0] // block * type_size
        for d in dims[1:]:
            n_bytes *= d
            if n_bytes > self.size:  # also keeps the products small (the file bounds every one)
                break
        if offset % alignment:
            raise self.fail(f"tensor {name!r}: offset {offset} is not a multiple of the alignment {alignment}")
        if data_offset + offset + n_bytes > self.size:
            raise self.fail(f"tensor {name!r} ({qt.name}, dims {list(dims)}) runs past the end of the file")
        return TensorInfo(name, dims, ggml_type, offset, n_bytes)
