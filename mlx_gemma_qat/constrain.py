"""Constrained decoding: output that follows a JSON schema, a regex or a grammar by construction.

Built on llguidance (the engine llama.cpp and mlx-vlm use). A ``Constraint`` is compiled once from a JSON
schema, ``json=True`` (any JSON object), a regex or a Lark grammar (llguidance's dialect) and can be reused
for any number of generations; each generation drives its own ``Matcher``, which gives the mask of the
tokens that keep the output a valid prefix of the language. The mask is applied to the logits before any
sampler sees them (greedy, temperature, top-k, top-p, min-p alike), as wide as the logits: ids past the
tokenizer's vocabulary (Gemma 3 4B and larger have 262,208 logits for 262,144 pieces) are never allowed.
End of sequence is allowed only where the grammar accepts, so a reply that ends with "stop" is complete;
one cut by ``max_tokens`` ends with "length".

llguidance reads the model's own tokenizer (its ``tokenizer.json``, the GGUF-rebuilt ones included); the
tokenizer it builds is cached per tokenizer (building it for Gemma 3's 262K pieces takes a few seconds).
"""

from __future__ import annotations

import copy
import json as _json
import threading
import weakref
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

__all__ = ["Constraint", "ConstraintError", "Matcher", "compile_constraint", "ll_tokenizer", "logits_width"]

# Compact, single-line JSON with the separators of Python's json.dumps: whitespace the grammar allowed
# anywhere would let a small model fill max_tokens with newlines before it closed the object.
JSON_OPTIONS = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False, "lenient": False}
MAX_CONSTRAINT_CHARS = 1_000_000  # a schema, regex or grammar longer than this is refused before compiling
STOP_WITH_CONSTRAINT = "stop strings cannot be given with a constraint: the grammar decides where the output ends"


class ConstraintError(ValueError):
    """A schema, regex or grammar that cannot be used (the CLI prints it; the server answers 400)."""


def _limits():
    """llguidance's bounds on the work of compiling a grammar and of each mask; its errors do not echo the
    parser's state."""
    import llguidance

    return llguidance.LLParserLimits(verbose_errors=False)


@dataclass(frozen=True)
class Constraint:
    """A compiled constraint: ``grammar`` is llguidance's grammar text, ``kind`` what it was made from
    ("json_schema", "json", "regex", "grammar" or "tools"). Independent of any tokenizer: build it once."""

    grammar: str
    kind: str

    def matcher(self, tokenizer, width: int) -> "Matcher":
        return Matcher(self, tokenizer, width)


def _checked(grammar: str, kind: str, what: str) -> Constraint:
    import llguidance

    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, None, limits=_limits())
    if failed:
        raise ConstraintError(f"invalid {what}: {_first_lines(messages[0])}")
    return Constraint(grammar, kind)


def _first_lines(message: str, n: int = 3) -> str:
    """llguidance's message on one line: its first ``n`` lines, less the lines that only point (^^^) at the
    echoed text, plus the reason Rust's regex parser gives on a later "error: ..." line (else cut off)."""
    lines = [line.strip() for line in str(message).strip().splitlines() if line.strip()]
    lines = [line for line in lines if set(line) - set("^~ ")]
    head = lines[:n]
    head += [line for line in lines[n:] if line.startswith("error:")][:1]
    return " ".join(head)[:500]


def _text(value, what: str) -> str:
    if not isinstance(value, str):
        raise ConstraintError(f"{what} must be text, not {type(value).__name__}")
    if len(value) > MAX_CONSTRAINT_CHARS:
        raise ConstraintError(f"{what} is {len(value):,} characters; at most {MAX_CONSTRAINT_CHARS:,} are read")
    return value


def schema_grammar(schema) -> str:
    """llguidance's grammar text for a JSON schema (a dict, or its JSON text)."""
    import llguidance

    if isinstance(schema, str):
        try:
            schema = _json.loads(_text(schema, "the JSON schema"))
        except _json.JSONDecodeError as e:
            raise ConstraintError(f"the JSON schema is not JSON: {e}") from None
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    if not isinstance(schema, dict):
        raise ConstraintError(f"a JSON schema must be an object, not {type(schema).__name__}")
    try:
        text = _text(_json.dumps(schema, ensure_ascii=False), "the JSON schema")
    except (TypeError, ValueError) as e:  # values JSON cannot hold (NaN is held, and refused by llguidance)
        raise ConstraintError(f"the JSON schema is not JSON: {e}") from None
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(text, defaults=JSON_OPTIONS)
    except (ValueError, TypeError) as e:
        raise ConstraintError(f"invalid JSON schema: {_first_lines(e)}") from None


def compile_constraint(*, json_schema=None, json: bool = False, regex: str | None = None,
                       grammar: str | None = None) -> Constraint | None:
    """The constraint of at most one of: ``json_schema`` (a dict or JSON text), ``json`` (any JSON object),
    ``regex`` (the output matches it whole; Rust regex syntax: no look-around or back-references) or
    ``grammar`` (a Lark grammar in llguidance's dialect, starting at ``start``). None when none is given.
    Raises ConstraintError for an invalid or unsupported one."""
    given = [k for k, v in (("json_schema", json_schema), ("json", json or None), ("regex", regex),
                            ("grammar", grammar)) if v is not None]
    if len(given) > 1:
        raise ConstraintError(f"give one constraint, not {' and '.join(given)}")
    if not given:
        return None
    import llguidance

    if json_schema is not None:
        return _checked(schema_grammar(json_schema), "json_schema", "JSON schema")
    if json:
        return _checked(schema_grammar({"type": "object"}), "json", "JSON")
    if regex is not None:
        return _checked(llguidance.LLMatcher.grammar_from_regex(_text(regex, "the regex")), "regex", "regex")
    return _checked(llguidance.LLMatcher.grammar_from_lark(_text(grammar, "the grammar")), "grammar", "grammar")


# -- the tokenizer llguidance reads ------------------------------------------------------------------------

_LL_TOKENIZERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_DIGIT_TOKENS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_LL_LOCK = threading.Lock()


def _hf_tokenizer(tokenizer):
    """The transformers tokenizer inside an mlx-lm ``TokenizerWrapper`` (or the tokenizer itself)."""
    return getattr(tokenizer, "_tokenizer", tokenizer)


def eos_ids(tokenizer) -> list[int]:
    ids = getattr(tokenizer, "eos_token_ids", None)
    if ids is None:
        ids = [tokenizer.eos_token_id]
    return sorted(int(i) for i in ids)


def ll_tokenizer(tokenizer):
    """llguidance's ``LLTokenizer`` for ``tokenizer`` (an mlx-lm ``TokenizerWrapper`` or a fast transformers
    tokenizer), ending on every one of its eos ids; built once per tokenizer."""
    import llguidance

    return _per_tokenizer(_LL_TOKENIZERS, tokenizer,
                          lambda hf: llguidance.LLTokenizer(_ll_tokenizer_json(hf), eos_token=eos_ids(tokenizer)))


def _per_tokenizer(cache, tokenizer, build):
    """``build(hf tokenizer)``, made once per tokenizer and kept in ``cache`` while the tokenizer lives."""
    hf = _hf_tokenizer(tokenizer)
    with _LL_LOCK:
        found = cache.get(hf)
        if found is None:
            found = cache[hf] = build(hf)
    return found


def digit_tokens(tokenizer) -> np.ndarray:
    """The ids of the tokens whose text starts with an ASCII digit (they would lengthen a number)."""
    return _per_tokenizer(_DIGIT_TOKENS, tokenizer, lambda hf: np.array(
        [i for i, b in enumerate(token_bytes(tokenizer)) if b and 48 <= b[0] <= 57], np.int64))


def _ll_tokenizer_json(hf) -> str:
    """The tokenizer's JSON as ``llguidance.hf.from_tokenizer`` passes it, less the added pieces that are text.

    llguidance takes every added piece spelled "<...>" for a special token, the ones the tokenizer calls
    normal text too (Gemma's <b>, <table>, <start_of_image>...): its trie then never matches them against text,
    yet its tokenization of the text a grammar forces (the Hugging Face tokenizer's, which splits added pieces
    off) picks them, so it would force such a piece by mask and then refuse it (a grammar or enum containing
    "<b>" failed mid-generation). Left as plain vocabulary pieces (each is one already, same id) they are the
    text they decode to, for both."""
    from copy import copy

    backend = copy(hf.backend_tokenizer if hasattr(hf, "backend_tokenizer") else hf)
    backend.no_padding()
    backend.no_truncation()
    data = _json.loads(backend.to_str())
    vocab = data.get("model", {}).get("vocab")
    if not isinstance(vocab, dict):  # not a BPE/WordPiece model: llguidance reads it as it is
        return _json.dumps(data)
    data["added_tokens"] = [
        t for t in data.get("added_tokens", [])
        if t.get("special") or not (t["content"].startswith("<") and t["content"].endswith(">"))
        or vocab.get(t["content"]) != t["id"]
    ]
    return _json.dumps(data, ensure_ascii=False)


def token_bytes(tokenizer) -> list[bytes | None]:
    """Each token's bytes as detokenized text carries them (None for special tokens, which are never text):
    the view llguidance must share. Gemma's pieces, SentencePiece and GGUF-rebuilt BPE alike: "▁" is a space,
    "<0xNN>" one byte."""
    hf = _hf_tokenizer(tokenizer)
    backend = hf.backend_tokenizer if hasattr(hf, "backend_tokenizer") else hf
    n = backend.get_vocab_size(with_added_tokens=True)
    special = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
    out: list[bytes | None] = []
    for i in range(n):
        piece = backend.id_to_token(i)
        if piece is None or piece in special:
            out.append(None)
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            out.append(bytes([int(piece[3:5], 16)]))
        else:
            out.append(piece.replace("\u2581", " ").encode("utf-8"))
    return out


def logits_width(model) -> int:
    """How many logits the model's head gives (its config's vocab_size; 262,208 on Gemma 3 4B and larger)."""
    return int(model.cfg.vocab_size)


# -- one generation ---------------------------------------------------------------------------------------

class Matcher:
    """One generation's state in a constraint: ``apply(logits)`` masks what the output cannot become next,
    ``consume(token)`` advances past a sampled token; ``accepting`` says whether the output so far is
    complete. Not thread-safe: one generation drives it (it may be built on another thread: it holds no MLX
    array)."""

    def __init__(self, constraint: Constraint, tokenizer, width: int):
        import llguidance

        llt = ll_tokenizer(tokenizer)
        self.constraint = constraint
        self._m = llguidance.LLMatcher(llt, constraint.grammar, log_level=0, limits=_limits())
        if self._m.is_error():
            raise ConstraintError(f"invalid {constraint.kind.replace('_', ' ')}: {_first_lines(self._m.get_error())}")
        self.width = int(width)
        self._words = np.zeros(max((llt.vocab_size + 31) // 32, (self.width + 31) // 32), np.int32)
        self._ll_words = (llt.vocab_size + 31) // 32
        self.tokens = 0  # consumed so far
        self._llt = llt
        self._digits = _NumberDigits(digit_tokens(tokenizer)) if constraint.kind in JSON_KINDS else None
        self._eos = frozenset(int(i) for i in eos_ids(tokenizer))

    @property
    def accepting(self) -> bool:
        return self._m.is_accepting()

    @property
    def done(self) -> bool:
        """The output has ended: the grammar stopped (after the end of sequence was consumed)."""
        return self._m.is_stopped()

    def mask_words(self) -> np.ndarray:
        """The next token's mask as bits (int32 words, little-endian bit order), llguidance's layout."""
        words = self._words
        words[:] = 0
        view = words[: self._ll_words]
        self._m.unsafe_compute_mask_ptr(view.ctypes.data, view.nbytes)
        if self._m.is_error():
            raise ConstraintError(f"the constraint failed: {_first_lines(self._m.get_error())}")
        if self._digits is not None:
            self._digits.cap(words)
        return words

    def allowed(self) -> np.ndarray:
        """The ids the next token may take (numpy), for tests and tools."""
        bits = np.unpackbits(self.mask_words().view(np.uint8), bitorder="little")[: self.width]
        return np.nonzero(bits)[0]

    def mask(self, words: np.ndarray | None = None) -> mx.array:
        """(width,) bool: the tokens that keep the output a valid prefix (the eos ids where it is complete);
        ``words``: this state's ``mask_words()``, when the caller has them already."""
        words = mx.array(self.mask_words() if words is None else words)
        bits = (words[:, None] >> mx.arange(32, dtype=mx.int32)) & 1  # made here: MLX arrays belong to a thread
        return bits.reshape(-1)[: self.width].astype(mx.bool_)

    def apply(self, logits: mx.array) -> mx.array:
        """``logits`` (..., width) with every disallowed token at -inf."""
        return mx.where(self.mask(), logits, mx.array(-mx.inf, dtype=logits.dtype))

    def consume(self, token: int) -> None:
        if not self._m.consume_token(int(token)):
            raise ConstraintError(f"the constraint rejected token {int(token)}: {_first_lines(self._m.get_error())}")
        self.tokens += 1
        if self._digits is not None:
            self._digits.feed(self._llt.decode_bytes([int(token)]))

    def ends(self, token: int) -> bool:
        """Whether ``token`` ends the output (an eos id): speculative drafts end there, without consuming it."""
        return int(token) in self._eos

    def fork(self) -> "Matcher":
        """An independent copy of this state (speculative decoding walks its drafts on one and keeps this one at
        what the target accepted: llguidance cannot roll back past a stop, and a draft may reach one)."""
        new = object.__new__(Matcher)
        new.__dict__.update(self.__dict__)
        new._m = self._m.deep_copy()
        new._words = self._words.copy()
        if self._digits is not None:
            new._digits = copy.copy(self._digits)
        return new

JSON_KINDS = ("json_schema", "json", "tools")
MAX_NUMBER_DIGITS = 16  # per run of digits in a JSON number, as llama.cpp's JSON grammars cap them


class _NumberDigits:
    """Caps each run of digits of a JSON number (its integer part, its fraction, its exponent) at
    ``MAX_NUMBER_DIGITS``, as llama.cpp's grammars do: JSON allows any number of digits, and a small model
    writing 0.1000000... would otherwise fill max_tokens with zeros. Past the cap, tokens that start with a
    digit are masked (the grammar then allows only what ends the run); digits inside strings are not counted.
    A mask that the cap would leave empty is kept whole."""

    def __init__(self, digit_ids: np.ndarray):
        self.word = (digit_ids >> 5).astype(np.int64)
        self.clear = ~(np.uint32(1) << (digit_ids & 31).astype(np.uint32))
        self.in_string = self.escaped = False
        self.run = 0

    def feed(self, data: bytes) -> None:
        for b in data:
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif b == 0x5C:  # backslash
                    self.escaped = True
                elif b == 0x22:
                    self.in_string = False
            elif b == 0x22:
                self.in_string, self.run = True, 0
            elif 48 <= b <= 57:
                self.run += 1
            else:
                self.run = 0

    def cap(self, words: np.ndarray) -> None:
        if self.in_string or self.run < MAX_NUMBER_DIGITS or not len(self.word):
            return
        capped = words.view(np.uint32).copy()
        np.bitwise_and.at(capped, self.word, self.clear)
        if capped.any():
            words.view(np.uint32)[:] = capped
