"""Token generation: chunked prefill, sampled decode, streaming text, stop conditions, measured speed.

The API has mlx-lm's shape (``stream_generate`` yields responses with ``.text``; ``generate`` returns
the text), with samplers from mlx-lm. Prefill runs in chunks through the KV cache and computes the
output head for the last prompt position only; decode overlaps the next step's graph with the
current token's evaluation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import mlx.core as mx

from .image import crop_prompt, preprocess_all
from .model.cache import cache_nbytes, check_kv_quantization
from .prefill import chunk_bounds, prefill  # noqa: F401 - chunk_bounds: part of this module's API
from .sampling import Sampler
from .speculative import (
    PromptLookup,
    SpeculativeStats,
    check_num_draft,
    default_num_draft,
    make_drafter,
    speculative_step,
)
from .stop_strings import StopStrings


class ContextLengthError(ValueError):
    pass


@dataclass
class GenerationResponse:
    text: str  # the new text segment
    token: int
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB, process peak as MLX reports it
    cache_bytes: int  # KV cache allocated now
    finish_reason: str | None = None  # "stop", "length" or None while streaming
    speculative: SpeculativeStats | None = None  # with a draft model or prompt lookup: what it did so far


def generate_step(
    prompt: mx.array,
    model,
    *,
    max_tokens: int = 256,
    sampler: Callable[[mx.array], mx.array] | None = None,
    cache: list | None = None,
    prefill_step_size: int = 256,
    on_prefill_done: Callable[[], None] | None = None,
    embeddings: mx.array | None = None,
    groups: mx.array | None = None,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    matcher=None,
) -> Iterator[tuple[int, mx.array]]:
    """Yield (token, logprobs) pairs, one per decode step (``kv_bits``: quantize a cache made here).

    ``matcher`` (a ``constrain.Matcher``): every token is sampled from the logits it masks (the log-probabilities
    yielded are those of the masked distribution); the next mask is computed while the model runs."""
    sampler = sampler or (lambda lp: mx.argmax(lp, axis=-1))
    cache = cache if cache is not None else model.make_cache(kv_bits, kv_group_size)

    def pick(logits):
        if matcher is not None:
            logits = matcher.apply(logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return sampler(logprobs), logprobs

    y, lp = pick(prefill(model, prompt, cache, prefill_step_size, embeddings=embeddings, groups=groups))
    mx.eval(y, lp)
    if on_prefill_done is not None:
        on_prefill_done()
    for n in range(max_tokens):
        if n + 1 < max_tokens:
            logits = model(y[:, None], cache)[:, -1, :]
            if matcher is not None:
                mx.async_eval(logits)  # the forward runs while the matcher takes y and computes the next mask
                matcher.consume(int(y.item()))
            ny, nlp = pick(logits)
            mx.async_eval(ny, nlp)
        yield int(y.item()), lp[0]
        if n + 1 < max_tokens:
            y, lp = ny, nlp


def context_limit(model) -> int:
    """The model's context in tokens (a multimodal model's ``cfg`` is its text config)."""
    return int(model.cfg.max_position_embeddings)


BOI = "<start_of_image>"


def encode_prompt(
    tokenizer,
    prompt: str | list[int],
    *,
    chat: bool | None = None,
    system: str | None = None,
    n_images: int = 0,
    image_ids: tuple[int, int, int, int] | None = None,
    crops: list[int] | None = None,
) -> list[int]:
    """Token ids for a prompt: through the chat template or raw (BOS added once).

    ``chat=None`` applies the template when the model ships one (instruction-tuned models do; a base
    model's GGUF has none); ``chat=True`` falls back to the Gemma 3 template. With ``n_images``, each
    <start_of_image> marker (the template puts one per image; a raw prompt may place its own, else the
    images go first) becomes "\n\n" <start_of_image> + n soft tokens + <end_of_image> "\n\n", as Gemma 3's
    processor lays it out; ``image_ids`` = (boi, eoi, image token, tokens per image). ``crops``: the
    number of pan-and-scan crops of each image, laid out after it as the processor does.
    """
    own = getattr(tokenizer, "chat_template", None)
    if is_messages(prompt):
        messages = ([{"role": "system", "content": system}] if system else []) + list(prompt)
        chat = True
    elif not isinstance(prompt, str):
        return list(prompt)
    else:
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}] if n_images else prompt
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    if chat or (chat is None and own):
        from .convert.tokenizer import template_kwargs

        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                             **template_kwargs(tokenizer))
    else:
        if system:
            prompt = system + "\n\n" + prompt
        if n_images and BOI not in prompt:
            prompt = BOI * n_images + prompt
        text = (tokenizer.bos_token or "") + prompt

    if not n_images:
        return _enc(tokenizer, text)
    return layout_images(tokenizer, text, n_images, image_ids, crops)


BASE_MODEL_NOTE = ("this model ships no chat template: it is a base (pre-trained) model, which continues text rather "
                   "than answering, and the Gemma 3 chat layout it is given was not trained into it. For a chat, use "
                   "an instruction-tuned file (Google's are named gemma-3-*-it, e.g. "
                   "-m google/gemma-3-1b-it-qat-q4_0-gguf)")


def base_model_note(tokenizer) -> str | None:
    """What to tell a user who chats with a model that ships no chat template (None when it ships one)."""
    return None if getattr(tokenizer, "chat_template", None) else BASE_MODEL_NOTE


def _enc(tokenizer, t: str) -> list[int]:
    return list(tokenizer.encode(t, add_special_tokens=False)) if t else []


def layout_images(tokenizer, text: str, n_images: int, image_ids: tuple[int, int, int, int],
                  crops: list[int] | None = None) -> list[int]:
    """Token ids of rendered ``text`` whose ``n_images`` <start_of_image> markers become Gemma 3's image
    layout (see ``encode_prompt``); shared with lora/data.py."""
    pieces = text.split(BOI)
    if len(pieces) - 1 != n_images:
        raise ValueError(f"the prompt has {len(pieces) - 1} {BOI} markers for {n_images} image(s)")
    crops = crops or [0] * n_images
    text = pieces[0] + "".join(crop_prompt(f"\n\n{BOI}\n\n", c) + p for c, p in zip(crops, pieces[1:]))
    boi, eoi, img, n = image_ids
    pieces = text.split(BOI)  # now one per image and crop, each a run of n soft tokens
    ids = _enc(tokenizer, pieces[0])
    for piece in pieces[1:]:
        ids += [boi] + [img] * n + [eoi] + _enc(tokenizer, piece)
    return ids


def image_token_ids(model) -> tuple[int, int, int, int] | None:
    """(boi, eoi, image token, tokens per image) of a model with a vision tower, else None."""
    m = getattr(model, "mcfg", None)
    return (m.boi_token_index, m.eoi_token_index, m.image_token_index, m.mm_tokens_per_image) if m else None


def is_messages(prompt) -> bool:
    return isinstance(prompt, (list, tuple)) and bool(prompt) and isinstance(prompt[0], dict)


def message_images(messages) -> list:
    """The images of a chat, in order: content items {"type": "image", "image": path/URL/PIL/array}."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            for item in content:
                if item.get("type") == "image":
                    if item.get("image") is None:
                        raise ValueError('an image item needs its image: {"type": "image", "image": PATH_OR_PIL}')
                    out.append(item["image"])
    return out


def stream_generate(
    model,
    tokenizer,
    prompt: str | list[int] | list[dict],
    max_tokens: int = 256,
    *,
    sampler: Callable | None = None,
    temp: float = 0.0,
    top_p: float = 0.0,
    top_k: int = 0,
    min_p: float = 0.0,
    seed: int | None = None,
    chat: bool | None = None,
    system: str | None = None,
    images: list | None = None,
    pan_and_scan: bool = False,
    stop_strings: list[str] | None = None,
    prefill_step_size: int = 256,
    cache: list | None = None,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    prompt_cache=None,
    json_schema=None,
    json: bool = False,
    regex: str | None = None,
    grammar: str | None = None,
    constraint=None,
    draft_model=None,
    num_draft_tokens: int | None = None,
    prompt_lookup: bool = False,
    cache_ids: list[int] | None = None,
) -> Iterator[GenerationResponse]:
    """Stream a completion. ``prompt`` is text (chat template applied if ``chat``), token ids, or a list of
    chat messages ({"role", "content"}; content a string or items {"type": "text", "text": ...} and
    {"type": "image", "image": ...}) for multi-turn chats, with images anywhere in them.

    ``images``: paths, URLs, PIL images or arrays, for a model with a vision tower. ``pan_and_scan``:
    also show the model crops of elongated images (True, or an ``image.PanAndScan`` with other settings).

    ``kv_bits`` (4 or 8; 2, 3, 5, 6 also run) stores the KV cache quantized, in groups of ``kv_group_size``
    along head_dim, on every layer (used when the cache is made here; a given ``cache`` keeps its own form).
    ``prompt_cache``: a prompt-cache file (path) or a loaded ``prompt_cache.PromptCache``: generation resumes
    after its cached prefix and ``prompt`` is read against it (see ``PromptCache.prompt_ids``: in raw mode a
    continuation of the cached text, or a full prompt starting with it; in chat mode the user message after
    the cached system text); only the tokens after the prefix are prefilled. A loaded PromptCache is never
    changed, so it can be reused. With ``kv_bits`` given, the file must hold that quantization.

    Constrained output (``constrain.py``), at most one of: ``json_schema`` (a dict or JSON text), ``json=True``
    (any JSON object), ``regex`` (the whole output matches it), ``grammar`` (a Lark grammar in llguidance's
    dialect), or ``constraint``, one compiled by ``constrain.compile_constraint`` (build it once, reuse it). The
    output is then a valid prefix of the language at every token and ends with "stop" only when it is complete;
    the grammar decides where it ends, so stop strings cannot be given with a constraint.

    Speculative decoding (``speculative.py``): ``draft_model`` (a smaller Gemma 3 from ``load_draft``, or a
    ``speculative.ModelDraft`` whose cache carries over between calls) or ``prompt_lookup=True`` (drafts from the
    text so far) proposes ``num_draft_tokens`` tokens that the model checks in one forward. Greedy output is the
    model's own; sampled output follows its distribution exactly (speculative rejection sampling with the
    sampler settings above; a custom ``sampler`` cannot be used). ``cache_ids``: the token ids a given ``cache``
    holds (a draft model needs them to follow the conversation). Each response's ``speculative`` has the stats.
    """
    from .constrain import STOP_WITH_CONSTRAINT, ConstraintError, compile_constraint, logits_width

    compiled = compile_constraint(json_schema=json_schema, json=json, regex=regex, grammar=grammar)
    if compiled is not None and constraint is not None:
        raise ConstraintError("give either constraint= or one of json_schema=, json=, regex=, grammar=")
    constraint = constraint or compiled
    if constraint is not None and stop_strings:
        raise ConstraintError(STOP_WITH_CONSTRAINT)
    drafter = make_drafter(model, draft_model, prompt_lookup)
    if drafter is not None:
        if sampler is not None:
            raise ValueError("speculative sampling needs the sampler's settings (temp, top_p, top_k, min_p), "
                             "not a custom sampler")
        num_draft_tokens = check_num_draft(num_draft_tokens or default_num_draft(isinstance(drafter, PromptLookup)))
    if seed is not None:
        mx.random.seed(seed)
    if cache is None and prompt_cache is None:
        check_kv_quantization(kv_bits, kv_group_size, model.cfg.head_dim)  # before any work
    if prompt_cache is not None:
        if cache is not None:
            raise ValueError("give either cache= or prompt_cache=, not both")
        if images or is_messages(prompt):
            raise ValueError("a prompt cache takes a text prompt (or token ids), without images")
        if system:
            raise ValueError("a prompt cache fixes the start of the prompt: no system prompt can be added")
        from .prompt_cache import ANY, PromptCache, load_prompt_cache

        if not isinstance(prompt_cache, PromptCache):
            prompt_cache = load_prompt_cache(prompt_cache, model, kv_bits=ANY if kv_bits is None else kv_bits,
                                             kv_group_size=ANY if kv_bits is None else kv_group_size)
        elif kv_bits is not None and (kv_bits, kv_group_size) != (prompt_cache.kv_bits, prompt_cache.kv_group_size):
            raise ValueError(f"the prompt cache holds {prompt_cache.describe_kv()}, not kv_bits={kv_bits} "
                             f"group {kv_group_size}")
        ids = prompt_cache.prompt_ids(tokenizer, prompt, chat=chat)
        cache = prompt_cache.make_cache()
        prompt = ids[len(prompt_cache.tokens):]
        cache_ids = list(prompt_cache.tokens)
    elif cache is not None and cache_ids is not None and len(cache_ids) != cache[0].offset:
        raise ValueError(f"cache_ids has {len(cache_ids)} ids for a cache holding {cache[0].offset} tokens")
    if is_messages(prompt):
        if images:
            raise ValueError("give a chat's images inside its messages, not as images=")
        images = message_images(prompt) or None
    if images and not hasattr(model, "embed_prompt"):
        raise ValueError("this model is text-only: it has no vision tower to read images")
    pixels, crops = None, None
    if images:
        pixels, crops = preprocess_all(images, model.mcfg.vision.image_size, pan_and_scan)
    ids = encode_prompt(tokenizer, prompt, chat=chat, system=system, n_images=len(images or []),
                        image_ids=image_token_ids(model), crops=crops)
    used = cache[0].offset if cache else 0  # tokens an earlier turn left in a reused cache
    limit = context_limit(model) - used
    if not ids:
        raise ValueError("empty prompt")
    if max_tokens < 1:
        raise ValueError("max_tokens must be >= 1")
    if len(ids) >= limit:
        with_images = f" with {len(images)} image(s)" if images else ""
        with_images += f" and {sum(crops)} crop(s)" if crops and sum(crops) else ""
        before = f" after {used} tokens already in the cache" if used else ""
        raise ContextLengthError(
            f"prompt is {len(ids)} tokens{with_images}{before}; the model's context is {limit + used}")
    max_tokens = min(max_tokens, limit - len(ids))
    embeddings = groups = None
    if images:
        embeddings, groups = model.embed_prompt(ids, mx.array(pixels))
    if drafter is not None and used and cache_ids is None:
        raise ValueError("a draft model follows the whole conversation: give cache_ids, the ids the cache holds")
    sampler = sampler or Sampler(temp, top_p, top_k, min_p)
    eos = set(tokenizer.eos_token_ids)
    detok = tokenizer.detokenizer
    detok.reset()
    cache = cache if cache is not None else model.make_cache(kv_bits, kv_group_size)

    mx.reset_peak_memory()
    t0 = time.perf_counter()
    t_prefill = [None]

    def prefill_done():
        t_prefill[0] = time.perf_counter()

    matcher = None if constraint is None else constraint.matcher(tokenizer, logits_width(model))
    common = dict(max_tokens=max_tokens, cache=cache, prefill_step_size=prefill_step_size,
                  on_prefill_done=prefill_done, embeddings=embeddings, groups=groups, matcher=matcher)
    stats = None
    if drafter is None:
        steps = generate_step(mx.array(ids), model, sampler=sampler, **common)
    else:
        stats = SpeculativeStats()
        steps = speculative_step(mx.array(ids), model, drafter, num_draft=num_draft_tokens, sampler=sampler,
                                 history=cache_ids or [], stats=stats, **common)
    stops = StopStrings(stop_strings or [])
    n, token, finish, text = 0, None, None, ""
    try:
        for n, (token, _) in enumerate(steps, 1):
            if token in eos:
                finish = "stop"
                detok.finalize()
                text = stops.flush(detok.last_segment)  # what the detokenizer or the stop check held back
                break
            detok.add_token(token)
            text, hit = stops.feed(detok.last_segment)
            if hit:
                finish = "stop"
                break
            if n == max_tokens:
                detok.finalize()
                text += stops.flush(detok.last_segment)
                break
            yield _response(text, token, len(ids), n, t0, t_prefill[0], cache, None, stats)
    finally:
        steps.close()  # a speculative cache steps back to the tokens taken
    yield _response(text, token, len(ids), n, t0, t_prefill[0], cache, finish or "length", stats)


def _response(text, token, n_prompt, n_gen, t0, t_prefill, cache, finish, stats=None):
    now = time.perf_counter()
    prompt_time = (t_prefill or now) - t0
    gen_time = now - (t_prefill or now)
    return GenerationResponse(
        text=text,
        token=token,
        prompt_tokens=n_prompt,
        prompt_tps=n_prompt / prompt_time if prompt_time > 0 else 0.0,
        generation_tokens=n_gen,
        generation_tps=(n_gen - 1) / gen_time if gen_time > 0 and n_gen > 1 else 0.0,
        peak_memory=mx.get_peak_memory() / 1e9,
        cache_bytes=cache_nbytes(cache),
        finish_reason=finish,
        speculative=None if stats is None else replace(stats),
    )


def generate(model, tokenizer, prompt: str | list[int], max_tokens: int = 256, *, verbose: bool = False, **kwargs) -> str:
    """Generate a completion and return its text (printing it as it streams when ``verbose``)."""
    text, last = "", None
    for last in stream_generate(model, tokenizer, prompt, max_tokens, **kwargs):
        text += last.text
        if verbose:
            print(last.text, end="", flush=True)
    if verbose and last is not None:
        print()
        print(format_stats(last))
    return text


def format_stats(r: GenerationResponse) -> str:
    return (
        f"Prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.2f} tokens-per-sec\n"
        f"Generation: {r.generation_tokens} tokens, {r.generation_tps:.2f} tokens-per-sec\n"
        f"Peak memory: {r.peak_memory:.3f} GB (KV cache {r.cache_bytes / 2**20:.1f} MiB)"
        + (f"\n{r.speculative.describe()}" if r.speculative is not None else "")
    )
