"""Gemma 3 split over the processes of an ``mx.distributed`` group (started by ``mlx.launch``): tensor or pipeline.

**Tensor parallel** (``shard_tensor``): each rank holds 1/N of the query heads (with the KV heads they read: split
where N divides their count, the same ones on several ranks where it does not; the 270M and 1B have one), 1/N of
the MLP's columns (gate/up by output, down by input) and 1/N of the vocabulary (the tied embedding and head).
q/k/v/gate/up rows are whole, o/down are cut between quantization groups: every weight keeps its stored value,
nothing is re-quantized. Each sublayer ends in one ``all_sum`` of the partial projections, in float32, rounded once
to the compute dtype (model/text.py ``_project``), so the sums run in another order than in one process; a token
lookup sums one rank's row with zeros (exact), and the head's slices are gathered, so every rank samples from the
whole distribution.

**Pipeline parallel** (``shard_pipeline``): each rank holds a contiguous range of layers and their KV caches; rank 0
also holds the embedding and the head. Activations go rank to rank with ``send``/``recv``, the last rank's normed
hidden state back to rank 0, and rank 0's logits to every rank (a sum with the others' zeros, exact). The
arithmetic is one process's, so the outputs are bit-identical.

Every rank then runs the same generation (same seed, same logits), so they agree on every token without further
messages; only rank 0 prints. The checks here run on the config, before any weight is read (``check_split``),
and the slices are cut from lazily loaded tensors, so a rank reads and keeps only its part.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .config import TextConfig
from .quantized import Embedding, QuantizedEmbedding, QuantizedLinear

MODES = ("tensor", "pipeline")


@dataclass(frozen=True)
class ShardInfo:
    """How a loaded model is split (``model.shard``; None in one process)."""

    mode: str
    rank: int
    size: int
    layers: tuple[int, ...] | None  # pipeline: layers per rank


class ShardError(ValueError):
    """The model cannot be split this way over this many processes."""


@dataclass(frozen=True)
class Heads:
    """One rank's query heads [q0, q1) and the KV heads [kv0, kv1) they read."""

    q0: int
    q1: int
    kv0: int
    kv1: int


def rank_heads(n_heads: int, n_kv_heads: int, size: int, rank: int) -> Heads:
    per = n_heads // size
    group = n_heads // n_kv_heads  # query heads per KV head
    if n_heads % size or not (n_kv_heads % size == 0 or group % per == 0):
        raise ShardError(f"{n_heads} query heads over {n_kv_heads} KV heads cannot be split over {size} processes "
                         "(each needs a whole share of the query heads, and of the KV heads or one KV head's group)")
    q0, q1 = rank * per, (rank + 1) * per
    return Heads(q0, q1, q0 // group, (q1 - 1) // group + 1)


def _input_alignment(quantization: dict, name: str) -> int:
    """Elements an input-dimension cut of layer ``name`` must be a multiple of: whole quantization groups and
    whole 32-bit words of packed values (32 elements are a whole number of words at any bit width); 1 if dense."""
    q = quantization.get(name, quantization) if quantization else {}
    if not isinstance(q, dict) or "group_size" not in q:
        return 1  # dense: any cut
    return math.lcm(32, int(q["group_size"]))


def check_split(cfg: TextConfig, mode: str, size: int, quantization: dict | None = None, prefix: str = "",
                counts: list[int] | None = None) -> None:
    """Refuse, before any weight is read, a split the model cannot take (``quantization``: the config's)."""
    if mode not in MODES:
        raise ShardError(f"unknown shard mode {mode!r} ({', '.join(MODES)})")
    if size < 2:
        return
    if mode == "pipeline":
        pipeline_counts(cfg.num_hidden_layers, size, counts)
        return
    rank_heads(cfg.num_attention_heads, cfg.num_key_value_heads, size, 0)
    cols = cfg.intermediate_size // size
    align = max(_input_alignment(quantization or {}, f"{prefix}model.layers.{i}.mlp.down_proj")
                for i in range(cfg.num_hidden_layers))
    if cfg.intermediate_size % size or cols % align:
        raise ShardError(f"the MLP's {cfg.intermediate_size} columns cannot be split over {size} processes in whole "
                         f"quantization groups ({align} columns)")
    if (cfg.head_dim * (cfg.num_attention_heads // size)) % _input_alignment(
            quantization or {}, f"{prefix}model.layers.0.self_attn.o_proj"):
        raise ShardError(f"the attention output cannot be split over {size} processes in whole quantization groups")


def pipeline_counts(n_layers: int, size: int, counts: list[int] | None) -> list[int]:
    """Layers per rank: ``counts`` as given (checked), or an even split."""
    if counts is None:
        if n_layers < size:
            raise ShardError(f"{n_layers} layers cannot be split over {size} processes")
        return [n_layers // size + (r < n_layers % size) for r in range(size)]
    if len(counts) != size or sum(counts) != n_layers or min(counts) < 1:
        raise ShardError(f"--pipeline-split {','.join(map(str, counts))}: give {size} layer counts, each at least 1, "
                         f"that add up to the model's {n_layers} layers")
    return list(counts)


def memory_counts(n_layers: int, layer_bytes: int, first_bytes: int, budgets: list[int]) -> list[int]:
    """Layers per rank in proportion to each rank's memory (``budgets``), rank 0 also holding ``first_bytes``
    (the embedding and head): every rank at least one layer."""
    size = len(budgets)
    if n_layers < size:
        raise ShardError(f"{n_layers} layers cannot be split over {size} processes")
    total = n_layers * layer_bytes + first_bytes
    want = [total * b / sum(budgets) - (first_bytes if r == 0 else 0) for r, b in enumerate(budgets)]
    counts = [max(1, round(w / max(layer_bytes, 1))) for w in want]
    while sum(counts) > n_layers:  # take from the rank with the most layers above its share
        r = max((r for r in range(size) if counts[r] > 1), key=lambda r: counts[r] * layer_bytes - want[r])
        counts[r] -= 1
    while sum(counts) < n_layers:
        r = min(range(size), key=lambda r: counts[r] * layer_bytes - want[r])
        counts[r] += 1
    return counts


# ---------------------------------------------------------------------------------------------------- slicing


def _take(a: mx.array, lo: int, hi: int, axis: int) -> mx.array:
    """A copy of ``a``'s [lo, hi) along ``axis`` in a buffer of its own: a slice (even made contiguous) of a row
    range can share the whole tensor's buffer and keep it alive; a gather never does."""
    return mx.take(a, mx.arange(lo, hi), axis=axis)


def _cut_outputs(m: nn.Module, lo: int, hi: int) -> None:
    """Keep output rows [lo, hi) of a linear layer (quantized or dense): whole rows, exact."""
    for name in ("weight", "scales", "biases", "bias"):
        if name in m:
            m[name] = _take(m[name], lo, hi, 0)


def _cut_inputs(m: nn.Module, lo: int, hi: int) -> None:
    """Keep input columns [lo, hi) of a linear layer; a quantized one is cut between groups and packed words."""
    if isinstance(m, QuantizedLinear):
        if lo % m.group_size or (lo * m.bits) % 32 or hi % m.group_size or (hi * m.bits) % 32:
            raise ShardError(f"columns [{lo}, {hi}) are not whole groups of {m.group_size} at {m.bits} bits")
        m.weight = _take(m.weight, lo * m.bits // 32, hi * m.bits // 32, 1)
        m.scales = _take(m.scales, lo // m.group_size, hi // m.group_size, 1)
        m.biases = _take(m.biases, lo // m.group_size, hi // m.group_size, 1)
    else:
        m.weight = _take(m.weight, lo, hi, 1)


class VocabSlice(nn.Module):
    """Rows [lo, hi) of the tied embedding and head: lookups sum one rank's row with the others' zeros (exact);
    the head's logits are gathered from every rank, so each holds all ``vocab`` of them."""

    def __init__(self, table: nn.Module, lo: int, hi: int, vocab: int, group):
        super().__init__()
        self.table = table
        self.lo, self.hi, self.vocab, self.group = lo, hi, vocab, group
        self.chunk = -(-vocab // group.size())

    def __call__(self, ids: mx.array) -> mx.array:
        local = ids - self.lo
        inside = (local >= 0) & (local < self.hi - self.lo)
        rows = self.table(mx.where(inside, local, 0))
        rows = mx.where(inside[..., None], rows, mx.zeros((), rows.dtype))
        return mx.distributed.all_sum(rows, group=self.group)

    def as_linear(self, x: mx.array) -> mx.array:
        part = self.table.as_linear(x)
        if part.shape[-1] < self.chunk:  # the last rank's share may be short: pad to the common width
            part = mx.pad(part, [(0, 0)] * (part.ndim - 1) + [(0, self.chunk - part.shape[-1])])
        every = mx.distributed.all_gather(mx.moveaxis(part, -1, 0), group=self.group)
        return mx.moveaxis(every, 0, -1)[..., : self.vocab]


def _table(embed: nn.Module) -> nn.Module:
    if not isinstance(embed, (Embedding, QuantizedEmbedding)):
        raise ShardError(f"cannot split an embedding of type {type(embed).__name__}")
    return embed


def shard_tensor(text: nn.Module, group) -> None:
    """Keep this rank's share of every layer of a (lazily loaded) Gemma 3 text model, in place."""
    cfg, size, rank = text.cfg, group.size(), group.rank()
    heads = rank_heads(cfg.num_attention_heads, cfg.num_key_value_heads, size, rank)
    d = cfg.head_dim
    cols = cfg.intermediate_size // size
    for layer in text.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        _cut_outputs(attn.q_proj, heads.q0 * d, heads.q1 * d)
        _cut_outputs(attn.k_proj, heads.kv0 * d, heads.kv1 * d)
        _cut_outputs(attn.v_proj, heads.kv0 * d, heads.kv1 * d)
        _cut_inputs(attn.o_proj, heads.q0 * d, heads.q1 * d)
        attn.n_heads, attn.n_kv_heads = heads.q1 - heads.q0, heads.kv1 - heads.kv0
        attn.sum_over = group
        _cut_outputs(mlp.gate_proj, rank * cols, (rank + 1) * cols)
        _cut_outputs(mlp.up_proj, rank * cols, (rank + 1) * cols)
        _cut_inputs(mlp.down_proj, rank * cols, (rank + 1) * cols)
        mlp.sum_over = group
    if not cfg.tie_word_embeddings:
        raise ShardError("only models whose head is tied to the embedding can be split (every Gemma 3 is)")
    table = _table(text.model.embed_tokens)
    chunk = -(-cfg.vocab_size // size)
    lo, hi = min(rank * chunk, cfg.vocab_size), min((rank + 1) * chunk, cfg.vocab_size)
    _cut_outputs(table, lo, hi)
    text.model.embed_tokens = VocabSlice(table, lo, hi, cfg.vocab_size, group)


# ---------------------------------------------------------------------------------------------------- pipeline


class Stage:
    """Where a pipeline rank's activations come from and go to (model/text.py ``Gemma3Model.stage``). Every
    hand-over is evaluated at once, in the same order on every rank, so no rank waits on a send its peer
    has not made (prefill evaluates only the KV caches between chunks)."""

    def __init__(self, group):
        self.group, self.rank, self.size = group, group.rank(), group.size()
        self.first, self.last = self.rank == 0, self.rank == self.size - 1

    def receive(self, shape: tuple, dtype: mx.Dtype) -> mx.array:
        return mx.distributed.recv(shape, dtype, self.rank - 1, group=self.group)

    def finish(self, h: mx.array, norm: nn.Module) -> mx.array:
        """After this rank's layers: pass ``h`` on; rank 0 gets the last rank's normed hidden state back (the
        others return a stand-in of its shape: only rank 0's head reads it)."""
        if not self.last:
            mx.eval(mx.distributed.send(h, self.rank + 1, group=self.group))
        else:
            h = norm(h)
            mx.eval(mx.distributed.send(h, 0, group=self.group))
        if self.first:
            h = mx.distributed.recv(h.shape, h.dtype, self.size - 1, group=self.group)
            mx.eval(h)
        return h


class SharedHead(nn.Module):
    """Rank 0's embedding; as the head, its logits go to every rank (the others add zeros: exact)."""

    def __init__(self, table: nn.Module, group):
        super().__init__()
        self.table, self.group = table, group

    def __call__(self, ids: mx.array) -> mx.array:
        return self.table(ids)

    def as_linear(self, x: mx.array) -> mx.array:
        return mx.distributed.all_sum(self.table.as_linear(x), group=self.group)


class RemoteHead(nn.Module):
    """Another rank's stand-in for the embedding held on rank 0: as the head it receives rank 0's logits."""

    def __init__(self, vocab: int, dtype: mx.Dtype, group):
        super().__init__()
        self.vocab, self.dtype, self.group = vocab, dtype, group

    def __call__(self, ids: mx.array) -> mx.array:
        raise RuntimeError("the embedding is held by pipeline rank 0")

    def as_linear(self, x: mx.array) -> mx.array:
        return mx.distributed.all_sum(mx.zeros((*x.shape[:-1], self.vocab), self.dtype), group=self.group)


_DTYPES = [mx.float32, mx.bfloat16, mx.float16]


def shard_pipeline(text: nn.Module, group, counts: list[int]) -> None:
    """Keep this rank's layers [sum(counts[:rank]), +counts[rank]) of a (lazily loaded) Gemma 3 text model, in
    place; rank 0 keeps the embedding and head. Collective: every rank must call it."""
    cfg, rank = text.cfg, group.rank()
    lo = sum(counts[:rank])
    hi = lo + counts[rank]
    inner = text.model
    inner.layers = inner.layers[lo:hi]
    inner.layer_ids = list(range(lo, hi))
    inner.stage = Stage(group)
    table = _table(inner.embed_tokens)
    # the head's logits dtype, from rank 0 (the others hold no table to ask)
    probe = table.as_linear(mx.zeros((1, 1, cfg.hidden_size), inner.compute_dtype)).dtype if rank == 0 else None
    code = mx.array(_DTYPES.index(probe) if rank == 0 else 0)
    dtype = _DTYPES[int(mx.distributed.all_sum(code, group=group).item())]
    if rank == 0:
        inner.embed_tokens = SharedHead(table, group)
    else:
        inner.embed_tokens = RemoteHead(cfg.vocab_size, dtype, group)
