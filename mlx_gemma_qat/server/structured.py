"""What a request asks its output to be: OpenAI's ``response_format`` and Ollama's ``format``, read into a
``constrain.Constraint`` (None for free text). Compiled before any token is generated: an invalid or unsupported
schema is a 400 naming the field.
"""

from __future__ import annotations

from ..constrain import Constraint, ConstraintError, compile_constraint
from .prompts import BadRequest, field


def _compiled(param: str, **kind) -> Constraint:
    try:
        return compile_constraint(**kind)
    except ConstraintError as e:
        raise BadRequest(str(e), param=param) from None


def response_format(body: dict) -> Constraint | None:
    """OpenAI's ``response_format``: ``{"type": "text"}`` (or absent), ``{"type": "json_object"}`` (any JSON
    object) or ``{"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}`` (output
    valid against ``schema``; strict or not, it always is)."""
    fmt = field(body, "response_format", dict, {})
    kind = field(fmt, "type", str, "text", where="response_format.")
    if kind == "text":
        return None
    if kind == "json_object":
        return _compiled("response_format", json=True)
    if kind != "json_schema":
        raise BadRequest(f"response_format type {kind!r} is not supported (text, json_object and json_schema are)",
                         param="response_format.type")
    spec = field(fmt, "json_schema", dict, required=True, where="response_format.")
    field(spec, "name", str, required=True, where="response_format.json_schema.")
    field(spec, "strict", bool, where="response_format.json_schema.")
    schema = field(spec, "schema", dict, where="response_format.json_schema.")
    param = "response_format.json_schema.schema"
    return _compiled(param, json=True) if schema is None else _compiled(param, json_schema=schema)


def ollama_format(body: dict) -> Constraint | None:
    """Ollama's ``format``: ``"json"`` (any JSON object), a JSON schema object, or absent/empty (free text)."""
    fmt = body.get("format")
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return _compiled("format", json=True)
    if isinstance(fmt, dict):
        return _compiled("format", json_schema=fmt)
    raise BadRequest("'format' must be \"json\" or a JSON schema object", param="format")
