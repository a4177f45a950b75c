"""Write tiny Gemma 3 GGUF files (as llama.cpp lays them out) from the tiny Hugging Face fixture.

Used by the tests for the GGUF route end to end (Q4_0 linears with an F16 embedding, as in Google's
QAT files, and the other simple block types), and to make broken files for the error tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np

FIX = Path(__file__).parent / "fixtures"
TINY = FIX / "tiny_gemma3"

_GGUF_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def tiny_float_weights(source: Path = TINY) -> dict[str, np.ndarray]:
    """Text weights of a fixture folder, HF text names (a multimodal folder's language model too)."""
    w = mx.load(str(source / "model.safetensors"))
    out = {}
    for k, v in w.items():
        if k.startswith("language_model."):
            k = k[len("language_model.") :]
        elif not k.startswith("model."):
            continue
        out[k] = np.array(v.astype(mx.float32))
    return out


def gguf_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    parts = hf.split(".")  # model.layers.N.<module...>.weight
    return f"blk.{parts[2]}.{_GGUF_NAMES['.'.join(parts[3:-1])]}.weight"


def write_tiny_gguf(path: Path, linear_type=gguf.GGMLQuantizationType.Q4_0,
                    embed_type=gguf.GGMLQuantizationType.F16, arch: str = "gemma3",
                    override: dict | None = None, source: Path = TINY) -> dict[str, np.ndarray]:
    """Write a tiny model's text part as a GGUF; returns the float weights gguf-py reads back (HF names)."""
    cfg = json.loads((source / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    vocab = json.loads((source / "tokenizer.json").read_text())["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    types = [3 if t.startswith("<") and not t.startswith("<0x") else 6 if t.startswith("<0x") else 1 for t in tokens]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(1e6)
    w.add_sliding_window(cfg["sliding_window"])
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores([0.0 if ty != 1 else -float(i) for i, ty in enumerate(types)])
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(False)
    expected = {}
    for hf, a in tiny_float_weights(source).items():
        name = gguf_name(hf)
        if name.endswith("norm.weight"):
            qt, data = gguf.GGMLQuantizationType.F32, a + np.float32(1.0)  # llama.cpp stores 1 + w
        else:
            qt = embed_type if name == "token_embd.weight" else linear_type
            qt = (override or {}).get(name, qt)
            if qt == gguf.GGMLQuantizationType.F32:
                data = a
            else:
                try:
                    data = gguf.quants.quantize(a, qt)
                except NotImplementedError:  # gguf-py cannot make this type: raw blocks of random bytes
                    bs, ts = gguf.GGML_QUANT_SIZES[qt]
                    data = np.random.default_rng(0).integers(0, 256, (a.shape[0], a.shape[1] // bs * ts), np.uint8)
        if name.endswith("norm.weight"):
            expected[hf] = (data - np.float32(1.0)).astype(np.float32)
        else:
            try:
                expected[hf] = gguf.quants.dequantize(data, qt).reshape(a.shape)
            except NotImplementedError:
                expected[hf] = None
        w.add_tensor(name, data, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected
