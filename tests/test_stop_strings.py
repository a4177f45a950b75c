"""Stop strings over streamed text (``stop_strings.StopStrings``) against a brute-force reference: the text is
cut at the earliest place any stop string ends, whatever the segmentation."""

from __future__ import annotations

import random

from mlx_gemma_qat.stop_strings import StopStrings


def reference(text: str, stops: list[str]) -> tuple[str, bool]:
    """What the whole text gives: cut before the stop string ending first (the longer one on a tie)."""
    ends = [(text.find(s) + len(s), len(s)) for s in stops if s and s in text]
    if not ends:
        return text, False
    end, length = min(ends, key=lambda e: (e[0], -e[1]))
    return text[: end - length], True


def stream(segments: list[str], stops: list[str]) -> tuple[str, bool]:
    s, out = StopStrings(stops), ""
    for seg in segments:
        piece, hit = s.feed(seg)
        out += piece
        if hit:
            return out, True
    return out + s.flush(), False


def test_stop_string_split_across_segments_is_never_streamed():
    s = StopStrings(["END", "\n\n"])
    assert s.feed("Hel") == ("Hel", False)
    assert s.feed("lo E") == ("lo ", False)  # "E" might start "END": held back
    assert s.feed("NX") == ("ENX", False)  # it did not
    assert s.feed("yz\n") == ("yz", False)
    assert s.feed("\nmore") == ("", True)
    t = StopStrings(["END"])
    assert t.feed("abcE") == ("abc", False)
    assert t.flush("N") == "EN"  # generation ended: the held-back tail is released


def test_earliest_end_wins_whatever_the_segments():
    # "bc" ends before "abcd" does: the same answer whether the text comes at once or a character at a time
    assert stream(["xabcd"], ["abcd", "bc"]) == ("xa", True)
    assert stream(list("xabcd"), ["abcd", "bc"]) == ("xa", True)
    assert stream(["xxabc"], ["abc", "bc"]) == ("xx", True)  # same end: the longer one
    assert stream(["aaab"], ["aab"]) == ("a", True)  # a partial match that fails over to a shorter one
    assert stream(["abababc"], ["ababc"]) == ("ab", True)


def test_random_texts_and_segmentations_match_the_reference():
    rng = random.Random(0)
    for _ in range(3000):
        alphabet = "ab" if rng.random() < 0.7 else "abc\n"
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(0, 4))]
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 8)))) if len(text) > 1 else []
        segments = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        assert stream(segments, stops) == reference(text, stops), (text, stops, segments)


def test_nothing_held_back_without_a_possible_match():
    s = StopStrings(["<end>"])
    assert s.feed("x" * 10_000) == ("x" * 10_000, False)
    assert s.feed("a<en") == ("a", False)
    assert s.feed("d>") == ("", True)
