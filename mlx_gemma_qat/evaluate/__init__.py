"""Quality measurements: perplexity, KL divergence against a reference, comparison of conversions.

    from mlx_gemma_qat import load
    from mlx_gemma_qat.evaluate import perplexity, kl_divergence, read_text, tokenize
    model, tok = load()
    ids = tokenize(tok, read_text("wiki.test.raw")[0])
    print(perplexity(model, ids, context=512).format())

Modules: ``corpus`` (the text), ``windows`` (which tokens are scored), ``scoring`` (log-probs through the KV
cache), ``stats`` (llama-perplexity's statistics), ``reference`` (logits files, llama.cpp's format),
``perplexity``, ``kld``, ``compare`` (a table and a plot over several models).
"""

from .corpus import read_text, tokenize
from .kld import KLDResult, kl_divergence
from .perplexity import PerplexityResult, perplexity

__all__ = ["perplexity", "kl_divergence", "PerplexityResult", "KLDResult", "read_text", "tokenize"]
