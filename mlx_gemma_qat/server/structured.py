"""What a request asks its output to be: OpenAI's ``response_format`` and Ollama's ``format``, read into a
``constrain.Constraint`` (None for free text), and its tools (``tools.py``: declared functions, the tool choice,
the conversation's calls and results rendered as text, the grammar of the calls). Compiled before any token is
generated: an invalid or unsupported schema, tool or tool choice is a 400 naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..constrain import Constraint, ConstraintError, compile_constraint
from ..tools import Tool, ToolChoice, ToolError, parse_tool_choice, parse_tools, render_messages, tool_constraint
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


@dataclass
class ToolUse:
    """A chat request's tools: ``tools`` declared, ``choice`` what the reply may do, ``messages`` the request's
    messages rendered for Gemma's template (calls and results as text, ``tools.render_messages``), and the
    ``constraint`` on the reply (None when it may not call). ``calling``: read the reply for calls."""

    tools: list[Tool]
    choice: ToolChoice
    messages: list
    constraint: Constraint | None

    @property
    def calling(self) -> bool:
        return self.constraint is not None

    @property
    def reply_tools(self) -> list[Tool] | None:
        """The tools the reply is read for calls of; None when it may not call."""
        return self.tools if self.calling else None


def tool_use(body: dict, messages: list, *, choice=None, parallel: bool = True) -> ToolUse:
    """The request's ``tools`` with ``choice`` (OpenAI's ``tool_choice``; None: "auto") over its raw
    ``messages``. Messages without tool calls or results are left as they are when no tools are declared."""
    try:
        tools = parse_tools(body.get("tools"))
        chosen = parse_tool_choice(choice, tools)
        if tools or any(isinstance(m, dict) and (m.get("role") == "tool" or m.get("tool_calls")) for m in messages):
            messages = render_messages(messages, tools, chosen)
        constraint = tool_constraint(tools, chosen, parallel)
    except ToolError as e:
        raise BadRequest(str(e), param=e.param) from None
    return ToolUse(tools, chosen, messages, constraint)


def one_constraint(format_constraint: Constraint | None, use: ToolUse | None, param: str) -> Constraint | None:
    """The request's one constraint: its output format's or its tools' (``use``: None for a request without
    messages); both at once are refused."""
    if use is None:
        return format_constraint
    if format_constraint is not None and use.calling:
        raise BadRequest(f"'{param}' and tools that may be called cannot be given together", param=param)
    return format_constraint or use.constraint
