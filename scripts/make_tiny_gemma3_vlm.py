#!/usr/bin/env python3
"""Make a tiny random Gemma 3 vision-language checkpoint (HF folder), two test images, and the
transformers reference outputs for them.

Writes
  tests/fixtures/images/a.png                  37 wide x 23 high RGB PNG (gradients + noise): upsampled
  tests/fixtures/images/b.jpg                  150 wide x 100 high RGB JPEG (quality 90) stored with
                                               EXIF Orientation = 6 ("rotate 90 degrees clockwise to
                                               display"): upright it is 100 wide x 150 high; both axes
                                               are resampled (150 -> 112 down, 100 -> 112 up)
  tests/fixtures/tiny_gemma3_vlm/              config.json (Gemma3ForConditionalGeneration, transformers 5
                                               form), generation_config.json, model.safetensors (bf16),
                                               preprocessor_config.json (Gemma 3 image processor, 112x112),
                                               processor_config.json (image_seq_length 16),
                                               tokenizer.json + tokenizer_config.json (vocab 512)
  tests/fixtures/tiny_gemma3_vlm_reference.npz reference outputs, computed in float32 from the bf16 weights

Needs torch, transformers 5.x (checked with 5.23.0) and Pillow; torchvision is optional (when it imports,
the torchvision-backend image processor's output is recorded too). The tests that read the fixtures
need none of them.

Model
  text_config: as tests/fixtures/tiny_gemma3 (vocab 512, hidden 64, intermediate 128, 8 layers with
    layer 5 full attention, 2 heads, 1 kv head, head_dim 32, sliding_window 16, query_pre_attn_scalar 32,
    rope 1e6 global / 1e4 local, tied embeddings).
  vision_config (SigLIP): hidden 32, intermediate 40 (not a multiple of 32, like the real 4304), 2 layers,
    2 heads (head_dim 16), image_size 112, patch_size 14 (8x8 patches), layer_norm_eps 1e-6,
    gelu_pytorch_tanh, no attention-pooling head (vision_use_head false, as in Gemma 3).
  mm_tokens_per_image 16 (the 8x8 grid average-pooled with kernel 2 -> 4x4),
  boi_token_index 255, eoi_token_index 256, image_token_index 257 (all inside the vocab).

Tokenizer: the layout of scripts/make_tiny_tokenizer.py (<pad>=0 <eos>=1 <bos>=2 <unk>=3,
  <start_of_turn>=105, <end_of_turn>=106, single characters, byte fallback, <bos> prepended) rebuilt so
  that, as in Google's Gemma 3 tokenizer, "\\n"=107 and "\\n\\n"=108 (a plain added token, matched whole)
  and <start_of_image>=255, <end_of_image>=256 (plain added tokens), <image_soft_token>=257 (special).
  An image therefore expands to the 20 ids [108, 255] + [257]*16 + [256, 108].

Weights are drawn with a fixed seed (not transformers' init): text weights as in make_tiny_gemma3.py;
  vision: patch conv ~ N(0, 1/sqrt(3*14*14)), q/k ~ N(0, 1.5/sqrt(fan_in)), other linears
  ~ N(0, 1/sqrt(fan_in)), every bias ~ N(0, 0.2), position embedding ~ N(0, 0.5), LayerNorm weights
  ~ U(0.5, 1.5) and biases ~ N(0, 0.2); projector mm_soft_emb_norm ~ U(-0.5, 0.5) (a (1+w) RMSNorm),
  mm_input_projection_weight [32, 64] ~ N(0, 3/sqrt(32)) (image features of about the text embeddings'
  size). Cast to bf16 and saved; the references use the bf16 values upcast to float32.

Self-checks: an independent numpy forward (vision tower, projector, text model with the image-aware
masks, written from the definitions) must match transformers; the mask must be bidirectional within
an image (changing a later image token's input changes an earlier image token's logits) and never let
an image see a later image; cached generate() must reproduce the no-cache greedy ids; the prompts built
by hand must equal what transformers' Gemma3Processor builds from the folder.

NPZ keys (all float arrays float32)
  a_uint8 [23,37,3], b_raw_uint8 [100,150,3]      decoded RGB pixels as stored (PIL, no EXIF applied);
                                                  upright b is np.rot90(b_raw_uint8, -1) [150,100,3]
  pixel_values_a, pixel_values_b [3,112,112]      transformers' PIL-backend Gemma 3 image processor
                                                  (Gemma3ImageProcessorPil), b given upright (exif_transpose)
  pixel_values_b_raw [3,112,112]                  the same processor given the PIL image of b.jpg as
                                                  opened (the processor does NOT apply EXIF orientation to
                                                  a PIL image; given a path it does, via load_image)
                                                  PIL backend: u8 = PIL resize((112, 112), BILINEAR) of the
                                                  RGB uint8 image; pv = float32(u8 * (1/255) in float64),
                                                  then (pv - 0.5) / 0.5 in float32, channels first
  tv_pixel_values_b [3,112,112]                   the torchvision backend (class Gemma3ImageProcessor,
                                                  AutoImageProcessor's pick when torchvision is installed)
                                                  for upright b: torch's uint8 antialiased bilinear resize,
                                                  then (u8 - 127.5) / 127.5 in float32; its resize differs
                                                  from PIL's by 1 level on some pixels
  vision_{a,b,b_raw} [64,32]                      vision tower last_hidden_state (after post_layernorm)
  features_{a,b,b_raw} [16,64]                    projector output (image features, what replaces the
                                                  image tokens' embeddings, unscaled)
  p{1,2,3}_ids int32 [T], p{1,2,3}_token_type_ids int32 [T] (1 on image soft tokens),
  p{1,2,3}_images str [n]                          image names in prompt order ("a", "b")
  p{1,2,3}_logits [T,512]                         every position, no cache, eager attention, float32
  p1_gen_ids int32 [8], p1_gen_margins [8]        greedy continuation of prompt 1 (generate() with the
                                                  KV cache and pixel_values; equal to full recomputation)
  decoy_* []                                      max |logit change| of a plausible bug on p2 (p3 for the
                                                  window one): a test's tolerance must be far below them
      decoy_causal_images     image tokens attend causally only (mlx-vlm's behaviour)
      decoy_scaled_images     image features multiplied by sqrt(hidden) like text embeddings
      decoy_exact_gelu        exact erf GELU in the vision tower instead of the tanh form
      decoy_pool_transposed   pooled 4x4 grid read column-major
      decoy_no_exif           b.jpg used as stored (no EXIF transpose)
      decoy_window_le         sliding layers let i see j when i - j <= 16 (off by one), on p3

Prompts (BOS + the Gemma 3 image layout, built by hand from ids and checked against Gemma3Processor)
  p1: "<start_of_image>" + 4 characters (chosen so that the greedy continuation is varied and never
      near a tie)
  p2: "<start_of_image>vs<start_of_image>diff?"   images a then b
  p3: "Here is a tiny photo:" + "<start_of_image>" + "Now?"   the 16 image tokens sit at positions
      24..39, so in sliding layers (window 16) the first image token sees text back to position 9 and
      the last text token sees only the last 10 image tokens.

Usage: python scripts/make_tiny_gemma3_vlm.py
"""

from __future__ import annotations

import json
import math
import string
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
VLM_DIR = FIXTURES / "tiny_gemma3_vlm"
IMG_DIR = FIXTURES / "images"
NPZ_PATH = FIXTURES / "tiny_gemma3_vlm_reference.npz"
SEED = 31337

BOI, EOI, IMAGE_TOKEN = 255, 256, 257
NL, NL2 = 107, 108
MM_TOKENS = 16
N_GEN = 8

TEXT = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=8,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    sliding_window=16,
    query_pre_attn_scalar=32,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    hidden_activation="gelu_pytorch_tanh",
    bos_token_id=2,
    eos_token_id=1,
    pad_token_id=0,
    attn_logit_softcapping=None,
    final_logit_softcapping=None,
    tie_word_embeddings=True,
    rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    },
)
VISION = dict(
    hidden_size=32,
    intermediate_size=40,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_channels=3,
    image_size=112,
    patch_size=14,
    layer_norm_eps=1e-6,
    hidden_act="gelu_pytorch_tanh",
    attention_dropout=0.0,
    vision_use_head=False,
)

OWNED = (
    "config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
    "preprocessor_config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "chat_template.jinja", "chat_template.json",
)


# ----------------------------------------------------------------------------------------------
# tokenizer
def build_tokenizer():
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for i in range(4, 105):
        vocab[f"<unused{i - 4}>"] = i
    vocab["<start_of_turn>"] = 105
    vocab["<end_of_turn>"] = 106
    vocab["\n"] = NL
    vocab["\n\n"] = NL2
    reserved = {BOI: "<start_of_image>", EOI: "<end_of_image>", IMAGE_TOKEN: "<image_soft_token>"}
    pieces = ["\u2581"] + list(string.ascii_letters + string.digits + string.punctuation)
    pieces += [f"<0x{b:02X}>" for b in range(256)]
    nxt = len(vocab)
    for p in pieces:
        while nxt in reserved:
            nxt += 1
        vocab[p] = nxt
        nxt += 1
    for i, t in reserved.items():
        vocab[t] = i
    for i in range(TEXT["vocab_size"]):
        if i not in vocab.values():
            vocab[f"<extra{i}>"] = i
    assert sorted(vocab.values()) == list(range(TEXT["vocab_size"]))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
                            "<image_soft_token>"])
    # as in Google's tokenizer.json: newline runs and the image delimiters are plain added tokens
    tok.add_tokens([AddedToken("\n\n", normalized=False), AddedToken("<start_of_image>", normalized=False),
                    AddedToken("<end_of_image>", normalized=False)])
    tok.add_tokens([t for t in vocab if t.startswith("<extra")])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return tok


def tokenizer_config() -> dict:
    from mlx_gemma_qat.convert.tokenizer import GEMMA3_CHAT_TEMPLATE

    return {
        "tokenizer_class": "GemmaTokenizerFast",
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
        "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>",
        "extra_special_tokens": {
            "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>",
        },
        "add_bos_token": True, "add_eos_token": False, "model_max_length": 256,
        "processor_class": "Gemma3Processor",
        "chat_template": GEMMA3_CHAT_TEMPLATE,
    }


# ----------------------------------------------------------------------------------------------
# images
def make_images() -> None:
    from PIL import Image

    IMG_DIR.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    # a.png: 37 wide x 23 high
    h, w = 23, 37
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    a = np.stack([255 * x / (w - 1), 255 * y / (h - 1), 128 + 100 * np.sin(x / 3.0) * np.cos(y / 4.0)], -1)
    a = a + rng.normal(0, 25, a.shape)
    a[3:9, 4:12] = [250, 20, 30]  # a red block near the top-left corner
    Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "RGB").save(IMG_DIR / "a.png", optimize=True)
    # b.jpg: stored 150 wide x 100 high, EXIF orientation 6
    h, w = 100, 150
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    b = np.stack([200 * (1 - x / (w - 1)) + 30, 60 + 120 * (y / (h - 1)) ** 2, 100 + 80 * np.cos(x / 9.0 + y / 13.0)], -1)
    b = b + rng.normal(0, 12, b.shape)
    b[8:30, 10:50] = [20, 230, 40]  # a green block in the stored top-left corner
    b[70:95, 120:145] = [240, 240, 10]  # a yellow block in the stored bottom-right corner
    img = Image.fromarray(np.clip(np.rint(b), 0, 255).astype(np.uint8), "RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the stored image must be rotated 90 degrees clockwise to display
    img.save(IMG_DIR / "b.jpg", quality=90, exif=exif.tobytes())


# ----------------------------------------------------------------------------------------------
# model
def make_config():
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    return Gemma3Config(
        text_config=Gemma3TextConfig(**TEXT),
        vision_config=SiglipVisionConfig(**VISION),
        mm_tokens_per_image=MM_TOKENS,
        boi_token_index=BOI,
        eoi_token_index=EOI,
        image_token_index=IMAGE_TOKEN,
        tie_word_embeddings=True,
        architectures=["Gemma3ForConditionalGeneration"],
    )


def randomize(model, seed: int) -> list[str]:
    import torch

    g = torch.Generator().manual_seed(seed)

    def randn(shape, std):
        return torch.randn(shape, generator=g) * std

    def unif(shape, lo, hi):
        return torch.rand(shape, generator=g) * (hi - lo) + lo

    done = []
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name == "lm_head.weight":
                continue  # tied to the embedding
            s = p.shape
            if "vision_tower" in name:
                if name.endswith("patch_embedding.weight"):
                    v = randn(s, 1 / math.sqrt(s[1] * s[2] * s[3]))
                elif name.endswith("position_embedding.weight"):
                    v = randn(s, 0.5)
                elif "norm" in name and name.endswith(".weight"):
                    v = unif(s, 0.5, 1.5)
                elif name.endswith(".bias"):
                    v = randn(s, 0.2)
                elif name.endswith(("q_proj.weight", "k_proj.weight")):
                    v = randn(s, 1.5 / math.sqrt(s[1]))
                elif name.endswith(".weight") and p.ndim == 2:
                    v = randn(s, 1 / math.sqrt(s[1]))
                else:
                    raise RuntimeError(f"no rule for {name}")
            elif "multi_modal_projector" in name:
                if name.endswith("mm_soft_emb_norm.weight"):
                    v = unif(s, -0.5, 0.5)
                elif name.endswith("mm_input_projection_weight"):
                    v = randn(s, 3 / math.sqrt(s[0]))
                else:
                    raise RuntimeError(f"no rule for {name}")
            elif name.endswith("embed_tokens.weight"):
                v = randn(s, 0.5)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                v = unif(s, 0.0, 1.5)
            elif name.endswith(("post_attention_layernorm.weight", "post_feedforward_layernorm.weight")):
                v = unif(s, 5.0, 10.0)
            elif "norm" in name:
                v = unif(s, -0.5, 0.5)
            elif p.ndim == 2:
                v = randn(s, 1 / math.sqrt(s[1]))
            else:
                raise RuntimeError(f"no rule for {name}")
            p.copy_(v)
            done.append(name)
    return done


def load_f32(folder: Path, attn: str = "eager"):
    import torch
    from transformers import Gemma3ForConditionalGeneration

    m = Gemma3ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32, attn_implementation=attn)
    return m.eval()


# ----------------------------------------------------------------------------------------------
# independent numpy reference (float64), written from the SigLIP / Gemma 3 definitions
def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def gelu_erf(x):
    from math import erf

    return 0.5 * x * (1 + np.vectorize(erf)(x / math.sqrt(2)))


def np_vision(V: dict, vcfg: dict, pixels: np.ndarray, act=gelu_tanh) -> np.ndarray:
    """pixels [3, S, S] -> last hidden state [(S/p)^2, D]."""
    f = np.float64
    p, D, nh, eps = vcfg["patch_size"], vcfg["hidden_size"], vcfg["num_attention_heads"], vcfg["layer_norm_eps"]
    C, S, _ = pixels.shape
    g = S // p
    # patch (r, c) -> row-major index r * g + c; each patch flattened in (channel, y, x) order like the
    # conv weight [D, C, p, p]
    patches = pixels.astype(f).reshape(C, g, p, g, p).transpose(1, 3, 0, 2, 4).reshape(g * g, C * p * p)
    W = lambda n: V["model.vision_tower." + n].astype(f)  # noqa: E731
    x = patches @ W("embeddings.patch_embedding.weight").reshape(D, -1).T + W("embeddings.patch_embedding.bias")
    x = x + W("embeddings.position_embedding.weight")[np.arange(g * g)]

    def ln(x, w, b):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * w + b

    hd = D // nh
    for L in range(vcfg["num_hidden_layers"]):
        q = lambda n: W(f"encoder.layers.{L}.{n}")  # noqa: E731
        h = ln(x, q("layer_norm1.weight"), q("layer_norm1.bias"))
        qs, ks, vs = (
            (h @ q(f"self_attn.{n}_proj.weight").T + q(f"self_attn.{n}_proj.bias")).reshape(-1, nh, hd).transpose(1, 0, 2)
            for n in "qkv"
        )
        s = qs @ ks.transpose(0, 2, 1) * hd**-0.5
        s = np.exp(s - s.max(-1, keepdims=True))
        a = ((s / s.sum(-1, keepdims=True)) @ vs).transpose(1, 0, 2).reshape(-1, D)
        x = x + a @ q("self_attn.out_proj.weight").T + q("self_attn.out_proj.bias")
        h = ln(x, q("layer_norm2.weight"), q("layer_norm2.bias"))
        h = act(h @ q("mlp.fc1.weight").T + q("mlp.fc1.bias"))
        x = x + h @ q("mlp.fc2.weight").T + q("mlp.fc2.bias")
    return ln(x, W("post_layernorm.weight"), W("post_layernorm.bias"))


def np_project(V: dict, vcfg: dict, hidden: np.ndarray, tokens: int, transposed: bool = False) -> np.ndarray:
    """[g*g, D] -> [tokens, H]: average-pool the g x g patch grid with kernel g/sqrt(tokens), then
    Gemma RMSNorm (1 + w) and a matmul with mm_input_projection_weight [D, H] (no transpose)."""
    f = np.float64
    n, D = hidden.shape
    g, t = int(round(math.sqrt(n))), int(round(math.sqrt(tokens)))
    k = g // t
    grid = hidden.astype(f).reshape(t, k, t, k, D).mean((1, 3))  # [t_row, t_col, D]
    if transposed:
        grid = grid.transpose(1, 0, 2)
    x = grid.reshape(t * t, D)
    w = V["model.multi_modal_projector.mm_soft_emb_norm.weight"].astype(f)
    x = x / np.sqrt((x * x).mean(-1, keepdims=True) + vcfg["layer_norm_eps"]) * (1.0 + w)
    return x @ V["model.multi_modal_projector.mm_input_projection_weight"].astype(f)


def np_masks(ttype: np.ndarray, window: int, causal_images: bool = False, window_le: bool = False):
    """full: causal OR same image; sliding: (i - j < window) AND (causal OR same image).
    Images are the maximal runs of token_type 1."""
    T = len(ttype)
    is_img = ttype == 1
    start = is_img & ~np.concatenate([[False], is_img[:-1]])
    group = np.where(is_img, np.cumsum(start) - 1, -1)
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    causal = j <= i
    same = (group[:, None] == group[None, :]) & (group[:, None] >= 0)
    allowed = causal if causal_images else (causal | same)
    near = (i - j <= window) if window_le else (i - j < window)
    return allowed, allowed & near


def np_text(W: dict, tcfg: dict, embeds: np.ndarray, masks) -> np.ndarray:
    f = np.float64
    H, nh, nkv, hd = tcfg["hidden_size"], tcfg["num_attention_heads"], tcfg["num_key_value_heads"], tcfg["head_dim"]
    eps = tcfg["rms_norm_eps"]
    T = len(embeds)

    def rms(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * (1.0 + w)

    def rope(x, theta):
        inv = 1.0 / theta ** (np.arange(0, hd, 2, dtype=f) / hd)
        ang = np.arange(T, dtype=f)[:, None] * inv[None]
        cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return x * cos + np.concatenate([-x2, x1], -1) * sin

    full, sliding = masks
    x = embeds.astype(f)
    for L, lt in enumerate(tcfg["layer_types"]):
        p = lambda n: W[f"model.language_model.layers.{L}.{n}"].astype(f)  # noqa: E731
        theta = tcfg["rope_parameters"][lt]["rope_theta"]
        h = rms(x, p("input_layernorm.weight"))
        q = (h @ p("self_attn.q_proj.weight").T).reshape(T, nh, hd).transpose(1, 0, 2)
        k = (h @ p("self_attn.k_proj.weight").T).reshape(T, nkv, hd).transpose(1, 0, 2)
        v = (h @ p("self_attn.v_proj.weight").T).reshape(T, nkv, hd).transpose(1, 0, 2)
        q, k = rope(rms(q, p("self_attn.q_norm.weight")), theta), rope(rms(k, p("self_attn.k_norm.weight")), theta)
        k, v = np.repeat(k, nh // nkv, 0), np.repeat(v, nh // nkv, 0)
        s = q @ k.transpose(0, 2, 1) * tcfg["query_pre_attn_scalar"] ** -0.5
        s = np.where((sliding if lt == "sliding_attention" else full)[None], s, -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        a = ((s / s.sum(-1, keepdims=True)) @ v).transpose(1, 0, 2).reshape(T, nh * hd) @ p("self_attn.o_proj.weight").T
        x = x + rms(a, p("post_attention_layernorm.weight"))
        h = rms(x, p("pre_feedforward_layernorm.weight"))
        m = gelu_tanh(h @ p("mlp.gate_proj.weight").T) * (h @ p("mlp.up_proj.weight").T)
        x = x + rms(m @ p("mlp.down_proj.weight").T, p("post_feedforward_layernorm.weight"))
    x = rms(x, W["model.language_model.norm.weight"].astype(f))
    return x @ W["model.language_model.embed_tokens.weight"].astype(f).T


def np_embeds(W: dict, tcfg: dict, ids: np.ndarray, features: list[np.ndarray], image_scale: float = 1.0):
    E = W["model.language_model.embed_tokens.weight"].astype(np.float64)
    x = E[ids] * np.float64(np.float32(math.sqrt(tcfg["hidden_size"])))
    pos = np.flatnonzero(ids == IMAGE_TOKEN)
    x[pos] = np.concatenate(features, 0) * image_scale
    return x


# ----------------------------------------------------------------------------------------------
def image_block() -> list[int]:
    return [NL2, BOI] + [IMAGE_TOKEN] * MM_TOKENS + [EOI, NL2]


def build_prompt(tok, parts: list) -> list[int]:
    """parts: strings (tokenized without BOS) and None for an image."""
    ids = [2]
    for part in parts:
        ids += image_block() if part is None else tok.encode(part, add_special_tokens=False).ids
    return ids


def main() -> None:
    import torch
    import transformers
    from PIL import Image, ImageOps
    from transformers import AutoProcessor, Gemma3ForConditionalGeneration
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    arrays: dict[str, np.ndarray] = {}
    report: dict = {"transformers": transformers.__version__, "torch": torch.__version__,
                    "pillow": Image.__version__}

    # ---------------- images
    make_images()
    pil_a = Image.open(IMG_DIR / "a.png")
    pil_b_raw = Image.open(IMG_DIR / "b.jpg")
    pil_b = ImageOps.exif_transpose(pil_b_raw)
    report["b_exif_orientation"] = pil_b_raw.getexif().get(0x0112)
    arrays["a_uint8"] = np.asarray(pil_a.convert("RGB"))
    arrays["b_raw_uint8"] = np.asarray(pil_b_raw.convert("RGB"))
    b_up = np.asarray(pil_b.convert("RGB"))
    assert b_up.shape == (150, 100, 3)
    # orientation 6 = rotate the stored image 90 degrees clockwise
    assert np.array_equal(b_up, np.rot90(arrays["b_raw_uint8"], k=-1))
    images = {"a": pil_a, "b": pil_b, "b_raw": pil_b_raw}

    # ---------------- folder
    VLM_DIR.mkdir(parents=True, exist_ok=True)
    for name in OWNED:
        (VLM_DIR / name).unlink(missing_ok=True)
    for stale in VLM_DIR.glob("model-*.safetensors"):
        stale.unlink()
    cfg = make_config()
    model = Gemma3ForConditionalGeneration(cfg)
    randomized = randomize(model, SEED)
    model.to(torch.bfloat16).save_pretrained(VLM_DIR)
    tok = build_tokenizer()
    tok.save(str(VLM_DIR / "tokenizer.json"))
    (VLM_DIR / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n")
    improc = Gemma3ImageProcessorPil(size={"height": VISION["image_size"], "width": VISION["image_size"]})
    improc.save_pretrained(VLM_DIR)
    pre = json.loads((VLM_DIR / "preprocessor_config.json").read_text())
    report["preprocessor_config_as_written"] = dict(pre)
    # the name real Gemma 3 checkpoints carry; transformers 5 maps it to the torchvision backend when
    # torchvision is installed and to Gemma3ImageProcessorPil otherwise
    pre.update(image_processor_type="Gemma3ImageProcessor", processor_class="Gemma3Processor",
               image_seq_length=MM_TOKENS)
    (VLM_DIR / "preprocessor_config.json").write_text(json.dumps(pre, indent=2, sort_keys=True) + "\n")
    (VLM_DIR / "processor_config.json").write_text(
        json.dumps({"image_seq_length": MM_TOKENS, "processor_class": "Gemma3Processor"}, indent=2) + "\n")

    saved_cfg = json.loads((VLM_DIR / "config.json").read_text())
    from safetensors import safe_open

    with safe_open(str(VLM_DIR / "model.safetensors"), "np") as sf:
        saved_keys = sorted(sf.keys())
        saved_dtypes = sorted({str(sf.get_slice(k).get_dtype()) for k in saved_keys})
    report["saved_key_prefixes"] = sorted({".".join(k.split(".")[:2]) for k in saved_keys})
    report["saved_dtypes"] = saved_dtypes
    report["saved_vision_and_projector_keys"] = [
        k for k in saved_keys if "language_model" not in k and (".layers.1." not in k)]
    assert not any(k.startswith("lm_head") for k in saved_keys), "tied head should not be saved"

    # ---------------- tokenizer checks
    for i, want in ((BOI, "<start_of_image>"), (EOI, "<end_of_image>"), (IMAGE_TOKEN, "<image_soft_token>"),
                    (NL, "\n"), (NL2, "\n\n")):
        assert tok.id_to_token(i) == want, (i, tok.id_to_token(i))
        assert tok.decode([i], skip_special_tokens=False) == want, (i, tok.decode([i]))
    full_seq = "\n\n<start_of_image>" + "<image_soft_token>" * MM_TOKENS + "<end_of_image>\n\n"
    assert tok.encode(full_seq, add_special_tokens=False).ids == image_block()

    # ---------------- reload in float32
    m32, info = Gemma3ForConditionalGeneration.from_pretrained(
        VLM_DIR, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    m32.eval()
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    W = {k: v.detach().float().numpy() for k, v in m32.state_dict().items()}
    for k, v in model.state_dict().items():  # the bf16 values drawn above, upcast
        assert np.array_equal(W[k], v.float().numpy()), k
    report["state_dict_prefixes_in_memory"] = sorted({".".join(k.split(".")[:2]) for k in W})
    missing = [k for k in W if k not in randomized and k != "lm_head.weight"]
    assert not missing, missing
    assert m32.lm_head.weight.data_ptr() == m32.model.language_model.embed_tokens.weight.data_ptr()
    tcfg = m32.config.text_config.to_dict()
    vcfg = m32.config.vision_config.to_dict()
    assert tcfg["layer_types"] == ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(8)]

    # ---------------- preprocessing
    proc_pil = Gemma3ImageProcessorPil.from_pretrained(VLM_DIR)
    for name, img in images.items():
        pv = proc_pil(images=img, return_tensors="np")["pixel_values"][0].astype(np.float32)
        assert pv.shape == (3, 112, 112) and pv.dtype == np.float32
        arrays[f"pixel_values_{name}"] = pv
        rgb = np.asarray(img.convert("RGB"))
        resized = np.asarray(Image.fromarray(rgb).resize((112, 112), Image.BILINEAR)).transpose(2, 0, 1)
        # the processor's arithmetic: uint8 * (1/255) in float64 -> float32, then (x - 0.5) / 0.5 in float32
        ours = ((resized.astype(np.float64) * (1 / 255)).astype(np.float32) - np.float32(0.5)) / np.float32(0.5)
        report[f"pixel_values_{name}_vs_pil_resize_formula_max_abs"] = float(np.abs(ours - pv).max())
        assert np.array_equal(ours, pv), name
    report["processor_applies_exif_for_pil_input"] = bool(
        np.array_equal(arrays["pixel_values_b_raw"], arrays["pixel_values_b"]))
    assert not report["processor_applies_exif_for_pil_input"]
    try:  # a path string goes through transformers.image_utils.load_image, which does exif_transpose
        pv_path = proc_pil(images=str(IMG_DIR / "b.jpg"), return_tensors="np")["pixel_values"][0]
        report["processor_given_path_equals_upright"] = bool(np.array_equal(pv_path, arrays["pixel_values_b"]))
    except Exception as e:  # noqa: BLE001
        report["processor_given_path"] = f"not accepted: {type(e).__name__}: {e}"[:200]
    # The torchvision backend (transformers' `Gemma3ImageProcessor`, what AutoImageProcessor picks when
    # torchvision is installed): uint8 resize with torch's antialiased bilinear kernel, then the fused
    # rescale+normalize (x - 127.5) / 127.5 in float32. Emulated with torch alone; checked against the
    # real backend when torchvision imports.
    tv = {}
    for name, img in images.items():
        u8 = torch_resize_uint8(img, VISION["image_size"])
        tv[name] = (u8.astype(np.float32) - np.float32(127.5)) / np.float32(127.5)
        pil_u8 = np.rint(arrays[f"pixel_values_{name}"].astype(np.float64) * 127.5 + 127.5).astype(int)
        report[f"torchvision_vs_pil_{name}_max_abs_levels"] = int(np.abs(u8.astype(int) - pil_u8).max())
        report[f"torchvision_vs_pil_{name}_fraction_differing"] = float((u8.astype(int) != pil_u8).mean())
        report[f"torchvision_vs_pil_{name}_pixel_values_max_abs"] = float(np.abs(tv[name] - arrays[f"pixel_values_{name}"]).max())
    arrays["tv_pixel_values_b"] = tv["b"]
    try:
        from transformers import Gemma3ImageProcessor

        proc_tv = Gemma3ImageProcessor.from_pretrained(VLM_DIR)
        if getattr(proc_tv, "backend", None) != "torchvision":
            raise ImportError(f"torchvision missing: Gemma3ImageProcessor fell back to {type(proc_tv).__name__}")
        for name, img in images.items():
            real = proc_tv(images=img, return_tensors="pt")["pixel_values"][0].numpy()
            assert np.array_equal(real, tv[name]), name
        report["torchvision_backend"] = "emulation checked equal to transformers' torchvision backend"
    except ImportError as e:
        report["torchvision_backend"] = f"emulated with torch only, not checked: {e}"[:300]

    # ---------------- vision tower + projector
    feats = {}
    for name in images:
        pv = torch.from_numpy(arrays[f"pixel_values_{name}"])[None]
        with torch.inference_mode():
            out = m32.model.get_image_features(pv, return_dict=True)
        hid = out.last_hidden_state[0].numpy()
        ft = out.pooler_output[0].numpy()
        assert hid.shape == (64, 32) and ft.shape == (16, 64), (hid.shape, ft.shape)
        arrays[f"vision_{name}"], arrays[f"features_{name}"] = hid, ft
        feats[name] = ft
        nh = np_vision(W, vcfg, arrays[f"pixel_values_{name}"])
        nf = np_project(W, vcfg, nh, MM_TOKENS)
        report[f"numpy_vs_transformers_vision_{name}_max_abs"] = float(np.abs(nh - hid).max())
        report[f"numpy_vs_transformers_features_{name}_max_abs"] = float(np.abs(nf - ft).max())
        report[f"features_{name}_std"] = float(ft.std())
    report["vision_hidden_std_a"] = float(arrays["vision_a"].std())

    # ---------------- prompts
    def run(ids, names, embeds=None):
        ids_t = torch.tensor([ids])
        tt = torch.tensor([[1 if t == IMAGE_TOKEN else 0 for t in ids]])
        with torch.inference_mode():
            if embeds is not None:
                return m32(inputs_embeds=torch.from_numpy(embeds.astype(np.float32))[None], token_type_ids=tt,
                           use_cache=False).logits[0].numpy()
            pv = torch.from_numpy(np.stack([arrays[f"pixel_values_{n}"] for n in names])) if names else None
            return m32(input_ids=ids_t, pixel_values=pv, token_type_ids=tt, use_cache=False).logits[0].numpy()

    def greedy(ids, names, n):
        seq, gen, margins = list(ids), [], []
        for _ in range(n):
            lg = run(seq, names)[-1]
            order = np.argsort(-lg, kind="stable")
            gen.append(int(order[0]))
            margins.append(float(lg[order[0]] - lg[order[1]]))
            seq.append(gen[-1])
        return gen, margins

    letters = string.ascii_letters + string.digits + "?!., "
    for attempt in range(200):
        suffix = "".join(rng.choice(list(letters), size=4))
        p1 = build_prompt(tok, [None, suffix])
        gen, margins = greedy(p1, ["a"], N_GEN)
        if len(set(gen)) >= 5 and min(margins) >= 0.1 and not set(gen) & {BOI, EOI, IMAGE_TOKEN}:
            break
    else:
        raise RuntimeError("no prompt-1 suffix gives a clean greedy continuation")
    report["p1_suffix"], report["p1_suffix_attempts"] = suffix, attempt + 1
    prompts = {
        "p1": ([None, suffix], ["a"]),
        "p2": ([None, "vs", None, "diff?"], ["a", "b"]),
        "p3": (["Here is a tiny photo:", None, "Now?"], ["a"]),
    }
    texts = {"p1": f"<start_of_image>{suffix}", "p2": "<start_of_image>vs<start_of_image>diff?",
             "p3": "Here is a tiny photo:<start_of_image>Now?"}
    logits = {}
    for key, (parts, names) in prompts.items():
        ids = build_prompt(tok, parts)
        tt = [1 if t == IMAGE_TOKEN else 0 for t in ids]
        lg = run(ids, names)
        logits[key] = lg
        arrays[f"{key}_ids"] = np.array(ids, np.int32)
        arrays[f"{key}_token_type_ids"] = np.array(tt, np.int32)
        arrays[f"{key}_images"] = np.array(names)
        arrays[f"{key}_logits"] = lg.astype(np.float32)
        report[f"{key}_len"] = len(ids)
        report[f"{key}_image_positions"] = [int(np.flatnonzero(np.array(ids) == IMAGE_TOKEN)[k * 16]) for k in range(len(names))]
        # independent numpy forward
        emb = np_embeds(W, tcfg, np.array(ids), [feats[n] for n in names])
        ref = np_text(W, tcfg, emb, np_masks(np.array(tt), tcfg["sliding_window"]))
        report[f"{key}_numpy_vs_transformers_max_abs"] = float(np.abs(ref - lg).max())
        report[f"{key}_logit_std"] = float(lg.std())
        if report[f"{key}_numpy_vs_transformers_max_abs"] > 1e-3:
            raise RuntimeError(f"numpy reference disagrees with transformers on {key}: {report}")
        # the same ids from transformers' own processor, loaded from the folder
        proc = AutoProcessor.from_pretrained(VLM_DIR)
        got = proc(text=texts[key], images=[[images[n] for n in names]], return_tensors="np")
        assert got["input_ids"][0].tolist() == ids, (key, got["input_ids"][0].tolist(), ids)
        assert got["token_type_ids"][0].tolist() == tt, key
        for k, n in enumerate(names):
            want = tv[n] if getattr(proc.image_processor, "backend", "pil") == "torchvision" else arrays[f"pixel_values_{n}"]
            assert np.array_equal(got["pixel_values"][k], want), (key, n)
    report["auto_processor_classes"] = [type(proc).__name__, type(proc.image_processor).__name__,
                                        type(proc.tokenizer).__name__]

    # ---------------- the mask is bidirectional within an image, never towards a later image (p2)
    ids2 = arrays["p2_ids"]
    pos = np.flatnonzero(ids2 == IMAGE_TOKEN)
    first, second = pos[:16], pos[16:]
    emb = np_embeds(W, tcfg, ids2, [feats["a"], feats["b"]]).astype(np.float32)
    base = run(ids2.tolist(), None, embeds=emb)
    assert np.abs(base - logits["p2"]).max() < 1e-4
    bumped = emb.copy()
    bumped[first[-1]] += 3.0 * rng.standard_normal(emb.shape[1]).astype(np.float32)
    lg_b = run(ids2.tolist(), None, embeds=bumped)
    report["bidir_change_on_earlier_tokens_of_same_image"] = float(np.abs(lg_b[first[:-1]] - base[first[:-1]]).max())
    report["bidir_change_before_image"] = float(np.abs(lg_b[: first[0]] - base[: first[0]]).max())
    assert report["bidir_change_on_earlier_tokens_of_same_image"] > 1e-2
    assert report["bidir_change_before_image"] == 0.0
    bumped = emb.copy()
    bumped[second[0]] += 3.0 * rng.standard_normal(emb.shape[1]).astype(np.float32)
    lg_c = run(ids2.tolist(), None, embeds=bumped)
    report["later_image_change_on_earlier_image"] = float(np.abs(lg_c[: second[0]] - base[: second[0]]).max())
    report["later_image_change_on_own_earlier_tokens"] = float(np.abs(lg_c[second[1:]] - base[second[1:]]).max())
    assert report["later_image_change_on_earlier_image"] == 0.0
    assert report["later_image_change_on_own_earlier_tokens"] > 1e-2
    # without token_type_ids transformers is causal: differs from the reference
    with torch.inference_mode():
        pv2 = torch.from_numpy(np.stack([arrays["pixel_values_a"], arrays["pixel_values_b"]]))
        nott = m32(input_ids=torch.tensor([ids2.tolist()]), pixel_values=pv2, use_cache=False).logits[0].numpy()
    report["p2_without_token_type_ids_max_abs"] = float(np.abs(nott - logits["p2"]).max())

    # ---------------- decoys (numpy), the gap a test's tolerance must stay far below
    tt2 = arrays["p2_token_type_ids"]
    masks2 = np_masks(tt2, tcfg["sliding_window"])
    ref2 = np_text(W, tcfg, np_embeds(W, tcfg, ids2, [feats["a"], feats["b"]]), masks2)

    def decoy(name, lg):
        arrays[f"decoy_{name}"] = np.float32(np.abs(lg - ref2).max())
        report[f"decoy_{name}"] = float(arrays[f"decoy_{name}"])

    decoy("causal_images", np_text(W, tcfg, np_embeds(W, tcfg, ids2, [feats["a"], feats["b"]]),
                                   np_masks(tt2, tcfg["sliding_window"], causal_images=True)))
    report["decoy_causal_images_vs_transformers_without_token_type_ids_max_abs"] = float(
        np.abs(np_text(W, tcfg, np_embeds(W, tcfg, ids2, [feats["a"], feats["b"]]),
                       np_masks(tt2, tcfg["sliding_window"], causal_images=True)) - nott).max())
    decoy("scaled_images", np_text(W, tcfg, np_embeds(W, tcfg, ids2, [feats["a"], feats["b"]],
                                                      image_scale=math.sqrt(tcfg["hidden_size"])), masks2))
    fe = [np_project(W, vcfg, np_vision(W, vcfg, arrays[f"pixel_values_{n}"], act=gelu_erf), MM_TOKENS) for n in "ab"]
    decoy("exact_gelu", np_text(W, tcfg, np_embeds(W, tcfg, ids2, fe), masks2))
    ft = [np_project(W, vcfg, arrays[f"vision_{n}"], MM_TOKENS, transposed=True) for n in "ab"]
    decoy("pool_transposed", np_text(W, tcfg, np_embeds(W, tcfg, ids2, ft), masks2))
    decoy("no_exif", np_text(W, tcfg, np_embeds(W, tcfg, ids2, [feats["a"], feats["b_raw"]]), masks2))
    ids3, tt3 = arrays["p3_ids"], arrays["p3_token_type_ids"]
    le = np_text(W, tcfg, np_embeds(W, tcfg, ids3, [feats["a"]]), np_masks(tt3, tcfg["sliding_window"], window_le=True))
    arrays["decoy_window_le"] = np.float32(np.abs(le - logits["p3"]).max())
    report["decoy_window_le"] = float(arrays["decoy_window_le"])

    # ---------------- greedy continuation of p1 through generate() (KV cache, pixel_values)
    ids1 = arrays["p1_ids"].tolist()
    with torch.inference_mode():
        out = m32.generate(
            input_ids=torch.tensor([ids1]), attention_mask=torch.ones(1, len(ids1), dtype=torch.long),
            pixel_values=torch.from_numpy(arrays["pixel_values_a"])[None],
            token_type_ids=torch.tensor([arrays["p1_token_type_ids"].tolist()]),
            max_new_tokens=N_GEN, min_new_tokens=N_GEN, do_sample=False, top_k=None, top_p=None,
            temperature=None, pad_token_id=0,
        )
    cached = out[0, len(ids1):].tolist()
    if cached != gen:
        raise RuntimeError(f"cached generate {cached} != no-cache greedy {gen}")
    arrays["p1_gen_ids"] = np.array(gen, np.int32)
    arrays["p1_gen_margins"] = np.array(margins, np.float32)
    report["p1_gen_ids"], report["p1_min_margin"] = gen, min(margins)
    report["p1_gen_text"] = tok.decode(gen, skip_special_tokens=False)

    # ---------------- informational: sdpa vs eager, bf16 compute
    msd = load_f32(VLM_DIR, attn="sdpa")
    with torch.inference_mode():
        pv2 = torch.from_numpy(np.stack([arrays["pixel_values_a"], arrays["pixel_values_b"]]))
        tt2t = torch.tensor([tt2.tolist()])
        sd = msd(input_ids=torch.tensor([ids2.tolist()]), pixel_values=pv2, token_type_ids=tt2t, use_cache=False)
        report["p2_sdpa_vs_eager_max_abs"] = float(np.abs(sd.logits[0].numpy() - logits["p2"]).max())
        mbf = Gemma3ForConditionalGeneration.from_pretrained(VLM_DIR, dtype=torch.bfloat16,
                                                             attn_implementation="eager").eval()
        bf = mbf(input_ids=torch.tensor([ids2.tolist()]), pixel_values=pv2.to(torch.bfloat16), token_type_ids=tt2t,
                 use_cache=False)
        report["p2_bf16_compute_vs_f32_max_abs"] = float(np.abs(bf.logits[0].float().numpy() - logits["p2"]).max())

    # ---------------- informational: the key names of Google's checkpoints (written by transformers 4.5x:
    # vision_tower.vision_model.*) load to the same model
    import shutil
    import tempfile

    from safetensors.torch import load_file, save_file

    with tempfile.TemporaryDirectory() as td:
        for name in ("config.json", "generation_config.json"):
            shutil.copy(VLM_DIR / name, Path(td) / name)
        sd = load_file(str(VLM_DIR / "model.safetensors"))
        sd = {("vision_tower.vision_model." + k[len("vision_tower."):] if k.startswith("vision_tower.") else k): v
              for k, v in sd.items()}
        save_file(sd, str(Path(td) / "model.safetensors"), metadata={"format": "pt"})
        mleg, linfo = Gemma3ForConditionalGeneration.from_pretrained(
            td, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
        report["legacy_vision_model_prefix_loading_info"] = {k: list(v) for k, v in linfo.items() if v}
        with torch.inference_mode():
            lg_leg = mleg.eval()(input_ids=torch.tensor([ids2.tolist()]), pixel_values=pv2, token_type_ids=tt2t,
                                 use_cache=False).logits[0].numpy()
        report["legacy_vision_model_prefix_p2_max_abs"] = float(np.abs(lg_leg - logits["p2"]).max())

    np.savez_compressed(NPZ_PATH, **arrays)
    sizes = {str(f.relative_to(FIXTURES)): f.stat().st_size
             for f in sorted(list(VLM_DIR.iterdir()) + list(IMG_DIR.iterdir()) + [NPZ_PATH])}
    report["fixture_bytes"] = sizes
    report["fixture_bytes_total"] = sum(sizes.values())
    report["npz_keys"] = {k: [list(v.shape), str(v.dtype)] for k, v in arrays.items()}
    report["config_json"] = saved_cfg
    print(json.dumps(report, indent=1, default=str))
    if report["fixture_bytes_total"] > 1_500_000:
        raise RuntimeError(f"fixtures too large: {report['fixture_bytes_total']} bytes")


def torch_resize_uint8(img, size: int) -> np.ndarray:
    """torchvision.transforms.v2.functional.resize(bilinear, antialias=True) on a uint8 CPU image, which
    calls torch's native uint8 kernel (uint8 [3, size, size])."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(np.asarray(img.convert("RGB")).transpose(2, 0, 1)))[None]
    out = torch.nn.functional.interpolate(t, size=[size, size], mode="bilinear", align_corners=False, antialias=True)
    assert out.dtype == torch.uint8
    return out[0].numpy()


if __name__ == "__main__":
    sys.exit(main())
