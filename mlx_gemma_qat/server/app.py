"""The HTTP application: OpenAI's API under /v1 and Ollama's under /api, on one engine, and running it.

Handlers (``openai_api``, ``ollama_api``) read a request, submit it to the ``Engine`` and turn its events
into their API's answer. What both APIs share is here: the served model's description (``ModelCard``), the
optional API key, errors in each API's shape (a refused request never stops the server; an unexpected failure
is a 500, never a hung connection), and reading a request's events until it ends or its client goes away.
A request whose client goes away is cancelled, so the engine stops working on it at its next step: a
streamed one when its response stream is cancelled (Starlette cancels it on the client's disconnect), a
non-streamed one through a watch on the connection while the answer is computed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from dataclasses import dataclass
from pathlib import Path

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..generate import ContextLengthError, context_limit
from . import ollama_api, openai_api
from .engine import Engine, RequestError, SamplingParams
from .prompts import BadRequest, field

DEFAULT_MODEL_ID = "gemma3-270m"  # the embedded default model's name


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
        super().__init__(chunks, media_type=media_type, headers={"Cache-Control": "no-cache"})
        self.handle = handle

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.handle.cancel()


@dataclass
class ServerState:
    """What the handlers work with: the engine, the model's card and the sampling defaults for fields a
    request leaves out."""

    engine: Engine
    card: ModelCard
    defaults: SamplingParams

    def check_model(self, body: dict, *, ollama: bool = False) -> str:
        """The model a request names (the served one when it names none); 404 for any other. Ollama's API
        also takes the tagged name."""
        name = field(body, "model", str, self.card.id)
        if name not in ((self.card.id, self.card.ollama_name) if ollama else (self.card.id,)):
            raise BadRequest(f"model '{name}' not found", param="model", code="model_not_found", status=404)
        return name

    async def pixels(self, sources: list):
        """Preprocessed pixels of a request's images, read off the event loop (None without images)."""
        if not sources:
            return None
        return await anyio.to_thread.run_sync(self.engine.load_images, sources)

    async def collect(self, request: Request, handle) -> list:
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

    def stream(self, handle, chunks, media_type: str) -> StreamingResponse:
        """A response streaming ``chunks`` (made from ``handle``'s events), cancelling the request if it
        stops early."""
        return _CancellingStream(handle, chunks, media_type)


async def _disconnected(request: Request, handle) -> None:
    """Cancel ``handle`` when the client goes away (the request's body has been read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    handle.cancel()


def _is_openai(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def error_response(path: str, status: int, message: str, *, param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    """An error in the shape of the API ``path`` belongs to: OpenAI's {"error": {message, type, param,
    code}} under /v1, Ollama's {"error": message} elsewhere."""
    if _is_openai(path):
        kind = "invalid_request_error" if status < 500 else "server_error"
        body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    else:
        body = {"error": message}
    return JSONResponse(body, status_code=status)


async def _bad_request(request, e: BadRequest):
    return error_response(request.url.path, e.status, str(e), param=e.param, code=e.code)


async def _refused(request, e: ValueError):
    code = "context_length_exceeded" if isinstance(e, ContextLengthError) else None
    return error_response(request.url.path, 400, str(e), code=code)


async def _http_error(request, e: HTTPException):
    return error_response(request.url.path, e.status_code, str(e.detail))


async def _client_gone(request, e: ClientGone):
    return Response(status_code=499)


async def _server_error(request, e: Exception):
    return error_response(request.url.path, 500, f"internal error: {type(e).__name__}: {e}")


class _ApiKey:
    """ASGI middleware: every HTTP request must carry ``Authorization: Bearer KEY`` (401 otherwise)."""

    def __init__(self, app, key: str):
        self.app = app
        self.key = key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            scheme, _, given = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.key):
                response = error_response(scope["path"], 401, "a valid API key is required (Authorization: Bearer KEY)",
                                          code="invalid_api_key")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(engine: Engine, card: ModelCard, *, defaults: SamplingParams | None = None,
               api_key: str | None = None) -> Starlette:
    """The Starlette app serving ``engine``'s model as ``card.id``; the engine runs while the app does
    (started and stopped by the app's lifespan)."""
    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = Starlette(
        routes=openai_api.routes() + ollama_api.routes(),
        middleware=[Middleware(_ApiKey, key=api_key)] if api_key else [],
        exception_handlers={BadRequest: _bad_request, RequestError: _refused, ContextLengthError: _refused,
                            HTTPException: _http_error, ClientGone: _client_gone, Exception: _server_error},
        lifespan=lifespan,
    )
    app.state.server = ServerState(engine, card, defaults or SamplingParams())
    return app


def run(app: Starlette, host: str, port: int) -> None:
    """Serve ``app`` until interrupted (open responses get 5 s to finish)."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, timeout_graceful_shutdown=5)
