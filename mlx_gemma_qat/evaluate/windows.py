"""Which tokens a perplexity run feeds the model, and which of them it scores.

Two schemes, both starting every window with BOS:

* ``stride == context`` (the default): llama.cpp's ``llama-perplexity -c CONTEXT``. The tokens are cut into
  ``n // context`` non-overlapping windows; each window's first token is replaced by BOS and only its second
  half is scored (logits at positions ``context // 2 .. context - 2`` predict the tokens after them), so every
  scored token has at least half a window of context. Same windows, same scored tokens, same order, so the
  numbers compare one to one with llama.cpp's, and logits files are interchangeable with its
  ``--kl-divergence-base`` files.
* ``stride < context``: overlapping windows every ``stride`` tokens (Hugging Face's fixed-length-model
  scheme). The first window scores all its tokens, each later one the last ``stride``: every token is scored
  exactly once, with at least ``context - stride - 1`` tokens of context after the first window.

Tokens after the last full window are not evaluated (both schemes; the count is reported).
"""

from __future__ import annotations

from dataclasses import dataclass


class WindowError(ValueError):
    pass


@dataclass(frozen=True)
class Windows:
    n_tokens: int
    context: int
    stride: int

    @property
    def llama_cpp(self) -> bool:
        return self.stride == self.context

    @property
    def count(self) -> int:
        if self.llama_cpp:
            return self.n_tokens // self.context
        return (self.n_tokens - self.context) // self.stride + 1

    def start(self, k: int) -> int:
        """Index of window k's first token (the one BOS replaces) in the token list."""
        return k * self.stride

    def first(self, k: int) -> int:
        """Position in window k of the first logit that is scored (it predicts the token after it)."""
        if self.llama_cpp:
            return self.context // 2
        return 0 if k == 0 else self.context - 1 - self.stride

    def scored(self, k: int) -> int:
        return self.context - 1 - self.first(k)

    @property
    def total_scored(self) -> int:
        return sum(self.scored(k) for k in range(self.count))

    def scored_ends(self) -> list[int]:
        """Scored tokens in windows 0..k, for each k."""
        out, n = [], 0
        for k in range(self.count):
            n += self.scored(k)
            out.append(n)
        return out

    @property
    def evaluated_tokens(self) -> int:
        """Tokens run through the model (all windows, every position)."""
        return self.count * self.context

    @property
    def unused_tokens(self) -> int:
        return self.n_tokens - (self.start(self.count - 1) + self.context)

    def describe(self) -> str:
        scheme = "llama.cpp chunks" if self.llama_cpp else f"stride {self.stride}"
        return (f"{self.count} windows of {self.context} tokens ({scheme}), {self.total_scored} scored tokens"
                + (f", last {self.unused_tokens} tokens unused" if self.unused_tokens else ""))


def plan_windows(n_tokens: int, context: int, stride: int | None = None, max_context: int | None = None) -> Windows:
    """Check the settings against the text and the model; clear errors for what cannot run."""
    if context < 4:
        raise WindowError(f"--context {context} is too small (at least 4 tokens)")
    if max_context is not None and context > max_context:
        raise WindowError(f"--context {context} is larger than the model's context ({max_context} tokens)")
    stride = context if stride is None else stride
    if not 1 <= stride <= context:
        raise WindowError(f"--stride {stride} must be between 1 and --context ({context})")
    if n_tokens < context:
        raise WindowError(f"the text is {n_tokens} tokens long, shorter than one window of --context {context}: "
                          f"give more text or a smaller --context")
    return Windows(n_tokens, context, stride)
