"""Reading a request: typed fields of its JSON body, and its messages or prompt as token ids plus image sources.

Both APIs (OpenAI's and Ollama's) come through here, so a request is refused the same way whichever API it
used: ``BadRequest`` carries the message, the field at fault and the HTTP status, and each API writes it in
its own error shape.

Images come as data: URLs or bare base64 (decoded to bytes here) or as http(s) URLs (downloaded by the
engine). Nothing else is accepted: a file path or a file:// URL is refused, so no request can make the
server read a local file (the engine is only ever given bytes or http(s) URL strings).
"""

from __future__ import annotations

import base64
import binascii
import json

from jinja2 import TemplateError

from ..generate import encode_prompt, image_token_ids

_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "an array", dict: "an object"}


class BadRequest(ValueError):
    """A request the server refuses, answered with ``status`` in the API's error shape."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.code, self.status = param, code, status


async def read_json(request) -> dict:
    """A Starlette request's body as a JSON object."""
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"the body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def field(body: dict, name: str, kind: type, default=None, *, required: bool = False, where: str = ""):
    """``body[name]`` if it has type ``kind``; ``default`` when absent or null. A number field takes integers
    too; a boolean is never taken for a number. ``where`` prefixes the field's name in messages."""
    value = body.get(name)
    param = where + name
    if value is None:
        if required:
            raise BadRequest(f"'{param}' is required", param=param)
        return default
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise BadRequest(f"'{param}' must be {_NAMES[kind]}, not {type(value).__name__}", param=param)
    return value


def stop_strings(value, param: str) -> tuple[str, ...]:
    """A ``stop`` field: null, a string or a list of strings."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return tuple(value)
    raise BadRequest(f"'{param}' must be a string or a list of strings", param=param)


def image_source(value, param: str, *, bare_base64: bool):
    """Bytes or an http(s) URL for an image given as a data: URL, an http(s) URL or (``bare_base64``, as
    Ollama sends them) a base64 string."""
    if not isinstance(value, str) or not value:
        raise BadRequest(f"'{param}' must be a non-empty string", param=param)
    if value.startswith(("http://", "https://")):
        return value
    if value.startswith("data:"):
        head, sep, data = value.partition(",")
        if not sep or not head.endswith(";base64"):
            raise BadRequest(f"'{param}': a data: URL must be base64 (data:image/png;base64,...)", param=param)
        return _b64(data, param)
    if bare_base64:
        return _b64(value, param)
    raise BadRequest(f"'{param}' must be a data: URL or an http(s) URL (local files are never read)", param=param)


def _b64(data: str, param: str) -> bytes:
    try:
        out = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"'{param}' is not valid base64", param=param) from None
    if not out:
        raise BadRequest(f"'{param}' is empty", param=param)
    return out


def openai_messages(messages) -> tuple[list[dict], list]:
    """OpenAI chat messages as Gemma's (system first; "developer" is a system message; content a string or
    text and image items) and their images' sources, in order."""
    out, images = [], []
    for i, m in enumerate(_message_list(messages)):
        where = f"messages[{i}]."
        role = field(m, "role", str, required=True, where=where)
        role = "system" if role == "developer" else role
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, list):
            items = []
            for j, part in enumerate(content):
                items.append(_openai_part(part, f"{where}content[{j}]", images))
            content = items
        elif not isinstance(content, str):
            raise BadRequest(f"'{where}content' must be a string or a list of content parts", param=where + "content")
        out.append(_message(role, content, where))
    return _system_first(out), images


def _openai_part(part, where: str, images: list) -> dict:
    if not isinstance(part, dict):
        raise BadRequest(f"'{where}' must be an object", param=where)
    kind = field(part, "type", str, required=True, where=where + ".")
    if kind == "text":
        return {"type": "text", "text": field(part, "text", str, required=True, where=where + ".")}
    if kind == "image_url":
        ref = part.get("image_url")
        url = ref.get("url") if isinstance(ref, dict) else ref
        images.append(image_source(url, where + ".image_url.url", bare_base64=False))
        return {"type": "image"}
    raise BadRequest(f"'{where}.type' {kind!r} is not supported (text and image_url are)", param=where + ".type")


def ollama_messages(messages) -> tuple[list[dict], list]:
    """Ollama chat messages (content a string, ``images`` base64 strings shown before the text) as Gemma's,
    and their images' sources, in order."""
    out, images = [], []
    for i, m in enumerate(_message_list(messages)):
        where = f"messages[{i}]."
        role = field(m, "role", str, required=True, where=where)
        text = field(m, "content", str, "", where=where)
        pics = field(m, "images", list, [], where=where)
        images += [image_source(p, f"{where}images[{j}]", bare_base64=True) for j, p in enumerate(pics)]
        content = [{"type": "image"}] * len(pics) + [{"type": "text", "text": text}] if pics else text
        out.append(_message(role, content, where))
    return _system_first(out), images


def _message_list(messages) -> list[dict]:
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise BadRequest("'messages' must be a list of message objects", param="messages")
    return messages


def _message(role: str, content, where: str) -> dict:
    if role not in ("system", "user", "assistant"):
        raise BadRequest(f"'{where}role' {role!r} is not supported (system, user and assistant are)",
                         param=where + "role")
    if role == "system" and isinstance(content, list):
        if any(item["type"] != "text" for item in content):
            raise BadRequest(f"'{where}content': a system message takes text only", param=where + "content")
        content = "\n\n".join(item["text"] for item in content)
    return {"role": role, "content": content}


def _system_first(messages: list[dict]) -> list[dict]:
    """The leading system messages joined into one (Gemma folds it into the first user turn); a system
    message later in the conversation is refused, as Gemma's template has no place for it."""
    n = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
    if any(m["role"] == "system" for m in messages[n:]):
        raise BadRequest("system messages must come before the conversation", param="messages")
    if n == 0:
        return messages
    if n == len(messages):
        raise BadRequest("the messages need a user message after the system prompt", param="messages")
    system = "\n\n".join(m["content"] for m in messages[:n])
    return [{"role": "system", "content": system}] + messages[n:]


def chat_ids(model, tokenizer, messages: list[dict], n_images: int) -> list[int]:
    """Token ids of a chat through the chat template (the model's, else Gemma 3's), with its images laid out."""
    return _encode(model, tokenizer, messages, n_images, chat=True)


def text_ids(model, tokenizer, prompt: str, n_images: int = 0, *, chat: bool | None = False,
             system: str | None = None) -> list[int]:
    """Token ids of a text prompt: raw after BOS (``chat=False``), through the template (``True``), or through
    it when the model ships one (``None``, as Ollama's generate does)."""
    return _encode(model, tokenizer, prompt, n_images, chat=chat, system=system)


def _encode(model, tokenizer, prompt, n_images: int, *, chat, system=None) -> list[int]:
    ids_of_images = image_token_ids(model)
    if n_images and ids_of_images is None:
        raise BadRequest("this model is text-only: it has no vision tower to read images")
    try:
        return encode_prompt(tokenizer, prompt, chat=chat, system=system, n_images=n_images, image_ids=ids_of_images)
    except TemplateError as e:  # the template's own check, e.g. roles that do not alternate
        raise BadRequest(f"the chat template refused the messages: {e}", param="messages") from None
    except ValueError as e:  # <start_of_image> markers in the text that do not match the images
        raise BadRequest(str(e)) from None
