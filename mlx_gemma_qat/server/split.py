"""The server's engine for a model split over mlx.launch's processes (``serve --shard``, model/shard.py).

Rank 0 serves HTTP and runs the engine (``FrontEngine``); the other ranks run the same engine without a server
(``FollowerEngine.follow``). Every round, rank 0 tells the others what changed (``engine._Round``): the requests it
admits (their prompt ids and cache key, sampling with the seed fixed here, constraint grammar, owner, token limit,
number of images), the running ones cancelled, or the stop. Everything else a round does depends only on those
changes and on the model's outputs, which every rank computes alike, so the ranks run the same forwards in the same
order, as the split model's collectives require. Image pixels stay on rank 0, whose vision tower's features reach
the others inside the model (model/multimodal.py).

The kept KV caches (``reuse.CachePool``) are bounded by their number only: a byte bound would evict differently on
ranks whose caches differ in size (a pipeline rank holds its layers' caches only), and the ranks would part ways.
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import asdict, replace

import numpy as np

from ..constrain import Constraint, logits_width
from .engine import Engine, Handle, _Request, _Round
from .reuse import CachePool
from .sampling import SamplingParams

__all__ = ["FrontEngine", "FollowerEngine"]

UNBOUNDED = 1 << 62


def _unbounded_pool(engine: Engine) -> None:
    engine.pool = CachePool(engine.pool.max_entries, UNBOUNDED)


class FrontEngine(Engine):
    """Rank 0's engine: an ``Engine`` that sends each round's changes to the other ranks (``world``)."""

    def __init__(self, model, tokenizer, world, **kwargs):
        super().__init__(model, tokenizer, **kwargs)
        self.world = world
        self._seq = itertools.count()
        _unbounded_pool(self)

    def _next_round(self) -> _Round | None:
        changes = super()._next_round()
        if changes is None:
            self.world.text(json.dumps({"stop": True}))
            return None
        for r in changes.new:
            r.seq = next(self._seq)
            if r.params.seed is None:  # the request's draws, the same on every rank
                r.params = replace(r.params, seed=random.getrandbits(63))
        self.world.text(json.dumps({"new": [_describe(r) for r in changes.new],
                                    "cancelled": [r.seq for r in changes.cancelled]}))
        return changes


def _describe(r: _Request) -> dict:
    grammar = None if r.matcher is None else [r.matcher.constraint.grammar, r.matcher.constraint.kind]
    return {"seq": r.seq, "ids": r.ids, "key": r.key.tolist(), "images": 0 if r.pixels is None else len(r.pixels),
            "owner": r.owner, "params": asdict(r.params), "max_tokens": r.max_tokens, "grammar": grammar}


class FollowerEngine(Engine):
    """Another rank's engine: it runs the rounds rank 0 describes, until rank 0 stops (``follow``)."""

    def __init__(self, model, tokenizer, world, **kwargs):
        super().__init__(model, tokenizer, **kwargs)
        self.world = world
        _unbounded_pool(self)

    def _request(self, d: dict) -> _Request:
        params = SamplingParams(**{**d["params"], "stop": tuple(d["params"]["stop"])})
        pixels = None
        if d["images"]:  # their shape only: rank 0's tower sends the features
            size = self.model.mcfg.vision.image_size
            pixels = np.zeros((d["images"], size, size, 3), np.uint8)
        matcher = None
        if d["grammar"] is not None:
            matcher = Constraint(*d["grammar"]).matcher(self.tokenizer, logits_width(self.model))
        r = _Request(handle=Handle(self, len(d["ids"])), ids=d["ids"], key=np.array(d["key"], np.int64),
                     pixels=pixels, owner=d["owner"], params=params, max_tokens=d["max_tokens"], submitted=0.0,
                     matcher=matcher)
        r.seq = d["seq"]
        return r

    def follow(self) -> None:
        """Run rank 0's rounds until it stops."""
        running: dict[int, _Request] = {}
        while True:
            plan = json.loads(self.world.text(None))
            if plan.get("stop"):
                return
            new = [self._request(d) for d in plan["new"]]
            running.update((r.seq, r) for r in new)
            running = {seq: r for seq, r in running.items() if r in self._active or r in new}
            self._round(_Round([], new, [running[s] for s in plan["cancelled"] if s in running]))
