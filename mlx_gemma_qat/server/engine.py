"""The server's generation engine: one worker thread runs every request, so clients are served concurrently.

Each round the worker
  1. admits waiting requests, each starting from the longest prefix a kept KV cache holds (``reuse.py``),
  2. runs one prefill chunk of one prefilling request (round robin: a long prompt never stalls the others),
  3. runs one decode step of every decoding request: one batched forward (``decode_batch`` > 1: the
     projections and MLP of all rows at once, attention row by row against each row's own cache) or one
     request after another (a fair queue, for devices where batching does not pay, like MLX's CPU backend),
  4. streams each request's new text to its client (stop strings held back, as ``generate`` does), finishes
     requests (eos, stop string, max tokens) and keeps their caches for reuse; a cancelled request (its client
     went away) is dropped with its cache.

All MLX work happens on the worker thread; ``submit`` validates on the caller's thread and hands back a
``Handle`` whose events arrive on the caller's asyncio loop (or a blocking queue outside one).
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator

import mlx.core as mx
import numpy as np

from ..generate import ContextLengthError, chunk_bounds, context_limit, image_token_ids
from ..image import ImageError, preprocess_all
from ..model.cache import check_kv_quantization
from ..model.multimodal import image_groups
from .reuse import CachePool, prompt_key
from ..stop_strings import StopStrings
from .sampling import Sampler, SamplingParams

__all__ = ["Engine", "Handle", "Event", "Usage", "SamplingParams", "RequestError", "ContextLengthError"]


class RequestError(ValueError):
    """A request the engine cannot run (the HTTP layer answers 400 with this message)."""


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens taken from a kept KV cache, not prefilled
    queued_s: float  # waiting before work began
    prompt_s: float  # prefill
    generation_s: float  # decode


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
    pixels: np.ndarray | None
    params: SamplingParams
    max_tokens: int
    submitted: float
    sampler: Sampler = None
    cache: list | None = None
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


class Engine:
    """Runs generation requests for a model on a worker thread (see the module docstring).

    ``kv_bits``/``kv_group_size``: quantized KV caches; ``cache_entries``/``cache_bytes``: bounds of the kept
    caches (``reuse.CachePool``); ``slack``: tokens a sliding layer keeps beyond its window so a kept cache can
    step back that far; ``decode_batch``: most requests per batched decode step (1: one after another; None:
    batched on a GPU, one after another on the CPU, where a batched step costs as much as its rows run apart);
    ``prefill_step``: tokens per prefill chunk; ``image_urls``: whether images may be fetched from http(s) URLs
    (the server then reaches any host a request names).
    """

    def __init__(self, model, tokenizer, *, kv_bits: int | None = None, kv_group_size: int = 64, cache_entries: int = 8,
                 cache_bytes: int | None = None, slack: int = 64, decode_batch: int | None = None, prefill_step: int = 256,
                 image_urls: bool = True):
        check_kv_quantization(kv_bits, kv_group_size, model.cfg.head_dim)
        if slack < 0 or prefill_step < 1:
            raise ValueError("slack must be >= 0 and prefill_step >= 1")
        self.model, self.tokenizer = model, tokenizer
        self.kv_bits, self.kv_group_size, self.slack = kv_bits, kv_group_size, slack
        self.prefill_step = prefill_step
        self.image_urls = image_urls
        if decode_batch is None:
            decode_batch = 1 if mx.default_device() == mx.cpu else 8
        if decode_batch < 1:
            raise ValueError("decode_batch must be >= 1")
        self.decode_batch = decode_batch
        self.pool = CachePool(cache_entries, cache_bytes)
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

    def load_images(self, sources: list) -> np.ndarray:
        """Preprocessed pixels (n, 3, S, S) of images given as bytes or http(s) URLs (never file paths)."""
        if self._image_ids is None:
            raise RequestError("this model is text-only: it has no vision tower to read images")
        for s in sources:
            if isinstance(s, str) and not s.startswith(("http://", "https://")) or not isinstance(s, (str, bytes, bytearray)):
                raise RequestError("an image must be image bytes or an http(s) URL")
            if isinstance(s, str) and not self.image_urls:
                raise RequestError("this server does not fetch image URLs (--no-image-urls): send the image's bytes")
        try:
            pixels, _ = preprocess_all([bytes(s) if isinstance(s, bytearray) else s for s in sources],
                                       self.model.mcfg.vision.image_size)
        except ImageError as e:
            raise RequestError(str(e)) from None
        except Exception as e:  # Pillow's decompression-bomb and decoder errors
            raise RequestError(f"not a readable image ({type(e).__name__}: {e})") from None
        return pixels

    def submit(self, ids: list[int], params: SamplingParams, pixels: np.ndarray | None = None) -> Handle:
        """Queue a request for ``ids`` (with images' ``pixels`` for their image tokens); raises RequestError or
        ContextLengthError for one that cannot run. Call it on the event-loop thread that reads the events."""
        try:
            params.check()
        except ValueError as e:
            raise RequestError(str(e)) from None
        ids = [int(i) for i in ids]
        if not ids:
            raise RequestError("empty prompt")
        if len(ids) >= self.context:
            raise ContextLengthError(f"the prompt is {len(ids)} tokens; the model's context is {self.context}")
        n_images = 0 if pixels is None else len(pixels)
        image_token = self._image_ids[2] if self._image_ids else None
        if image_token is not None:
            runs = int(image_groups(np.array(ids), image_token).max(initial=-1)) + 1
            n_tok = int((np.array(ids) == image_token).sum())
            if runs != n_images or n_tok != n_images * self._image_ids[3]:
                raise RequestError(f"the prompt has {n_tok} image tokens in {runs} run(s) for {n_images} image(s)")
        elif n_images:
            raise RequestError("this model is text-only: it has no vision tower to read images")
        handle = Handle(self, len(ids))
        req = _Request(handle=handle, ids=ids, key=prompt_key(ids, pixels, image_token), pixels=pixels,
                       params=params, max_tokens=min(params.max_tokens, self.context - len(ids)),
                       submitted=time.perf_counter())
        with self._cv:
            if not self._running:
                raise RuntimeError("the engine is not running")
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
        while True:
            with self._cv:
                while self._running and not self._inbox and not self._active:
                    self._cv.wait()
                if not self._running:
                    for r in list(self._inbox) + self._active:
                        r.handle._put(RuntimeError("the server is shutting down"))
                    return
                new = list(self._inbox)
                self._inbox.clear()
            for r in new:
                self._guard(r, self._admit)
            for r in [r for r in self._active if r.handle.cancelled]:
                self._active.remove(r)  # its cache goes with it
                r.cache = None
                r.handle._put(Event("", None, finish_reason="cancelled"))
            prefilling = [r for r in self._active if r.chunks]
            if prefilling:
                r = prefilling[next(self._turn) % len(prefilling)]
                self._guard(r, self._prefill_chunk)
            decoding = [r for r in self._active if r.y is not None]
            for i in range(0, len(decoding), self.decode_batch):
                self._guard_all(decoding[i : i + self.decode_batch], self._decode)

    def _guard(self, r: _Request, fn) -> None:
        self._guard_all([r], lambda rs: fn(rs[0]))

    def _guard_all(self, rs: list[_Request], fn) -> None:
        """Run ``fn(rs)``; a failure ends those requests with the error (the engine keeps serving)."""
        try:
            fn(rs)
        except Exception as e:  # noqa: BLE001 - reported to the request's client
            for r in rs:
                r.handle._put(e)
                if r in self._active:
                    self._active.remove(r)

    def _admit(self, r: _Request) -> None:
        if r.handle.cancelled:
            r.handle._put(Event("", None, finish_reason="cancelled"))
            return
        r.started = time.perf_counter()
        r.sampler = Sampler(r.params)
        r.detok = self.tokenizer.detokenizer
        r.stops = StopStrings(list(r.params.stop))
        cache, n = self.pool.take(r.key)
        r.cache = cache if cache is not None else self.model.make_cache(self.kv_bits, self.kv_group_size, self.slack)
        r.cached = n
        rest = np.array(r.ids[n:])
        if self._image_ids is not None and (rest == self._image_ids[2]).any():
            groups = image_groups(rest, self._image_ids[2])
            k = int(groups.max()) + 1  # the last k images are in the rest
            emb, g = self.model.embed_prompt(rest, mx.array(r.pixels[len(r.pixels) - k :]))
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
        nexts = []
        for r, logits in zip(going, rows):
            lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            nexts.append((r, r.sampler(lp), lp))
        mx.async_eval([x for _, y, lp in nexts for x in (y, lp)])
        for r in rs:
            self._emit(r)
        for r, y, lp in nexts:
            if r.cache is not None:  # not finished by that token
                r.y, r.lp = y, lp
        mx.eval([x for _, y, lp in nexts for x in (y, lp)])

    def _emit(self, r: _Request) -> None:
        token = int(r.y.item())
        r.tokens.append(token)
        logprob = top = None
        if r.params.logprobs or r.params.top_logprobs:
            lp = r.lp[0]
            logprob = float(lp[token].item())
            if r.params.top_logprobs:
                idx = mx.argpartition(-lp, r.params.top_logprobs - 1)[: r.params.top_logprobs]
                vals = lp[idx].tolist()
                top = sorted(zip(idx.tolist(), vals), key=lambda t: -t[1])
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
        usage = self._finish(r) if finish else None
        r.handle._put(Event(text, token, logprob, top, finish, usage))

    def _finish(self, r: _Request) -> Usage:
        now = time.perf_counter()
        self._active.remove(r)
        r.y = r.lp = None
        fed = r.cache[0].offset  # the prompt and every emitted token fed back (not a last one at max tokens)
        self.pool.put(np.concatenate([r.key, np.array(r.tokens, np.int64)])[:fed], r.cache)
        r.cache = None
        return Usage(
            prompt_tokens=len(r.ids), completion_tokens=len(r.tokens), cached_tokens=r.cached,
            queued_s=r.started - r.submitted, prompt_s=r.prefilled - r.started, generation_s=now - r.prefilled)
