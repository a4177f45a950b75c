"""Per-request sampling for the server: ``sampling.Sampler`` with a random generator of the request's own.

A request with a ``seed`` draws from its own PRNG key, split once per token, so its text depends on the seed
alone, never on which other requests run beside it (mlx-lm's samplers draw from MLX's global generator).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import mlx.core as mx

from ..sampling import Sampler
from ..speculative import MAX_DRAFT_TOKENS

MAX_TOP_LOGPROBS = 20


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # 1.0 (or 0): off
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False  # report the sampled token's log-probability
    top_logprobs: int = 0  # and the n most likely (0..20)
    speculative: bool = True  # False: plain decoding on a server that speculates (a draft model or prompt lookup)
    num_draft_tokens: int | None = None  # tokens drafted per round (None: the server's; 0: plain decoding)

    def check(self) -> None:
        """Raise ValueError for values no sampler can use."""
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, not {self.max_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, not {self.temperature!r}")
        if not 0 <= self.top_p <= 1:
            raise ValueError(f"top_p must be in [0, 1], not {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, not {self.top_k!r}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], not {self.min_p!r}")
        if not isinstance(self.top_logprobs, int) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], not {self.top_logprobs!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer, not {self.seed!r}")
        if not isinstance(self.speculative, bool):
            raise ValueError(f"speculative must be true or false, not {self.speculative!r}")
        n = self.num_draft_tokens
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_DRAFT_TOKENS):
            raise ValueError(f"num_draft_tokens must be an integer in [0, {MAX_DRAFT_TOKENS}], not {n!r}")


def request_sampler(params: SamplingParams) -> Sampler:
    """The request's sampler, drawing from a generator of its own (seeded by ``params.seed``, else at random)."""
    seed = params.seed if params.seed is not None else random.getrandbits(63)
    return Sampler(params.temperature, params.top_p, params.top_k, params.min_p, key=mx.random.key(seed % 2**63))
