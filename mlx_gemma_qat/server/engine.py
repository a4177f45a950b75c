"""The server's generation engine: one worker thread runs every request, so clients are served concurrently.

Each round the worker
  1. admits waiting requests while fewer than ``parallel`` run, each starting from the longest prefix a kept KV
     cache holds (``reuse.py``); the rest wait in a queue of at most ``max_queue``, and a request beyond that
     is refused at once (``QueueFull``: the server answers 503),
  2. runs one prefill chunk of one prefilling request (round robin: a long prompt never stalls the others),
  3. runs one decode step of every decoding request: one batched forward (``decode_batch`` > 1: the
     projections and MLP of all rows at once, attention row by row against each row's own cache) or one
     request after another (a fair queue, for devices where batching does not pay, like MLX's CPU backend);
     a request that speculates (below) runs one speculative round instead, on its own,
  4. streams each request's new text to its client (stop strings held back, as ``generate`` does), finishes
     requests (eos, stop string, max tokens) and keeps their caches for reuse; a cancelled request (its client
     went away) is dropped with its cache.

All MLX work happens on the worker thread; ``submit`` validates on the caller's thread and hands back a
``Handle`` whose events arrive on the caller's asyncio loop (or a blocking queue outside one).

Speculative decoding (``speculative.py``): an engine made with a ``draft_model`` or ``prompt_lookup`` lets each
decoding request (unless its ``SamplingParams`` opt out: ``speculative=False`` or ``num_draft_tokens=0``) run one
speculative round per engine round: up to k tokens drafted, checked by one target forward over them and the
pending token, the rejected ones trimmed from the cache (and the grammar's matcher), and the pending token and the
accepted drafts emitted one by one as plain decoding would emit them (each may finish the request: the cache is then
trimmed back to the tokens emitted, so a kept cache holds exactly its key). Greedy output is the target's own;
sampled output follows the target's distribution (speculative rejection sampling). Each speculating request has
its own drafter: a ``PromptLookup``, or a ``ModelDraft`` whose KV cache (the engine's ``kv_bits``) is prefilled
from the request's whole ids at its first round (one go, in that round) and dropped when it ends: draft caches are
not kept in the reuse pool, so a request that reuses a kept target cache still prefills the draft from the start.
Its usage has its ``SpeculativeStats`` (``Usage.speculative``). Speculating requests are not batched: each
round is one forward of its own over k + 1 tokens.

Images arrive as 8-bit RGB at the tower's input size (``load_image``: a quarter of the bytes of their float
pixel values while a request waits) and are normalized when the request is admitted.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator

import mlx.core as mx
import numpy as np

from ..constrain import STOP_WITH_CONSTRAINT
from ..generate import ContextLengthError, context_limit, image_token_ids
from ..image import normalize, resized
from ..model.cache import check_kv_quantization, reserve_slack, trim_cache
from ..model.multimodal import image_groups
from ..prefill import chunk_bounds
from ..sampling import Sampler
from ..speculative import (
    DraftError,
    ModelDraft,
    PromptLookup,
    SpeculativeStats,
    check_num_draft,
    default_num_draft,
    make_drafter,
    speculative_round,
)
from ..stop_strings import StopStrings
from .reuse import CachePool, default_cache_bytes, prompt_key
from .sampling import SamplingParams, request_sampler

__all__ = ["Engine", "Handle", "Event", "Usage", "SamplingParams", "RequestError", "ContextLengthError", "QueueFull"]


class RequestError(ValueError):
    """A request the engine cannot run (the HTTP layer answers 400 with this message)."""


class QueueFull(RuntimeError):
    """Every slot runs and the queue is full: the request is refused now (the HTTP layer answers 503)."""


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens taken from a kept KV cache, not prefilled
    queued_s: float  # waiting before work began
    prompt_s: float  # prefill
    generation_s: float  # decode
    speculative: dict | None = None  # SpeculativeStats.as_dict() of a request that speculated


@dataclass
class Event:
    text: str  # new text since the last event (may be "")
    token: int | None  # this step's token id
    logprob: float | None = None  # when params.logprobs
    top_logprobs: list[tuple[int, float]] | None = None  # (token id, logprob), most likely first
    finish_reason: str | None = None  # "stop" | "length" on the last event ("cancelled" after ``cancel``)
    usage: Usage | None = None  # on the last event only


class Handle:
    """A submitted request, as its client sees it: events, and ``cancel``."""

    def __init__(self, engine: "Engine", prompt_tokens: int):
        self._engine = engine
        self.prompt_tokens = prompt_tokens
        self.cancelled = False
        try:
            self._loop = asyncio.get_running_loop()
            self._queue = asyncio.Queue()
        except RuntimeError:
            self._loop, self._queue = None, queue.Queue()

    def _put(self, item) -> None:  # worker thread
        if self._loop is None:
            self._queue.put(item)
        elif not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def cancel(self) -> None:
        """Stop generating; the request's KV cache is freed, not kept for reuse."""
        if not self.cancelled:
            self.cancelled = True
            self._engine._wake()

    async def events(self) -> AsyncIterator[Event]:
        while True:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason is not None:
                return

    def __iter__(self) -> Iterator[Event]:
        if self._loop is not None:
            raise RuntimeError("this handle was submitted on an asyncio loop: use `async for ... in handle.events()`")
        while True:
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason is not None:
                return


@dataclass
class _Request:
    handle: Handle
    ids: list[int]
    key: np.ndarray
    pixels: np.ndarray | None  # (n, S, S, 3) uint8
    owner: str  # whose kept caches it may reuse and whose it leaves ("": everyone's)
    params: SamplingParams
    max_tokens: int
    submitted: float
    matcher: object = None  # a constrain.Matcher: the request's output is constrained
    sampler: Sampler = None
    cache: list | None = None
    drafter: ModelDraft | PromptLookup | None = None  # when the request speculates
    num_draft: int = 0  # tokens drafted per round
    spec: SpeculativeStats | None = None
    cached: int = 0  # prompt tokens the cache held when the request started
    embeddings: mx.array | None = None  # of the tokens still to prefill, when they include images
    groups: np.ndarray | None = None
    chunks: list = field(default_factory=list)  # prefill bounds left, relative to ``cached``
    y: mx.array | None = None  # the token to emit next (decode)
    lp: mx.array | None = None  # its log-probabilities
    tokens: list[int] = field(default_factory=list)  # emitted
    detok: object = None
    stops: StopStrings = None
    started: float | None = None
    prefilled: float | None = None


@dataclass
class _Round:
    """What changed before a round: queued requests whose clients went away, requests admitted now, running
    requests whose clients went away."""

    gone: list[_Request]
    new: list[_Request]
    cancelled: list[_Request]


class Engine:
    """Runs generation requests for a model on a worker thread (see the module docstring).

    ``kv_bits``/``kv_group_size``: quantized KV caches; ``cache_entries``/``cache_bytes``: bounds of the kept
    caches (``reuse.CachePool``; ``cache_bytes`` None: ``reuse.default_cache_bytes()``, a share of the device's
    memory); ``slack``: tokens a sliding layer keeps beyond its window so a kept cache can step back that far;
    ``decode_batch``: most requests per batched decode step (1: one after another; None: batched on a GPU, one
    after another on the CPU, where a batched step costs as much as its rows run apart); ``prefill_step``:
    tokens per prefill chunk; ``parallel``: most requests running at once (each holds a KV cache);
    ``max_queue``: most requests waiting for a slot.

    Speculative decoding (see the module docstring): ``draft_model``, a loaded Gemma 3 (``mlx_gemma_qat.load``)
    whose vocabulary the caller has checked against the model's (``speculative.check_vocab``), or
    ``prompt_lookup``, not both; ``num_draft_tokens``: tokens drafted per round (None: 3 with a draft model, 4 with
    prompt lookup), which a request may change (``SamplingParams.num_draft_tokens``). A draft model's caches are
    quantized as ``kv_bits``/``kv_group_size`` say (the group size must divide its head_dim too).
    """

    def __init__(self, model, tokenizer, *, kv_bits: int | None = None, kv_group_size: int = 64,
                 cache_entries: int = 8, cache_bytes: int | None = None, slack: int = 64,
                 decode_batch: int | None = None, prefill_step: int = 256, parallel: int = 8, max_queue: int = 16,
                 draft_model=None, prompt_lookup: bool = False, num_draft_tokens: int | None = None):
        check_kv_quantization(kv_bits, kv_group_size, model.cfg.head_dim)
        if draft_model is not None and prompt_lookup:
            raise DraftError("give a draft model or prompt lookup, not both")
        if draft_model is not None:
            if not hasattr(draft_model, "make_cache") or not hasattr(draft_model, "cfg"):
                raise DraftError("draft_model must be a loaded Gemma 3 model (mlx_gemma_qat.load)")
            check_kv_quantization(kv_bits, kv_group_size, draft_model.cfg.head_dim)  # its cache is quantized alike
        if num_draft_tokens is not None:
            if draft_model is None and not prompt_lookup:
                raise DraftError("num_draft_tokens needs a draft model or prompt lookup")
            check_num_draft(num_draft_tokens)
        self.draft_model, self.prompt_lookup = draft_model, prompt_lookup
        self.num_draft = 0 if draft_model is None and not prompt_lookup else (
            num_draft_tokens or default_num_draft(prompt_lookup))
        if slack < 0 or prefill_step < 1 or parallel < 1 or max_queue < 0:
            raise ValueError("slack must be >= 0, prefill_step >= 1, parallel >= 1 and max_queue >= 0")
        self.model, self.tokenizer = model, tokenizer
        self.kv_bits, self.kv_group_size, self.slack = kv_bits, kv_group_size, slack
        self.prefill_step = prefill_step
        self.parallel, self.max_queue = parallel, max_queue
        if decode_batch is None:
            decode_batch = 1 if mx.default_device() == mx.cpu else 8
        if decode_batch < 1:
            raise ValueError("decode_batch must be >= 1")
        self.decode_batch = decode_batch
        self.pool = CachePool(cache_entries, default_cache_bytes() if cache_bytes is None else cache_bytes)
        self.context = context_limit(model)
        self.eos = set(tokenizer.eos_token_ids)
        self._image_ids = image_token_ids(model)
        self._inbox: deque[_Request] = deque()
        self._active: list[_Request] = []
        self._turn = itertools.count()  # round robin over prefilling requests
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._running = False

    # -- caller side -------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._running = True
            self._thread = threading.Thread(target=self._work, name="mlx-gemma-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._running = False
            self._cv.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    @property
    def speculative(self) -> bool:
        """Whether requests speculate (unless they opt out)."""
        return self.num_draft > 0

    @property
    def vision(self) -> bool:
        return self._image_ids is not None

    def load_image(self, data: bytes) -> np.ndarray:
        """An image's bytes as the 8-bit RGB (S, S, 3) that ``submit`` takes (raises ``image.ImageError``)."""
        if not self.vision:
            raise RequestError("this model is text-only: it has no vision tower to read images")
        if not isinstance(data, (bytes, bytearray)):
            raise RequestError("an image must be given as its bytes")
        return resized(bytes(data), self.model.mcfg.vision.image_size)

    def load_images(self, sources: list[bytes]) -> np.ndarray:
        """``load_image`` of each (at least one), stacked (n, S, S, 3)."""
        return np.stack([self.load_image(s) for s in sources])

    def check_prompt(self, ids: list[int], n_images: int) -> None:
        """Raise ContextLengthError or RequestError for a prompt that cannot run with ``n_images`` images (checked
        before any image is read)."""
        if not ids:
            raise RequestError("empty prompt")
        if len(ids) >= self.context:
            raise ContextLengthError(f"the prompt is {len(ids)} tokens; the model's context is {self.context}")
        if not self.vision:
            if n_images:
                raise RequestError("this model is text-only: it has no vision tower to read images")
            return
        image_token, per_image = self._image_ids[2], self._image_ids[3]
        runs = int(image_groups(np.asarray(ids), image_token).max(initial=-1)) + 1
        n_tok = int((np.asarray(ids) == image_token).sum())
        if runs != n_images or n_tok != n_images * per_image:
            raise RequestError(f"the prompt has {n_tok} image tokens in {runs} run(s) for {n_images} image(s)")

    def has_room(self) -> bool:
        """Whether a request submitted now would be queued rather than refused."""
        with self._cv:
            return self._room()

    def _room(self) -> bool:  # under self._cv
        return len(self._inbox) + len(self._active) < self.parallel + self.max_queue

    def submit(self, ids: list[int], params: SamplingParams, pixels: np.ndarray | None = None, *,
               owner: str = "", matcher=None) -> Handle:
        """Queue a request for ``ids`` (with its images' ``pixels`` from ``load_image`` for their image tokens);
        raises RequestError or ContextLengthError for one that cannot run, QueueFull when there is no room.
        ``owner``: the request reuses and leaves kept caches only among requests of the same owner. ``matcher``:
        a fresh ``constrain.Matcher`` (``Constraint.matcher(tokenizer, logits_width(model))``, built off the event
        loop: it can take a while) that constrains the output; it runs beside free requests in the same rounds.
        Call it on the event-loop thread that reads the events."""
        try:
            params.check()
        except ValueError as e:
            raise RequestError(str(e)) from None
        if matcher is not None and params.stop:
            raise RequestError(STOP_WITH_CONSTRAINT)
        if matcher is not None and matcher.tokens:
            raise RequestError("a constraint's matcher serves one request: build a new one")
        ids = [int(i) for i in ids]
        n_images = 0 if pixels is None else len(pixels)
        self.check_prompt(ids, n_images)
        if n_images:
            size = self.model.mcfg.vision.image_size
            if pixels.dtype != np.uint8 or pixels.shape[1:] != (size, size, 3):
                raise RequestError(f"images must be 8-bit RGB ({size}, {size}, 3), as load_image gives them")
        handle = Handle(self, len(ids))
        image_token = self._image_ids[2] if self.vision else None
        req = _Request(handle=handle, ids=ids, key=prompt_key(ids, pixels, image_token), pixels=pixels, owner=owner,
                       params=params, max_tokens=min(params.max_tokens, self.context - len(ids)),
                       submitted=time.perf_counter(), matcher=matcher)
        with self._cv:
            if not self._running:
                raise RuntimeError("the engine is not running")
            if not self._room():
                raise QueueFull(f"the server is busy ({self.parallel} requests running, {self.max_queue} waiting)")
            self._inbox.append(req)
            self._cv.notify()
        return handle

    def active_count(self) -> int:
        """Requests submitted and not finished (queued, prefilling or decoding)."""
        with self._cv:
            return len(self._inbox) + len(self._active)

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify()

    # -- worker side -------------------------------------------------------------------------------

    def _work(self) -> None:
        while (changes := self._next_round()) is not None:
            self._round(changes)

    def _next_round(self) -> _Round | None:
        """Wait for work; what changed since the last round (None: the engine stops)."""
        with self._cv:
            while self._running and not self._inbox and not self._active:
                self._cv.wait()
            if not self._running:
                for r in list(self._inbox) + self._active:
                    r.handle._put(RuntimeError("the server is shutting down"))
                return None
            gone = [r for r in self._inbox if r.handle.cancelled]
            for r in gone:
                self._inbox.remove(r)
            new = [self._inbox.popleft() for _ in range(min(len(self._inbox), self.parallel - len(self._active)))]
            return _Round(gone, new, [r for r in self._active if r.handle.cancelled])

    def _round(self, changes: _Round) -> None:
        """One round (see the module docstring): only ``changes`` and the model's outputs decide what it does."""
        for r in changes.gone:
            r.handle._put(Event("", None, finish_reason="cancelled"))
        for r in changes.new:
            self._guard(r, self._admit)
        for r in changes.cancelled:
            if r in self._active:
                self._active.remove(r)  # its cache goes with it
                r.cache = None
                r.handle._put(Event("", None, finish_reason="cancelled"))
        self._work_on_active()

    def _work_on_active(self) -> None:
        prefilling = [r for r in self._active if r.chunks]
        if prefilling:
            r = prefilling[next(self._turn) % len(prefilling)]
            self._guard(r, self._prefill_chunk)
        decoding = [r for r in self._active if r.y is not None]
        plain = [r for r in decoding if r.drafter is None]
        for i in range(0, len(plain), self.decode_batch):
            self._guard_all(plain[i : i + self.decode_batch], self._decode)
        for r in decoding:
            if r.drafter is not None:
                self._guard(r, self._speculate)

    def _guard(self, r: _Request, fn) -> None:
        self._guard_all([r], lambda rs: fn(rs[0]))

    def _guard_all(self, rs: list[_Request], fn) -> None:
        """Run ``fn(rs)``; a failure ends those requests with the error (the engine keeps serving)."""
        try:
            fn(rs)
        except Exception as e:  # noqa: BLE001 - reported to the request's client
            for r in rs:
                self._fail(r, e)

    def _fail(self, r: _Request, e: Exception) -> None:
        """End ``r`` with the error ``e`` (its cache is dropped)."""
        r.handle._put(e)
        r.cache = None
        if r in self._active:
            self._active.remove(r)

    def _admit(self, r: _Request) -> None:
        r.started = time.perf_counter()
        r.sampler = request_sampler(r.params)
        r.detok = self.tokenizer.detokenizer
        r.stops = StopStrings(list(r.params.stop))
        cache, n = self.pool.take(r.key, r.owner)
        r.cache = cache if cache is not None else self.model.make_cache(self.kv_bits, self.kv_group_size, self.slack)
        r.cached = n
        k = self._num_draft(r.params)
        if k:
            r.num_draft, r.spec = k, SpeculativeStats()
            reserve_slack(r.cache, k)  # a round trims up to k rejected drafts on sliding layers too
            r.drafter = make_drafter(self.model, self.draft_model, self.prompt_lookup, kv_bits=self.kv_bits,
                                     kv_group_size=self.kv_group_size, prefill_step_size=self.prefill_step)
        rest = np.array(r.ids[n:])
        if self._image_ids is not None and (rest == self._image_ids[2]).any():
            groups = image_groups(rest, self._image_ids[2])
            k = int(groups.max()) + 1  # the last k images are in the rest
            emb, g = self.model.embed_prompt(rest, mx.array(normalize(r.pixels[len(r.pixels) - k :])))
            r.embeddings, r.groups = emb, np.array(g)
        r.chunks = chunk_bounds(len(rest), self.prefill_step, r.groups)
        self._active.append(r)

    def _prefill_chunk(self, r: _Request) -> None:
        a, b = r.chunks.pop(0)
        n = r.cached
        if r.embeddings is not None:
            g = r.groups[a:b]
            h = self.model.model(None, r.cache, r.embeddings[:, a:b], mx.array(g) if (g >= 0).any() else None)
        else:
            h = self.model.model(mx.array(r.ids[n + a : n + b])[None], r.cache)
        if r.chunks:
            mx.eval([c.state for c in r.cache])
            return
        logits = self.model.head(h[:, -1:, :])[:, -1, :]
        if r.matcher is not None:
            logits = r.matcher.apply(logits)
        r.embeddings = r.groups = None
        r.lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        r.y = r.sampler(r.lp)
        mx.eval(r.y, r.lp)
        r.prefilled = time.perf_counter()

    def _decode(self, rs: list[_Request]) -> None:
        """Emit each request's pending token and compute the next one (not past its max tokens)."""
        going = [r for r in rs if len(r.tokens) + 1 < r.max_tokens]
        if len(going) > 1 and self.decode_batch > 1:
            logits = self.model(mx.array([[int(r.y.item())] for r in going]), [r.cache for r in going])[:, -1, :]
            rows = [logits[i : i + 1] for i in range(len(going))]
        else:
            rows = [self.model(r.y[:, None], r.cache)[:, -1, :] for r in going]
        if any(r.matcher is not None for r in going):
            mx.async_eval(rows)  # the forward runs while each matcher takes its token and computes the next mask
        nexts = []
        for r, logits in zip(going, rows):
            if r.matcher is not None:
                try:
                    r.matcher.consume(int(r.y.item()))
                    logits = r.matcher.apply(logits)
                except Exception as e:  # noqa: BLE001 - this request's constraint failed; the others go on
                    self._fail(r, e)
                    continue
            lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            nexts.append((r, r.sampler(lp), lp))
        rs = [r for r in rs if r.cache is not None]
        mx.async_eval([x for _, y, lp in nexts for x in (y, lp)])
        for r in rs:
            self._emit(r)
        for r, y, lp in nexts:
            if r.cache is not None:  # not finished by that token
                r.y, r.lp = y, lp
        mx.eval([x for _, y, lp in nexts for x in (y, lp)])

    def _num_draft(self, params: SamplingParams) -> int:
        """Tokens drafted per round for a request (0: it decodes plainly)."""
        if not self.speculative or not params.speculative:
            return 0
        return self.num_draft if params.num_draft_tokens is None else params.num_draft_tokens

    def _speculate(self, r: _Request) -> None:
        """One speculative round of a decoding request: its pending token and the drafts the target accepts are
        emitted (as ``_decode`` would emit them one step at a time), and the target's next token becomes pending."""
        left = r.max_tokens - len(r.tokens) - 1  # tokens it may emit after the pending one
        if left <= 0:
            self._emit(r)  # its last token: not fed (as in ``_decode``)
            return
        y = int(r.y.item())
        kept, nxt, lps = speculative_round(self.model, r.drafter, r.cache, r.ids + r.tokens, y,
                                           min(r.num_draft, left - 1), r.sampler, r.matcher, r.spec)
        a = len(kept)
        for i, t in enumerate([y] + kept):
            if i:
                r.y, r.lp = mx.array([t]), lps[i - 1 : i]
            self._emit(r, unfed=a - i)  # the cache holds the a - i accepted drafts after this token
            if r.cache is None:  # finished by it
                return
        r.y, r.lp = mx.array([nxt]), lps[a : a + 1]
        mx.eval(r.lp)

    def _emit(self, r: _Request, unfed: int = 0) -> None:
        """Emit the pending token; ``unfed``: tokens after it the cache already holds (trimmed if it finishes)."""
        token = int(r.y.item())
        r.tokens.append(token)
        logprob = top = None
        if r.params.logprobs or r.params.top_logprobs:
            lp = r.lp[0]
            logprob = float(lp[token].item())
            if r.params.top_logprobs:
                idx = mx.argpartition(-lp, r.params.top_logprobs - 1)[: r.params.top_logprobs]
                vals = lp[idx].tolist()
                top = sorted(((i, v) for i, v in zip(idx.tolist(), vals) if v > -math.inf), key=lambda t: -t[1])
                # (a constraint's masked tokens have no probability: they are never offered)
        finish = None
        if token in self.eos:
            r.detok.finalize()
            text, finish = r.stops.flush(r.detok.last_segment), "stop"
        else:
            r.detok.add_token(token)
            text, hit = r.stops.feed(r.detok.last_segment)
            if hit:
                finish = "stop"
            elif len(r.tokens) >= r.max_tokens:
                r.detok.finalize()
                text, finish = text + r.stops.flush(r.detok.last_segment), "length"
        usage = self._finish(r, unfed) if finish else None
        r.handle._put(Event(text, token, logprob, top, finish, usage))

    def _finish(self, r: _Request, unfed: int = 0) -> Usage:
        now = time.perf_counter()
        self._active.remove(r)
        r.y = r.lp = r.drafter = None
        trim_cache(r.cache, unfed)  # speculation fed accepted drafts beyond the finishing token
        fed = r.cache[0].offset  # the prompt and every emitted token fed back (not a last one at max tokens)
        self.pool.put(np.concatenate([r.key, np.array(r.tokens, np.int64)])[:fed], r.cache, r.owner)
        r.cache = None
        return Usage(
            prompt_tokens=len(r.ids), completion_tokens=len(r.tokens), cached_tokens=r.cached,
            queued_s=r.started - r.submitted, prompt_s=r.prefilled - r.started, generation_s=now - r.prefilled,
            speculative=None if r.spec is None else r.spec.as_dict())
