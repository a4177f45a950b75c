"""Stop strings over streamed text, in linear time.

Generated text arrives a segment at a time (what the detokenizer releases per token). ``StopStrings`` sends
on every character that can no longer be the start of a stop string, holds back the tail that still could,
and reports the first stop string the text completes (the text before it is sent, the stop string and what
follows are not). "First" means the one that ends earliest, as if the text arrived a character at a time, so
the result does not depend on how the text was cut into segments; of two ending at the same character the
longer one wins.

Each stop string runs a Knuth-Morris-Pratt automaton: its state is the length of the longest prefix of the
stop string that the text so far ends with. That state is both the match test (state == length) and how much
to hold back (the largest state over the stop strings), so each character costs O(number of stop strings),
amortized, whatever their lengths.
"""

from __future__ import annotations


def _failure(s: str) -> list[int]:
    """KMP's failure function: f[i] = length of the longest proper prefix of s[:i+1] that is also its suffix."""
    f = [0] * len(s)
    k = 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = f[k - 1]
        if s[i] == s[k]:
            k += 1
        f[i] = k
    return f


class StopStrings:
    """Streams text while holding back any tail that could still grow into a stop string."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self._fail = [_failure(s) for s in self.stops]
        self._state = [0] * len(self.stops)
        self._held = ""  # received, not sent: a suffix that may begin a stop string

    def _step(self, k: int, c: str) -> int:
        s, f, q = self.stops[k], self._fail[k], self._state[k]
        while q and s[q] != c:
            q = f[q - 1]
        if s[q] == c:
            q += 1
        self._state[k] = q
        return q

    def feed(self, segment: str) -> tuple[str, bool]:
        """(text that can be sent now, whether a stop string was completed: then generation should end)."""
        if not self.stops:
            return segment, False
        text, base = self._held + segment, len(self._held)
        for i, c in enumerate(segment):
            done = [len(self.stops[k]) for k in range(len(self.stops)) if self._step(k, c) == len(self.stops[k])]
            if done:
                self._held = ""
                self._state = [0] * len(self.stops)
                return text[: base + i + 1 - max(done)], True
        keep = max(self._state)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def flush(self, segment: str = "") -> str:
        """The rest of the text once generation has ended (the held-back tail, unless it completes a stop)."""
        out, hit = self.feed(segment)
        if hit:
            return out
        out, self._held = out + self._held, ""
        self._state = [0] * len(self.stops)
        return out
