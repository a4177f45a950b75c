"""Read a Gemma 3 GGUF (llama.cpp's format) into Hugging Face names, config and exact MLX tensors.

Undoes llama.cpp's weight transforms: its converter stores every Gemma ``*norm.weight`` as w + 1
(for a plain RMSNorm kernel); we subtract 1 in float32 so the model sees the Hugging Face values.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterator

import gguf
import numpy as np

from ..model.config import TextConfig, default_layer_types
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


def hf_name(gguf_name: str) -> str:
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    m = _BLK.match(gguf_name)
    if not m or m.group(2) not in _BLOCK_NAMES:
        raise GGUFError(f"unexpected tensor {gguf_name!r} in a Gemma 3 GGUF")
    return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.weight"


def read_gguf(path: str | os.PathLike, error: type[ValueError] = None) -> gguf.GGUFReader:
    """Open a GGUF with gguf-py, refusing missing, non-GGUF, corrupt or truncated files with ``error``."""
    error = error or GGUFError
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such file")
    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise error(f"{path}: not a GGUF file (bad magic)")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # gguf-py raises assorted errors on truncated/corrupt files
        raise error(f"{path}: corrupt or truncated GGUF ({type(e).__name__}: {e})") from None
    size = path.stat().st_size
    for t in reader.tensors:
        if int(t.data_offset) + int(t.n_bytes) > size:
            raise error(f"{path}: truncated GGUF (tensor {t.name} runs past the end of the file)")
    return reader


def open_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
    """Open and sanity-check a GGUF: readable, complete, and a Gemma 3 text model."""
    reader = read_gguf(path)
    arch = field(reader, "general.architecture")
    if arch != "gemma3":
        raise GGUFError(f"{path}: architecture {arch!r} is not Gemma 3 (expected 'gemma3')")
    return reader


def field(reader: gguf.GGUFReader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    return v


def config_from_gguf(reader: gguf.GGUFReader) -> TextConfig:
    """The Hugging Face text config implied by llama.cpp's gemma3 metadata and its hard-coded facts."""
    a = "gemma3"

    def need(key):
        v = field(reader, f"{a}.{key}")
        if v is None:
            raise GGUFError(f"GGUF metadata lacks {a}.{key}")
        return v

    n_layers = int(need("block_count"))
    hidden = int(need("embedding_length"))
    heads = int(need("attention.head_count"))
    head_dim = int(field(reader, f"{a}.attention.key_length", hidden // heads))
    names = {t.name for t in reader.tensors}
    emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
    vocab = int(emb.shape[1])
    # llama.cpp: 27B (62 layers) scales queries by (hidden/heads)^-0.5, other sizes by head_dim^-0.5
    qpas = hidden // heads if n_layers == 62 else head_dim
    rope_scaling = None
    st = field(reader, f"{a}.rope.scaling.type")
    if st and st != "none":
        rope_scaling = {"rope_type": st, "factor": float(field(reader, f"{a}.rope.scaling.factor"))}
    return TextConfig(
        hidden_size=hidden,
        num_hidden_layers=n_layers,
        intermediate_size=int(need("feed_forward_length")),
        num_attention_heads=heads,
        num_key_value_heads=int(field(reader, f"{a}.attention.head_count_kv", heads)),
        head_dim=head_dim,
        vocab_size=vocab,
        rms_norm_eps=float(field(reader, f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(field(reader, f"{a}.rope.freq_base", 1e6)),
        rope_local_base_freq=10_000.0,  # not in GGUF; llama.cpp hard-codes it for gemma3
        rope_scaling=rope_scaling,
        query_pre_attn_scalar=float(qpas),
        sliding_window=int(field(reader, f"{a}.attention.sliding_window", 512)),
        layer_types=default_layer_types(n_layers, 6),
        max_position_embeddings=int(field(reader, f"{a}.context_length", 32768)),
        tie_word_embeddings="output.weight" not in names,
    )


def iter_tensors(
    reader: gguf.GGUFReader, *, q6k: str = "int8", dequantize: bool = False
) -> Iterator[tuple[str, MLXTensor]]:
    """Yield (hf_name, MLXTensor) for every tensor; norms get llama.cpp's +1 removed.

    ``dequantize`` gives every tensor as dense float32 (gguf-py's values exactly): the Hugging Face
    form of the checkpoint, for tools that want floats (mlx_lm.convert, transformers).
    """
    for t in reader.tensors:
        name = hf_name(t.name)
        shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists dims fastest-first
        if len(shape) == 2 and shape[0] == 1 and t.name.endswith("norm.weight"):
            shape = shape[1:]
        mt = ggml_to_mlx(np.asarray(t.data), t.tensor_type, shape, q6k="float32" if dequantize else q6k, name=t.name)
        if dequantize and mt.quantized:
            mt = MLXTensor(mt.dequantize(), None, None, None, None, mt.exact, mt.source_type)
        if name.endswith("norm.weight"):
            if mt.quantized:
                raise GGUFError(f"{t.name}: quantized norm weights are not supported")
            w = np.asarray(mt.weight, dtype=np.float32).reshape(-1) - np.float32(1.0)
            mt = MLXTensor(w, None, None, None, None, mt.exact, mt.source_type)
        yield name, mt
