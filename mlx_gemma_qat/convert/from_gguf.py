"""Read a Gemma 3 GGUF (llama.cpp's format) into Hugging Face names, config and exact MLX tensors.

Undoes llama.cpp's weight transforms: its converter stores every Gemma ``*norm.weight`` as w + 1
(for a plain RMSNorm kernel); we subtract 1 in float32 so the model sees the Hugging Face values.

Ollama's own converter writes the same text names and the same + 1, with fewer metadata keys: for a
vision model it writes no ``rope.freq_base``, ``layer_norm_rms_epsilon`` nor ``rope.scaling.*``, and it puts
the vision tower in the same file (``v.*`` and ``mm.*`` tensors, read by :mod:`.from_mmproj`; this module
reads the text tensors only). Missing keys take Gemma 3's values, as Ollama's runner does: rms eps 1e-6,
rope bases 1e6 (global) and 1e4 (local), and linear rope scaling by 8 on the global layers of the 34-, 48-
and 62-layer models (4B, 12B, 27B: every released one has it in its Hugging Face config).
``attention.sliding_window_pattern`` (Ollama's per-layer booleans, true = sliding) gives the layer types
where present; otherwise every sixth layer is global.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from pathlib import Path
from typing import Iterator

import gguf
import numpy as np

from ..model.config import TextConfig, default_layer_types
from .gguf_check import check_gguf
from .grids import MLXTensor, ggml_to_mlx


class GGUFError(ValueError):
    """A file that is not a readable Gemma 3 GGUF."""


_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.weight$")
VISION_PREFIXES = ("v.", "mm.")  # Ollama's one-file layout: the vision tower and projector beside the text
_ROPE_SCALED_LAYERS = (34, 48, 62)  # Gemma 3 4B, 12B, 27B: linear rope scaling by 8 on the global layers


def is_text_tensor(name: str) -> bool:
    return not name.startswith(VISION_PREFIXES)


def has_embedded_vision(reader: gguf.GGUFReader) -> bool:
    """Whether the GGUF holds a vision tower beside the text model (Ollama's own gemma3 files)."""
    return any(not is_text_tensor(t.name) for t in reader.tensors)


def is_ours(e: BaseException) -> bool:
    """An error this package raised on purpose (its own ValueError/OSError subclasses)."""
    return isinstance(e, (ValueError, OSError)) and (type(e).__module__ or "").startswith("mlx_gemma_qat")


@contextlib.contextmanager
def reading(path, error: type[ValueError] | None = None):
    """Errors while reading ``path`` name it: this package's own get the path in front when they lack it, and
    whatever a corrupt file still makes gguf-py, numpy or the converters raise becomes ``error``. MemoryError
    is left alone: the readers check sizes up front, so one would be a bug to see, not hide."""
    try:
        yield
    except MemoryError:
        raise
    except Exception as e:
        if is_ours(e):
            if str(path) in str(e) or type(e).__module__.endswith(".writer"):  # named, or about OUT, not the source
                raise
            try:
                named = type(e)(f"{path}: {e}")
            except Exception:  # an error class with other arguments
                named = (error or GGUFError)(f"{path}: {e}")
            raise named from None
        raise (error or GGUFError)(f"{path}: corrupt or malformed file ({type(e).__name__}: {e})") from None


def guarded(it: Iterator, path, error: type[ValueError] | None = None) -> Iterator:
    """``it``, with :func:`reading` around each step (for iterators consumed elsewhere)."""
    while True:
        with reading(path, error):
            try:
                item = next(it)
            except StopIteration:
                return
        yield item


def hf_name(gguf_name: str) -> str:
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    m = _BLK.match(gguf_name)
    if not m or m.group(2) not in _BLOCK_NAMES:
        raise GGUFError(f"unexpected tensor {gguf_name!r} in a Gemma 3 GGUF")
    return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.weight"


class _Reader(gguf.GGUFReader):
    """gguf-py's reader, over a plain ndarray view of its memory map instead of the ``np.memmap`` itself.

    Everything it parses is the same (tested against gguf-py's own reader), but each of the million small
    slices a 262,144-token vocabulary makes skips ``np.memmap``'s per-slice bookkeeping: opening the 270M's
    GGUF takes ~8 s instead of ~22 s. The tensors' ``data`` are the same lazy views of the mapped file."""

    @property
    def data(self) -> np.ndarray:
        return self._plain

    @data.setter
    def data(self, value: np.ndarray) -> None:  # gguf-py's __init__ assigns its np.memmap here
        self.memmap = value  # keeps the map, and its file name, reachable
        self._plain = value.view(np.ndarray)


def read_gguf(path: str | os.PathLike, error: type[ValueError] = None) -> gguf.GGUFReader:
    """Open a GGUF with gguf-py, refusing missing, non-GGUF, corrupt or truncated files with ``error``.

    The header is walked and checked against the file's size first (:func:`.gguf_check.check_gguf`), so
    gguf-py only ever parses a header whose counts, lengths, dims, types and offsets are consistent.
    The reader gets ``path`` and ``layout`` (the checked :class:`.gguf_check.GGUFLayout`) attributes.
    """
    error = error or GGUFError
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such file")
    layout = check_gguf(path, error)
    try:
        reader = _Reader(str(path))
    except MemoryError:
        raise
    except Exception as e:  # the check above leaves gguf-py little to trip on; anything it still raises
        raise error(f"{path}: corrupt GGUF, gguf-py cannot read it ({type(e).__name__}: {e})") from None
    reader.path, reader.layout = path, layout
    return reader


def open_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
    """Open and sanity-check a GGUF: readable, complete, and a Gemma 3 text model."""
    reader = read_gguf(path)
    arch = meta(reader, "general.architecture", str)
    if arch != "gemma3":
        raise GGUFError(f"{path}: architecture {arch!r} is not Gemma 3 (expected 'gemma3')")
    return reader


def field(reader: gguf.GGUFReader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    return v


_INTS = {gguf.GGUFValueType.UINT8, gguf.GGUFValueType.INT8, gguf.GGUFValueType.UINT16, gguf.GGUFValueType.INT16,
         gguf.GGUFValueType.UINT32, gguf.GGUFValueType.INT32, gguf.GGUFValueType.UINT64, gguf.GGUFValueType.INT64}
_FLOATS = {gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.FLOAT64}
_KINDS = {int: _INTS, float: _INTS | _FLOATS, str: {gguf.GGUFValueType.STRING}, bool: {gguf.GGUFValueType.BOOL}}


def where(reader) -> str:
    """The reader's file, for messages."""
    return str(getattr(reader, "path", None) or getattr(getattr(reader, "data", None), "filename", None) or "GGUF")


def meta(reader: gguf.GGUFReader, key: str, kind: type, default=None, error: type[ValueError] | None = None):
    """A scalar metadata value of the given kind (int, float, str, bool), or ``default`` when absent.

    A value of another GGUF type (an array, a string where a number belongs) is refused with ``error``
    (default :class:`GGUFError`) naming the file and the key; floats must be finite.
    """
    f = reader.fields.get(key)
    if f is None:
        return default
    if len(f.types) != 1 or f.types[0] not in _KINDS[kind]:
        got = "/".join(t.name for t in f.types) or "?"
        raise (error or GGUFError)(f"{where(reader)}: metadata {key} has type {got}, expected {kind.__name__}")
    if kind is str:
        try:
            return bytes(f.parts[f.data[0]]).decode("utf-8")
        except UnicodeDecodeError:
            raise (error or GGUFError)(f"{where(reader)}: metadata {key} is not UTF-8 text") from None
    v = f.parts[f.data[0]][0]
    v = kind(v.item() if hasattr(v, "item") else v)
    if kind is float and not math.isfinite(v):
        raise (error or GGUFError)(f"{where(reader)}: metadata {key} = {v} is not a finite number")
    return v


_MAX_DIM = 2**31 - 1  # MLX shapes are int32


def config_from_gguf(reader: gguf.GGUFReader) -> TextConfig:
    """The Hugging Face text config implied by llama.cpp's gemma3 metadata and its hard-coded facts.

    Every value is checked before use: numbers of the right type and range, and every tensor's shape equal
    to what the config implies (so nothing sized from the metadata can exceed what the file holds).
    """
    a = "gemma3"
    path = where(reader)

    def bad(msg):
        return GGUFError(f"{path}: {msg}")

    def get(key, kind=int, default=None, lo=1, hi=_MAX_DIM):
        v = meta(reader, f"{a}.{key}", kind, default)
        if v is None:
            raise bad(f"GGUF metadata lacks {a}.{key}")
        if not lo <= v <= hi:
            raise bad(f"metadata {a}.{key} = {v} is out of range [{lo}, {hi}]")
        return v

    n_layers = get("block_count")
    hidden = get("embedding_length")
    heads = get("attention.head_count")
    kv_heads = get("attention.head_count_kv", default=heads)
    if heads % kv_heads:
        raise bad(f"attention.head_count {heads} is not a multiple of attention.head_count_kv {kv_heads}")
    head_dim = get("attention.key_length", default=max(1, hidden // heads))
    inter = get("feed_forward_length")
    tensors = {t.name: t for t in reader.tensors if is_text_tensor(t.name)}
    emb = tensors.get("token_embd.weight")
    if emb is None:
        raise bad("no token_embd.weight tensor")
    if len(emb.shape) != 2:
        raise bad(f"token_embd.weight has {len(emb.shape)} dims, expected 2")
    vocab = int(emb.shape[1])
    blocks = {int(m.group(1)) for n in tensors if (m := _BLK.match(n))}
    if blocks != set(range(n_layers)):
        have = f"{len(blocks)} blocks ({min(blocks)}..{max(blocks)})" if blocks else "none"
        raise bad(f"block_count is {n_layers} but the tensors are for {have}")
    q, kv = heads * head_dim, kv_heads * head_dim
    shapes = {"attn_q": (q, hidden), "attn_k": (kv, hidden), "attn_v": (kv, hidden), "attn_output": (hidden, q),
              "attn_q_norm": (head_dim,), "attn_k_norm": (head_dim,), "ffn_gate": (inter, hidden),
              "ffn_up": (inter, hidden), "ffn_down": (hidden, inter)}
    for name, t in tensors.items():
        m = _BLK.match(name)
        if name in ("token_embd.weight", "output.weight"):
            want = (vocab, hidden)
        elif name == "output_norm.weight":
            want = (hidden,)
        elif m and m.group(2) in _BLOCK_NAMES:
            want = shapes.get(m.group(2), (hidden,))  # the four layer norms
        else:
            raise bad(f"unexpected tensor {name!r} in a Gemma 3 GGUF")
        shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists dims fastest-first
        if len(want) == 1 and len(shape) == 2 and shape[0] == 1:
            shape = shape[1:]
        if shape != want:
            raise bad(f"tensor {name} has shape {shape}, the metadata implies {want}")
    # llama.cpp: 27B (62 layers) scales queries by (hidden/heads)^-0.5, other sizes by head_dim^-0.5
    qpas = hidden // heads if n_layers == 62 else head_dim
    rope_scaling = None
    st = meta(reader, f"{a}.rope.scaling.type", str)
    if st and st != "none":
        if st != "linear":
            raise bad(f"rope scaling type {st!r} is not supported (none or linear)")
        rope_scaling = {"rope_type": st, "factor": get("rope.scaling.factor", float, lo=1e-6, hi=1e6)}
    elif st is None and n_layers in _ROPE_SCALED_LAYERS:  # Ollama's files omit it (see the module's docstring)
        rope_scaling = {"rope_type": "linear", "factor": 8.0}
    pattern = field(reader, f"{a}.attention.sliding_window_pattern")
    if isinstance(pattern, list) and pattern:
        if len(pattern) != n_layers or not all(isinstance(x, bool) for x in pattern):
            raise bad(f"attention.sliding_window_pattern is not {n_layers} booleans")
        layer_types = ["sliding_attention" if x else "full_attention" for x in pattern]
    else:
        layer_types = default_layer_types(n_layers, 6)
    try:
        return TextConfig(
            hidden_size=hidden,
            num_hidden_layers=n_layers,
            intermediate_size=inter,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            vocab_size=vocab,
            rms_norm_eps=get("attention.layer_norm_rms_epsilon", float, 1e-6, lo=1e-30, hi=1.0),
            rope_theta=get("rope.freq_base", float, 1e6, lo=1e-6, hi=1e30),
            rope_local_base_freq=get("rope.local.freq_base", float, 1e4, lo=1e-6, hi=1e30),  # Ollama's key
            rope_scaling=rope_scaling,
            query_pre_attn_scalar=float(qpas),
            sliding_window=get("attention.sliding_window", int, 512),
            layer_types=layer_types,
            max_position_embeddings=get("context_length", int, 32768),
            tie_word_embeddings="output.weight" not in tensors,
        )
    except ValueError as e:  # model.config's ConfigError
        raise bad(str(e)) from None


def iter_tensors(
    reader: gguf.GGUFReader, *, q6k: str = "int8", dequantize: bool = False
) -> Iterator[tuple[str, MLXTensor]]:
    """Yield (hf_name, MLXTensor) for every tensor; norms get llama.cpp's +1 removed.

    ``dequantize`` gives every tensor as dense float32 (gguf-py's values exactly): the Hugging Face
    form of the checkpoint, for tools that want floats (mlx_lm.convert, transformers).
    """
    for t in reader.tensors:
        if not is_text_tensor(t.name):
            continue
        name = hf_name(t.name)
        shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists dims fastest-first
        if len(shape) == 2 and shape[0] == 1 and t.name.endswith("norm.weight"):
            shape = shape[1:]
        mt = ggml_to_mlx(np.asarray(t.data), t.tensor_type, shape, q6k="float32" if dequantize else q6k, name=t.name)
        if dequantize and mt.quantized:
            mt = MLXTensor(mt.dequantize(), None, None, None, None, mt.exact, mt.source_type)
        if name.endswith("norm.weight"):
            if mt.quantized:
                raise GGUFError(f"{where(reader)}: {t.name}: quantized norm weights are not supported")
            w = np.asarray(mt.weight, dtype=np.float32).reshape(-1) - np.float32(1.0)
            mt = MLXTensor(w, None, None, None, None, mt.exact, mt.source_type)
        yield name, mt
