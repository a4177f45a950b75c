"""Gemma 3 tokenizer from GGUF metadata, as a Hugging Face ``tokenizers`` fast tokenizer.

A Gemma 3 GGUF carries its SentencePiece vocabulary as three parallel arrays
(``tokenizer.ggml.tokens`` / ``scores`` / ``token_type``) and no merges. SentencePiece's BPE
segmentation repeatedly joins the adjacent pair of symbols whose concatenation is a vocabulary piece
with the highest score, leftmost first on ties. A ``tokenizers`` BPE model joins the adjacent pair
with the lowest *merge rank*, leftmost first on ties. The two agree when the merge list holds every
split ``(left, right)`` of every piece where both halves are pieces too, ranked by the score of the
joined piece (best first). That list (515k merges for Gemma 3) is derived here with vectorised
rolling hashes in about a second.

Everything around the BPE model follows Google's Gemma 3 ``tokenizer.json``:

* normalizer: ``" "`` -> ``"▁"`` (no dummy prefix for Gemma 3, ``add_space_prefix`` is false);
* byte fallback to the ``<0xNN>`` pieces for characters outside the vocabulary;
* control pieces (``<pad> <eos> <bos> <unk> <mask> <start_of_turn> <end_of_turn> <unusedN>``) are
  special added tokens; user-defined pieces (the ``\\n``/``\\t``/space runs, the HTML tags,
  ``<start_of_image>``, ``<end_of_image>``, ``[multimodal]``) are plain (non-special) added tokens,
  matched whole in the raw text, as llama.cpp does whether or not it parses control tokens. The
  space runs keep the GGUF's spelling (``"  "``, which SentencePiece writes ``"▁▁"``): that is what
  makes a literal ``"▁"`` in the text tokenize as in llama.cpp;
* decoder: ``"▁"`` -> ``" "``, byte fallback, fuse (no space stripping);
* post processor: ``<bos>`` in front when the file says ``add_bos_token``.

GGUFs of type ``gpt2`` (a BPE vocabulary with an explicit ``tokenizer.ggml.merges`` list) are what
llama.cpp's ``convert_hf_to_gguf.py`` writes for a Gemma 3 folder without ``tokenizer.model`` (the
way transformers 5 saves Gemma tokenizers). Its pre-tokenizer name comes from a hash of the
tokenizer's output (Gemma 3's vocabulary gives ``"granite-embed-multi-311m"``, Gemma 4-style ones
``"gemma4"``); llama.cpp tokenizes both the same way (``LLAMA_VOCAB_PRE_TYPE_GEMMA4``), and so does
the tokenizer built here:

* the merges are the file's, in its order (first occurrence of a pair wins, as in llama.cpp);
* control/user-defined tokens are split off first, exactly as above;
* spaces become ``"▁"``, the text is cut into runs of newlines and runs of everything else, BPE runs
  on raw UTF-8 characters (no GPT-2 byte-to-unicode map), and pieces outside the vocabulary fall back
  to the ``<0xNN>`` byte tokens;
* ``<bos>`` is always added in front (llama.cpp forces ``add_bos`` for this pre-tokenizer).

Other ``gpt2`` pre-tokenizers (GPT-2/Llama 3-style byte-level regexes) are refused with a clear error.

The public entry points are :func:`tokenizer_from_gguf`, :func:`special_token_ids`,
:func:`write_tokenizer_files`, :func:`eos_token_ids` and :data:`GEMMA3_CHAT_TEMPLATE`.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

__all__ = [
    "GEMMA3_CHAT_TEMPLATE",
    "template_kwargs",
    "GEMMA_BPE_PRE_TOKENIZERS",
    "TokenizerError",
    "TokenizerMetadata",
    "read_tokenizer_metadata",
    "derive_merges",
    "parse_merges",
    "tokenizer_from_gguf",
    "special_token_ids",
    "eos_token_ids",
    "write_tokenizer_files",
]

GEMMA3_CHAT_TEMPLATE: str = (Path(__file__).with_name("gemma3_chat_template.jinja")).read_text(encoding="utf-8")


def template_kwargs(tokenizer) -> dict:
    """``apply_chat_template``'s keywords for ``tokenizer``: none when it ships a template, else the built-in
    Gemma 3 one (a base model's GGUF has none)."""
    return {} if getattr(tokenizer, "chat_template", None) else {"chat_template": GEMMA3_CHAT_TEMPLATE}
"""The official Gemma 3 chat template (``chat_template`` of Google's gemma-3 ``tokenizer_config.json``)."""

class TokenizerError(ValueError):
    """A GGUF tokenizer that cannot be converted (unsupported kind, or inconsistent metadata)."""


SPM_SPACE = "\u2581"  # "▁", SentencePiece's visible space

# llama.cpp token types (gguf.TokenType)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

END_OF_TURN = "<end_of_turn>"

_KEYS = (
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.scores",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.add_bos_token",
    "tokenizer.ggml.add_eos_token",
    "tokenizer.ggml.add_space_prefix",
    "tokenizer.chat_template",
)


# ----------------------------------------------------------------------------------------------
# Reading the metadata
# ----------------------------------------------------------------------------------------------


@dataclass
class TokenizerMetadata:
    """The tokenizer part of a GGUF's metadata."""

    model: str | None
    pre: str | None
    tokens: list[str]
    scores: np.ndarray  # float32, one per token
    token_types: np.ndarray  # int32, one per token (llama.cpp TokenType)
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None
    add_bos: bool | None = None
    add_eos: bool | None = None
    add_space_prefix: bool | None = None
    chat_template: str | None = None
    merges: list[str] | None = None  # tokenizer.ggml.merges ("left right"), BPE (gpt2) files only

    @classmethod
    def from_mapping(cls, kv: Mapping[str, Any]) -> "TokenizerMetadata":
        tokens = kv.get("tokenizer.ggml.tokens")
        tokens = [t.decode("utf-8", "replace") if isinstance(t, (bytes, bytearray)) else str(t) for t in (tokens or [])]
        n = len(tokens)
        scores = kv.get("tokenizer.ggml.scores")
        scores = np.zeros(n, np.float32) if scores is None else np.asarray(scores, dtype=np.float32).reshape(-1)
        types = kv.get("tokenizer.ggml.token_type")
        types = np.full(n, TOKEN_NORMAL, np.int32) if types is None else np.asarray(types, dtype=np.int32).reshape(-1)
        if len(scores) != n or len(types) != n:
            raise TokenizerError(f"GGUF tokenizer arrays disagree: {n} tokens, {len(scores)} scores, {len(types)} types")

        def opt_int(key):
            v = kv.get(key)
            return None if v is None else int(v)

        def opt_bool(key):
            v = kv.get(key)
            return None if v is None else bool(v)

        def opt_str(key):
            v = kv.get(key)
            if isinstance(v, (bytes, bytearray)):
                v = v.decode("utf-8")
            return v

        return cls(
            model=opt_str("tokenizer.ggml.model"),
            pre=opt_str("tokenizer.ggml.pre"),
            tokens=tokens,
            scores=scores,
            token_types=types,
            bos_id=opt_int("tokenizer.ggml.bos_token_id"),
            eos_id=opt_int("tokenizer.ggml.eos_token_id"),
            unk_id=opt_int("tokenizer.ggml.unknown_token_id"),
            pad_id=opt_int("tokenizer.ggml.padding_token_id"),
            add_bos=opt_bool("tokenizer.ggml.add_bos_token"),
            add_eos=opt_bool("tokenizer.ggml.add_eos_token"),
            add_space_prefix=opt_bool("tokenizer.ggml.add_space_prefix"),
            chat_template=opt_str("tokenizer.chat_template"),
            merges=_opt_str_list(kv.get("tokenizer.ggml.merges")),
        )


def _opt_str_list(v) -> list[str] | None:
    if v is None:
        return None
    return [t.decode("utf-8", "replace") if isinstance(t, (bytes, bytearray)) else str(t) for t in v]


# GGUF value types
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "u1", 1: "i1", 2: "u2", 3: "i2", 4: "u4", 5: "i4", 6: "f4", 7: "?", 10: "u8", 11: "i8", 12: "f8"}
_STRING, _ARRAY = 8, 9


def _read_kv_file(path: str | os.PathLike, wanted: tuple[str, ...] = _KEYS) -> dict[str, Any]:
    """Parse only the key/value section of a GGUF file (fast: no tensor info, no per-element objects)."""
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        buf = memoryview(mm)
        try:
            if bytes(buf[:4]) != b"GGUF":
                raise TokenizerError(f"{path}: not a GGUF file")
            (version,) = struct.unpack_from("<I", buf, 4)
            e = "<"
            if version & 0xFFFF == 0:  # written big-endian
                e = ">"
                (version,) = struct.unpack_from(">I", buf, 4)
            if version < 2:
                raise TokenizerError(f"{path}: GGUF version {version} is not supported")
            _, n_kv = struct.unpack_from(e + "QQ", buf, 8)
            pos = 24
            out: dict[str, Any] = {}

            def read_str(p):
                (n,) = struct.unpack_from(e + "Q", buf, p)
                return bytes(buf[p + 8 : p + 8 + n]).decode("utf-8", "replace"), p + 8 + n

            def read_value(p, vtype, keep):
                if vtype == _STRING:
                    return read_str(p)
                if vtype in _SCALAR:
                    fmt = e + _SCALAR[vtype][1]
                    return struct.unpack_from(fmt, buf, p)[0], p + struct.calcsize(fmt)
                if vtype == _ARRAY:
                    etype, count = struct.unpack_from(e + "IQ", buf, p)
                    p += 12
                    if etype in _NUMPY:
                        dt = np.dtype(_NUMPY[etype]).newbyteorder(e)
                        end = p + dt.itemsize * count
                        arr = np.frombuffer(buf[p:end], dtype=dt).astype(dt.newbyteorder("="), copy=True) if keep else None
                        return arr, end
                    if etype == _STRING:
                        items = [] if keep else None
                        unpack = struct.Struct(e + "Q").unpack_from
                        for _ in range(count):
                            (n,) = unpack(buf, p)
                            p += 8
                            if keep:
                                items.append(bytes(buf[p : p + n]).decode("utf-8", "replace"))
                            p += n
                        return items, p
                    items = []
                    for _ in range(count):
                        v, p = read_value(p, etype, keep)
                        items.append(v)
                    return (items if keep else None), p
                raise TokenizerError(f"{path}: unknown GGUF value type {vtype}")

            for _ in range(n_kv):
                key, pos = read_str(pos)
                (vtype,) = struct.unpack_from(e + "I", buf, pos)
                pos += 4
                value, pos = read_value(pos, vtype, key in wanted)
                if key in wanted:
                    out[key] = value
            return out
        finally:
            buf.release()


def read_gguf_keys(path: str | os.PathLike, keys: tuple[str, ...]) -> dict[str, Any]:
    """The values of ``keys`` in the GGUF at ``path`` (those it has), read from its key/value section alone.
    Walk the header with :func:`.gguf_check.check_gguf` first: this reader trusts its lengths."""
    return _read_kv_file(path, keys)


def _read_kv_reader(reader) -> dict[str, Any]:
    """The tokenizer keys of a ``gguf.GGUFReader`` (or anything with a GGUFReader-like ``fields``)."""
    out: dict[str, Any] = {}
    fields = reader.fields
    for key in _KEYS:
        field = fields.get(key)
        if field is None:
            continue
        if key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
            # the array elements are numpy views of one element each; gather them without Python floats
            parts = [field.parts[i] for i in field.data]
            out[key] = np.concatenate(parts) if parts else np.zeros(0)
        elif key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
            parts = field.parts
            out[key] = [bytes(parts[i]).decode("utf-8", "replace") for i in field.data]
        else:
            out[key] = field.contents()
    return out


def read_tokenizer_metadata(source) -> TokenizerMetadata:
    """Tokenizer metadata from a ``gguf.GGUFReader``, a GGUF path, a metadata mapping or a
    :class:`TokenizerMetadata` (returned as is).

    A path is parsed by a small key/value reader here, which takes a fraction of a second, where
    constructing a ``GGUFReader`` on a 262k-token vocabulary takes tens of seconds.
    """
    if isinstance(source, TokenizerMetadata):
        return source
    if isinstance(source, (str, os.PathLike)):
        from .gguf_check import check_gguf

        # the header is walked and checked against the file size first: the reader below can trust it
        _check_key_types(source, check_gguf(source, TokenizerError).keys)
        return _named(source, lambda: TokenizerMetadata.from_mapping(_read_kv_file(source)))
    if hasattr(source, "fields"):
        where = getattr(source, "path", None) or getattr(getattr(source, "data", None), "filename", "GGUF")
        f = source.fields
        _check_key_types(where, {k: (int(f[k].types[0]), int(f[k].types[1]) if len(f[k].types) > 1 else None)
                                 for k in _KEYS if k in f and f[k].types})
        return _named(where, lambda: TokenizerMetadata.from_mapping(_read_kv_reader(source)))
    if isinstance(source, Mapping):
        return TokenizerMetadata.from_mapping(source)
    raise TypeError(f"expected a gguf.GGUFReader, a GGUF path or a metadata mapping, got {type(source).__name__}")


# GGUF value types each tokenizer key may have: (value type, array element types)
_INT_TYPES = {0, 1, 2, 3, 4, 5, 10, 11}
_NUM_TYPES = _INT_TYPES | {6, 12}
_KEY_TYPES = {
    "tokenizer.ggml.tokens": (_ARRAY, {_STRING}),
    "tokenizer.ggml.merges": (_ARRAY, {_STRING}),
    "tokenizer.ggml.scores": (_ARRAY, _NUM_TYPES),
    "tokenizer.ggml.token_type": (_ARRAY, _INT_TYPES),
    "tokenizer.ggml.model": (_STRING, None),
    "tokenizer.ggml.pre": (_STRING, None),
    "tokenizer.chat_template": (_STRING, None),
    **{f"tokenizer.ggml.{k}_token_id": (_INT_TYPES, None) for k in ("bos", "eos", "unknown", "padding")},
    **{f"tokenizer.ggml.{k}": ({7} | _INT_TYPES, None) for k in ("add_bos_token", "add_eos_token", "add_space_prefix")},
}


def _check_key_types(where, types: Mapping[str, tuple[int, int | None]]) -> None:
    """Each tokenizer key present has a value type the reader can use (a GGUF can say anything)."""
    for key, (want, elems) in _KEY_TYPES.items():
        if key not in types:
            continue
        vtype, etype = types[key]
        ok = vtype in want if isinstance(want, set) else vtype == want
        if ok and elems is not None:
            ok = etype in elems
        if not ok:
            got = f"an array of type {etype}" if vtype == _ARRAY else f"type {vtype}"
            raise TokenizerError(f"{where}: metadata {key} has GGUF {got}, not what a tokenizer key holds")


def _named(where, build):
    """``build()``, its TokenizerErrors naming the file."""
    try:
        return build()
    except TokenizerError as e:
        if str(where) in str(e):
            raise
        raise TokenizerError(f"{where}: {e}") from None


# ----------------------------------------------------------------------------------------------
# Merges from SentencePiece scores
# ----------------------------------------------------------------------------------------------


def _codepoints(tokens: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(lengths, codes)``: per-token length in characters and a zero-padded [n, maxlen] uint32 matrix."""
    lengths = np.fromiter((len(t) for t in tokens), dtype=np.int64, count=len(tokens))
    width = max(1, int(lengths.max(initial=1)))
    codes = np.array(tokens, dtype=f"<U{width}").view(np.uint32).reshape(len(tokens), width)
    return lengths, codes


# derive_merges holds ~12 bytes per (piece, character position) cell: 2**26 cells, 0.8 GB, allow a 262k
# vocabulary pieces of up to 256 characters (a crafted vocabulary with one long piece would otherwise ask for
# terabytes)
_MAX_CODE_CELLS = 1 << 26


def derive_merges(tokens: list[str], scores) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's score-driven pair joining.

    Every split ``piece = left + right`` with ``left`` and ``right`` in the vocabulary becomes the
    merge ``(left, right)``; merges are ranked by the score of ``piece`` (higher first), then by the
    id of ``piece``, then by the split position. Since a rank is tied to the joined piece, the BPE
    model's "lowest rank, leftmost" choice is SentencePiece's "highest score, leftmost" choice.

    Implementation: polynomial hashes (mod 2**64) of every prefix of every piece, from which the
    hash of each suffix follows in O(1); both are looked up among the hashes of whole pieces with a
    sorted search, and the hits are confirmed character by character.
    """
    n = len(tokens)
    if n == 0:
        return []
    width = max(len(t) for t in tokens)
    if n * width > _MAX_CODE_CELLS:  # the arrays below are n x width: refuse before allocating them
        raise TokenizerError(f"a vocabulary of {n} pieces up to {width} characters long is too large to derive "
                             f"merges from ({n * width:,} > {_MAX_CODE_CELLS:,} cells; Gemma 3's is 262,144 x 31)")
    scores = np.asarray(scores, dtype=np.float64)
    lengths, codes = _codepoints(tokens)
    width = codes.shape[1]
    codes_t = np.ascontiguousarray(codes.T)  # [width, n]: one contiguous row per character position
    base = np.uint64(0x100000001B3)  # odd multiplier; arithmetic wraps mod 2**64
    # pre[k] = hash of piece[:k] (for k <= len(piece))
    pre = np.zeros((width + 1, n), dtype=np.uint64)
    powers = np.ones(width + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(width):
            pre[k + 1] = pre[k] * base + (codes_t[k].astype(np.uint64) + np.uint64(1))  # +1: NUL counts
            powers[k + 1] = powers[k] * base
    full = pre[lengths, np.arange(n)]
    order = np.argsort(full, kind="stable")
    sorted_full = full[order]

    def lookup(h: np.ndarray) -> np.ndarray:
        """Token id whose whole-piece hash is ``h``, or -1."""
        i = np.minimum(np.searchsorted(sorted_full, h), n - 1)
        return np.where(sorted_full[i] == h, order[i], -1)

    found = []
    candidates = np.nonzero(lengths > 1)[0]
    for k in range(1, width):
        candidates = candidates[lengths[candidates] > k]  # pieces long enough to split after k chars
        if candidates.size == 0:
            break
        left = lookup(pre[k, candidates])
        hit = left >= 0
        sel, left = candidates[hit], left[hit]
        if sel.size == 0:
            continue
        with np.errstate(over="ignore"):
            right_hash = full[sel] - pre[k, sel] * powers[lengths[sel] - k]
        right = lookup(right_hash)
        hit = right >= 0
        found.append((sel[hit], np.full(int(hit.sum()), k, dtype=np.int64), left[hit], right[hit]))
    if not found:
        return []
    piece, split, left, right = (np.concatenate(parts) for parts in zip(*found))

    # confirm on the characters (rules out hash collisions)
    ok = lengths[left] == split
    ok &= lengths[right] == lengths[piece] - split
    for j in range(width):
        in_left = j < split
        rj = np.clip(j - split, 0, width - 1)
        expected = np.where(in_left, codes_t[j][left], codes_t[rj, right])
        ok &= (expected == codes_t[j][piece]) | (j >= lengths[piece])
    piece, split, left, right = piece[ok], split[ok], left[ok], right[ok]

    rank = np.lexsort((split, piece, -scores[piece]))  # the last key is the primary one
    return [(tokens[a], tokens[b]) for a, b in zip(left[rank].tolist(), right[rank].tolist())]


# ----------------------------------------------------------------------------------------------
# The tokenizer
# ----------------------------------------------------------------------------------------------


def _template(bos: str | None, bos_id: int | None, eos: str | None = None, eos_id: int | None = None):
    """``<bos> $A [<eos>]`` (pairs: ``<bos> $A [<eos>] <bos> $B:1 [<eos>:1]``), or None when neither is added."""
    from tokenizers import processors

    if bos is None and eos is None:
        return None
    head = f"{bos} " if bos is not None else ""
    tail_a = f" {eos}" if eos is not None else ""
    tail_b = f" {eos}:1" if eos is not None else ""
    head_b = f"{bos}:1 " if bos is not None else ""
    special = [(t, int(i)) for t, i in ((bos, bos_id), (eos, eos_id)) if t is not None]
    return processors.TemplateProcessing(
        single=f"{head}$A{tail_a}", pair=f"{head}$A{tail_a} {head_b}$B:1{tail_b}", special_tokens=special
    )


# llama.cpp's ``tokenizer.ggml.pre`` names that select LLAMA_VOCAB_PRE_TYPE_GEMMA4 (src/llama-vocab.cpp):
# SentencePiece-style BPE with spaces escaped to "▁", a newline split and raw UTF-8 symbols.
# convert_hf_to_gguf.py names the pre-tokenizer by hashing the tokenizer's ids for a check text:
# Gemma 3's vocabulary hashes to the entry of a Gemma 3-based model, "granite-embed-multi-311m".
GEMMA_BPE_PRE_TOKENIZERS = ("gemma4", "granite-embed-multi-311m")


def _check_vocab(meta: TokenizerMetadata) -> tuple[list[str], list[int]]:
    if not meta.tokens:
        raise TokenizerError("GGUF has no tokenizer.ggml.tokens")
    names = meta.tokens
    if len(set(names)) != len(names):
        raise TokenizerError("GGUF vocabulary has duplicate pieces")
    return names, meta.token_types.tolist()


def _name_of(names: list[str], i: int | None) -> str | None:
    return names[i] if i is not None and 0 <= i < len(names) else None


def _add_file_tokens(tok, names: list[str], types: list[int]) -> None:
    """Control/unknown pieces as special added tokens, user-defined ones as plain added tokens."""
    from tokenizers import AddedToken

    special, plain = [], []
    for name, ty in zip(names, types):
        if ty in (TOKEN_CONTROL, TOKEN_UNKNOWN):
            special.append(AddedToken(name, special=True, normalized=False))
        elif ty == TOKEN_USER_DEFINED:
            # matched whole in the raw text, as llama.cpp does even when it does not parse control
            # tokens. The space runs keep the file's spelling ("  ", not "▁▁"): matched before " " ->
            # "▁", a literal "▁" in the text cannot take part in them, exactly as in llama.cpp.
            plain.append(AddedToken(name, special=False, normalized=False))
    if special:
        tok.add_special_tokens(special)
    if plain:
        tok.add_tokens(plain)


def _spm_decoder():
    from tokenizers import decoders

    return decoders.Sequence([decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])


def _build_spm_tokenizer(meta: TokenizerMetadata):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    if meta.add_space_prefix:
        raise TokenizerError(
            "GGUF tokenizer has add_space_prefix=true (a SentencePiece dummy prefix); Gemma 3 has none "
            "and this converter supports only that"
        )
    names, types = _check_vocab(meta)
    merges = derive_merges(names, meta.scores)
    unk = _name_of(names, meta.unk_id)
    model = models.BPE(
        vocab={name: i for i, name in enumerate(names)},
        merges=merges,
        unk_token=unk,
        fuse_unk=True,
        byte_fallback=any(ty == TOKEN_BYTE for ty in types),
    )
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Replace(" ", SPM_SPACE)
    tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")  # a no-op, as in Google's file
    tok.decoder = _spm_decoder()
    _add_file_tokens(tok, names, types)

    add_bos = True if meta.add_bos is None else meta.add_bos
    post = _template(
        _name_of(names, meta.bos_id) if add_bos else None,
        meta.bos_id,
        _name_of(names, meta.eos_id) if meta.add_eos else None,
        meta.eos_id,
    )
    if post is not None:
        tok.post_processor = post
    return tok


def parse_merges(merges: list[str], vocab: Mapping[str, int]) -> list[tuple[str, str]]:
    """``tokenizer.ggml.merges`` as ``(left, right)`` pairs, read as llama.cpp reads them.

    Each entry is split at its first space after the first character; the first occurrence of a pair
    keeps its rank. Pairs whose halves are not both pieces can never be formed from pieces and are
    dropped (convert_hf_to_gguf.py writes the spaces inside Gemma's space-run pieces as "Ġ", giving
    such entries; llama.cpp never matches them either, since it escapes spaces to "▁" first). A pair
    of pieces whose join is not a piece is refused: llama.cpp would merge it and then spell the
    result as bytes, which a ``tokenizers`` BPE model cannot express.
    """
    out: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for word in merges:
        pos = word.find(" ", 1)
        if pos < 0:
            continue
        pair = (word[:pos], word[pos + 1 :])
        if pair in seen or pair[0] not in vocab or pair[1] not in vocab:
            continue
        if pair[0] + pair[1] not in vocab:
            raise TokenizerError(f"GGUF merge {word!r} joins two pieces into {pair[0] + pair[1]!r}, which is not a piece")
        seen.add(pair)
        out.append(pair)
    return out


def _build_bpe_tokenizer(meta: TokenizerMetadata):
    """llama.cpp's BPE tokenizer (``tokenizer.ggml.model = "gpt2"``) for the Gemma-style pre-tokenizers."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

    if meta.pre not in GEMMA_BPE_PRE_TOKENIZERS:
        raise TokenizerError(
            f"unsupported pre-tokenizer tokenizer.ggml.pre={meta.pre!r} for a 'gpt2' (BPE) GGUF tokenizer: "
            f"only {', '.join(repr(p) for p in GEMMA_BPE_PRE_TOKENIZERS)} (what llama.cpp's converter writes for "
            "Gemma tokenizers) can be converted"
        )
    if not meta.merges:
        raise TokenizerError("GGUF tokenizer of type 'gpt2' has no tokenizer.ggml.merges")
    names, types = _check_vocab(meta)
    vocab = {name: i for i, name in enumerate(names)}
    merges = parse_merges(meta.merges, vocab)
    model = models.BPE(
        vocab=vocab,
        merges=merges,
        unk_token=None,  # llama.cpp drops bytes that have no <0xNN> piece; it never emits <unk> here
        byte_fallback=any(f"<0x{b:02X}>" in vocab for b in range(256)),
    )
    tok = Tokenizer(model)
    # llama.cpp: escape spaces as "▁", then its regex "[^\n]+|[\n]+" cuts the text into words.
    # (llama.cpp also takes a whole-newline word as one piece when it is in the vocabulary; in Gemma
    # vocabularies every newline run is a user-defined token, split off before this point.)
    tok.normalizer = normalizers.Replace(" ", SPM_SPACE)
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("\n+"), "isolated")
    tok.decoder = _spm_decoder()
    _add_file_tokens(tok, names, types)
    # llama.cpp forces add_bos for this pre-tokenizer, whatever the file says (a Gemma 4 workaround)
    post = _template(_name_of(names, meta.bos_id), meta.bos_id,
                     _name_of(names, meta.eos_id) if meta.add_eos else None, meta.eos_id)
    if post is not None:
        tok.post_processor = post
    return tok


def _build_tokenizer(meta: TokenizerMetadata):
    if meta.model == "llama":
        return _build_spm_tokenizer(meta)
    if meta.model == "gpt2":
        return _build_bpe_tokenizer(meta)
    raise TokenizerError(
        f"unsupported GGUF tokenizer model tokenizer.ggml.model={meta.model!r}: only 'llama' "
        "(SentencePiece, as in Gemma 3 GGUFs) and 'gpt2' (BPE with merges, as llama.cpp's "
        "convert_hf_to_gguf.py writes for Gemma 3 folders without tokenizer.model) can be converted"
    )


def tokenizer_from_gguf(reader):
    """A ``tokenizers.Tokenizer`` equivalent to Google's Gemma 3 ``tokenizer.json``, built from GGUF
    metadata.

    ``reader``: a ``gguf.GGUFReader``, a path to a ``.gguf`` file (read faster), a mapping of the
    ``tokenizer.*`` metadata keys, or a :class:`TokenizerMetadata`.

    ``encode(text)`` adds ``<bos>`` when the file says ``add_bos_token`` (Gemma 3 does);
    ``encode(text, add_special_tokens=False)`` does not. Control tokens written in the text, like
    ``<start_of_turn>``, become their ids (llama.cpp's ``parse_special=True``); setting
    ``tokenizer.encode_special_tokens = True`` splits them as text instead (``parse_special=False``).

    ``tokenizer.ggml.model = "llama"`` (SentencePiece) gets merges derived from the scores;
    ``"gpt2"`` (BPE) uses the file's ``tokenizer.ggml.merges`` with llama.cpp's Gemma pre-tokenizer
    (``tokenizer.ggml.pre`` one of :data:`GEMMA_BPE_PRE_TOKENIZERS`). Anything else raises
    ``ValueError``.
    """
    meta = read_tokenizer_metadata(reader)
    if isinstance(reader, (str, os.PathLike)) or hasattr(reader, "fields"):  # errors name the file
        where = reader if not hasattr(reader, "fields") else getattr(reader, "path", None) or getattr(
            getattr(reader, "data", None), "filename", "GGUF")
        return _named(where, lambda: _build_tokenizer(meta))
    return _build_tokenizer(meta)


def special_token_ids(reader) -> dict[str, int | None]:
    """``{"bos_id", "eos_id", "pad_id", "unk_id"}`` from the GGUF metadata (None where absent), the
    keyword arguments of :func:`write_tokenizer_files`."""
    meta = read_tokenizer_metadata(reader)
    return {"bos_id": meta.bos_id, "eos_id": meta.eos_id, "pad_id": meta.pad_id, "unk_id": meta.unk_id}


def eos_token_ids(tokenizer, eos_id: int | None = None) -> list[int]:
    """The ids generation should stop on for Gemma 3 chat: ``<eos>`` and ``<end_of_turn>`` ([1, 106]).

    ``tokenizer``: a ``tokenizers.Tokenizer``, a transformers tokenizer or an mlx-lm
    ``TokenizerWrapper``. ``eos_id`` defaults to the id of ``<eos>``. Write the result to
    ``config.json`` as ``"eos_token_id"`` (a list): ``mlx_lm.load`` reads its stop ids from there.
    """
    vocab = tokenizer.get_vocab()
    ids = []
    for i in (eos_id if eos_id is not None else vocab.get("<eos>"), vocab.get(END_OF_TURN)):
        if i is not None and int(i) not in ids:
            ids.append(int(i))
    return ids


# ----------------------------------------------------------------------------------------------
# Writing the Hugging Face files
# ----------------------------------------------------------------------------------------------


def _token_str(tokenizer, i: int | None) -> str | None:
    return None if i is None else tokenizer.id_to_token(int(i))


def write_tokenizer_files(
    out_dir: str | os.PathLike,
    tokenizer,
    *,
    bos_id: int | None,
    eos_id: int | None,
    pad_id: int | None,
    unk_id: int | None,
    add_bos: bool = True,
    chat_template: str | None = GEMMA3_CHAT_TEMPLATE,
) -> Path:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` to
    ``out_dir`` (created if needed; no ``generation_config.json``).

    The folder loads offline, without SentencePiece files, with ``transformers.AutoTokenizer`` and
    ``mlx_lm``'s tokenizer loader, giving the ids of ``tokenizer`` (``<bos>`` first when
    ``add_bos``). ``tokenizer`` is a ``tokenizers.Tokenizer`` (e.g. from :func:`tokenizer_from_gguf`).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bos, eos, pad, unk = (_token_str(tokenizer, i) for i in (bos_id, eos_id, pad_id, unk_id))

    # The BOS template follows ``add_bos``; the caller's tokenizer gets its own back afterwards.
    previous = tokenizer.post_processor
    tokenizer.post_processor = _template(bos if add_bos else None, bos_id)
    try:
        tokenizer.save(str(out / "tokenizer.json"), pretty=False)
    finally:
        tokenizer.post_processor = previous

    def entry(s):
        return {"content": s, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}

    special_map = {k: entry(v) for k, v in (("bos_token", bos), ("eos_token", eos), ("pad_token", pad), ("unk_token", unk)) if v}
    config: dict[str, Any] = {
        "add_bos_token": bool(add_bos),
        "add_eos_token": False,
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": pad,
        "unk_token": unk,
        "clean_up_tokenization_spaces": False,
        "padding_side": "left",
        "spaces_between_special_tokens": False,
        "tokenizer_class": "GemmaTokenizer",
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    config = {k: v for k, v in config.items() if v is not None}
    with open(out / "tokenizer_config.json", "w", encoding="utf-8") as fh:
        json.dump(config, fh, ensure_ascii=False, indent=2)
    with open(out / "special_tokens_map.json", "w", encoding="utf-8") as fh:
        json.dump(special_map, fh, ensure_ascii=False, indent=2)
    return out
