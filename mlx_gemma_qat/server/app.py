"""The HTTP application: OpenAI's API under /v1 and Ollama's under /api, on one engine, and running it.

Handlers (``openai_api``, ``ollama_api``) read a request, submit it to the ``Engine`` and turn its events
into their API's answer. What both APIs share is here: the served model's description (``ModelCard``), the
server's limits and access rules (``ServerOptions``; the middleware is in ``access.py``), reading a request
under those limits (``ServerState.body``, ``prepare``, ``images``), the mapping of errors to answers (a refused
request never stops the server; an unexpected failure is a 500 whose details go to the server's log only,
never a hung connection), and reading a request's events until it ends or its client goes away.

Each request's work is bounded before it is done, in this order: the body (size and time), the JSON and the
prompt (parsed and tokenized off the event loop, a few requests at a time), the number of images and the
prompt's length with their tokens, room in the engine's queue, and only then its images, read one at a time
(``IMAGE_READERS`` requests at a time) and held as 8-bit pixels until the engine runs it.
A request whose client goes away is cancelled, so the engine stops working on it at its next step: a
streamed one when its response stream is cancelled (Starlette cancels it on the client's disconnect), a
non-streamed one through a watch on the connection while the answer is computed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import anyio
import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..constrain import STOP_WITH_CONSTRAINT, Constraint, ConstraintError, logits_width
from ..fetch import FetchPolicy
from ..generate import ContextLengthError, context_limit
from ..image import ImageError, ImageTooLarge
from . import access, ollama_api, openai_api
from .engine import Engine, QueueFull, RequestError, SamplingParams
from .errors import error_response
from .prompts import BadRequest, ImageRef, check_images, field, image_bytes, parse_json, read_body

log = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "gemma3-270m"  # the embedded default model's name
RECEIVERS = 4  # request bodies received at once (the others wait, their bytes still in the socket)
PREPARERS = 2  # requests parsed and tokenized at once (off the event loop)
IMAGE_READERS = 1  # requests reading their images at once (a 50 MP image takes ~200 MB to decode)
MAX_CONNECTIONS = 512  # open connections uvicorn takes before answering 503 itself
MB = 2**20


@dataclass(frozen=True)
class ServerOptions:
    """The server's limits and access rules (the ``serve`` command's flags of the same names).

    ``api_keys``: the keys a request may carry (``Authorization: Bearer KEY``; none: no key asked for);
    ``max_body``: bytes of a request body; ``max_images``: images per request; ``bound_host``: the address the
    server listens on; ``allowed_hosts``: more names the Host header may give (``*``: any); ``cors_origins``:
    web origins allowed to call it (``*``: any; none by default); ``fetch_policy``: a ``fetch.FetchPolicy``
    under which image URLs are fetched (None: they are refused); ``cross_client_reuse``: whether a request may
    start from a KV cache another client's request left (False: only from those of requests with the same
    API key)."""

    api_keys: tuple[str, ...] = ()
    max_body: int = 20 * MB
    max_images: int = 8
    bound_host: str = "127.0.0.1"
    allowed_hosts: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    fetch_policy: FetchPolicy | None = None
    cross_client_reuse: bool = True

    def __post_init__(self):
        if any(not k.strip() for k in self.api_keys):
            raise ValueError("an API key is empty: give a key, or none to serve without one")
        if self.max_body < 1 or self.max_images < 0:
            raise ValueError("max_body must be >= 1 and max_images >= 0")


def default_model_id(spec: str | None) -> str:
    """The id a model is served as when no name is given: its file or folder name (without .gguf), or a
    hub id's last part; ``DEFAULT_MODEL_ID`` for the embedded model."""
    if spec is None:
        return DEFAULT_MODEL_ID
    return Path(str(spec).rstrip("/\\")).name.removesuffix(".gguf") or DEFAULT_MODEL_ID


@dataclass(frozen=True)
class ModelCard:
    """What the APIs say about the served model."""

    id: str
    created: int  # unix time of the model folder
    size: int  # bytes of its weight files
    parameters: int
    quantization: str  # e.g. "Q4_0" (the GGUF type(s) it was converted from), "4-bit", "BF16"
    digest: str
    context: int
    hidden_size: int
    layers: int
    vision: bool
    template: str  # the chat template the model ships ("" when none)

    @property
    def ollama_name(self) -> str:
        """The name Ollama's API lists it under (Ollama names carry a tag)."""
        return self.id if ":" in self.id else f"{self.id}:latest"

    @property
    def parameter_size(self) -> str:
        p = self.parameters
        return f"{p / 1e9:.2f}B" if p >= 1e9 else f"{p / 1e6:.2f}M"


def describe_model(model, tokenizer, folder: str | Path, model_id: str) -> ModelCard:
    """The ``ModelCard`` of a loaded model and the MLX folder it came from (reads the folder's headers)."""
    from ..inspect import inspect_mlx
    from ..model.load import model_identity, read_config

    folder = Path(folder)
    rep = inspect_mlx(folder)
    config = read_config(folder)
    types = (config.get("mlx_gemma_qat") or {}).get("source_types") or {}
    quantized = {k: n for k, n in types.items() if k not in ("F32", "F16", "BF16")}
    if quantized:  # the GGUF types it was converted from, most tensors first ("Q5_0+Q4_K+Q8_0+Q6_K": a mix)
        quant = "+".join(sorted(quantized, key=lambda k: -quantized[k]))
    elif config.get("quantization"):
        quant = f"{config['quantization'].get('bits')}-bit"
    else:
        quant = max(rep.groups, key=lambda g: g.params).kind.upper() if rep.groups else "?"
    cfg = model.cfg
    return ModelCard(
        id=model_id, created=int(folder.stat().st_mtime), size=rep.file_bytes, parameters=rep.params,
        quantization=quant, digest=model_identity(folder), context=context_limit(model),
        hidden_size=cfg.hidden_size, layers=cfg.num_hidden_layers, vision=hasattr(model, "embed_prompt"),
        template=getattr(tokenizer, "chat_template", None) or "",
    )


class ClientGone(Exception):
    """The client went away before its answer was ready (nothing is sent back)."""


class _CancellingStream(StreamingResponse):
    """A streamed answer whose request is cancelled when the stream stops, whatever stopped it (a no-op once
    the request has finished)."""

    def __init__(self, handle, chunks, media_type: str):
        super().__init__(self._then_cancel(handle, chunks), media_type=media_type,
                         headers={"Cache-Control": "no-cache"})
        self.handle = handle

    @staticmethod
    async def _then_cancel(handle, chunks):
        """The chunks, the request cancelled once they end: before the stream's end is sent, so a client
        that has read the whole stream finds its request already cancelled."""
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            handle.cancel()

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.handle.cancel()


@dataclass
class Work:
    """A request read and checked, its images not read yet. ``reply`` is its API's answer: ``media_type``,
    ``stream(handle)`` (the streamed chunks) and ``whole(events)`` (the JSON object of a whole answer)."""

    reply: object
    ids: list[int]
    params: SamplingParams
    images: list[ImageRef]
    stream: bool
    matcher: object = None  # a constrain.Matcher when the output is constrained


@dataclass
class ServerState:
    """What the handlers work with: the engine, the model's card, the sampling defaults for fields a request
    leaves out, and the server's options."""

    engine: Engine
    card: ModelCard
    defaults: SamplingParams
    options: ServerOptions
    max_chars: int  # characters of prompt text past which no tokenization can fit the context
    receiving: anyio.CapacityLimiter | None = None  # made on the server's event loop (lifespan)
    preparing: anyio.CapacityLimiter | None = None
    reading: anyio.CapacityLimiter | None = None

    def check_model(self, body: dict, *, ollama: bool = False) -> str:
        """The model a request names (the served one when it names none); 404 for any other. Ollama's API
        also takes the tagged name."""
        name = field(body, "model", str, self.card.id)
        if name not in ((self.card.id, self.card.ollama_name) if ollama else (self.card.id,)):
            raise BadRequest(f"model '{name}' not found", param="model", code="model_not_found", status=404)
        return name

    async def body(self, request: Request, *, work: bool = True) -> bytes:
        """The request's body, within the size and time limits; a request for ``work`` (generation) is not read
        while the engine has no room for it (503 at once)."""
        if work and not self.engine.has_room():
            raise QueueFull("the server is busy")
        async with self.receiving:
            return await read_body(request, self.options.max_body)

    async def prepare(self, fn, raw: bytes):
        """``fn(body)`` with the body parsed as a JSON object, run off the event loop (a few requests at a
        time): where a handler reads its fields and tokenizes the prompt."""
        return await anyio.to_thread.run_sync(lambda: fn(parse_json(raw)), limiter=self.preparing)

    def check_images(self, images: list[ImageRef]) -> None:
        """Refuse a request with more images than the server takes (before tokenizing its prompt)."""
        check_images(images, self.options.max_images)

    async def images(self, refs: list[ImageRef]) -> np.ndarray | None:
        """The images' 8-bit pixels, read one at a time off the event loop (None without images)."""
        if not refs:
            return None
        if not self.engine.has_room():
            raise QueueFull("the server is busy")
        return await anyio.to_thread.run_sync(self._read_images, refs, limiter=self.reading)

    def _read_images(self, refs: list[ImageRef]) -> np.ndarray:
        out = []
        for ref in refs:
            data = image_bytes(ref, self.options.fetch_policy)
            try:
                out.append(self.engine.load_image(data))
            except ImageTooLarge as e:
                raise BadRequest(f"'{ref.param}': {e}", param=ref.param) from None
            except ImageError as e:
                log.info("unreadable image in %s: %s", ref.param, e)
                raise BadRequest(f"'{ref.param}' is not a readable image", param=ref.param) from None
            del data
        return np.stack(out)

    def owner(self, request: Request) -> str:
        """Whose kept KV caches a request may reuse: everyone's (""), or with cross-client reuse off, those of
        requests carrying the same Authorization header (API key)."""
        if self.options.cross_client_reuse:
            return ""
        return hashlib.sha256(request.headers.get("authorization", "").encode()).hexdigest()

    def work(self, reply, ids: list[int], params: SamplingParams, images: list[ImageRef], *, stream: bool,
             constraint: Constraint | None = None, param: str | None = None) -> Work:
        """The ``Work`` of a prepared request, once its prompt fits with its images (checked before they are
        read); with a ``constraint`` (from the request's field ``param``), its matcher is built here, off the event
        loop."""
        self.engine.check_prompt(ids, len(images))
        matcher = None
        if constraint is not None:
            if params.stop:
                raise BadRequest(STOP_WITH_CONSTRAINT, param="stop")
            engine = self.engine
            try:
                matcher = constraint.matcher(engine.tokenizer, logits_width(engine.model))
            except ConstraintError as e:
                raise BadRequest(str(e), param=param) from None
        return Work(reply, ids, params, images, stream, matcher)

    async def answer(self, request: Request, work: Work) -> Response:
        """Read the work's images, submit it, and answer: streamed, or whole once done."""
        pixels = await self.images(work.images)
        handle = self.engine.submit(work.ids, work.params, pixels, owner=self.owner(request), matcher=work.matcher)
        if work.stream:
            return _CancellingStream(handle, work.reply.stream(handle), work.reply.media_type)
        return JSONResponse(work.reply.whole(await self._collect(request, handle)))

    async def _collect(self, request: Request, handle) -> list:
        """Every event of a submitted request; if its client goes away first, the request is cancelled and
        ``ClientGone`` raised."""
        watch = asyncio.ensure_future(_disconnected(request, handle))
        events = []
        try:
            async for event in handle.events():
                events.append(event)
        finally:
            watch.cancel()
            handle.cancel()  # a no-op once the last event came
        if events[-1].finish_reason == "cancelled":
            raise ClientGone()
        return events


async def _disconnected(request: Request, handle) -> None:
    """Cancel ``handle`` when the client goes away (the request's body has been read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    handle.cancel()


async def _bad_request(request, e: BadRequest):
    return error_response(request.url.path, e.status, str(e), param=e.param, code=e.code)


async def _refused(request, e: ValueError):
    code = "context_length_exceeded" if isinstance(e, ContextLengthError) else None
    return error_response(request.url.path, 400, str(e), code=code)


async def _http_error(request, e: HTTPException):
    return error_response(request.url.path, e.status_code, str(e.detail))


async def _client_gone(request, e: ClientGone):
    return Response(status_code=499)


async def _busy(request, e: QueueFull):
    return error_response(request.url.path, 503, f"{e}: retry shortly", code="server_busy", headers={"Retry-After": "1"})


async def _server_error(request, e: Exception):  # Starlette re-raises it after this answer: uvicorn logs it
    return error_response(request.url.path, 500, "internal error (the server's log has the details)")


def _max_chars(tokenizer, context: int) -> int:
    """Characters of text that cannot fit in ``context`` tokens whatever the tokenization: the context times
    the longest piece of the vocabulary."""
    return context * max(map(len, tokenizer.get_vocab()))


def create_app(engine: Engine, card: ModelCard, *, defaults: SamplingParams | None = None,
               options: ServerOptions | None = None) -> Starlette:
    """The Starlette app serving ``engine``'s model as ``card.id``; the engine runs while the app does
    (started and stopped by the app's lifespan)."""
    options = options or ServerOptions()
    state = ServerState(engine, card, defaults or SamplingParams(), options,
                        max_chars=_max_chars(engine.tokenizer, engine.context))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.receiving = anyio.CapacityLimiter(RECEIVERS)
        state.preparing, state.reading = anyio.CapacityLimiter(PREPARERS), anyio.CapacityLimiter(IMAGE_READERS)
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = Starlette(
        routes=openai_api.routes() + ollama_api.routes(),
        middleware=access.middleware(bound_host=options.bound_host, allowed_hosts=options.allowed_hosts,
                                     cors_origins=options.cors_origins, api_keys=options.api_keys),
        exception_handlers={BadRequest: _bad_request, RequestError: _refused, ContextLengthError: _refused,
                            HTTPException: _http_error, ClientGone: _client_gone, QueueFull: _busy,
                            Exception: _server_error},
        lifespan=lifespan,
    )
    app.state.server = state
    return app


def run(app: Starlette, host: str, port: int) -> None:
    """Serve ``app`` until interrupted (open responses get 5 s to finish). Requests beyond what the engine can
    run and queue are answered 503 by the handlers; connections beyond ``MAX_CONNECTIONS`` (a backstop against
    floods of idle connections) by uvicorn at once."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, timeout_graceful_shutdown=5, limit_concurrency=MAX_CONNECTIONS)
