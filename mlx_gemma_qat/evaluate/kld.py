"""``mlx-gemma kld``: per-token KL divergence of a model against a reference on the same tokens.

The reference is a model in memory (both run window by window, exact float32 log-probs) or a logits file
saved once (``reference.py``), so a large reference need not stay in memory beside the evaluated model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from .reference import LogitsFile, RefPiece, check_vocab
from ..generate import context_limit
from .scoring import Piece, Tally, scored_logprobs
from .stats import KLDStats
from .windows import Windows, plan_windows


def kld_piece(q: Piece, ref: RefPiece) -> dict[str, np.ndarray]:
    """Per-position KL(ref || q), negative log-likelihoods of both, and whether their top tokens agree."""
    lq = q.logprobs
    t = mx.array(q.targets)[:, None]
    nll = -mx.take_along_axis(lq, t, axis=-1)[:, 0]
    if ref.full is not None:
        lr = ref.full
        keep = lr > ref.floor if ref.floor is not None else None
        terms = mx.exp(lr) * (lr - lq)
        kld = (mx.where(keep, terms, 0.0) if keep is not None else terms).sum(axis=-1)
        top_ref = mx.argmax(lr, axis=-1)
        nll_ref = -(ref.target_logprobs if ref.target_logprobs is not None
                    else mx.take_along_axis(lr, t, axis=-1)[:, 0])
    else:  # top-K: the K entries plus the rest of the mass as one bucket (a lower bound)
        lr, ids = ref.top_logprobs, ref.top_ids
        lqk = mx.take_along_axis(lq, ids, axis=-1)
        pr = mx.exp(lr)
        p_rest = mx.maximum(1.0 - pr.sum(axis=-1), 0.0)
        q_rest = mx.maximum(1.0 - mx.exp(lqk).sum(axis=-1), 1e-30)
        rest = mx.where(p_rest > 0, p_rest * (mx.log(mx.maximum(p_rest, 1e-30)) - mx.log(q_rest)), 0.0)
        kld = (pr * (lr - lqk)).sum(axis=-1) + rest
        top_ref = ids[:, 0]
        nll_ref = -ref.target_logprobs
    same = mx.argmax(lq, axis=-1) == top_ref
    mx.eval(kld, nll, nll_ref, same)
    return {"kld": np.array(kld, np.float64), "nll": np.array(nll, np.float64),
            "nll_ref": np.array(nll_ref, np.float64), "same_top": np.array(same)}


@dataclass
class KLDResult:
    stats: KLDStats
    windows: int
    windows_planned: int
    context: int
    stride: int
    seconds: float
    tokens_per_s: float
    reference: str
    kv_bits: int | None = None
    interrupted: bool = False
    peak_memory_gb: float = 0.0
    kld: np.ndarray = field(default=None, repr=False)  # per scored token

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("windows", "windows_planned", "context", "stride", "seconds", "tokens_per_s",
                                           "reference", "kv_bits", "interrupted", "peak_memory_gb")}
        return d | self.stats.to_dict()

    def format(self) -> str:
        head = (f"KL divergence against {self.reference}: {self.stats.tokens} tokens, {self.windows} window{'s' * (self.windows != 1)} of "
                f"{self.context}" + (f", stride {self.stride}" if self.stride != self.context else ""))
        if self.interrupted:
            head = f"interrupted after {self.windows} of {self.windows_planned} windows: partial results. " + head
        tail = f"{self.tokens_per_s:.1f} tokens/s, peak memory {self.peak_memory_gb:.2f} GB"
        return "\n".join([head, "", self.stats.format(), "", tail])


def kl_divergence(model, ids=None, *, ref_model=None, ref_logits=None, context: int = 2048, stride: int | None = None,
                  bos_id: int | None = None, chunk: int = 256, kv_bits: int | None = None, kv_group_size: int = 64,
                  ref_kv_bits: int | None = None, progress: bool = False, reference_name: str | None = None,
                  max_windows: int | None = None) -> KLDResult:
    """KL divergence of ``model`` against ``ref_model`` (on ``ids``, over ``plan_windows(context, stride)``) or
    against a saved ``ref_logits`` file (its own tokens and windows, the first ``max_windows`` of them; ``ids``, if
    given, must equal them).
    Ctrl-C returns the statistics of the completed windows (``interrupted``)."""
    if (ref_model is None) == (ref_logits is None):
        raise ValueError("give a reference model or a reference logits file (one of them)")
    vocab = model.cfg.vocab_size
    ref_file = None
    if ref_logits is not None:
        ref_file = LogitsFile(ref_logits)
        check_vocab(ref_file.vocab, vocab, str(ref_logits))
        if ids is not None and not np.array_equal(np.asarray(ids, np.int32)[: ref_file.ids.size], ref_file.ids):
            raise ValueError(f"{ref_logits} was computed on other tokens than this text (another text, tokenizer "
                             "or window settings): compute it again on this text")
        ids, windows = ref_file.ids, ref_file.windows
        if max_windows is not None and max_windows < windows.count:  # the file's first windows only
            ids = ids[: windows.start(max_windows - 1) + windows.context]
            windows = Windows(ids.size, windows.context, windows.stride)
        if windows.context > context_limit(model):
            raise ValueError(f"{ref_logits} uses a context of {windows.context}, larger than the model's "
                             f"({context_limit(model)})")
    else:
        check_vocab(ref_model.cfg.vocab_size, vocab, "the reference model")
        ids = np.asarray(ids, np.int32)
        windows = plan_windows(ids.size, context, stride, min(context_limit(model), context_limit(ref_model)))
    bos_id = int(ids[0]) if bos_id is None and ids.size else bos_id
    kw = dict(bos_id=bos_id, chunk=chunk, kv_group_size=kv_group_size)
    mine = scored_logprobs(model, ids, windows, kv_bits=kv_bits, **kw)
    theirs = None if ref_file else scored_logprobs(ref_model, ids, windows, kv_bits=ref_kv_bits, **kw)
    parts = []
    tally = Tally(windows, "KL divergence", progress)
    try:
        for q in mine:
            if ref_file is not None:
                r = ref_file.read(q.targets.size)
            else:
                r = RefPiece(target_logprobs=None, full=next(theirs).logprobs)
            parts.append(kld_piece(q, r))
            tally.add(q)
    except KeyboardInterrupt:
        tally.interrupted = True
    finally:
        if ref_file is not None:
            ref_file.close()
    cut = tally.close()
    cat = {k: np.concatenate([p[k] for p in parts])[:cut] for k in parts[0]}
    stats = KLDStats.of(cat["nll"], cat["nll_ref"], cat["kld"], cat["same_top"])
    done, seconds = tally.done, tally.seconds
    evaluated = done * windows.context * (1 if ref_file else 2)
    return KLDResult(stats=stats, windows=done, windows_planned=windows.count, context=windows.context,
                     stride=windows.stride, seconds=seconds, tokens_per_s=evaluated / seconds if seconds else 0.0,
                     reference=reference_name or str(ref_logits or "the reference model"), kv_bits=kv_bits,
                     interrupted=tally.interrupted, peak_memory_gb=tally.peak_memory_gb, kld=cat["kld"])


__all__ = ["kl_divergence", "kld_piece", "KLDResult"]
