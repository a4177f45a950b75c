"""Bytes a decoded token reads, for each way of holding the quantized weights (decode is memory-bound on a GPU).

``mx.quantized_matmul`` promotes the activations and the scales to one type before its kernel runs, as graph-level
``astype`` nodes (mlx/ops.cpp, every backend). Float16 scales with bfloat16 activations are therefore widened to
float32 on every call: the astype reads the float16 scales and biases and writes float32 ones, then the kernel
reads the packed weights and the float32 scales and biases. Per Q4_0 weight at group 32 that is 1 + 2 + 4 + 2 = 9
bits moved per token. The ways of holding (``HOLDINGS``) and what they move per Q4_0 weight:

- ``stored``: scales as the file stores them, bfloat16 activations: 9 bits (above).
- ``float32``: scales and biases held once in the type the matmul computes in (float32 for float16 scales; what the
  loader's ``scales="float32"`` does): the kernel reads 4 + 2 = 6 bits, nothing is widened per call.
- ``float16``: float16 activations into the quantized matmuls, float16 scales read as stored: 4 + 1 = 5 bits.
  Modelled only: the loader does not offer it (exact only in Metal's decode kernel, and the matmuls' float16
  outputs have no bound below 65504; scripts/check_f16_decode_results.md).
- ``widen``: the CPU default: float32 compute, every float16/bfloat16 tensor and scale held as float32.

K-quant scales are float32 as stored, so only their kernel read counts, under every holding. Per token, every
matmul reads its whole weight (and moves its per-call widening); an embedding reads one row, but a tied output head
reads its whole table; norm weights are read whole; activations (kilobytes) are left out. A dense head multiplies
in its table's dtype (the activations are cast, not the table: model/quantized.py). The KV cache attention reads
at a given context is a separate figure (``kv_bytes_per_token``).
"""

from __future__ import annotations

from dataclasses import dataclass

ITEM = {"F32": 4, "F16": 2, "BF16": 2}
# holding: (dtype of the activations into quantized matmuls, dtype of the rest of the compute)
HOLDINGS = {"stored": ("BF16", "BF16"), "float32": ("BF16", "BF16"), "float16": ("F16", "BF16"),
            "widen": ("F32", "F32")}


@dataclass(frozen=True)
class Weight:
    """One text tensor: ``dtype`` is a dense tensor's stored dtype, or a quantized one's scales' (safetensors'
    names: F16, BF16, F32); ``use``: "matmul", "lookup" (an embedding), "tied" (an embedding that is also the
    head) or "vector" (a norm weight); ``rows``: an embedding's rows."""

    numel: int
    dtype: str
    bits: int | None = None
    group_size: int = 32
    use: str = "matmul"
    rows: int = 1


def promote(a: str, b: str) -> str:
    """MLX's promote_types on these three: equal types stay, any mix of two becomes float32."""
    return a if a == b else "F32"


def held_dtype(w: Weight, holding: str) -> str:
    """The dtype a tensor (a quantized one's scales) is held in once loaded under ``holding``."""
    compute = HOLDINGS[holding][1]
    if holding == "widen":
        return "F32"
    if w.bits and (holding == "float32" or w.use == "tied"):  # a tied quantized head never widens per token
        return promote(compute, w.dtype)
    return w.dtype


def held_bytes(w: Weight, holding: str) -> int:
    """Bytes the tensor takes once loaded under ``holding`` (packed weights, then scales and biases)."""
    item = ITEM[held_dtype(w, holding)]
    return w.numel * w.bits // 8 + 2 * (w.numel // w.group_size) * item if w.bits else w.numel * item


@dataclass
class Traffic:
    read: int = 0
    written: int = 0  # by per-call widening (astype) only
    transient: int = 0  # the largest per-call widened buffer (scales + biases, or a dense weight)

    @property
    def moved(self) -> int:
        return self.read + self.written

    def add(self, other: Traffic) -> Traffic:
        return Traffic(self.read + other.read, self.written + other.written, max(self.transient, other.transient))


def _matmul(numel: int, held: str, act: str, bits: int | None, group_size: int) -> Traffic:
    """One ``x @ W.T`` (quantized or dense): MLX widens the narrower operand to the common type first."""
    c = promote(act, held)
    n = 2 * (numel // group_size) if bits else numel  # scales + biases, or the dense elements
    packed = numel * bits // 8 if bits else 0
    if held == c:
        return Traffic(packed + n * ITEM[c])
    return Traffic(packed + n * ITEM[c] + n * ITEM[held], n * ITEM[c], n * ITEM[c])


def token_traffic(w: Weight, holding: str) -> Traffic:
    """What one decoded token moves for this tensor under ``holding``."""
    act_q, compute = HOLDINGS[holding]
    held = held_dtype(w, holding)
    if w.use == "vector":
        return Traffic(w.numel * ITEM[held])
    if w.use in ("lookup", "tied"):
        row = w.numel // w.rows  # a lookup reads one row (its scales and biases too)
        t = Traffic(row * w.bits // 8 + 2 * (row // w.group_size) * ITEM[held] if w.bits else row * ITEM[held])
        if w.use == "lookup":
            return t
        head = _matmul(w.numel, held, compute, w.bits, w.group_size) if w.bits else Traffic(w.numel * ITEM[held])
        return t.add(head)
    return _matmul(w.numel, held, act_q if w.bits else compute, w.bits, w.group_size)


def bytes_per_token(weights: list[Weight], holding: str) -> Traffic:
    total = Traffic()
    for w in weights:
        total = total.add(token_traffic(w, holding))
    return total


def kv_bytes_per_token(config, context: int, holding: str, kv_bits: int | None = None,
                       kv_group_size: int = 64) -> int:
    """The KV cache attention reads for one token at ``context`` (window x sliding layers + context x global ones),
    in the compute dtype's size (float32 under ``widen``, bfloat16 otherwise)."""
    return config.kv_cache_bytes(context, ITEM[HOLDINGS[holding][1]], kv_bits, kv_group_size)


def model_weights(model) -> list[Weight]:
    """The ``Weight`` list of a loaded text model, in the dtypes it holds now (its vision tower left out)."""
    from mlx.utils import tree_flatten

    from .quantized import Embedding, QuantizedEmbedding, QuantizedLinear

    text = getattr(model, "language_model", model)
    tied = text.cfg.tie_word_embeddings
    name = {"mlx.core.float32": "F32", "mlx.core.float16": "F16", "mlx.core.bfloat16": "BF16"}
    out, seen = [], set()
    for path, m in text.named_modules():
        if isinstance(m, (QuantizedLinear, QuantizedEmbedding, Embedding)):
            seen.add(path)
            emb = not isinstance(m, QuantizedLinear)
            use = ("tied" if tied else "lookup") if emb else "matmul"
            numel = m.weight.shape[0] * (m.weight.shape[1] * 32 // m.bits if hasattr(m, "bits") else m.weight.shape[1])
            dtype = m.scales.dtype if hasattr(m, "bits") else m.weight.dtype
            out.append(Weight(numel, name[str(dtype)], getattr(m, "bits", None), getattr(m, "group_size", 32), use,
                              m.weight.shape[0] if emb else 1))
    for path, a in tree_flatten(text.parameters()):
        module = path.rsplit(".", 1)[0]
        if module in seen or path.endswith((".scales", ".biases")):
            continue
        out.append(Weight(a.size, name[str(a.dtype)], use="matmul" if a.ndim == 2 else "vector"))
    return out
