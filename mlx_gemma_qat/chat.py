"""Multi-turn chat whose KV cache carries over from turn to turn.

Each turn renders the whole conversation with the chat template, as a fresh prompt would be, and
compares its token ids with those already in the cache (the earlier prompts and the tokens the model
generated, as it generated them). When the cache holds a prefix of the new prompt, only the rest is
prefilled; otherwise (the template re-tokenized a reply differently, e.g. it trims trailing spaces) the
conversation is prefilled again from the start, so reuse never changes what the model sees.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from .generate import GenerationResponse, encode_prompt, image_token_ids, stream_generate
from .image import PanAndScan, crop_counts
from .model.cache import check_kv_quantization
from .model.multimodal import image_groups
from .speculative import ModelDraft, PromptLookup, make_drafter


class ChatSession:
    """A conversation with ``model``. ``send`` streams the reply to one user message. ``kv_bits`` (8 or 4; 2, 3,
    5, 6 also run) keeps the carried-over KV cache quantized, in groups of ``kv_group_size`` along head_dim.
    ``draft_model`` (``load_draft``) or ``prompt_lookup`` decode speculatively (``speculative.py``), the draft
    model with a cache of its own that carries over too; ``num_draft_tokens``: tokens drafted per round."""

    def __init__(self, model, tokenizer, *, system: str | None = None, pan_and_scan: bool | PanAndScan = False,
                 kv_bits: int | None = None, kv_group_size: int = 64, draft_model=None,
                 num_draft_tokens: int | None = None, prompt_lookup: bool = False):
        self.model, self.tokenizer = model, tokenizer
        self.system = system
        self.pan_and_scan = pan_and_scan
        check_kv_quantization(kv_bits, kv_group_size, model.cfg.head_dim)
        self.kv_bits, self.kv_group_size = kv_bits, kv_group_size
        # speculative decoding (see stream_generate); a draft model keeps its own cache across turns
        self.drafter = make_drafter(model, draft_model, prompt_lookup)
        self.num_draft_tokens = num_draft_tokens
        self.reset()

    def _new_cache(self) -> list:
        return self.model.make_cache(self.kv_bits, self.kv_group_size)

    def reset(self) -> None:
        """Forget the conversation and empty the cache."""
        self.messages: list[dict] = []
        self.images: list = []  # every image of the conversation, in order
        self.crops: list[int] = []  # pan-and-scan crops of each
        self.cache = self._new_cache()
        if isinstance(self.drafter, ModelDraft):
            self.drafter.reset()
        self.cached_ids: list[int] = []  # the tokens the cache holds
        self.reused_tokens = 0  # of the last turn's prompt, how many came from the cache

    def send(self, text: str, images: list | None = None, max_tokens: int = 512,
             **kwargs) -> Iterator[GenerationResponse]:
        """Stream the reply to ``text`` (with ``images``, shown before the text); ``kwargs`` go to
        ``stream_generate`` (sampling, stop strings, prefill step, constraints)."""
        images = list(images or [])
        if images and not hasattr(self.model, "embed_prompt"):
            raise ValueError("this model is text-only: it has no vision tower to read images")
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}] if images else text
        messages = self.messages + [{"role": "user", "content": content}]
        crops = self.crops + crop_counts(images, self.pan_and_scan)
        ids = encode_prompt(self.tokenizer, messages, chat=True, system=self.system,
                            n_images=len(self.images) + len(images), image_ids=image_token_ids(self.model), crops=crops)
        n = len(self.cached_ids)
        if ids[:n] != self.cached_ids or n == len(ids):
            self.cache, self.cached_ids, n = self._new_cache(), [], 0
        new_images = self._last_images(ids[n:], self.images + images, crops)
        tokens, reply = [], ""
        try:
            if self.drafter is not None:
                kwargs = {"draft_model": self.drafter if isinstance(self.drafter, ModelDraft) else None,
                          "prompt_lookup": isinstance(self.drafter, PromptLookup),
                          "num_draft_tokens": self.num_draft_tokens, "cache_ids": self.cached_ids, **kwargs}
            for r in stream_generate(self.model, self.tokenizer, ids[n:], max_tokens, images=new_images or None,
                                     pan_and_scan=self.pan_and_scan, cache=self.cache, **kwargs):
                tokens.append(r.token)
                reply += r.text
                yield r
        finally:  # also when the caller stops early or generation fails: keep the record true to the cache
            # the cache holds the prompt (or the part prefilled before a failure) and the generated tokens
            # it was fed: all but a last one when generation stopped at max_tokens or was left
            self.cached_ids = (ids + tokens)[: self.cache[0].offset]
            self.reused_tokens = n
            if tokens:  # the turn happened (perhaps cut short): it is part of the conversation
                self.messages = messages + [{"role": "assistant", "content": reply}]
                self.images += images
                self.crops = crops


    def _last_images(self, ids: list[int], images: list, crops: list[int]) -> list:
        """The images whose soft tokens are in ``ids``, the tail of a prompt: the last images of the
        conversation, each one run of soft tokens plus one per crop."""
        if not images:
            return []
        runs = int(image_groups(np.array(ids), self.model.mcfg.image_token_index).max(initial=-1)) + 1
        k = len(images)
        while runs > 0:
            k -= 1
            runs -= 1 + crops[k]
        return images[k:]
