"""Speculative decoding that stays exact at any length: a draft proposes up to k tokens, the target checks them
all in one forward over k + 1 positions, and both models' KV caches are rolled back past what it rejected.

Drafts come from a smaller Gemma 3 (``ModelDraft``: its own KV cache, kept in step with the target's tokens by
``sync``) or from the text so far (``PromptLookup``: what followed the latest earlier occurrence of the last few
tokens). Greedy decoding keeps a draft token only when it is the target's argmax, so the output is the target's
own. Sampling uses speculative rejection sampling (Leviathan et al. 2023, Chen et al. 2023): a draft token d drawn
from q is kept with probability min(1, p(d) / q(d)), a rejected one is replaced by a draw from max(0, p - q)
renormalized, and after k kept tokens the target's k + 1-th distribution gives one more; p and q are the
distributions ``sampling.Sampler`` makes of each model's log-probabilities (temperature, top-p, min-p, top-k,
the same settings for both), so the output is distributed exactly as the target's. A lookup draft is a point
mass (q(d) = 1).

Rollback: verification writes k + 1 keys on every layer and the rejected ones are trimmed. Sliding-window layers
keep ``slack`` keys beyond their window for it (``cache.reserve_slack``; quantized caches alike), so the output
does not drift from plain decoding once the window has filled, as mlx-lm's does (its #1423, #1914). The only
admissible difference from plain decoding is float summation order: a forward over k + 1 tokens may round the
last bits of a logit differently from k + 1 one-token forwards, which can flip a near-tie.

Vocabularies: Gemma 3 270M and 1B have 262,144 logits, 4B and larger 262,208; a pair is accepted when the ids
they share are the same pieces (``check_vocab``). Drafts are drawn over the target's width with the draft's extra
ids (if any) masked, and the target's extra ids are never drafted. Image soft tokens are not shown to a text
draft: it sees the text around them.

With a constraint (``constrain.Matcher``) drafts are drawn under the grammar's masks, walked on a fork of the
matcher (a lookup draft is cut at its first token the grammar refuses), the target's k + 1 positions are masked
with the same masks, and the matcher itself takes only the drafts the target accepted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator

import mlx.core as mx
import numpy as np

from .model.cache import can_trim, reserve_slack, trim_cache
from .prefill import prefill
from .sampling import Sampler

DEFAULT_DRAFT_TOKENS = 3  # with a draft model (scripts/bench_speculative.py)
DEFAULT_LOOKUP_TOKENS = 4  # with prompt lookup
MAX_DRAFT_TOKENS = 32


class DraftError(ValueError):
    """A draft that cannot serve this target (vocabulary, settings)."""


@dataclass
class SpeculativeStats:
    """What speculation did in one generation."""

    rounds: int = 0  # target forwards that checked drafts (and gave one token more)
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens kept
    draft_s: float = 0.0  # drafting (the draft model's forwards, the lookup, the grammar's masks)
    verify_s: float = 0.0  # the target's forwards over the drafts, and accepting

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_round(self) -> float:
        """Mean tokens one target forward yields: the accepted drafts plus the target's own next token."""
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0

    def as_dict(self) -> dict:
        return {"rounds": self.rounds, "drafted": self.drafted, "accepted": self.accepted,
                "acceptance_rate": round(self.acceptance_rate, 4), "tokens_per_round": round(self.tokens_per_round, 4),
                "draft_s": round(self.draft_s, 4), "verify_s": round(self.verify_s, 4)}

    def describe(self) -> str:
        return (f"Speculative: {self.accepted}/{self.drafted} drafts accepted ({100 * self.acceptance_rate:.1f}%), "
                f"{self.tokens_per_round:.2f} tokens per target forward, draft {self.draft_s:.2f} s, "
                f"verify {self.verify_s:.2f} s")


def _pieces(tokenizer) -> dict[int, str]:
    from .constrain import _hf_tokenizer

    hf = _hf_tokenizer(tokenizer)
    backend = hf.backend_tokenizer if hasattr(hf, "backend_tokenizer") else hf
    return {i: p for p, i in backend.get_vocab(with_added_tokens=True).items()}


def check_vocab(target_tokenizer, draft_tokenizer) -> None:
    """Raise DraftError unless every id both tokenizers have is the same piece in both (an id only one has is
    fine: the draft's are never drafted, the target's are only ever its own)."""
    if draft_tokenizer is target_tokenizer:
        return
    a, b = _pieces(target_tokenizer), _pieces(draft_tokenizer)
    shared = sorted(set(a) & set(b))
    if not shared:
        raise DraftError("the draft model's vocabulary shares no ids with the target's")
    differ = [i for i in shared if a[i] != b[i]]
    if differ:
        i = differ[0]
        raise DraftError(f"the draft model's vocabulary differs from the target's at {len(differ)} of {len(shared)} "
                         f"shared ids (first: id {i} is {b[i]!r} in the draft, {a[i]!r} in the target): a draft must "
                         "be a model of the same family (any Gemma 3 drafts for any other)")


def check_num_draft(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_DRAFT_TOKENS:
        raise DraftError(f"num_draft_tokens must be an integer in [1, {MAX_DRAFT_TOKENS}], not {k!r}")
    return k


def _fit(logits: mx.array, width: int) -> mx.array:
    """``logits`` (1, V) over ``width`` ids: extra ids dropped, missing ones at -inf (never drawn)."""
    v = logits.shape[-1]
    if v == width:
        return logits
    if v > width:
        return logits[..., :width]
    return mx.concatenate([logits, mx.full(logits.shape[:-1] + (width - v,), -mx.inf, logits.dtype)], axis=-1)


def _logprobs(logits: mx.array) -> mx.array:
    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


@dataclass
class Draft:
    """One round's proposal: ``tokens`` (host ints, or an (n,) array not yet evaluated), ``probs`` (n, width) the
    draft distribution each was drawn from (None: point masses), ``masks`` the grammar's masks at the n + 1
    positions (None without a constraint)."""

    tokens: list[int] | mx.array
    probs: mx.array | None = None
    masks: list[mx.array] | None = None
    consumed: int = 0  # drafts the grammar took (all but an eos that ends the draft)

    def __len__(self) -> int:
        return len(self.tokens) if isinstance(self.tokens, list) else self.tokens.size


def _common_prefix(a: list[int], b: list[int]) -> int:
    """The length of the longest common prefix (slices compare at C speed; a mismatch is searched by halving)."""
    lo, hi = 0, min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    while lo + 1 < hi:  # a[:lo] == b[:lo], a[:hi] != b[:hi]
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class ModelDraft:
    """A draft model with its own KV cache, which follows the target's tokens: ``sync`` trims what the target did
    not keep and prefills what the draft has not seen. Keep one per conversation to reuse its cache across turns.

    ``skip``: ids the draft never sees (the target's image soft tokens); ids past the draft's vocabulary are skipped
    too. ``kv_bits``/``kv_group_size``: the draft's own KV quantization."""

    def __init__(self, model, *, skip: tuple[int, ...] = (), kv_bits: int | None = None, kv_group_size: int = 64,
                 prefill_step_size: int = 256):
        self.model = model
        self.vocab = int(model.cfg.vocab_size)
        self.skip = frozenset(int(i) for i in skip)
        self.kv_bits, self.kv_group_size = kv_bits, kv_group_size
        self.prefill_step_size = prefill_step_size
        self.cache: list | None = None
        self.tokens: list[int] = []  # what the cache holds
        self._pending: mx.array | None = None  # drafted tokens fed to the cache, not yet read back

    def reset(self) -> None:
        self.cache, self.tokens, self._pending = None, [], None

    def _visible(self, ids: list[int]) -> list[int]:
        return [t for t in ids if t < self.vocab and t not in self.skip]

    def sync(self, context: list[int], slack: int) -> mx.array:
        """Make the cache hold ``context`` but its last token, feed that one, and return the next token's logits."""
        if self._pending is not None:
            self.tokens += self._pending.tolist()
            self._pending = None
        ctx = self._visible(context)
        if not ctx:
            raise DraftError("the draft sees no token of the context")
        c = min(_common_prefix(self.tokens, ctx), len(ctx) - 1)  # the last token is always fed: it drafts the next
        drop = len(self.tokens) - c
        if self.cache is None or not can_trim(self.cache, drop):
            self.cache = self.model.make_cache(self.kv_bits, self.kv_group_size, slack)
            self.tokens, c = [], 0
        else:
            reserve_slack(self.cache, slack)
            trim_cache(self.cache, drop)
            del self.tokens[c:]
        logits = prefill(self.model, mx.array(ctx[c:]), self.cache, self.prefill_step_size)
        self.tokens = list(ctx)
        return logits

    def propose(self, context: list[int], k: int, sampler: Sampler, width: int, matcher=None) -> Draft:
        if matcher is not None and matcher.done:
            return Draft([], None, [matcher.mask()])  # (the end of sequence, where the grammar has stopped)
        logits = self.sync(context, k + 1)
        tokens, probs, masks = [], [], ([] if matcher is not None else None)
        for i in range(k):
            logits = _fit(logits, width)
            if matcher is not None:
                masks.append(matcher.mask())
                logits = mx.where(masks[-1], logits, mx.array(-mx.inf, logits.dtype))
            lp = _logprobs(logits)
            if sampler.greedy:
                t = mx.argmax(lp, axis=-1)
            else:
                z = sampler.logits(lp)
                t = sampler.categorical(z)
                probs.append(mx.softmax(z, axis=-1))
            tokens.append(t)
            if matcher is not None:
                ti = int(t.item())
                if matcher.ends(ti):  # the output would end here: drafted, not consumed, nothing after
                    break
                matcher.consume(ti)
            if i + 1 < k:
                logits = self.model(t.reshape(1, 1), self.cache)[:, -1, :]
        consumed = len(tokens)
        if matcher is not None:
            if tokens and matcher.ends(int(tokens[-1].item())):
                consumed -= 1
            else:
                masks.append(matcher.mask())
        fed = mx.concatenate(tokens[: len(tokens) - 1]) if len(tokens) > 1 else None
        self._pending = fed  # read back at the next sync, once evaluated
        if matcher is not None:
            tokens = [int(t.item()) for t in tokens]
        else:
            tokens = mx.concatenate(tokens)
        return Draft(tokens, mx.concatenate(probs) if probs else None, masks, consumed)


class PromptLookup:
    """Drafts from the text so far: the tokens that followed the latest earlier occurrence of the last ``n``
    tokens, for ``n`` from ``max_ngram`` down to ``min_ngram`` (prompt lookup decoding; llama.cpp's lookup). No
    second model: a rewrite, a summary or code editing repeats long runs of the prompt."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise DraftError("prompt lookup needs 1 <= min_ngram <= max_ngram")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def lookup(self, context: list[int], k: int) -> list[int]:
        arr = np.asarray(context, np.int64)
        n_ctx = arr.size
        for n in range(min(self.max_ngram, n_ctx - 1), self.min_ngram - 1, -1):
            tail = arr[n_ctx - n:]
            starts = np.nonzero(arr[: n_ctx - n] == tail[0])[0]  # an occurrence that something follows
            for j in range(1, n):
                starts = starts[arr[starts + j] == tail[j]]
            if starts.size:
                s = int(starts[-1]) + n
                return arr[s : s + k].tolist()
        return []

    def propose(self, context: list[int], k: int, sampler: Sampler, width: int, matcher=None) -> Draft:
        tokens = [t for t in self.lookup(context, k)]
        cut = next((i for i, t in enumerate(tokens) if t >= width), len(tokens))
        tokens = tokens[:cut]
        if matcher is None:
            return Draft(tokens)
        masks, kept = [], []
        if matcher.done:
            return Draft([], None, [matcher.mask()])  # (the end of sequence, where the grammar has stopped)
        for t in tokens:  # keep the drafts the grammar allows, with the mask at each
            words = matcher.mask_words()
            masks.append(matcher.mask(words))
            if not (int(words[t >> 5]) >> (t & 31)) & 1:
                return Draft(kept, None, masks, len(kept))
            kept.append(t)
            if matcher.ends(t):  # the output would end here: not consumed, nothing after
                return Draft(kept, None, masks, len(kept) - 1)
            matcher.consume(t)
        masks.append(matcher.mask())
        return Draft(kept, None, masks, len(kept))


def _accept(lps: mx.array, draft: Draft, sampler: Sampler) -> tuple[int, int]:
    """(drafts kept, the target's token after them) from the target's log-probabilities ``lps`` (n + 1, width)."""
    n = len(draft)
    if sampler.greedy:
        best = mx.argmax(lps, axis=-1)
        if n == 0:
            return 0, int(best.item())
        tokens = mx.array(draft.tokens) if isinstance(draft.tokens, list) else draft.tokens
        best, tokens = best.tolist(), tokens.tolist()
        a = 0
        while a < n and best[a] == tokens[a]:
            a += 1
        return a, best[a]
    if n == 0:
        return 0, int(sampler(lps).item())
    tokens = mx.array(draft.tokens) if isinstance(draft.tokens, list) else draft.tokens
    p = sampler.probs(lps)  # (n + 1, width)
    rows = mx.arange(n)
    if draft.probs is not None:
        q = draft.probs
    else:  # point masses
        q = (mx.arange(p.shape[-1])[None] == tokens[:, None]).astype(mx.float32)
    keep = sampler.uniform((n,)) * q[rows, tokens] < p[rows, tokens]  # u < p(d)/q(d), with q(d) > 0 for a drawn d
    # one draw per position, all in one evaluation: from max(0, p - q) where a draft may be rejected (p(d) < q(d)
    # there, so some mass is left), from p after the last draft; only the one after the first rejection is used
    rest = mx.concatenate([mx.maximum(p[:n] - q, 0.0), p[n:]])
    draws = sampler.categorical(mx.log(rest))
    keep, draws = keep.tolist(), draws.tolist()
    a = next((i for i, ok in enumerate(keep) if not ok), n)
    return a, draws[a]


def _masked(logits: mx.array, mask: mx.array | None) -> mx.array:
    return logits if mask is None else mx.where(mask, logits, mx.array(-mx.inf, logits.dtype))


def speculative_round(
    model,
    drafter: ModelDraft | PromptLookup,
    cache: list,
    context: list[int],
    y: int,
    k: int,
    sampler: Sampler,
    matcher=None,
    stats: SpeculativeStats | None = None,
) -> tuple[list[int], int, mx.array]:
    """One round after the target's token ``y`` (not yet in ``cache``; ``context``: the ids before it, which
    ``cache`` holds): ``matcher`` takes y, the drafter proposes up to ``k`` tokens, the target checks y and them
    in one forward, and the cache (and matcher) roll back past the rejected ones. Returns (the drafts kept, the
    target's token after them, the target's log-probabilities (n + 1, width) at y and each draft: row i is the
    distribution of the token after the i-th one fed). ``cache`` then holds ``context``, y and the drafts kept;
    ``cache``'s sliding layers need ``k`` tokens of slack (``reserve_slack``)."""
    width = int(model.cfg.vocab_size)
    t0 = time.perf_counter()
    if matcher is not None:
        matcher.consume(y)
    probe = matcher.fork() if matcher is not None and k else None  # walks the drafts; matcher keeps what is accepted
    if k:
        draft = drafter.propose(context + [y], k, sampler, width, probe)
    else:  # the last token: no drafts, the target alone (under the grammar's mask)
        draft = Draft([], None, None if matcher is None else [matcher.mask()])
    n = len(draft)
    fed = mx.array([y])
    if n:
        fed = mx.concatenate([fed, draft.tokens if isinstance(draft.tokens, mx.array) else mx.array(draft.tokens)])
    if n and isinstance(draft.tokens, mx.array):
        mx.eval(fed, draft.probs if draft.probs is not None else [])  # the draft's forwards run here
    t1 = time.perf_counter()
    logits = model(fed[None], cache)[0]  # (n + 1, width)
    if draft.masks is not None:  # the grammar's mask at each position (none after the end it accepted)
        ms = draft.masks[: n + 1]
        ms += [mx.ones((width,), mx.bool_)] * (n + 1 - len(ms))
        logits = _masked(logits, mx.stack(ms))
    lps = _logprobs(logits)
    a, nxt = _accept(lps, draft, sampler)
    t2 = time.perf_counter()
    trim_cache(cache, n - a)
    kept = fed[1 : 1 + a].tolist() if a else []
    if matcher is not None:
        for t in kept[: draft.consumed]:  # (an eos the drafts ended on is not consumed: the output ends there)
            matcher.consume(t)
    if n and stats is not None:
        stats.rounds += 1
        stats.drafted += n
        stats.accepted += a
        stats.draft_s += t1 - t0
        stats.verify_s += t2 - t1
    return kept, nxt, lps


def speculative_step(
    prompt: mx.array,
    model,
    drafter: ModelDraft | PromptLookup,
    *,
    num_draft: int,
    sampler: Sampler,
    history: list[int] = (),
    max_tokens: int = 256,
    cache: list,
    prefill_step_size: int = 256,
    on_prefill_done: Callable[[], None] | None = None,
    embeddings: mx.array | None = None,
    groups: mx.array | None = None,
    matcher=None,
    stats: SpeculativeStats | None = None,
) -> Iterator[tuple[int, mx.array]]:
    """``generate.generate_step`` with speculation: yields (token, log-probabilities) pairs, the target's tokens
    (greedy: the very tokens plain decoding gives; sampled: from the same distribution). ``history``: the ids
    ``cache`` already holds. When the consumer stops early, the cache is trimmed back to the tokens yielded."""
    check_num_draft(num_draft)
    stats = stats if stats is not None else SpeculativeStats()
    reserve_slack(cache, num_draft)
    context = [int(t) for t in history] + prompt.tolist()

    logits = prefill(model, prompt, cache, prefill_step_size, embeddings=embeddings, groups=groups)
    lp = _logprobs(_masked(logits, None if matcher is None else matcher.mask()))
    y = int(sampler(lp).item())
    if on_prefill_done is not None:
        on_prefill_done()
    emitted = 0
    while True:
        yield y, lp[0]
        emitted += 1
        left = max_tokens - emitted
        if left <= 0:
            return
        # this round: feed y and k drafts, keep y and the a drafts accepted, and the target's next token after them
        kept, nxt, lps = speculative_round(model, drafter, cache, context, y, min(num_draft, left - 1), sampler,
                                           matcher, stats)
        a = len(kept)
        context += [y] + kept
        for i, t in enumerate(kept):
            try:
                yield t, lps[i]
            except GeneratorExit:
                trim_cache(cache, a - 1 - i)  # the cache holds exactly the tokens yielded
                raise
        emitted += a
        y, lp = nxt, lps[a : a + 1]


def make_drafter(model, draft_model=None, prompt_lookup: bool = False,
                 **draft_options) -> ModelDraft | PromptLookup | None:
    """The drafter for ``model``: a ``ModelDraft`` (kept as given, so its cache carries over) or a model to wrap in
    one (with ``draft_options``: ModelDraft's kv_bits, kv_group_size, prefill_step_size), or prompt lookup; None
    for plain decoding."""
    if draft_model is not None and prompt_lookup:
        raise DraftError("give a draft model or prompt lookup, not both")
    if prompt_lookup:
        return PromptLookup()
    if draft_model is None or isinstance(draft_model, ModelDraft):
        return draft_model
    if not hasattr(draft_model, "make_cache") or not hasattr(draft_model, "cfg"):
        raise DraftError("draft_model must be a loaded Gemma 3 model (mlx_gemma_qat.load) or a ModelDraft")
    mcfg = getattr(model, "mcfg", None)
    return ModelDraft(draft_model, skip=(mcfg.image_token_index,) if mcfg is not None else (), **draft_options)


def default_num_draft(prompt_lookup: bool) -> int:
    return DEFAULT_LOOKUP_TOKENS if prompt_lookup else DEFAULT_DRAFT_TOKENS
