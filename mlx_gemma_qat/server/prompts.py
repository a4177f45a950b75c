"""Reading a request: typed fields of its JSON body, and its messages or prompt as token ids plus image sources.

Both APIs (OpenAI's and Ollama's) come through here, so a request is refused the same way whichever API it
used: ``BadRequest`` carries the message, the field at fault and the HTTP status, and each API writes it in
its own error shape.

Work is bounded before it is done: the body is read up to ``max_body`` bytes (413 past it) within a time
limit, then parsed off the event loop (nesting too deep for the parser is a 400); stop strings are capped
(``MAX_STOPS`` of ``MAX_STOP_CHARS`` characters, as OpenAI caps them); images are counted, and the prompt's
length (image tokens included) checked, before any image is read; a text too long to fit the context
whatever its tokens is refused before it is tokenized.

Images come as data: URLs or bare base64, or as http(s) URLs: each becomes an ``ImageRef``, read only when
the request has passed those checks (``image_bytes``: base64 decoded, or a URL fetched under the server's
``fetch.FetchPolicy``, never when URLs are off). Nothing else is accepted: a file path or a file:// URL is
refused, so no request can make the server read a local file.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from dataclasses import dataclass

import anyio
from jinja2 import TemplateError

from ..generate import ContextLengthError, encode_prompt, image_token_ids
from ..speculative import MAX_DRAFT_TOKENS

log = logging.getLogger(__name__)

MAX_STOPS = 4  # stop strings per request (OpenAI's limit)
MAX_STOP_CHARS = 256  # characters per stop string
BODY_SECONDS = 60.0  # to receive a whole request body

_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "an array", dict: "an object"}


class BadRequest(ValueError):
    """A request the server refuses, answered with ``status`` in the API's error shape."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.code, self.status = param, code, status


class BodyTooLarge(BadRequest):
    def __init__(self, limit: int):
        super().__init__(f"the request body is larger than the server's limit of {limit:,} bytes", status=413,
                         code="request_too_large")


async def read_body(request, max_bytes: int) -> bytes:
    """A Starlette request's body: at most ``max_bytes`` (``BodyTooLarge`` past it, refused on its
    Content-Length before reading where it gives one) within ``BODY_SECONDS`` (408 past it)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise BodyTooLarge(max_bytes)
    parts, n = [], 0
    with anyio.move_on_after(BODY_SECONDS) as scope:
        async for chunk in request.stream():
            n += len(chunk)
            if n > max_bytes:
                raise BodyTooLarge(max_bytes)
            parts.append(chunk)
    if scope.cancelled_caught:
        raise BadRequest(f"the request body did not arrive within {BODY_SECONDS:.0f} s", status=408)
    return b"".join(parts)


def parse_json(raw: bytes) -> dict:
    """A request body as a JSON object (run it off the event loop: a large body takes a while)."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise BadRequest("the body's JSON is nested too deeply") from None
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


def speculation(body: dict, flag: str, n_max: str, *, where: str = "") -> dict:
    """A request's speculative-decoding fields as ``SamplingParams``' ``speculative`` and ``num_draft_tokens``:
    ``flag`` (false: plain decoding) and ``n_max`` (tokens drafted per round, 0 to ``MAX_DRAFT_TOKENS``; 0: plain
    decoding). They change nothing on a server that does not speculate."""
    n = field(body, n_max, int, where=where)
    if n is not None and not 0 <= n <= MAX_DRAFT_TOKENS:
        raise BadRequest(f"'{where}{n_max}' must be between 0 and {MAX_DRAFT_TOKENS}, not {n}", param=where + n_max)
    return {"speculative": field(body, flag, bool, True, where=where), "num_draft_tokens": n}


def stop_strings(value, param: str) -> tuple[str, ...]:
    """A ``stop`` field: null, a string or a list of at most ``MAX_STOPS`` strings of at most
    ``MAX_STOP_CHARS`` characters."""
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise BadRequest(f"'{param}' must be a string or a list of strings", param=param)
    if len(stops) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in stops):
        raise BadRequest(f"'{param}' takes at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} characters",
                         param=param)
    return tuple(stops)


@dataclass(frozen=True)
class ImageRef:
    """An image a request gives, not read yet: base64 text (of a data: URL, or Ollama's bare base64) or an
    http(s) URL; ``param`` names the field it came in."""

    param: str
    base64: str | None = None
    url: str | None = None


def image_source(value, param: str, *, bare_base64: bool) -> ImageRef:
    """The ``ImageRef`` of an image given as a data: URL, an http(s) URL or (``bare_base64``, as Ollama sends
    them) a base64 string."""
    if not isinstance(value, str) or not value:
        raise BadRequest(f"'{param}' must be a non-empty string", param=param)
    if value.startswith(("http://", "https://")):
        return ImageRef(param, url=value)
    if value.startswith("data:"):
        head, sep, data = value.partition(",")
        if not sep or not head.endswith(";base64"):
            raise BadRequest(f"'{param}': a data: URL must be base64 (data:image/png;base64,...)", param=param)
        return ImageRef(param, base64=data)
    if bare_base64:
        return ImageRef(param, base64=value)
    raise BadRequest(f"'{param}' must be a data: URL or an http(s) URL (local files are never read)", param=param)


def image_bytes(ref: ImageRef, fetch_policy) -> bytes:
    """The bytes of an image: its base64 decoded, or its URL fetched under ``fetch_policy`` (a
    ``fetch.FetchPolicy``; None: URLs are refused). Blocking: run it off the event loop."""
    if ref.url is not None:
        if fetch_policy is None:
            raise BadRequest(f"'{ref.param}': this server does not fetch image URLs (start it with "
                             "--allow-image-urls): send the image's bytes as a data: URL", param=ref.param)
        from ..fetch import FetchError, fetch

        try:
            return fetch(ref.url, fetch_policy)
        except FetchError as e:  # the client reads one generic line; what happened goes to the log
            log.warning("image URL in %s not fetched: %s", ref.param, e.detail)
            raise BadRequest(f"'{ref.param}': {e}", param=ref.param) from None
    try:
        out = base64.b64decode("".join(ref.base64.split()), validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"'{ref.param}' is not valid base64", param=ref.param) from None
    if not out:
        raise BadRequest(f"'{ref.param}' is empty", param=ref.param)
    return out


def check_images(images: list, max_images: int) -> None:
    if len(images) > max_images:
        raise BadRequest(f"the request has {len(images)} images; this server takes at most {max_images} per request")


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


def chat_ids(model, tokenizer, messages: list[dict], n_images: int, *, max_chars: int | None = None) -> list[int]:
    """Token ids of a chat through the chat template (the model's, else Gemma 3's), with its images laid out.
    ``max_chars``: refuse text longer than that before tokenizing it (no tokenization could fit it)."""
    return _encode(model, tokenizer, messages, n_images, chat=True, max_chars=max_chars)


def text_ids(model, tokenizer, prompt: str, n_images: int = 0, *, chat: bool | None = False,
             system: str | None = None, max_chars: int | None = None) -> list[int]:
    """Token ids of a text prompt: raw after BOS (``chat=False``), through the template (``True``), or through
    it when the model ships one (``None``, as Ollama's generate does)."""
    return _encode(model, tokenizer, prompt, n_images, chat=chat, system=system, max_chars=max_chars)


def _chars(prompt, system: str | None) -> int:
    """Characters of text in a prompt (a string, or messages with string or text-item content)."""
    n = len(system or "")
    if isinstance(prompt, str):
        return n + len(prompt)
    for m in prompt:
        content = m["content"]
        n += len(content) if isinstance(content, str) else sum(len(i.get("text", "")) for i in content)
    return n


def _encode(model, tokenizer, prompt, n_images: int, *, chat, system=None, max_chars=None) -> list[int]:
    ids_of_images = image_token_ids(model)
    if n_images and ids_of_images is None:
        raise BadRequest("this model is text-only: it has no vision tower to read images")
    if max_chars is not None and _chars(prompt, system) > max_chars:
        raise ContextLengthError(f"the prompt's {_chars(prompt, system):,} characters cannot fit the model's context")
    try:
        return encode_prompt(tokenizer, prompt, chat=chat, system=system, n_images=n_images, image_ids=ids_of_images)
    except TemplateError as e:  # the template's own check, e.g. roles that do not alternate
        raise BadRequest(f"the chat template refused the messages: {e}", param="messages") from None
    except ValueError as e:  # <start_of_image> markers in the text that do not match the images
        raise BadRequest(str(e)) from None
