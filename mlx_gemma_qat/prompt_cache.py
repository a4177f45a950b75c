"""Prompt-cache files: a prefix's KV cache saved once, generation resumed from it many times.

A file is safetensors: per layer its keys and values in order (a rotating sliding-window cache is saved
unrolled, oldest key first, so a loaded one starts with its ring at 0), quantized ones as their
(packed, scales, biases) triples; the prefix token ids; and metadata (format version, the model's identity
fingerprint, compute dtype, kv-bits and group size, per-layer kind/window/offset, how the prefix was made).
Files are written atomically (temporary sibling, then rename). Loading checks everything against the
model and the requested quantization and raises ``PromptCacheError`` (a ValueError) on any mismatch or
on a corrupt or truncated file.

How a prompt relates to the cached prefix (``PromptCache.prompt_ids``):

- **raw** prefix (``BOS + text``): the prompt is a *continuation* of the cached text, appended as is (no
  BOS, no separator), as mlx-lm does; or, when it starts with the cached text, it is the *full* prompt and
  only what follows the cached text is prefilled;
- **chat** prefix: the cached text is the *system* part of the first user turn (Gemma 3 folds the system
  prompt into it: ``<start_of_turn>user\\n{text}\\n\\n``) and the prompt is the user's message; the ids are
  those of ``generate(..., chat=True, system=text, prompt)``, so the answer equals a fresh run of that;
- token ids: a full prompt when they start with the cached ids, else a continuation.

Whenever the fresh tokenization of the whole prompt starts with the cached ids (the usual case), the ids
prefilled are exactly the rest of that tokenization, so greedy output equals the whole prompt run fresh,
also for prefixes longer than the sliding window (each layer's cache is restored exactly as it was, ring
state and positions included). Only when the tokenizer would merge across the boundary are the cached ids
kept and the rest tokenized on its own.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from .atomic import atomic_file
from .model.cache import KVCache, RotatingKVCache, check_kv_quantization, copy_cache

FORMAT = "mlx-gemma-qat/prompt-cache"
VERSION = 1
ANY = "any"  # load_prompt_cache(kv_bits=ANY): take the file's quantization, whatever it is

_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
_SENTINEL = "\u2063USER\u2063"  # stands in for the user message when rendering a chat prefix


class PromptCacheError(ValueError):
    """A prompt-cache file that cannot be used with this model (other model, kv-bits, dtype) or is corrupt."""


def _dtype_name(dtype: mx.Dtype) -> str:
    for k, v in _DTYPES.items():
        if v == dtype:
            return k
    raise PromptCacheError(f"unsupported cache dtype {dtype}")


def _compute_dtype(model) -> mx.Dtype:
    return model.model.compute_dtype


def _identity(model) -> str:
    ident = getattr(model, "identity", None)
    if not ident:
        raise PromptCacheError("this model has no identity fingerprint (load it with mlx_gemma_qat.load or "
                               "load_model), so a prompt cache could not be checked against it")
    return ident


def _render(tokenizer, messages) -> str:
    from .convert.tokenizer import template_kwargs

    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                         **template_kwargs(tokenizer))


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def _resolve_chat(tokenizer, chat: bool | None) -> bool:
    return bool(getattr(tokenizer, "chat_template", None)) if chat is None else bool(chat)


def chat_prefix_text(tokenizer, text: str) -> str:
    """The chat template's rendering of a conversation whose system prompt is ``text``, up to where the user's
    message starts (for Gemma 3: "<bos><start_of_turn>user\\n{text}\\n\\n")."""
    full = _render(tokenizer, [{"role": "system", "content": text}, {"role": "user", "content": _SENTINEL}])
    cut = full.find(_SENTINEL)
    if cut < 0 or full.find(text) < 0:
        raise PromptCacheError("the chat template does not place the system text before the user's message")
    return full[:cut]


def prefix_ids(tokenizer, text: str, chat: bool) -> list[int]:
    """Token ids of a cached prefix: ``BOS + text`` (raw) or the chat rendering up to the user message."""
    if chat:
        return _encode(tokenizer, chat_prefix_text(tokenizer, text))
    return _encode(tokenizer, (tokenizer.bos_token or "") + text)


@dataclass
class PromptCache:
    """A prefix's KV cache in memory, as loaded from a file or made by ``cache_prompt``. It is never changed:
    ``make_cache()`` hands out an independent copy for each use. ``cache, tokens = prompt_cache`` unpacks
    a fresh copy and the prefix ids (mlx-lm's shape)."""

    tokens: list[int]
    kv_bits: int | None
    kv_group_size: int
    dtype: str
    identity: str
    chat: bool = False
    text: str | None = None  # the cached text, when the prefix was made from text
    _cache: list = field(default_factory=list, repr=False)

    def make_cache(self) -> list:
        return copy_cache(self._cache)

    def __iter__(self):
        return iter((self.make_cache(), list(self.tokens)))

    def __len__(self) -> int:
        return len(self.tokens)

    def describe_kv(self) -> str:
        return "a float cache" if self.kv_bits is None else f"a {self.kv_bits}-bit cache (group {self.kv_group_size})"

    def prompt_ids(self, tokenizer, prompt: str | list[int], chat: bool | None = None) -> list[int]:
        """The whole prompt's ids (they start with ``tokens``) for ``prompt`` read against this prefix (see
        the module docstring); raises PromptCacheError when it adds nothing after the prefix."""
        P, n = list(self.tokens), len(self.tokens)
        if not isinstance(prompt, str):
            ids = [int(t) for t in prompt]
            full = ids if ids[:n] == P and len(ids) > n else P + ids
            return self._check_longer(full)
        if chat is not None and bool(chat) != self.chat:
            raise PromptCacheError(f"the prompt cache was made {'with' if self.chat else 'without'} the chat "
                                   f"template: generate with --{'chat' if self.chat else 'raw'} (or leave it out)")
        if self.chat:
            if self.text is None:
                raise PromptCacheError("this chat prompt cache does not record its text; give token ids")
            prefix = chat_prefix_text(tokenizer, self.text)
            if _encode(tokenizer, prefix) != P:
                raise PromptCacheError("the tokenizer or chat template encodes the cached prefix differently "
                                       "from when the file was made")
            full_text = _render(tokenizer, [{"role": "system", "content": self.text},
                                            {"role": "user", "content": prompt}])
            if not full_text.startswith(prefix):
                raise PromptCacheError("the chat template does not render the cached prefix first")
            rest = full_text[len(prefix):]
            fresh = _encode(tokenizer, full_text)
        else:
            bos = tokenizer.bos_token or ""
            if self.text is not None:
                if prompt.startswith(self.text):  # the full prompt
                    prompt = prompt[len(self.text):]
                rest, fresh = prompt, _encode(tokenizer, bos + self.text + prompt)
            else:
                full = _encode(tokenizer, bos + prompt)
                if full[:n] == P and len(full) > n:
                    return full
                rest, fresh = prompt, []
        if fresh[:n] == P and len(fresh) > n:
            return fresh  # exactly the fresh tokenization of the whole prompt
        return self._check_longer(P + _encode(tokenizer, rest))

    def _check_longer(self, ids: list[int]) -> list[int]:
        if len(ids) <= len(self.tokens):
            raise PromptCacheError(f"the prompt adds no tokens after the {len(self.tokens)} cached ones")
        return ids

    def save(self, path) -> Path:
        return _write(path, self._cache, self.tokens, self._info())

    def _info(self) -> dict:
        return {
            "model_identity": self.identity, "dtype": self.dtype, "kv_bits": self.kv_bits,
            "kv_group_size": self.kv_group_size, "num_tokens": len(self.tokens), "chat": self.chat,
            "text": self.text,
        }


def _check_cache(model, cache: list, tokens) -> tuple[int | None, int]:
    cfg = model.cfg
    if len(cache) != cfg.num_hidden_layers:
        raise ValueError(f"the cache has {len(cache)} layers, the model {cfg.num_hidden_layers}")
    n = len(tokens)
    if n == 0:
        raise ValueError("nothing to save: the prefix is empty")
    bits = {(c.bits, c.group_size if c.bits else None) for c in cache}
    if len(bits) != 1:
        raise ValueError("the layers of the cache are quantized differently")
    for i, c in enumerate(cache):
        want = RotatingKVCache if cfg.is_sliding(i) else KVCache
        if not isinstance(c, want):
            raise ValueError(f"layer {i}: a {type(c).__name__} where the model needs a {want.__name__}")
        if c.offset != n:
            raise ValueError(f"layer {i} holds {c.offset} tokens, the prefix has {n}")
    c0 = cache[0]
    return c0.bits, c0.group_size


def save_prompt_cache(path, model, cache: list, tokens, *, text: str | None = None, chat: bool = False) -> Path:
    """Save ``cache`` (the KV cache after exactly the prefix ``tokens``) to ``path`` for ``model``.
    ``text``/``chat``: the text the prefix was made from and whether through the chat template (recorded so
    a later prompt can be read against it; see ``PromptCache.prompt_ids``). Written atomically."""
    bits, gs = _check_cache(model, cache, tokens)
    pc = PromptCache(tokens=[int(t) for t in tokens], kv_bits=bits, kv_group_size=gs,
                     dtype=_dtype_name(_compute_dtype(model)), identity=_identity(model), chat=bool(chat),
                     text=text, _cache=cache)
    return pc.save(path)


def _write(path, cache: list, tokens, info: dict) -> Path:
    path = Path(path)
    arrays = {"tokens": mx.array(np.asarray(tokens, dtype=np.int32))}
    layers = []
    for i, c in enumerate(cache):
        keys, values = c.fetch()
        for name, t in (("keys", keys), ("values", values)):
            if isinstance(t, tuple):
                for part, a in zip(("q", "scales", "biases"), t):
                    arrays[f"layers.{i}.{name}.{part}"] = a
            else:
                arrays[f"layers.{i}.{name}"] = t
        entry = {"kind": "sliding" if isinstance(c, RotatingKVCache) else "global", "offset": c.offset}
        if isinstance(c, RotatingKVCache):
            entry["window"] = c.window
        layers.append(entry)
    info = dict(info, layers=layers)
    meta = {"format": FORMAT, "format_version": str(VERSION), "info": json.dumps(info)}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, suffix=".safetensors") as tmp:  # mx.save_safetensors appends it when missing
        mx.save_safetensors(str(tmp), arrays, metadata=meta)
    return path


_ST_DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "I64": 8, "U8": 1, "BOOL": 1}


def _check_safetensors(path: Path) -> None:
    """Structural check before MLX reads the file: header length, JSON, every tensor's extent inside the
    file and the data section exactly covered (a truncated or padded file is refused)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise PromptCacheError(f"{path}: not a prompt-cache file (too short)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 1 << 28):
                raise PromptCacheError(f"{path}: corrupt or truncated (header length {n} for a {size}-byte file)")
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PromptCacheError(f"{path}: corrupt prompt-cache file (unreadable header: {e})") from None
    if not isinstance(header, dict):
        raise PromptCacheError(f"{path}: corrupt prompt-cache file (header is not an object)")
    data = size - 8 - n
    end = 0
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            a, b = (int(x) for x in t["data_offsets"])
            count = int(np.prod([int(s) for s in t["shape"]], dtype=np.int64))
            width = _ST_DTYPES[t["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise PromptCacheError(f"{path}: corrupt prompt-cache file (bad entry for {name!r})") from None
        if not (0 <= a <= b <= data) or b - a != count * width:
            raise PromptCacheError(f"{path}: corrupt or truncated prompt-cache file ({name!r} lies outside the data)")
        end = max(end, b)
    if end != data:
        raise PromptCacheError(f"{path}: corrupt or truncated prompt-cache file (data is {data} bytes, "
                               f"tensors cover {end})")


def load_prompt_cache(path, model, *, kv_bits: int | None | str = ANY, kv_group_size: int | str = ANY) -> PromptCache:
    """Read a prompt-cache file for ``model`` (checked: format, model identity, compute dtype, layers, shapes).
    ``kv_bits``/``kv_group_size``: the quantization the caller expects (None: a float cache); ANY (default)
    takes the file's. Returns a ``PromptCache``: ``cache, tokens = load_prompt_cache(...)`` also works."""
    path = Path(path)
    if not path.is_file():
        raise PromptCacheError(f"{path}: no such prompt-cache file")
    _check_safetensors(path)
    try:
        arrays, meta = mx.load(str(path), format="safetensors", return_metadata=True)
    except Exception as e:  # noqa: BLE001 - MLX raises RuntimeError/ValueError for unreadable files
        raise PromptCacheError(f"{path}: corrupt prompt-cache file ({e})") from None
    if meta.get("format") != FORMAT:
        raise PromptCacheError(f"{path}: not an mlx-gemma-qat prompt-cache file")
    if meta.get("format_version") != str(VERSION):
        raise PromptCacheError(f"{path}: prompt-cache format version {meta.get('format_version')}, "
                               f"this version reads {VERSION}")
    try:
        info = json.loads(meta["info"])
        ident, dtype, bits, gs = info["model_identity"], info["dtype"], info["kv_bits"], info["kv_group_size"]
        layers, n = info["layers"], int(info["num_tokens"])
    except (KeyError, TypeError, ValueError, json.JSONDecodeError):
        raise PromptCacheError(f"{path}: corrupt prompt-cache metadata") from None

    if ident != _identity(model):
        raise PromptCacheError(f"{path} was made with another model (identity {ident}; this model is "
                               f"{_identity(model)})")
    want_dtype = _dtype_name(_compute_dtype(model))
    if dtype != want_dtype:
        raise PromptCacheError(f"{path} holds a {dtype} cache; this model computes in {want_dtype} "
                               f"(load it with dtype={dtype!r})")
    have = "a float cache" if bits is None else f"{bits}-bit keys and values (group {gs})"
    if kv_bits != ANY and kv_bits != bits:
        asked = "a float cache" if kv_bits is None else f"kv_bits={kv_bits}"
        raise PromptCacheError(f"{path} holds {have}, not {asked}")
    if kv_group_size != ANY and bits is not None and kv_group_size != gs:
        raise PromptCacheError(f"{path} holds {have}, not group size {kv_group_size}")
    cfg = model.cfg
    try:
        check_kv_quantization(bits, gs, cfg.head_dim)
    except ValueError as e:
        raise PromptCacheError(f"{path}: {e}") from None
    if not isinstance(layers, list) or len(layers) != cfg.num_hidden_layers:
        raise PromptCacheError(f"{path}: {len(layers) if isinstance(layers, list) else '?'} layers, "
                               f"the model has {cfg.num_hidden_layers}")
    tokens = arrays.get("tokens")
    if tokens is None or tokens.ndim != 1 or tokens.size != n or tokens.dtype != mx.int32 or n < 1:
        raise PromptCacheError(f"{path}: corrupt prompt-cache file (prefix tokens)")
    tokens = [int(t) for t in np.array(tokens)]
    if n >= cfg.max_position_embeddings:
        raise PromptCacheError(f"{path}: {n} cached tokens fill the model's context {cfg.max_position_embeddings}")

    cache = model.make_cache(bits, gs if bits is not None else 64)
    D, H, cdt = cfg.head_dim, cfg.num_key_value_heads, _DTYPES[dtype]
    for i, (c, entry) in enumerate(zip(cache, layers)):
        kind = "sliding" if cfg.is_sliding(i) else "global"
        if not isinstance(entry, dict) or entry.get("kind") != kind or entry.get("offset") != n or (
                kind == "sliding" and entry.get("window") != cfg.sliding_window):
            raise PromptCacheError(f"{path}: layer {i} does not match the model ({entry!r})")
        held = min(n, cfg.sliding_window) if kind == "sliding" else n
        kv = []
        for name in ("keys", "values"):
            if bits is None:
                t = arrays.get(f"layers.{i}.{name}")
                shapes = [((1, H, held, D), cdt, t)]
            else:
                t = tuple(arrays.get(f"layers.{i}.{name}.{p}") for p in ("q", "scales", "biases"))
                shapes = [((1, H, held, D * bits // 32), mx.uint32, t[0]),
                          ((1, H, held, D // gs), cdt, t[1]), ((1, H, held, D // gs), cdt, t[2])]
            for shape, dt, a in shapes:
                if a is None or tuple(a.shape) != shape or a.dtype != dt:
                    got = "missing" if a is None else f"{tuple(a.shape)} {a.dtype}"
                    raise PromptCacheError(f"{path}: layer {i} {name}: expected {shape} {dt}, found {got}")
            kv.append(t)
        c.restore(kv[0], kv[1], n)
    mx.eval([c.state for c in cache])
    return PromptCache(tokens=tokens, kv_bits=bits, kv_group_size=gs, dtype=dtype, identity=ident,
                       chat=bool(info.get("chat", False)), text=info.get("text"), _cache=cache)


def cache_prompt(model, tokenizer, text: str, path=None, *, chat: bool | None = None, kv_bits: int | None = None,
                 kv_group_size: int = 64, prefill_step_size: int = 256) -> PromptCache:
    """Prefill ``text`` (raw: ``BOS + text``; chat: as the system part of the first user turn, see the module
    docstring; ``chat=None``: chat when the model ships a template) and return its ``PromptCache``, saved
    to ``path`` when given."""
    from .generate import ContextLengthError
    from .prefill import prefill

    chat = _resolve_chat(tokenizer, chat)
    if not text:
        raise ValueError("empty prompt")
    ids = prefix_ids(tokenizer, text, chat)
    limit = int(model.cfg.max_position_embeddings)
    if len(ids) >= limit:
        raise ContextLengthError(f"prompt is {len(ids)} tokens; the model's context is {limit}")
    cache = model.make_cache(kv_bits, kv_group_size)
    mx.eval(prefill(model, mx.array(ids), cache, prefill_step_size))
    mx.eval([c.state for c in cache])
    _check_cache(model, cache, ids)
    pc = PromptCache(tokens=ids, kv_bits=kv_bits, kv_group_size=kv_group_size,
                     dtype=_dtype_name(_compute_dtype(model)), identity=_identity(model), chat=chat, text=text,
                     _cache=cache)
    if path is not None:
        pc.save(path)
    return pc
