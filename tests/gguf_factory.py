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
    _add_tokenizer(w, source)
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


def _add_tokenizer(w: gguf.GGUFWriter, source: Path) -> None:
    """The fixture's vocabulary as llama.cpp and Ollama write a SentencePiece one (model "llama")."""
    vocab = json.loads((source / "tokenizer.json").read_text())["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    types = [3 if t.startswith("<") and not t.startswith("<0x") else 6 if t.startswith("<0x") else 1 for t in tokens]
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


# Ollama's converter for Gemma 3 (ollama/ollama convert/convert_gemma3.go, Replacements()): a Go
# strings.NewReplacer over the published checkpoint's names, in this order.
OLLAMA_GEMMA3_REPLACEMENTS = [
    ("lm_head", "output"), ("model.embed_tokens", "token_embd"), ("model.norm", "output_norm"),
    ("vision_tower.vision_model.embeddings", "v"), ("vision_tower.vision_model", "v"),
    ("vision_model.vision_model.embeddings", "v"), ("vision_model.vision_model", "v"),
    ("language_model.", ""), ("model.layers", "blk"), ("encoder.layers", "blk"),
    ("input_layernorm", "attn_norm"), ("self_attn.q_proj", "attn_q"), ("self_attn.q_norm", "attn_q_norm"),
    ("self_attn.k_proj", "attn_k"), ("self_attn.k_norm", "attn_k_norm"), ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"), ("self_attn.out_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"),
    ("mlp.down_proj", "ffn_down"), ("mlp.up_proj", "ffn_up"), ("post_attention_layernorm", "post_attention_norm"),
    ("pre_feedforward_layernorm", "ffn_norm"), ("post_feedforward_layernorm", "post_ffw_norm"),
    ("input_projection_weight", "input_projection.weight"), ("multi_modal_projector", "mm"),
]


def go_replace(name: str, pairs=OLLAMA_GEMMA3_REPLACEMENTS) -> str:
    """Go's strings.NewReplacer: left to right, at each position the first pair (in argument order) whose old
    string starts there is replaced, and scanning resumes after it (no rescans, no overlaps)."""
    out, i = [], 0
    while i < len(name):
        for old, new in pairs:
            if name.startswith(old, i):
                out.append(new)
                i += len(old)
                break
        else:
            out.append(name[i])
            i += 1
    return "".join(out)


def write_ollama_gguf(path: Path, source: Path = FIX / "tiny_gemma3_vlm", vision_type=gguf.GGMLQuantizationType.F16,
                      tokens_per_image: int | None = None) -> None:
    """Ollama's one-file Gemma 3 vision GGUF, as its converter writes one from a Gemma3ForConditionalGeneration
    checkpoint: the published names through its replacement table, + 1 on every ``*_norm.weight`` outside
    ``v.``, one-dim tensors F32 and the others F16 (the text at F32 here, to compare with llama.cpp's pair), and
    only the metadata keys of its multimodal branch (no rms eps, rope bases or rope scaling)."""
    cfg = json.loads((source / "config.json").read_text())
    t, v = cfg["text_config"], cfg["vision_config"]
    w = gguf.GGUFWriter(str(path), "gemma3")
    for key, value in {"block_count": t["num_hidden_layers"], "attention.head_count": t["num_attention_heads"],
                       "attention.head_count_kv": t["num_key_value_heads"],
                       "context_length": t["max_position_embeddings"], "embedding_length": t["hidden_size"],
                       "feed_forward_length": t["intermediate_size"], "attention.sliding_window": t["sliding_window"],
                       "vision.block_count": v["num_hidden_layers"], "vision.embedding_length": v["hidden_size"],
                       "vision.feed_forward_length": v["intermediate_size"], "vision.image_size": v["image_size"],
                       "vision.patch_size": v["patch_size"], "vision.num_channels": 3,
                       "vision.attention.head_count": v["num_attention_heads"],
                       "attention.key_length": t["head_dim"], "attention.value_length": t["head_dim"],
                       "mm.tokens_per_image": tokens_per_image or cfg["mm_tokens_per_image"]}.items():
        w.add_uint32(f"gemma3.{key}", value)
    w.add_float32("gemma3.vision.attention.layer_norm_epsilon", v["layer_norm_eps"])
    _add_tokenizer(w, source)
    weights = mx.load(str(source / "model.safetensors"))
    for hf in sorted(weights):
        name = go_replace(hf.replace("vision_tower.", "vision_tower.vision_model.", 1))  # as published
        a = np.array(weights[hf].astype(mx.float32))
        if not name.startswith("v.") and name.endswith("_norm.weight"):
            a = a + np.float32(1.0)
        qt = gguf.GGMLQuantizationType.F32 if a.ndim == 1 or not name.startswith(("v.", "mm.")) else vision_type
        w.add_tensor(name, a if qt == gguf.GGMLQuantizationType.F32 else a.astype(np.float16), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
