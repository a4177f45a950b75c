"""Ollama's API under /api: chat, generate, the model list, show and version, so Ollama clients can use the
server as they would a local Ollama.

As in Ollama, answers stream by default, as newline-delimited JSON objects (``"done": false`` with each piece of
text, then one ``"done": true`` with the finish reason and timings in nanoseconds); ``"stream": false`` gives the
one final object with the whole text. A request with no prompt (generate) or no messages (chat) answers done at once
with ``"done_reason": "load"``, which is how Ollama clients load a model. Sampling comes from ``options``
(temperature, top_p, top_k, min_p, seed, num_predict, stop; num_ctx and the others Ollama has are ignored: the
context is the model's). On a server that speculates, ``options.speculative`` (false: plain decoding) and
``options.num_draft_tokens`` (drafted tokens per round; 0: off) are this server's own, and the final object of a
request that speculated has its stats in ``speculative``. Images are base64 strings. ``format`` ("json" or a JSON
schema) constrains the output (``structured.py``); chat takes ``tools`` and conversations with ``tool_calls`` and
``tool`` results (``tools.py``), and answers calls as ``message.tool_calls``; ``suffix`` and ``think`` are refused
rather than ignored.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from ..tools import CallStream, parse_reply
from .engine import SamplingParams
from .errors import public_error
from .prompts import BadRequest, chat_ids, field, image_source, ollama_messages, speculation, stop_strings, text_ids
from .structured import ToolUse, ollama_format, one_constraint, tool_use

log = logging.getLogger(__name__)

OLLAMA_VERSION = "0.12.0"  # the Ollama API version whose shapes these answers follow (clients gate features on it)


def routes() -> list[Route]:
    return [
        Route("/", root, methods=["GET", "HEAD"]),
        Route("/api/version", version, methods=["GET"]),
        Route("/api/tags", tags, methods=["GET"]),
        Route("/api/show", show, methods=["POST"]),
        Route("/api/chat", chat, methods=["POST"]),
        Route("/api/generate", generate, methods=["POST"]),
    ]


async def root(request: Request) -> PlainTextResponse:
    return PlainTextResponse("Ollama is running")


async def version(request: Request) -> JSONResponse:
    return JSONResponse({"version": OLLAMA_VERSION})


def _time(t: float | None = None) -> str:
    """An RFC 3339 time in UTC, as Ollama writes them."""
    return datetime.fromtimestamp(time.time() if t is None else t, timezone.utc).isoformat().replace("+00:00", "Z")


def _details(card) -> dict:
    return {"parent_model": "", "format": "mlx", "family": "gemma3", "families": ["gemma3"],
            "parameter_size": card.parameter_size, "quantization_level": card.quantization}


async def tags(request: Request) -> JSONResponse:
    card = request.app.state.server.card
    return JSONResponse({"models": [{"name": card.ollama_name, "model": card.ollama_name,
                                     "modified_at": _time(card.created), "size": card.size,
                                     "digest": card.digest, "details": _details(card)}]})


async def show(request: Request) -> JSONResponse:
    state = request.app.state.server
    await state.prepare(lambda body: state.check_model({"model": field(body, "model", str) or field(body, "name", str)},
                                                       ollama=True), await state.body(request, work=False))
    card = state.card
    return JSONResponse({
        "license": "", "modelfile": "", "parameters": "", "template": card.template,
        "details": _details(card),
        "model_info": {"general.architecture": "gemma3", "general.parameter_count": card.parameters,
                       "gemma3.context_length": card.context, "gemma3.embedding_length": card.hidden_size,
                       "gemma3.block_count": card.layers},
        "capabilities": ["completion"] + (["vision"] if card.vision else []),
        "modified_at": _time(card.created),
    })


def _refuse_unsupported(body: dict) -> None:
    if field(body, "think", bool):
        raise BadRequest("this model does not support thinking")


def _sampling(body: dict, defaults: SamplingParams, context: int) -> SamplingParams:
    """``options`` over the server's defaults; num_predict -1 (or -2) runs to the end of the context."""
    opts = field(body, "options", dict, {})

    def opt(name, kind, default=None):
        return field(opts, name, kind, default, where="options.")

    n = opt("num_predict", int)
    if n is not None and n < 1 and n not in (-1, -2):
        raise BadRequest(f"options.num_predict must be positive, or -1 for no limit; not {n}")
    seed = opt("seed", int)
    return replace(
        defaults, max_tokens=defaults.max_tokens if n is None else context if n < 0 else n,
        temperature=opt("temperature", float, defaults.temperature), top_p=opt("top_p", float, defaults.top_p),
        top_k=opt("top_k", int, defaults.top_k), min_p=opt("min_p", float, defaults.min_p),
        seed=None if seed is None or seed < 0 else seed,  # Ollama's -1: a random seed
        stop=stop_strings(opts.get("stop"), "options.stop"),
        **speculation(opts, "speculative", "num_draft_tokens", where="options."),
    )


async def _run(request: Request, read, *, chat: bool):
    """A chat or generate request: ``read(state, body)`` gives its (ids, images) after its own checks, or None
    for a request that only loads the model (the clock starts as it arrives)."""
    started = time.perf_counter()
    state = request.app.state.server

    def prepare(body: dict):
        name = state.check_model(body, ollama=True)
        _refuse_unsupported(body)
        prompt = read(state, body)
        if prompt is None:
            return _Reply(name, chat=chat, started=started).loaded()
        constraint = one_constraint(ollama_format(body), prompt.tools, "format")
        reply = _Reply(name, chat=chat, started=started, tools=prompt.tools and prompt.tools.reply_tools)
        params = _sampling(body, state.defaults, state.card.context)
        return state.work(reply, prompt.ids, params, prompt.images, stream=field(body, "stream", bool, True),
                          constraint=constraint, param="format")

    work = await state.prepare(prepare, await state.body(request))
    return JSONResponse(work) if isinstance(work, dict) else await state.answer(request, work)


@dataclass
class _Prompt:
    ids: list[int]
    images: list
    tools: ToolUse | None = None  # a chat's


def _chat_prompt(state, body: dict) -> _Prompt | None:
    raw = field(body, "messages", list, [])
    if not raw:
        return None
    use = tool_use(body, raw)
    messages, images = ollama_messages(use.messages)
    state.check_images(images)
    engine = state.engine
    return _Prompt(chat_ids(engine.model, engine.tokenizer, messages, len(images), max_chars=state.max_chars), images,
                   use)


def _generate_prompt(state, body: dict):
    if field(body, "suffix", str):
        raise BadRequest("suffix is not supported")
    prompt = field(body, "prompt", str, "")
    images = [image_source(p, f"images[{i}]", bare_base64=True) for i, p in enumerate(field(body, "images", list, []))]
    if not prompt and not images:
        return None
    state.check_images(images)
    engine = state.engine
    raw = field(body, "raw", bool, False)
    ids = text_ids(engine.model, engine.tokenizer, prompt, len(images), chat=False if raw else None,
                   system=None if raw else field(body, "system", str), max_chars=state.max_chars)
    return _Prompt(ids, images)


async def chat(request: Request):
    return await _run(request, _chat_prompt, chat=True)


async def generate(request: Request):
    return await _run(request, _generate_prompt, chat=False)


class _Reply:
    """One answer's objects: a chat's ``message`` or generate's ``response``, and the final timings."""

    media_type = "application/x-ndjson"

    def __init__(self, model: str, *, chat: bool, started: float, tools: list | None = None):
        self.model, self.chat, self.started = model, chat, started
        self.tools = tools  # a chat reply is read for calls of these

    def piece(self, text: str, done: bool = False, calls: list | None = None) -> dict:
        """One object of the answer; ``calls``: tool calls it carries (Ollama's shape)."""
        out = {"model": self.model, "created_at": _time()}
        message = {"role": "assistant", "content": text, **({"tool_calls": calls} if calls else {})}
        out.update({"message": message} if self.chat else {"response": text})
        out["done"] = done
        return out

    def loaded(self) -> dict:
        return {**self.piece("", True), "done_reason": "load"}

    def final(self, text: str, last, calls: list | None = None) -> dict:
        u, ns = last.usage, 1e9
        return {**self.piece(text, True, calls), "done_reason": last.finish_reason,
                "total_duration": int((time.perf_counter() - self.started) * ns), "load_duration": 0,
                "prompt_eval_count": u.prompt_tokens, "prompt_eval_duration": int(u.prompt_s * ns),
                "eval_count": u.completion_tokens, "eval_duration": int(u.generation_s * ns),
                **({"speculative": u.speculative} if u.speculative is not None else {})}

    def whole(self, events: list) -> dict:
        text = "".join(e.text for e in events)
        if self.tools is None:
            return self.final(text, events[-1])
        reply = parse_reply(text, self.tools)
        return self.final(reply.content or "", events[-1], [c.ollama() for c in reply.calls])

    async def stream(self, handle):
        """The stream's lines (a call in a line of its own once it is complete); an error after the stream began
        ends it with an {"error"} line."""
        calls = None if self.tools is None else CallStream(self.tools)
        try:
            async for e in handle.events():
                last = e.finish_reason is not None
                if calls is None:
                    text, found = e.text, []
                else:
                    items = calls.feed(e.text) + (calls.finish() if last else [])
                    text = "".join(i.text for i in items if i.call is None)
                    found = [i.call.ollama() for i in items if i.call is not None]
                if found:
                    yield json.dumps(self.piece("", calls=found)) + "\n"
                if last:
                    yield json.dumps(self.final(text, e)) + "\n"
                elif text:
                    yield json.dumps(self.piece(text)) + "\n"
        except Exception as e:  # noqa: BLE001 - the headers are sent: the error goes in the stream
            log.exception("generation failed mid-stream")
            yield json.dumps({"error": public_error(e)}) + "\n"
