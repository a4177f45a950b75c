"""Errors in each API's shape: OpenAI's ``{"error": {message, type, param, code}}`` under /v1, Ollama's
``{"error": message}`` elsewhere."""

from __future__ import annotations

from starlette.responses import JSONResponse

from ..generate import ContextLengthError
from .engine import RequestError
from .prompts import BadRequest


def is_openai(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def error_response(path: str, status: int, message: str, *, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    """An error answer for a request to ``path``, in the shape of the API it belongs to."""
    if is_openai(path):
        kind = "invalid_request_error" if status < 500 else "server_error"
        body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    else:
        body = {"error": message}
    return JSONResponse(body, status_code=status, headers=headers)


def public_error(e: Exception) -> str:
    """What a client may read of an error raised while its answer streamed: the message of a refusal, a
    generic line for anything else (whose details go to the log)."""
    if isinstance(e, (BadRequest, RequestError, ContextLengthError)):
        return str(e)
    return "generation failed (the server's log has the details)"
