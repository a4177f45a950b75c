"""OpenAI's API under /v1: the model list, chat completions and (legacy) text completions.

Answers come whole or, with ``"stream": true``, as server-sent events (``data: {chunk}`` lines, then ``data:
[DONE]``), in the shapes the official client reads: a chat stream's first chunk carries the role, the last one the
finish reason, and with ``stream_options.include_usage`` one more chunk with no choices carries the usage.
Log-probabilities come in the chat shape (``logprobs``/``top_logprobs``: ``choices[0].logprobs.content``) or the
legacy completions one (``logprobs: N``: tokens, token_logprobs, top_logprobs, text_offset). On a server that
speculates (``--draft-model``, ``--prompt-lookup``) a request may opt out with ``"speculative": false`` or set its
drafted tokens per round with llama.cpp's ``"speculative.n_max": N`` (0: off); the usage of a request that
speculated has its stats in ``usage.speculative``. ``response_format`` (``json_object``, ``json_schema``) constrains
the output on both endpoints (``structured.py``). Chat takes ``tools``, ``tool_choice`` and ``parallel_tool_calls``,
and conversations with calls and results (``tools.py``): calls come back as ``message.tool_calls`` (streamed as
``delta.tool_calls``, each when it is complete) with ``finish_reason: "tool_calls"``. One choice per request (``n``
> 1 is refused); ``echo`` and ``suffix`` are refused rather than ignored.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import replace

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ..tools import CallStream, parse_reply
from .engine import SamplingParams
from .errors import public_error
from .prompts import BadRequest, chat_ids, field, openai_messages, speculation, stop_strings, text_ids
from .structured import one_constraint, response_format, tool_use

log = logging.getLogger(__name__)


def routes() -> list[Route]:
    return [
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ]


def _model_entry(card) -> dict:
    return {"id": card.id, "object": "model", "created": card.created, "owned_by": "mlx-gemma-qat"}


async def list_models(request: Request) -> JSONResponse:
    return JSONResponse({"object": "list", "data": [_model_entry(request.app.state.server.card)]})


async def get_model(request: Request) -> JSONResponse:
    state = request.app.state.server
    state.check_model({"model": request.path_params["model"]})
    return JSONResponse(_model_entry(state.card))


async def chat_completions(request: Request):
    state = request.app.state.server

    def prepare(body: dict):
        model = state.check_model(body)
        use = tool_use(body, field(body, "messages", list, required=True), choice=body.get("tool_choice"),
                       parallel=field(body, "parallel_tool_calls", bool, True))
        messages, images = openai_messages(use.messages)
        if not messages:
            raise BadRequest("'messages' must not be empty", param="messages")
        state.check_images(images)
        constraint = one_constraint(response_format(body), use, "response_format")
        params = _sampling(body, state.defaults, chat=True)
        engine = state.engine
        ids = chat_ids(engine.model, engine.tokenizer, messages, len(images), max_chars=state.max_chars)
        reply = _Reply(model, engine.tokenizer, body, chat=True, tools=use.reply_tools)
        return state.work(reply, ids, params, images, stream=_stream(body), constraint=constraint,
                          param="response_format")

    return await state.answer(request, await state.prepare(prepare, await state.body(request)))


async def completions(request: Request):
    state = request.app.state.server

    def prepare(body: dict):
        model = state.check_model(body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise BadRequest("'prompt' must be a string (or a list of one string)", param="prompt")
        if field(body, "echo", bool, False):
            raise BadRequest("echo is not supported", param="echo")
        if field(body, "suffix", str):
            raise BadRequest("suffix is not supported", param="suffix")
        constraint = response_format(body)
        params = _sampling(body, state.defaults, chat=False)
        engine = state.engine
        ids = text_ids(engine.model, engine.tokenizer, prompt, max_chars=state.max_chars)
        return state.work(_Reply(model, engine.tokenizer, body, chat=False), ids, params, [], stream=_stream(body),
                          constraint=constraint, param="response_format")

    return await state.answer(request, await state.prepare(prepare, await state.body(request)))


def _stream(body: dict) -> bool:
    return field(body, "stream", bool, False)


def _sampling(body: dict, defaults: SamplingParams, *, chat: bool) -> SamplingParams:
    """The request's sampling fields over the server's defaults (the engine checks their ranges)."""
    if field(body, "n", int, 1) != 1:
        raise BadRequest("only n=1 is supported", param="n")
    name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = field(body, name, int, defaults.max_tokens)
    if max_tokens < 1:
        raise BadRequest(f"'{name}' must be at least 1, not {max_tokens}", param=name)
    if chat:
        logprobs, top = field(body, "logprobs", bool, False), field(body, "top_logprobs", int, 0)
        if top and not logprobs:
            raise BadRequest("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        param = "top_logprobs"
    else:
        top = field(body, "logprobs", int)
        logprobs, top, param = top is not None, top or 0, "logprobs"
    if not 0 <= top <= 20:
        raise BadRequest(f"'{param}' must be between 0 and 20, not {top}", param=param)
    return replace(
        defaults, max_tokens=max_tokens, logprobs=logprobs, top_logprobs=top,
        temperature=field(body, "temperature", float, defaults.temperature),
        top_p=field(body, "top_p", float, defaults.top_p), top_k=field(body, "top_k", int, defaults.top_k),
        min_p=field(body, "min_p", float, defaults.min_p), seed=field(body, "seed", int),
        stop=stop_strings(body.get("stop"), "stop"), **speculation(body, "speculative", "speculative.n_max"),
    )


class _Reply:
    """One answer's id, time and model, and its events in the chat or the completions shape (``body``: the
    request, for its streaming options)."""

    media_type = "text/event-stream"

    def __init__(self, model: str, tokenizer, body: dict, *, chat: bool, tools: list | None = None):
        self.model, self.tokenizer, self.chat = model, tokenizer, chat
        self.tools = tools  # the reply is read for calls of these
        self.include_usage = field(field(body, "stream_options", dict, {}), "include_usage", bool, False,
                                   where="stream_options.")
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.offset = 0  # legacy logprobs: characters of token text so far

    def _head(self, chunk: bool) -> dict:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _choice(self, text: str | None, events: list, finish: str | None, *, chunk: bool, calls: list | None = None,
                ) -> dict:
        """One choice; ``calls``: the tool calls it carries (OpenAI's shape, with their "index" in a chunk)."""
        logprobs = self._logprobs(events) if any(e.logprob is not None for e in events) else None
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
        content = {} if text is None and chunk else {"content": text}
        if calls:
            content["tool_calls"] = calls
        message = {"delta": content} if chunk else {"message": {"role": "assistant", **content}}
        return {"index": 0, **message, "logprobs": logprobs, "finish_reason": finish}

    def _text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def _logprobs(self, events: list) -> dict:
        events = [e for e in events if e.logprob is not None]
        if self.chat:
            def entry(token, logprob):
                text = self._text(token)
                return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

            return {"content": [{**entry(e.token, e.logprob),
                                 "top_logprobs": [entry(t, lp) for t, lp in e.top_logprobs or []]} for e in events]}
        tokens = [self._text(e.token) for e in events]
        offsets = []
        for t in tokens:
            offsets.append(self.offset)
            self.offset += len(t)
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in events],
                "top_logprobs": [{self._text(t): lp for t, lp in e.top_logprobs or []} for e in events],
                "text_offset": offsets}

    def whole(self, events: list) -> dict:
        last = events[-1]
        text, finish, calls = "".join(e.text for e in events), last.finish_reason, None
        if self.tools is not None:
            reply = parse_reply(text, self.tools)
            text, calls = reply.content, [c.openai() for c in reply.calls]
            finish = _finish(finish, bool(calls))
        return {**self._head(False), "choices": [self._choice(text, events, finish, chunk=False, calls=calls)],
                "usage": _usage(last.usage)}

    async def stream(self, handle):
        """The stream's ``data:`` lines; an error after the stream began ends it with an error chunk."""
        include_usage = self.include_usage
        extra = {"usage": None} if include_usage else {}

        def data(obj) -> str:
            return f"data: {json.dumps(obj)}\n\n"

        def chunk(text, events, finish, calls=None) -> str:
            return data({**self._head(True), "choices": [self._choice(text, events, finish, chunk=True, calls=calls)],
                         **extra})

        calls = None if self.tools is None else CallStream(self.tools)

        def pieces(text: str, last: bool):
            """(text, tool calls) deltas of new text: as it is, or read for calls."""
            if calls is None:
                return [(text, None)] if text else []
            items = calls.feed(text) + (calls.finish() if last else [])
            return [(i.text, None) if i.call is None else (None, [i.call.openai(index=i.index)]) for i in items]

        try:
            if self.chat:
                yield data({**self._head(True), "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                             "logprobs": None, "finish_reason": None}], **extra})
            async for e in handle.events():
                found = pieces(e.text, e.finish_reason is not None)
                for i, (text, call) in enumerate(found):
                    yield chunk(text, [e] if i == 0 else [], None, call)
                if not found and e.logprob is not None:
                    yield chunk(None if self.chat else "", [e], None)
                if e.finish_reason is not None:
                    yield chunk(None if self.chat else "", [], _finish(e.finish_reason, bool(calls and calls.calls)))
                    if include_usage:
                        yield data({**self._head(True), "choices": [], "usage": _usage(e.usage)})
        except Exception as e:  # noqa: BLE001 - the headers are sent: the error goes in the stream
            log.exception("generation failed mid-stream")
            yield data({"error": {"message": public_error(e), "type": "server_error", "param": None, "code": None}})
            return
        yield "data: [DONE]\n\n"


def _finish(reason: str, called: bool) -> str:
    """OpenAI's finish reason: a reply that ended on its own after making calls ends with "tool_calls"."""
    return "tool_calls" if called and reason == "stop" else reason


def _usage(u) -> dict:
    """OpenAI's usage object; with speculation, its stats as the extension field ``speculative``."""
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
            **({"speculative": u.speculative} if u.speculative is not None else {})}
