#!/usr/bin/env python3
"""Make tiny random Gemma 3 text checkpoints (HF folders) and their transformers reference outputs.

Writes
  tests/fixtures/tiny_gemma3/                 config.json (transformers 5 form: layer_types,
                                              nested rope_parameters), generation_config.json,
                                              model.safetensors (bfloat16)
  tests/fixtures/tiny_gemma3_linear_rope/     config.json hand-written in the OLD (transformers 4.5x)
                                              form: rope_theta, rope_local_base_freq,
                                              sliding_window_pattern, rope_scaling {linear, factor 8}
                                              (the factor applies to full-attention layers only),
                                              model.safetensors (bfloat16)
  tests/fixtures/tiny_gemma3_reference.npz    reference outputs, computed in float32 from the bf16 weights

Needs torch + transformers 5.x (checked with 5.23.0). The tests that read these fixtures need neither.

Main model: vocab 512, hidden 64, intermediate 128, 8 layers (layer_types default for pattern 6:
layer 5 is full attention, 0-4 and 6-7 sliding), 2 heads, 1 kv head, head_dim 32, sliding_window 16,
global rope theta 1e6, local 1e4, query_pre_attn_scalar 32, tied embeddings, max_position 256.
Variant: same shape family but 4 layers, intermediate 32 and vocab 256 (fixtures under 1 MB), old-form
`sliding_window_pattern: 3` (so layer 2 is full attention: a reader that hard-codes 6 fails), and
rope_scaling linear factor 8, which applies to the full-attention layer only.

Weights are drawn with a fixed seed (not transformers' init, whose 0.02-std weights and all-zero norm
weights give near-uniform attention and would hide mask, (1+w) and RoPE bugs):
  embedding ~ N(0, 0.5); linear ~ N(0, 1/sqrt(fan_in)); RMSNorm weights ~ U(-0.5, 0.5), except
  q_norm/k_norm ~ U(0, 1.5) (sharper attention) and the post-attention / post-feedforward norms
  ~ U(5, 10) (so the blocks outweigh the embedding in the residual stream; otherwise the tied head
  just predicts the input token again and greedy decoding repeats one id). Then cast to bfloat16 and saved; the references use
  the bf16 values upcast to float32 (the model is reloaded from the folder with dtype=float32).

Self-checks: an independent numpy forward (written from the Gemma 3 definition, not from transformers)
must match the transformers logits; KV-cached generate() must reproduce the no-cache greedy ids; the
old-form config must load to the same rope_parameters / layer_types as the equivalent new-form config
and give identical logits.

NPZ keys (prefix `main_` for tiny_gemma3, `linrope_` for tiny_gemma3_linear_rope):
  {p}prompt40_ids   int32 [40]      random ids (seeded)
  {p}prompt40_logits float32 [40, V] logits of every position (no cache, eager attention)
  {p}gen_prompt_ids int32 [10]     first seeded random prompt whose greedy run has >= 8 distinct ids
                                   and top1-top2 margins >= 0.1 at every step
  {p}gen_ids        int32 [16]      greedy continuation (argmax, full recomputation every step, no stop ids)
  {p}gen_margins    float32 [16]    top1 - top2 logit at every greedy step
  main_decoy_window_le_max_abs     float32 []  max |logit change| if sliding layers wrongly let query i
                                   see key j when i - j <= 16 (off by one): the tolerance a test must beat
  linrope_decoy_nofactor_max_abs   float32 []  max |logit change| if the rope factor 8 is dropped

Usage: python scripts/make_tiny_gemma3.py
"""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
MAIN_DIR = FIXTURES / "tiny_gemma3"
LIN_DIR = FIXTURES / "tiny_gemma3_linear_rope"
NPZ_PATH = FIXTURES / "tiny_gemma3_reference.npz"
SEED = 1234

COMMON = dict(
    hidden_size=64,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    sliding_window=16,
    query_pre_attn_scalar=32,
    tie_word_embeddings=True,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    hidden_activation="gelu_pytorch_tanh",
    bos_token_id=2,
    eos_token_id=1,
    pad_token_id=0,
    attn_logit_softcapping=None,
    final_logit_softcapping=None,
)
MAIN_SHAPE = dict(vocab_size=512, intermediate_size=128, num_hidden_layers=8)
LIN_SHAPE = dict(vocab_size=256, intermediate_size=32, num_hidden_layers=4)
LIN_PATTERN = 3  # old-form sliding_window_pattern of the variant: layer 2 is full attention
ROPE_GLOBAL, ROPE_LOCAL, LINEAR_FACTOR = 1_000_000.0, 10_000.0, 8.0


def new_config(shape: dict, linear_factor: float | None, layer_types: list[str] | None = None):
    from transformers import Gemma3TextConfig

    full = {"rope_type": "default", "rope_theta": ROPE_GLOBAL}
    if linear_factor is not None:
        full = {"rope_type": "linear", "factor": linear_factor, "rope_theta": ROPE_GLOBAL}
    return Gemma3TextConfig(
        **COMMON,
        **shape,
        rope_parameters={"full_attention": full, "sliding_attention": {"rope_type": "default", "rope_theta": ROPE_LOCAL}},
        architectures=["Gemma3ForCausalLM"],
        layer_types=layer_types,
    )


def old_config_dict(shape: dict, linear_factor: float, pattern: int) -> dict:
    """A config.json the way transformers 4.50-4.57 wrote Gemma 3 text configs (cf. gemma-3-1b-it and the
    text_config of gemma-3-4b-it)."""
    d = {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_logit_softcapping": None,
        "bos_token_id": 2,
        "cache_implementation": "hybrid",
        "eos_token_id": 1,
        "final_logit_softcapping": None,
        "head_dim": COMMON["head_dim"],
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": COMMON["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": shape["intermediate_size"],
        "max_position_embeddings": COMMON["max_position_embeddings"],
        "num_attention_heads": COMMON["num_attention_heads"],
        "num_hidden_layers": shape["num_hidden_layers"],
        "num_key_value_heads": COMMON["num_key_value_heads"],
        "pad_token_id": 0,
        "query_pre_attn_scalar": COMMON["query_pre_attn_scalar"],
        "rms_norm_eps": COMMON["rms_norm_eps"],
        "rope_local_base_freq": ROPE_LOCAL,
        "rope_scaling": {"factor": linear_factor, "rope_type": "linear"},
        "rope_theta": ROPE_GLOBAL,
        "sliding_window": COMMON["sliding_window"],
        "sliding_window_pattern": pattern,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.50.0.dev0",
        "use_cache": True,
        "vocab_size": shape["vocab_size"],
    }
    return d


OWNED = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json")


def clear_owned(folder: Path) -> None:
    """Remove only the files this script writes; other files (e.g. the tokenizer.json that
    scripts/make_tiny_tokenizer.py adds to these folders) are kept."""
    for name in OWNED:
        (folder / name).unlink(missing_ok=True)
    for f in folder.glob("model-*.safetensors"):
        f.unlink()


def randomize(model, seed: int) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name == "lm_head.weight":
                continue  # tied
            if name.endswith("embed_tokens.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                p.copy_(torch.rand(p.shape, generator=g) * 1.5)
            elif name.endswith(("post_attention_layernorm.weight", "post_feedforward_layernorm.weight")):
                p.copy_(torch.rand(p.shape, generator=g) * 5.0 + 5.0)
            elif "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) - 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))


# ----------------------------------------------------------------------------------------------
# independent numpy reference (float64), written from the Gemma 3 definition
def np_forward(W: dict, cfg: dict, ids: np.ndarray, window_le: bool = False) -> np.ndarray:
    f = np.float64
    H, nh, nkv, hd = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    eps, win = cfg["rms_norm_eps"], cfg["sliding_window"]
    T = len(ids)

    def rms(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * (1.0 + w)

    def gelu_tanh(x):
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    def rope(x, theta, factor):  # x [heads, T, hd], rotate-half convention
        inv = 1.0 / theta ** (np.arange(0, hd, 2, dtype=f) / hd) / factor
        ang = np.arange(T, dtype=f)[:, None] * inv[None]
        cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return x * cos + np.concatenate([-x2, x1], -1) * sin

    E = W["model.embed_tokens.weight"].astype(f)
    x = E[ids] * f(np.float32(math.sqrt(H)))  # scale is a float32 scalar in transformers (f32 compute)
    i_idx, j_idx = np.arange(T)[:, None], np.arange(T)[None, :]
    causal = j_idx <= i_idx
    sliding = causal & ((i_idx - j_idx <= win) if window_le else (i_idx - j_idx < win))
    for L, lt in enumerate(cfg["layer_types"]):
        p = lambda n: W[f"model.layers.{L}.{n}"].astype(f)  # noqa: E731
        rp = cfg["rope"][lt]
        h = rms(x, p("input_layernorm.weight"))
        q = (h @ p("self_attn.q_proj.weight").T).reshape(T, nh, hd).transpose(1, 0, 2)
        k = (h @ p("self_attn.k_proj.weight").T).reshape(T, nkv, hd).transpose(1, 0, 2)
        v = (h @ p("self_attn.v_proj.weight").T).reshape(T, nkv, hd).transpose(1, 0, 2)
        q, k = rms(q, p("self_attn.q_norm.weight")), rms(k, p("self_attn.k_norm.weight"))
        q, k = rope(q, rp["theta"], rp["factor"]), rope(k, rp["theta"], rp["factor"])
        k, v = np.repeat(k, nh // nkv, 0), np.repeat(v, nh // nkv, 0)
        s = q @ k.transpose(0, 2, 1) * cfg["query_pre_attn_scalar"] ** -0.5
        mask = sliding if lt == "sliding_attention" else causal
        s = np.where(mask[None], s, -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        a = (s / s.sum(-1, keepdims=True)) @ v  # [nh, T, hd]
        a = a.transpose(1, 0, 2).reshape(T, nh * hd) @ p("self_attn.o_proj.weight").T
        x = x + rms(a, p("post_attention_layernorm.weight"))
        h = rms(x, p("pre_feedforward_layernorm.weight"))
        m = gelu_tanh(h @ p("mlp.gate_proj.weight").T) * (h @ p("mlp.up_proj.weight").T)
        x = x + rms(m @ p("mlp.down_proj.weight").T, p("post_feedforward_layernorm.weight"))
    x = rms(x, W["model.norm.weight"].astype(f))
    return x @ E.T


def np_cfg(model_cfg, factor_override: float | None = None) -> dict:
    d = {k: getattr(model_cfg, k) for k in (
        "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
        "sliding_window", "layer_types", "query_pre_attn_scalar")}
    rope = {}
    for lt, rp in model_cfg.rope_parameters.items():
        factor = rp.get("factor", 1.0) if rp["rope_type"] == "linear" else 1.0
        assert rp["rope_type"] in ("default", "linear"), rp
        rope[lt] = {"theta": rp["rope_theta"], "factor": factor if factor_override is None else factor_override}
    d["rope"] = rope
    return d


# ----------------------------------------------------------------------------------------------
def load_f32(folder: Path):
    import torch
    from transformers import Gemma3ForCausalLM

    m = Gemma3ForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    m.eval()
    return m


def logits_of(model, ids) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return model(input_ids=torch.tensor([list(map(int, ids))]), use_cache=False).logits[0].float().numpy()


def greedy(model, ids, n):
    seq, gen, margins = list(map(int, ids)), [], []
    for _ in range(n):
        lg = logits_of(model, seq)[-1]
        order = np.argsort(-lg, kind="stable")
        gen.append(int(order[0]))
        margins.append(float(lg[order[0]] - lg[order[1]]))
        seq.append(gen[-1])
    return gen, margins


def weights_np(model) -> dict:
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def make_reference(model, prefix: str, vocab: int, rng: np.random.Generator, arrays: dict, report: dict):
    import torch

    prompt40 = rng.integers(3, vocab, size=40).astype(np.int32)
    prompt40[0] = 2  # BOS
    lg = logits_of(model, prompt40)
    # draw 10-token prompts until the greedy continuation is varied and never near a tie
    for attempt in range(100):
        gen_prompt = rng.integers(3, vocab, size=10).astype(np.int32)
        gen_prompt[0] = 2
        gen, margins = greedy(model, gen_prompt, 16)
        if len(set(gen)) >= 8 and min(margins) >= 0.1:
            break
    report[prefix + "gen_prompt_attempts"] = attempt + 1
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([gen_prompt.tolist()]), max_new_tokens=16, min_new_tokens=16, do_sample=False,
            top_k=None, top_p=None, temperature=None, pad_token_id=0,
        )
    if len(set(gen)) < 8 or min(margins) < 0.1:
        raise RuntimeError(f"{prefix}: degenerate greedy continuation {gen}")
    cached = out[0, 10:].tolist()
    if cached != gen:
        raise RuntimeError(f"{prefix}: cached generate {cached} != no-cache greedy {gen}")
    arrays[f"{prefix}prompt40_ids"] = prompt40
    arrays[f"{prefix}prompt40_logits"] = lg.astype(np.float32)
    arrays[f"{prefix}gen_prompt_ids"] = gen_prompt
    arrays[f"{prefix}gen_ids"] = np.array(gen, np.int32)
    arrays[f"{prefix}gen_margins"] = np.array(margins, np.float32)
    report[prefix + "gen_ids"] = gen
    report[prefix + "min_margin"] = min(margins)
    report[prefix + "logit_std"] = float(lg.std())
    return prompt40, lg


def main() -> None:
    import torch
    import transformers
    from transformers import AutoConfig, Gemma3ForCausalLM

    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    arrays: dict[str, np.ndarray] = {}
    report: dict = {"transformers": transformers.__version__, "torch": torch.__version__}

    # ---------------- main (new config form)
    cfg = new_config(MAIN_SHAPE, None)
    model = Gemma3ForCausalLM(cfg)
    randomize(model, SEED)
    clear_owned(MAIN_DIR)
    model.to(torch.bfloat16).save_pretrained(MAIN_DIR)
    saved_cfg = json.loads((MAIN_DIR / "config.json").read_text())
    report["main_config_keys"] = sorted(saved_cfg)
    m32 = load_f32(MAIN_DIR)
    W = weights_np(m32)
    assert np.all(W["model.layers.0.input_layernorm.weight"] != 0)
    assert m32.lm_head.weight.data_ptr() == m32.model.embed_tokens.weight.data_ptr()
    expected_types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(8)]
    assert m32.config.layer_types == expected_types, m32.config.layer_types
    prompt40, lg = make_reference(m32, "main_", MAIN_SHAPE["vocab_size"], rng, arrays, report)

    c = np_cfg(m32.config)
    ref = np_forward(W, c, prompt40)
    report["main_numpy_vs_transformers_max_abs"] = float(np.abs(ref - lg).max())
    le = np_forward(W, c, prompt40, window_le=True)
    report["main_window_lt_vs_le_max_abs"] = float(np.abs(le - lg).max())
    arrays["main_decoy_window_le_max_abs"] = np.float32(report["main_window_lt_vs_le_max_abs"])
    if report["main_numpy_vs_transformers_max_abs"] > 1e-3:
        raise RuntimeError(f"numpy reference disagrees with transformers: {report}")
    if not report["main_numpy_vs_transformers_max_abs"] < report["main_window_lt_vs_le_max_abs"] / 100:
        raise RuntimeError("the i-j<window vs <=window distinction is not resolved by this fixture")
    # the same check on transformers' own mask: build a model whose window is 17 and confirm it equals
    # the numpy "<= 16" variant (i.e. transformers' window W means i - j < W)
    cfg17 = copy.deepcopy(m32.config)
    cfg17.sliding_window = 17
    m17 = Gemma3ForCausalLM(cfg17).eval()
    m17.load_state_dict(m32.state_dict())
    report["transformers_window17_vs_numpy_le16_max_abs"] = float(np.abs(logits_of(m17, prompt40) - le).max())
    # sdpa agrees with eager?
    msd = Gemma3ForCausalLM.from_pretrained(MAIN_DIR, dtype=torch.float32, attn_implementation="sdpa").eval()
    report["main_sdpa_vs_eager_max_abs"] = float(np.abs(logits_of(msd, prompt40) - lg).max())
    # bf16 compute, for information only
    mbf = Gemma3ForCausalLM.from_pretrained(MAIN_DIR, dtype=torch.bfloat16, attn_implementation="eager").eval()
    report["main_bf16_compute_vs_f32_max_abs"] = float(np.abs(logits_of(mbf, prompt40) - lg).max())
    report["embed_scale_buffer_bf16"] = float(mbf.model.embed_tokens.embed_scale.to(torch.bfloat16))

    # ---------------- variant: old config form, linear rope factor 8 on full-attention layers
    lin_types = ["full_attention" if (i + 1) % LIN_PATTERN == 0 else "sliding_attention" for i in range(4)]
    cfg_lin_new = new_config(LIN_SHAPE, LINEAR_FACTOR, lin_types)
    lin = Gemma3ForCausalLM(cfg_lin_new)
    randomize(lin, SEED + 1)
    clear_owned(LIN_DIR)
    lin.to(torch.bfloat16).save_pretrained(LIN_DIR)
    report["linrope_new_form_config_as_written_by_transformers"] = json.loads((LIN_DIR / "config.json").read_text())
    (LIN_DIR / "config.json").write_text(json.dumps(old_config_dict(LIN_SHAPE, LINEAR_FACTOR, LIN_PATTERN), indent=2) + "\n")
    gc = LIN_DIR / "generation_config.json"
    if gc.exists():
        gc.unlink()  # old-form checkpoint: keep only config.json + weights
    old = AutoConfig.from_pretrained(LIN_DIR)
    want_rope = {
        "full_attention": {"rope_type": "linear", "factor": LINEAR_FACTOR, "rope_theta": ROPE_GLOBAL},
        "sliding_attention": {"rope_type": "default", "rope_theta": ROPE_LOCAL},
    }
    report["linrope_old_form_loaded_rope_parameters"] = old.rope_parameters
    report["linrope_old_form_loaded_layer_types"] = old.layer_types
    assert type(old).__name__ == "Gemma3TextConfig", type(old)
    assert old.rope_parameters == want_rope, old.rope_parameters
    lin_types = ["full_attention" if (i + 1) % LIN_PATTERN == 0 else "sliding_attention" for i in range(4)]
    assert old.layer_types == lin_types, old.layer_types
    l32 = load_f32(LIN_DIR)
    Wl = weights_np(l32)
    lp40, llg = make_reference(l32, "linrope_", LIN_SHAPE["vocab_size"], rng, arrays, report)
    # same weights under the equivalent NEW-form config give identical logits
    l_new = Gemma3ForCausalLM(new_config(LIN_SHAPE, LINEAR_FACTOR, lin_types)).to(torch.float32)
    l_new.config._attn_implementation = "eager"
    l_new.load_state_dict(l32.state_dict())
    report["linrope_old_vs_new_form_max_abs"] = float(np.abs(logits_of(l_new.eval(), lp40) - llg).max())
    assert report["linrope_old_vs_new_form_max_abs"] == 0.0, report["linrope_old_vs_new_form_max_abs"]
    cl = np_cfg(l32.config)
    report["linrope_numpy_vs_transformers_max_abs"] = float(np.abs(np_forward(Wl, cl, lp40) - llg).max())
    nof = np_forward(Wl, np_cfg(l32.config, factor_override=1.0), lp40)
    report["linrope_factor_vs_nofactor_max_abs"] = float(np.abs(nof - llg).max())
    arrays["linrope_decoy_nofactor_max_abs"] = np.float32(report["linrope_factor_vs_nofactor_max_abs"])
    # factor applied to the full layer only: scaling the sliding layers too must change the logits
    both = copy.deepcopy(cl)
    both["rope"]["sliding_attention"]["factor"] = LINEAR_FACTOR
    report["linrope_factor_on_all_layers_vs_transformers_max_abs"] = float(np.abs(np_forward(Wl, both, lp40) - llg).max())
    if report["linrope_numpy_vs_transformers_max_abs"] > 1e-3:
        raise RuntimeError(f"numpy reference disagrees with transformers (linear rope): {report}")

    np.savez_compressed(NPZ_PATH, **arrays)
    total = sum(f.stat().st_size for d in (MAIN_DIR, LIN_DIR) for f in d.iterdir() if f.name in OWNED)
    total += NPZ_PATH.stat().st_size
    report["fixture_bytes_total"] = total
    report["main_config_json"] = saved_cfg
    print(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
