"""``mlx-gemma perplexity``: perplexity of a model on a text, with its standard error and speed."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import mlx.core as mx
import numpy as np

from .reference import LogitsWriter
from ..generate import context_limit
from .scoring import Tally, scored_logprobs
from .stats import PerplexityStats
from .windows import plan_windows


@dataclass
class PerplexityResult:
    ppl: float
    ppl_error: float
    tokens: int  # scored
    windows: int  # completed
    windows_planned: int
    context: int
    stride: int
    evaluated_tokens: int  # run through the model
    seconds: float
    tokens_per_s: float  # evaluated tokens per second
    kv_bits: int | None = None
    interrupted: bool = False
    peak_memory_gb: float = 0.0
    logits_file: str | None = None
    nll: np.ndarray = field(default=None, repr=False)  # per scored token

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("nll")
        return d

    def format(self) -> str:
        head = (f"perplexity {self.ppl:.4f} ± {self.ppl_error:.4f} over {self.tokens} tokens "
                f"({self.windows} window{'s' * (self.windows != 1)} of {self.context}"
                + (f", stride {self.stride}" if self.stride != self.context else "") + ")")
        if self.interrupted:
            head = f"interrupted after {self.windows} of {self.windows_planned} windows: partial " + head
        tail = f"{self.tokens_per_s:.1f} tokens/s ({self.evaluated_tokens} tokens in {self.seconds:.1f} s), " \
               f"peak memory {self.peak_memory_gb:.2f} GB" + (f", KV cache {self.kv_bits}-bit" if self.kv_bits else "")
        return head + "\n" + tail + (f"\nlogits saved to {self.logits_file}" if self.logits_file else "")


def perplexity(model, ids, *, context: int = 2048, stride: int | None = None, bos_id: int | None = None, chunk: int = 256,
               kv_bits: int | None = None, kv_group_size: int = 64, save_logits=None, logits_top_k: int = 0,
               progress: bool = False) -> PerplexityResult:
    """Perplexity of ``ids`` (BOS first) under ``model`` over the windows of ``windows.plan_windows``.

    ``save_logits``: also write the scored log-probabilities, as the reference of later KL-divergence runs
    (``reference.py``: llama.cpp's format, or the top ``logits_top_k``). Ctrl-C stops at the next chunk and
    returns the statistics of the windows completed (``interrupted``); no partial logits file is kept.
    """
    ids = np.asarray(ids, dtype=np.int32)
    bos_id = int(ids[0]) if bos_id is None and ids.size else bos_id
    windows = plan_windows(ids.size, context, stride, context_limit(model))
    writer = LogitsWriter(save_logits, ids, windows, model.cfg.vocab_size, logits_top_k) if save_logits else None
    nll, finished = [], False
    tally = Tally(windows, "scoring", progress)
    try:
        for p in scored_logprobs(model, ids, windows, bos_id=bos_id, chunk=chunk, kv_bits=kv_bits,
                                 kv_group_size=kv_group_size):
            t = mx.take_along_axis(p.logprobs, mx.array(p.targets)[:, None], axis=-1)[:, 0]
            nll.append(-np.array(t, dtype=np.float64))
            if writer:
                writer.add(p.logprobs, p.targets)
            tally.add(p)
        finished = True
    except KeyboardInterrupt:
        tally.interrupted = True
    finally:
        if writer:
            writer.close(complete=finished)  # an error or Ctrl-C leaves no file
    cut = tally.close()
    all_nll = np.concatenate(nll)[:cut]
    s = PerplexityStats.of(all_nll)
    done, seconds = tally.done, tally.seconds
    evaluated = done * windows.context
    return PerplexityResult(
        ppl=s.ppl, ppl_error=s.ppl_error, tokens=s.tokens, windows=done, windows_planned=windows.count,
        context=windows.context, stride=windows.stride, evaluated_tokens=evaluated, seconds=seconds,
        tokens_per_s=evaluated / seconds if seconds > 0 else 0.0, kv_bits=kv_bits, interrupted=tally.interrupted,
        peak_memory_gb=tally.peak_memory_gb, logits_file=str(save_logits) if writer and finished else None,
        nll=all_nll)
