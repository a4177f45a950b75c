"""Tool (function) calls for Gemma 3: one prompt format and one call syntax, enforced by a grammar.

Gemma 3 has no tool tokens and its chat template knows only user and model turns, so tool calling is done by
prompting, as Google's function-calling guide for Gemma 3 (ai.google.dev/gemma/docs/capabilities/function-calling)
describes, and the calls are made exact by constrained decoding (``constrain.py``).

**Prompt.** The declarations go in the system part of the first user turn (``render_messages`` puts them before
the system text; Gemma's template folds the system message into the first user turn), in the words of the
guide's JSON variant, then the function definitions as a JSON list of ``{"name", "description", "parameters"}``,
one definition a line (the guide indents them; one line each costs far fewer tokens)::

    You have access to functions. If you decide to invoke any of the function(s), you MUST put it in the format of
    {"name": function name, "parameters": dictionary of argument name and its value}
    To invoke several functions, put each call on a line of its own.

    You SHOULD NOT include any other text in the response if you call a function
    [
    {"name": "get_weather", "description": "The weather now", "parameters": {"type": "object", ...}},
    {"name": "get_time", ...}
    ]

**Call syntax.** A reply that calls functions is only calls: one compact JSON object per call,
``{"name": "get_weather", "parameters": {"city": "Paris"}}`` (separators ", " and ": ", no other whitespace,
"name" first), several calls one per line, separated by "\\n" (only when parallel calls are allowed). A reply
is a call reply iff its first character is ``{``; any other reply is plain text. ``tool_constraint`` gives the
grammar that enforces this: under "required" the reply is calls whose names are declared and whose
"parameters" follow the function's schema; with a named function, calls of that function; under "auto" plain
text (not starting with ``{``) or calls as under "required"; under "none" nothing is constrained and the
declarations are not rendered.

**History.** An assistant message's ``tool_calls`` (OpenAI's ``{"id", "type", "function": {"name",
"arguments": JSON text}}`` or Ollama's ``{"function": {"name", "arguments": {...}}}``) are rendered as the call
lines (after the message's text, if any). Tool results (``role: "tool"``; OpenAI names the call with
``tool_call_id``, Ollama may give ``tool_name``) become a user turn, each result as::

    Function get_weather returned:
    ```tool_output
    {"temperature": 21}
    ```

(the guide's ``tool_output`` block; "Function returned:" when the function cannot be named). Consecutive
results share one user turn, and a user message that follows is merged into it, so that roles alternate as the
template requires (any two consecutive messages of one role are merged, their texts joined by a blank line).

**Parsing.** ``parse_reply`` reads a whole reply, ``CallStream`` a streamed one; both read the same way
(``parse_reply`` is a ``CallStream`` fed the whole text): in a call reply each JSON object that closes and is a
call of a declared function (exactly the keys "name" and "parameters", the latter an object) is a call;
whitespace between calls is skipped; from the first object that is not such a call (or a call cut short by
``max_tokens``), the rest of the reply is text. A plain-text reply streams as it comes: only the first
character is needed to decide.

The API takes what both OpenAI's and Ollama's chat APIs send: ``parse_tools(body["tools"])``,
``parse_tool_choice(body.get("tool_choice"), tools)``, then ``render_messages``, ``tool_constraint`` (pass it
to ``stream_generate(..., constraint=...)``) and ``parse_reply`` or ``CallStream``. Errors in what a client
sent raise ``ToolError`` (a ValueError: a 400) with a message naming the field (``.param``).
"""

from __future__ import annotations

import functools
import json
import re
import secrets
from dataclasses import dataclass, field, replace
from typing import Literal

from .constrain import JSON_OPTIONS, Constraint, ConstraintError, compile_constraint

__all__ = ["CallStream", "Reply", "StreamItem", "Tool", "ToolCall", "ToolChoice", "ToolError", "parse_reply",
           "parse_tool_choice", "parse_tools", "render_messages", "tool_constraint", "tools_prompt"]

NAME_RE = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's rule for function names

PROMPT_HEAD = (
    "You have access to functions. If you decide to invoke any of the function(s), you MUST put it in the "
    "format of\n"
    '{"name": function name, "parameters": dictionary of argument name and its value}\n'
    "To invoke several functions, put each call on a line of its own.\n\n"
    "You SHOULD NOT include any other text in the response if you call a function\n"
)

_SEPARATORS = (JSON_OPTIONS["item_separator"], JSON_OPTIONS["key_separator"])
MAX_KEPT_CHARS = 64 * 1024  # schemas longer than this are not kept in the caches (which a server's clients fill)


class ToolError(ValueError):
    """Tools, a tool choice or tool messages that cannot be used (the server answers 400). ``param`` names the
    field at fault ("tools[1].function.name", "tool_choice", "messages[3].tool_calls[0]"), when there is one."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


# -- declarations -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tool:
    """A declared function. ``parameters``: the JSON schema of its arguments, an object schema ("type":
    "object" filled in where it was left out; none given = no arguments: ``{"type": "object", "properties": {},
    "additionalProperties": false}``, so that the call's "parameters" can only be ``{}``)."""

    name: str
    description: str | None
    parameters: dict

    def declaration(self) -> dict:
        """The function's definition as the prompt shows it."""
        out = {"name": self.name}
        if self.description:
            out["description"] = self.description
        out["parameters"] = self.parameters
        return out


def parse_tools(tools) -> list[Tool]:
    """The functions of an OpenAI (or Ollama: the same shape) ``tools`` list,
    ``[{"type": "function", "function": {"name", "description"?, "parameters"?}}]``; None is no tools.
    Raises ToolError for a value that is not such a list, a type other than "function", a missing or bad name
    (OpenAI's ``^[a-zA-Z0-9_-]{1,64}$``), a repeated name, or ``parameters`` that is not an object schema or
    that the grammar engine cannot compile."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise ToolError(f"'tools' must be a list of tools, not {_kind(tools)}", "tools")
    out: list[Tool] = []
    seen: set[str] = set()
    for i, entry in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(entry, dict):
            raise ToolError(f"'{where}' must be an object, not {_kind(entry)}", where)
        kind = entry.get("type", "function")
        if kind != "function":
            raise ToolError(f"'{where}.type' is {kind!r}; only \"function\" tools are supported", where + ".type")
        fn = entry.get("function")
        if not isinstance(fn, dict):
            raise ToolError(f"'{where}.function' must be an object with the function's name", where + ".function")
        where += ".function"
        name = fn.get("name")
        if name is None:
            raise ToolError(f"'{where}.name' is missing", where + ".name")
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise ToolError(f"'{where}.name' {name!r} is not a valid function name (1 to 64 letters, digits, "
                            "underscores and dashes)", where + ".name")
        if name in seen:
            raise ToolError(f"'{where}.name': the function {name!r} is declared twice", where + ".name")
        seen.add(name)
        description = fn.get("description")
        if description is not None and not isinstance(description, str):
            raise ToolError(f"'{where}.description' must be a string", where + ".description")
        out.append(Tool(name, description, _parameters(fn.get("parameters"), where + ".parameters")))
    return out


def _parameters(schema, where: str) -> dict:
    if schema is None:
        return {"type": "object", "properties": {}, "additionalProperties": False}  # no arguments
    if not isinstance(schema, dict):
        raise ToolError(f"'{where}' must be a JSON schema object, not {_kind(schema)}", where)
    if "type" not in schema:
        schema = {"type": "object", **schema}
    elif schema["type"] != "object":
        raise ToolError(f"'{where}' must describe an object (\"type\": \"object\"), not {schema['type']!r}", where)
    try:
        text = json.dumps(schema, sort_keys=True)
        # kept compiled for tools that come back request after request; a large one is checked and not kept
        check = _check_schema if len(text) <= MAX_KEPT_CHARS else _check_schema.__wrapped__
        check(text)
    except ConstraintError as e:
        raise ToolError(f"'{where}': {e}", where) from None
    except (TypeError, ValueError) as e:  # values JSON cannot hold
        raise ToolError(f"'{where}' is not a JSON schema: {e}", where) from None
    return schema


@functools.lru_cache(maxsize=256)
def _check_schema(text: str) -> None:
    compile_constraint(json_schema=json.loads(text))


def _kind(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null", bool: "a boolean"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


@dataclass(frozen=True)
class ToolChoice:
    """What the reply may do: ``mode`` "auto" (text or calls), "none" (text only; the tools are not shown),
    "required" (one call or more) or "function" (calls of the function ``name``)."""

    mode: Literal["auto", "none", "required", "function"]
    name: str | None = None

    @property
    def calls_allowed(self) -> bool:
        """Whether the reply may hold calls (then constrain it and parse it for calls)."""
        return self.mode != "none"


def parse_tool_choice(choice, tools: list[Tool]) -> ToolChoice:
    """OpenAI's ``tool_choice``: "auto", "none", "required" or ``{"type": "function", "function": {"name": N}}``;
    None is "auto" (Ollama has no tool_choice). Without tools, "auto" is "none". Raises ToolError for another
    value, a function not in ``tools`` or "required" without tools."""
    if choice is None:
        choice = "auto"
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise ToolError(f"'tool_choice' {choice!r} is not one of \"auto\", \"none\", \"required\" or "
                            '{"type": "function", "function": {"name": ...}}', "tool_choice")
        if not tools and choice == "required":
            raise ToolError("'tool_choice' is \"required\" but no tools are given", "tool_choice")
        return ToolChoice("none" if not tools else choice)
    if not isinstance(choice, dict):
        raise ToolError(f"'tool_choice' must be a string or an object, not {_kind(choice)}", "tool_choice")
    if choice.get("type") != "function":
        raise ToolError(f"'tool_choice.type' must be \"function\", not {choice.get('type')!r}", "tool_choice.type")
    fn = choice.get("function")
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise ToolError("'tool_choice.function.name' is missing: give {\"type\": \"function\", \"function\": "
                        '{"name": ...}}', "tool_choice.function")
    if name not in {t.name for t in tools}:
        raise ToolError(f"'tool_choice' names the function {name!r}, which is not in 'tools'",
                        "tool_choice.function.name")
    return ToolChoice("function", name)


# -- the grammar --------------------------------------------------------------------------------------------

def tool_constraint(tools: list[Tool], choice: ToolChoice, parallel: bool = True) -> Constraint | None:
    """The constraint on a reply under ``choice`` (see the module's docstring), kind "tools"; None when no
    call can be made ("none", or no tools). ``parallel``: several calls, one per line, may be made (else
    exactly one under "required" or a named function, at most one under "auto"). Compiled once per distinct
    grammar (cached). Raises ToolError if the grammar cannot be compiled."""
    if not tools or not choice.calls_allowed:
        return None
    chosen = [t for t in tools if choice.mode != "function" or t.name == choice.name]
    if not chosen:
        raise ToolError(f"'tool_choice' names the function {choice.name!r}, which is not in 'tools'", "tool_choice")
    schema = {"x-guidance": dict(JSON_OPTIONS),
              "anyOf": [_call_schema(t, f"#/anyOf/{i}/properties/parameters") for i, t in enumerate(chosen)]}
    calls = 'call ("\\n" call)*' if parallel else "call"
    start = "start: TEXT | calls | \"\"\nTEXT: /[^{](.|\\n)*/\n" if choice.mode == "auto" else "start: calls\n"
    grammar = f"%llguidance {{}}\n{start}calls: {calls}\ncall: %json {json.dumps(schema, ensure_ascii=False)}\n"
    try:
        return _compiled(grammar) if len(grammar) <= 4 * MAX_KEPT_CHARS else _compiled.__wrapped__(grammar)
    except ConstraintError as e:
        raise ToolError(f"the tools' schemas cannot be combined into one grammar: {e}", "tools") from None


@functools.lru_cache(maxsize=32)
def _compiled(grammar: str) -> Constraint:
    return replace(compile_constraint(grammar=grammar), kind="tools")


def _call_schema(tool: Tool, at: str) -> dict:
    return {"type": "object",
            "properties": {"name": {"const": tool.name}, "parameters": _rebased(tool.parameters, at)},
            "required": ["name", "parameters"], "additionalProperties": False}


_DATA_KEYWORDS = {"const", "enum", "default", "examples"}  # values that are data, not schemas
_SCHEMA_MAPS = {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"}  # name -> schema


def _rebased(schema, at: str):
    """``schema`` moved to the JSON pointer ``at`` of a larger document: its local references ("#/$defs/X",
    "#") made to point into it there, "$schema" (a root-only keyword) dropped."""
    if isinstance(schema, list):
        return [_rebased(s, at) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for k, v in schema.items():
        if k == "$ref" and isinstance(v, str) and v.startswith("#"):
            out[k] = at + v[1:]
        elif k == "$schema":
            continue
        elif k in _DATA_KEYWORDS:
            out[k] = v
        elif k in _SCHEMA_MAPS and isinstance(v, dict):  # the names are data (a property may be called "enum")
            out[k] = {name: _rebased(s, at) for name, s in v.items()}
        else:
            out[k] = _rebased(v, at)
    return out


# -- the prompt ---------------------------------------------------------------------------------------------

def tools_prompt(tools: list[Tool]) -> str:
    """The instructions and function definitions put before the system text."""
    lines = ",\n".join(json.dumps(t.declaration(), ensure_ascii=False) for t in tools)
    return PROMPT_HEAD + "[\n" + lines + "\n]"


def call_line(name: str, arguments: dict) -> str:
    """One call in the call syntax, as the grammar has the model write it."""
    return json.dumps({"name": name, "parameters": arguments}, ensure_ascii=False, separators=_SEPARATORS)


def tool_output_block(name: str | None, content: str) -> str:
    """One function result as a tool turn shows it."""
    head = f"Function {name} returned:" if name else "Function returned:"
    return f"{head}\n```tool_output\n{content.strip()}\n```"


def render_messages(messages: list[dict], tools: list[Tool], choice: ToolChoice) -> list[dict]:
    """OpenAI or Ollama chat messages (with assistant ``tool_calls`` and ``tool`` results) as messages Gemma's
    template takes: {"role", "content"} with roles "system" (first, if any; "developer" counts as system), "user"
    and "assistant" alternating. The declarations and instructions (``tools_prompt``) go before the system
    text, in a new system message when there is none (unless ``choice`` is "none" or there are no tools).
    Content lists stay lists (their image items untouched); only strings and text items are rewritten.
    Messages of other roles pass through unchanged. Raises ToolError for malformed tool calls."""
    if not isinstance(messages, list):
        raise ToolError("'messages' must be a list of message objects", "messages")
    names: dict[str, str] = {}  # tool_call_id -> function name
    out: list[dict] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ToolError(f"'{where}' must be an object", where)
        role = m.get("role")
        if role == "assistant":
            content = m.get("content")
            calls = m.get("tool_calls")
            if calls is not None and not isinstance(calls, list):
                raise ToolError(f"'{where}.tool_calls' must be a list of calls", where + ".tool_calls")
            if calls:
                lines = "\n".join(_history_call(c, f"{where}.tool_calls[{j}]", names) for j, c in enumerate(calls))
                content = _join(content, lines, "\n")
            _append(out, "assistant", "" if content is None else content)
        elif role in ("tool", "function"):
            name = m.get("tool_name") or m.get("name") or names.get(m.get("tool_call_id"))
            _append(out, "user", _tool_result(name if isinstance(name, str) else None, m.get("content"), where))
        elif role == "user":
            _append(out, "user", "" if m.get("content") is None else m["content"], m.get("images"))
        elif role in ("system", "developer"):
            out.append({"role": role, "content": m.get("content")})
        else:
            out.append(m)
    if tools and choice.calls_allowed:
        prompt = tools_prompt(tools)
        if out and out[0].get("role") in ("system", "developer"):
            out[0] = {**out[0], "content": _join(prompt, out[0]["content"], "\n\n")}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def _append(out: list[dict], role: str, content, images: list | None = None) -> None:
    """A message added, or merged into the last one when that has the same role (Ollama's ``images`` of both
    kept, in order)."""
    if out and out[-1].get("role") == role:
        merged = {**out[-1], "content": _join(out[-1]["content"], content, "\n\n")}
        if images:
            merged["images"] = list(out[-1].get("images") or []) + list(images)
        out[-1] = merged
    else:
        out.append({"role": role, "content": content, **({"images": images} if images else {})})


def _join(a, b, sep: str):
    """Two contents as one: strings joined by ``sep`` (an empty one dropped); with a list, the items of both,
    adjacent text items joined by ``sep`` (the template trims each text item and adds nothing between)."""
    if a is None or a == "":
        return b
    if b is None or b == "":
        return a
    if isinstance(a, str) and isinstance(b, str):
        return a.rstrip() + sep + b.lstrip()
    items: list = []
    for item in _items(a) + _items(b):
        if _is_text(item) and items and _is_text(items[-1]):
            items[-1] = {**items[-1], "text": items[-1]["text"].rstrip() + sep + item["text"].lstrip()}
        else:
            items.append(item)
    return items


def _items(content) -> list:
    if isinstance(content, list):
        return list(content)
    return [{"type": "text", "text": content}]


def _is_text(item) -> bool:
    return isinstance(item, dict) and item.get("type") == "text" and isinstance(item.get("text"), str)


def _history_call(call, where: str, names: dict[str, str]) -> str:
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        raise ToolError(f"'{where}' must be an object with a \"function\": {{\"name\", \"arguments\"}}", where)
    fn = call["function"]
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise ToolError(f"'{where}.function.name' must be a function name", where + ".function.name")
    arguments = fn.get("arguments")
    if arguments is None or arguments == "":
        arguments = {}
    if isinstance(arguments, str):  # OpenAI: JSON text
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as e:
            raise ToolError(f"'{where}.function.arguments' is not JSON: {e}", where + ".function.arguments") from None
    if not isinstance(arguments, dict):
        raise ToolError(f"'{where}.function.arguments' must be a JSON object", where + ".function.arguments")
    if isinstance(call.get("id"), str):
        names[call["id"]] = name
    return call_line(name, arguments)


def _tool_result(name: str | None, content, where: str):
    if content is None:
        content = ""
    if isinstance(content, str):
        return tool_output_block(name, content)
    if not isinstance(content, list):
        raise ToolError(f"'{where}.content' must be a string or a list of content parts", where + ".content")
    text = "\n".join(item["text"] for item in content if _is_text(item))
    others = [item for item in content if not _is_text(item)]
    block = tool_output_block(name, text)
    return [{"type": "text", "text": block}] + others if others else block


# -- reading the reply --------------------------------------------------------------------------------------

def _new_id() -> str:
    return "call_" + secrets.token_hex(12)


@dataclass
class ToolCall:
    """A call the model made: ``id`` ("call_" + 24 hex digits, new for each call), the function's ``name``
    and its ``arguments``."""

    name: str
    arguments: dict
    id: str = field(default_factory=_new_id)

    @property
    def arguments_json(self) -> str:
        """The arguments as JSON text (OpenAI's "arguments")."""
        return json.dumps(self.arguments, ensure_ascii=False)

    def openai(self, index: int | None = None) -> dict:
        """OpenAI's form: {"id", "type": "function", "function": {"name", "arguments": JSON text}}; with
        ``index``, a stream delta's entry ({"index": index, ...})."""
        out = {} if index is None else {"index": index}
        out.update(id=self.id, type="function", function={"name": self.name, "arguments": self.arguments_json})
        return out

    def ollama(self) -> dict:
        """Ollama's form: {"function": {"name", "arguments": object}}."""
        return {"function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class Reply:
    """A reply read for calls: ``calls`` in order, ``content`` the text (None when the reply is calls only;
    a plain-text reply has no calls and its whole text, possibly "", as content)."""

    content: str | None
    calls: list[ToolCall]


@dataclass(frozen=True)
class StreamItem:
    """One thing a ``CallStream`` found: a ``text`` delta, or a complete ``call`` with its ``index`` among the
    reply's calls (0, 1, ...). Exactly one of ``text`` and ``call`` is set."""

    text: str | None = None
    call: ToolCall | None = None
    index: int | None = None


class CallStream:
    """Reads a streamed reply for calls. ``feed(delta)`` gives what the new text completes: in a plain-text
    reply, the text at once (a reply is decided by its first character: ``{`` starts calls); in a call reply,
    each call when its JSON object closes. ``finish()`` gives what is left at the end (the text of a call cut
    short, or of what followed the calls and is not a call). ``calls`` holds the calls so far."""

    def __init__(self, tools: list[Tool]):
        self._names = {t.name for t in tools}
        self._mode = "start"  # then "text" or "calls"
        self._buf = ""  # calls mode: text from the start of the current object (or the gap before it)
        self._scan = 0  # where the scan of _buf resumes
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._started = False  # an object is open in _buf (it starts at _buf[0])
        self.calls: list[ToolCall] = []

    @property
    def is_calls(self) -> bool:
        """The reply has been decided to be calls (its first character was ``{``)."""
        return self._mode == "calls"

    def feed(self, delta: str) -> list[StreamItem]:
        if not delta:
            return []
        if self._mode == "start":
            self._mode = "calls" if delta[0] == "{" else "text"
        if self._mode == "text":
            return [StreamItem(text=delta)]
        self._buf += delta
        return self._parse()

    def finish(self) -> list[StreamItem]:
        if self._mode != "calls":
            return []
        rest = self._buf if self._started else self._buf.lstrip()
        self._buf, self._scan, self._started = "", 0, False
        if rest:
            self._mode = "text"
            return [StreamItem(text=rest)]
        return []

    def _parse(self) -> list[StreamItem]:
        out: list[StreamItem] = []
        buf = self._buf
        i = self._scan
        while i < len(buf):
            c = buf[i]
            if not self._started:
                if c.isspace():
                    i += 1
                    continue
                if c != "{":  # not a call: the rest of the reply is text
                    self._mode = "text"
                    self._buf, self._scan = "", 0
                    out.append(StreamItem(text=buf[i:]))
                    return out
                buf = buf[i:]
                i, self._started, self._depth = 0, True, 0
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif c == "\\":
                    self._escape = True
                elif c == '"':
                    self._in_string = False
            elif c == '"':
                self._in_string = True
            elif c in "{[":
                self._depth += 1
            elif c in "}]":
                self._depth -= 1
                if self._depth == 0:
                    call = self._call(buf[: i + 1])
                    if call is None:  # from this object on, text
                        self._mode = "text"
                        self._buf, self._scan, self._started = "", 0, False
                        out.append(StreamItem(text=buf))
                        return out
                    out.append(StreamItem(call=call, index=len(self.calls)))
                    self.calls.append(call)
                    buf = buf[i + 1:]
                    i, self._started = 0, False
                    continue
            i += 1
        self._buf, self._scan = buf, i
        return out

    def _call(self, text: str) -> ToolCall | None:
        try:
            obj = json.loads(text)
        except ValueError:
            return None
        if (isinstance(obj, dict) and set(obj) == {"name", "parameters"} and obj["name"] in self._names
                and isinstance(obj["parameters"], dict)):
            return ToolCall(obj["name"], obj["parameters"])
        return None


def parse_reply(text: str, tools: list[Tool]) -> Reply:
    """A whole reply read for calls, as ``CallStream`` reads it streamed (see the module's docstring)."""
    stream = CallStream(tools)
    items = stream.feed(text) + stream.finish()
    texts = [item.text for item in items if item.text is not None]
    if not stream.calls:
        return Reply(content=text, calls=[])
    return Reply(content="".join(texts) if texts else None, calls=list(stream.calls))
