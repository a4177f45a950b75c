"""Constrained decoding (constrain.py) against references written elsewhere: llguidance's tokenizer against the
Hugging Face tokenizers' own decode, every mask against a brute force over the whole vocabulary (Python's
``regex`` module's partial matching, or the enumerated strings of a finite language), generated JSON against
the ``jsonschema`` package."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma_qat.constrain import (
    JSON_OPTIONS,
    Constraint,
    ConstraintError,
    compile_constraint,
    ll_tokenizer,
    token_bytes,
)

FIX = Path(__file__).parent / "fixtures"


# -- fixtures ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    """The tiny Gemma 3 (random weights, 512 logits) converted as-is, and its 513-piece SentencePiece-style
    tokenizer (single characters, the 256 <0xNN> byte pieces, <unusedN>/<extraN> pieces; eos ids 1 and 106)."""
    from mlx_gemma_qat import load

    return load(tiny_folder)


@pytest.fixture(scope="module")
def bpe_tok(tmp_path_factory):
    """The GGUF-rebuilt BPE tokenizer of tests/test_tokenizer_gpt2.py (Gemma 3's 262,144 pieces with llama.cpp's
    merges), written as a model folder's tokenizer files and loaded by mlx-lm as a model's would be (~15 s)."""
    import hashlib
    import lzma

    from mlx_lm.utils import load_tokenizer

    from mlx_gemma_qat.convert.tokenizer import (
        eos_token_ids,
        special_token_ids,
        tokenizer_from_gguf,
        write_tokenizer_files,
    )

    meta = json.loads((FIX / "gpt2_tokenizer_cases.json").read_text(encoding="utf-8"))["meta"]
    raw = lzma.decompress((FIX / meta["gguf"]).read_bytes())
    assert hashlib.sha256(raw).hexdigest() == meta["gguf_sha256"]
    work = tmp_path_factory.mktemp("constrain-bpe")
    (work / "t.gguf").write_bytes(raw)
    tk = tokenizer_from_gguf(work / "t.gguf")
    write_tokenizer_files(work / "tok", tk, **special_token_ids(work / "t.gguf"))
    return load_tokenizer(work / "tok", eos_token_ids=eos_token_ids(tk))


def _hf(tok):
    return getattr(tok, "_tokenizer", tok)


# -- a. token bytes ---------------------------------------------------------------------------------------


def check_token_bytes(tok, n_random: int = 400):
    """llguidance's bytes of every text token are ``token_bytes``'s, and ``token_bytes`` joined over random
    token sequences is what the Hugging Face tokenizer decodes them to."""
    tb = token_bytes(tok)
    llt = ll_tokenizer(tok)
    hf = _hf(tok)
    assert len(tb) == llt.vocab_size == len(hf)
    special = [i for i, b in enumerate(tb) if b is None]
    assert set(special) >= set(tok.eos_token_ids) | {tok.bos_token_id}
    differ = [i for i, b in enumerate(tb) if b is not None and llt.decode_bytes([i]) != b]
    # One exception, on every Gemma vocabulary: the byte piece <0xFF>. llguidance's token trie marks special
    # tokens with a leading 0xFF byte, so a token whose bytes are exactly b"\xff" reads as an (empty) special
    # token: it decodes to b"" and is never allowed. No harm: 0xFF never occurs in UTF-8, so no text a
    # constraint accepts (llguidance's grammars are over UTF-8 text) could use it.
    assert differ == [hf.convert_tokens_to_ids("<0xFF>")] and tb[differ[0]] == b"\xff"
    assert llt.decode_bytes(differ) == b"" and llt.is_special_token(differ[0])
    # else llguidance's special tokens (never text) are the tokenizer's (see test_added_text_pieces_are_text)
    assert [i for i in range(len(tb)) if llt.is_special_token(i)] == sorted(special + differ)

    # joined bytes against the tokenizer's own decode; pieces drawn mostly from the non-byte ones so that most
    # sequences are valid UTF-8 (a byte piece alone is often not)
    text_ids = [i for i, b in enumerate(tb) if b is not None]
    byte_ids = [i for i in text_ids if hf.convert_ids_to_tokens(i).startswith("<0x")]
    other_ids = sorted(set(text_ids) - set(byte_ids))
    assert len(byte_ids) == 256
    rng = random.Random(0)
    checked = 0
    for _ in range(n_random):
        seq = [rng.choice(byte_ids if rng.random() < 0.15 else other_ids) for _ in range(rng.randint(1, 16))]
        try:
            text = b"".join(tb[i] for i in seq).decode("utf-8")
        except UnicodeDecodeError:
            continue
        assert hf.decode(seq, skip_special_tokens=False, clean_up_tokenization_spaces=False) == text, seq
        checked += 1
    assert checked > n_random // 3
    # and over the ids the tokenizer itself gives text with multi-byte characters (byte fallback on the tiny one)
    for text in ["héllo wörld", "naïve café ☕ 日本語", " two  spaces\nand\ttabs", "emoji 🦙 <b>bold</b>"]:
        ids = hf.encode(text, add_special_tokens=False)
        assert b"".join(tb[i] for i in ids) == text.encode("utf-8")
    return tb, llt


def test_token_bytes_tiny(tiny):
    _, tok = tiny
    tb, _ = check_token_bytes(tok)
    assert len(tb) == 513


def test_token_bytes_gguf_bpe(bpe_tok):
    tb, llt = check_token_bytes(bpe_tok)
    assert len(tb) == 262144 and b"".join(tb[i] for i in bpe_tok.encode("{\"", add_special_tokens=False)) == b'{"'


@pytest.fixture(scope="module")
def real_tok(real_270m):
    """The real 270M's tokenizer alone (mlx-lm's loader, the eos ids of its config), as load() gives it."""
    from mlx_lm.utils import load_tokenizer

    from mlx_gemma_qat.model.load import read_config

    eos = read_config(real_270m).get("eos_token_id")
    return load_tokenizer(real_270m, eos_token_ids=eos if isinstance(eos, list) else None)


@pytest.mark.real
def test_token_bytes_real_270m(real_tok):
    tb, _ = check_token_bytes(real_tok)
    assert len(tb) == 262144


@pytest.mark.real
def test_real_270m_answers_in_json(real_270m, real_tok):
    """The real model asked for JSON under a schema with a free string: greedy, it writes the object and stops."""
    jsonschema = pytest.importorskip("jsonschema")
    from mlx_gemma_qat import stream_generate
    from mlx_gemma_qat.model.load import load_model

    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16}},
              "required": ["city"], "additionalProperties": False}
    model = load_model(real_270m)
    rs = list(stream_generate(model, real_tok, "What is the capital of France? Answer in JSON.", 24,
                              json_schema=schema))
    text = "".join(r.text for r in rs)
    assert rs[-1].finish_reason == "stop", text
    jsonschema.validate(json.loads(text), schema)


# -- b. every mask against a brute force -------------------------------------------------------------------


def all_prefixes(language) -> set[bytes]:
    return {s[:k] for s in language for k in range(len(s) + 1)}


class Finite:
    """A finite language (its strings' UTF-8 bytes), enumerated independently of llguidance."""

    def __init__(self, strings):
        self.language = {s.encode("utf-8") for s in strings}
        self.prefixes = all_prefixes(self.language)

    def valid_prefix(self, b: bytes) -> bool:
        return b in self.prefixes

    def complete(self, b: bytes) -> bool:
        return b in self.language


class PartialRegex:
    """An infinite language: Python's ``regex`` module's partial matching on bytes decides prefixes."""

    def __init__(self, pattern: bytes):
        regex = pytest.importorskip("regex")
        self.rx = regex.compile(pattern)

    def valid_prefix(self, b: bytes) -> bool:
        return self.rx.fullmatch(b, partial=True) is not None

    def complete(self, b: bytes) -> bool:
        m = self.rx.fullmatch(b, partial=True)
        return m is not None and not m.partial


def brute_force(tb, out: bytes, lang, eos, width: int) -> set[int]:
    """Every token whose bytes keep ``out`` a valid prefix of the language, and the eos ids when ``out`` is
    complete. Special tokens (None) are never text; an empty token would never be allowed by llguidance
    (none of these tokenizers has one)."""
    allowed = {t for t in range(width) if tb[t] and lang.valid_prefix(out + tb[t])}
    return allowed | (set(eos) if lang.complete(out) else set())


def forced_bytes(lang, out: bytes) -> bytes:
    """The bytes the language forces after ``out``: while it is incomplete and exactly one next byte is valid."""
    forced = b""
    while not lang.complete(out + forced):
        nxt = [b for b in range(256) if lang.valid_prefix(out + forced + bytes([b]))]
        if len(nxt) != 1:
            break
        forced += bytes(nxt)
    return forced


def check_mask(tok, lang, out: bytes, got: set[int], want: set[int]) -> None:
    """``got`` (the matcher's mask after ``out``) against ``want`` (the brute force).

    Never a token outside the brute force. Where the language lets more than one byte come next, exactly the
    brute force. Where it forces the next bytes (a JSON key, the rest of "maybe"), llguidance may instead allow
    one token only, the first of the tokenizer's own (canonical) tokenization of the forced text (its
    "fast-forward token forced by mask", so a forced key is written in the pieces the model was trained on,
    not spelled with byte pieces): that is checked against the Hugging Face tokenizer's encode. It does so
    when that first token is fixed whatever follows; else (the forced text is one piece that could grow into
    a longer one, or it ends inside a UTF-8 character) its mask is the brute force."""
    assert got <= want, (out, sorted(got - want)[:10])
    forced = forced_bytes(lang, out)
    if got == want:
        return
    assert forced, (out, sorted(want - got)[:10])
    first = _hf(tok).encode(forced.decode("utf-8"), add_special_tokens=False)[0]
    assert got == {first}, (out, forced, sorted(got)[:10], first)


def walk(constraint, tok, lang, *, width, walks, max_steps, seed=0):
    """Random walks through the matcher (random allowed tokens; eos sometimes where allowed): every mask
    checked against the brute force over all ``width`` ids. Returns the completed outputs and how many steps
    were forced to one canonical token."""
    tb = token_bytes(tok)
    eos = sorted(tok.eos_token_ids)
    rng = random.Random(seed)
    ends, steps, single = [], 0, 0
    for _ in range(walks):
        m = constraint.matcher(tok, width)
        out = b""
        for _ in range(max_steps):
            got = set(m.allowed().tolist())
            want = brute_force(tb, out, lang, eos, width)
            check_mask(tok, lang, out, got, want)
            single += got != want
            steps += 1
            assert m.accepting == lang.complete(out)
            text = sorted(got - set(eos))
            if not text or (m.accepting and rng.random() < 0.25):
                t = rng.choice(eos)
                m.consume(t)
                assert m.done and m.allowed().tolist() == eos  # after eos only eos
                ends.append(out)
                break
            t = rng.choice(text)
            m.consume(t)
            out += tb[t]
    assert steps > walks * 3
    return ends, single


JSON_SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "color": {"enum": ["red", "green", "bleu", "é"]},
        "n": {"type": "integer", "minimum": 0, "maximum": 12},
        "tag": {"enum": [None, "x"]},
    },
    "required": ["ok", "color", "n"],
    "additionalProperties": False,
}


def json_language() -> list[str]:
    """Every serialization the schema allows in llguidance's compact form, written out by Python's json module
    (constrain.JSON_OPTIONS sets its separators; properties in the schema's order)."""
    assert (JSON_OPTIONS["item_separator"], JSON_OPTIONS["key_separator"]) == (", ", ": ")
    out = []
    for ok, color, n, tag in itertools.product([True, False], ["red", "green", "bleu", "é"], range(13),
                                               ["absent", None, "x"]):
        doc = {"ok": ok, "color": color, "n": n, **({} if tag == "absent" else {"tag": tag})}
        out.append(json.dumps(doc, ensure_ascii=False))
    return out


GRAMMAR = r"""
start: greet " " who "!"
greet: "hi" | "hello"
who: "bob" | "zoë" | "al" "ice"?
"""

CASES = {
    # a finite regex, its language written out by hand
    "regex-finite": (dict(regex=r"(yes|no|maybe)( sir| café)?\."),
                     lambda: Finite(a + b + "." for a in ("yes", "no", "maybe") for b in ("", " sir", " café"))),
    # an infinite one (y+), decided by the regex module's partial matching on bytes; "€" is three bytes, the
    # tiny tokenizer spells it with byte pieces, none valid UTF-8 alone
    "regex-partial": (dict(regex="[a-c]{2,4}(-[0-9]+)?|x€y+"),
                      lambda: PartialRegex(rb"[a-c]{2,4}(-[0-9]+)?|x\xe2\x82\xacy+")),
    "grammar": (dict(grammar=GRAMMAR),
                lambda: Finite(g + " " + w + "!" for g in ("hi", "hello") for w in ("bob", "zoë", "al", "alice"))),
    "json-schema": (dict(json_schema=JSON_SCHEMA), lambda: Finite(json_language())),
}


@pytest.mark.parametrize("case", list(CASES))
def test_mask_is_the_brute_force_tiny(tiny, case):
    """Every mask on random walks against the brute force over all 512 ids (see check_mask). The tiny pieces
    are single characters or single bytes, so partial UTF-8 (é, ë, €: byte pieces, not UTF-8 alone) is allowed
    exactly where the bytes so far lead on to a valid character: llguidance works on bytes, as the brute force
    does. The special pieces (<pad>, <bos>, <start_of_turn>...) are never allowed; the eos ids (<eos> and
    <end_of_turn>) both, exactly where the output is complete."""
    model, tok = tiny
    assert sorted(tok.eos_token_ids) == [1, 106]
    kwargs, lang = CASES[case]
    lang = lang()
    ends, single = walk(compile_constraint(**kwargs), tok, lang, width=model.cfg.vocab_size, walks=25, max_steps=60)
    assert ends and all(lang.complete(e) for e in ends)
    if isinstance(lang, Finite):
        assert len(set(ends)) > 5 and single > 0  # the walks went different ways, some through forced text
    assert any(len(e.decode("utf-8")) < len(e) for e in ends)  # and some through multi-byte characters


def test_mask_is_the_brute_force_gguf_bpe(bpe_tok):
    """On Gemma 3's real vocabulary (262,144 pieces, many multi-character: '{"', ' true', '": '), walks through
    the JSON schema and the grammar: every mask against the brute force over every piece (found from the
    language's prefixes: the pieces whose bytes take the output to another prefix)."""
    tb = token_bytes(bpe_tok)
    by_bytes: dict[bytes, list[int]] = {}
    for i, b in enumerate(tb):
        if b:
            by_bytes.setdefault(b, []).append(i)
    eos = sorted(bpe_tok.eos_token_ids)
    rng = random.Random(1)
    multi = single = 0
    for case in ("json-schema", "grammar"):
        kwargs, lang = CASES[case]
        lang = lang()
        c = compile_constraint(**kwargs)
        for _ in range(4):
            m = c.matcher(bpe_tok, len(tb))
            out = b""
            while True:
                want = {i for p in lang.prefixes if len(p) > len(out) and p.startswith(out)
                        for i in by_bytes.get(p[len(out):], [])}
                want |= set(eos) if lang.complete(out) else set()
                got = set(m.allowed().tolist())
                check_mask(bpe_tok, lang, out, got, want)
                single += got != want
                text = sorted(got - set(eos))
                if not text:
                    break
                t = rng.choice(text)
                multi += len(tb[t]) > 1
                m.consume(t)
                out += tb[t]
            assert lang.complete(out) and got == set(eos)
    assert multi > 0 and single > 0


def test_added_text_pieces_are_text(tiny, bpe_tok):
    """Gemma's tokenizers add pieces spelled "<...>" that are text, not special (<b>, </b>, <table>,
    <start_of_image> on the real vocabulary; <extra459>... on the tiny one). llguidance takes every added
    "<...>" piece for a special token unless told otherwise; then a grammar that forced such text (here
    "<b>", or an enum value "<table>") had llguidance force that piece by mask and refuse it when consumed, and
    the generation failed. ll_tokenizer gives llguidance those pieces as text: they are allowed where their
    text fits, like any piece."""
    tb = token_bytes(bpe_tok)
    bold, close = (bpe_tok.convert_tokens_to_ids(p) for p in ("<b>", "</b>"))
    # a free choice: the mask is the brute force, the added pieces <b> and </b> in it
    m = compile_constraint(regex="[<>b/]+").matcher(bpe_tok, len(tb))
    got = set(m.allowed().tolist())
    assert got == {i for i, b in enumerate(tb) if b and set(b) <= set(b"<>b/")} and {bold, close} <= got
    # forced text with added pieces in it, walked to the end through random allowed pieces
    lang = PartialRegex(rb"<b>[a-z]{1,3}</b>")
    eos = sorted(bpe_tok.eos_token_ids)
    for seed in range(6):
        rng = random.Random(seed)
        m = compile_constraint(regex="<b>[a-z]{1,3}</b>").matcher(bpe_tok, len(tb))
        out = b""
        while not lang.complete(out):
            got = set(m.allowed().tolist())
            assert got and all(tb[t] and lang.valid_prefix(out + tb[t]) for t in got)  # within the brute force
            t = rng.choice(sorted(got))
            m.consume(t)
            out += tb[t]
        assert set(m.allowed().tolist()) == set(eos)
    # the tokenizer's own pieces for that text are accepted too
    m = compile_constraint(regex="<b>[a-z]{1,3}</b>").matcher(bpe_tok, len(tb))
    for t in bpe_tok.encode("<b>abc</b>", add_special_tokens=False):
        assert t in set(m.allowed().tolist()) or t in (bold, close)
        m.consume(t)
    assert m.accepting
    # end to end on the tiny model: the generation completes
    model, tok = tiny
    from mlx_gemma_qat import stream_generate

    rs = list(stream_generate(model, tok, "hi", 20, regex="<extra460>[a-z]!"))
    text = "".join(r.text for r in rs)
    assert rs[-1].finish_reason == "stop" and __import__("re").fullmatch("<extra460>[a-z]!", text), text


# -- c. width ---------------------------------------------------------------------------------------------


def test_width_past_the_vocabulary_is_masked(tiny, bpe_tok):
    """Gemma 3 4B and larger have 262,208 logits for 262,144 pieces: the ids past the tokenizer are never
    allowed, even where everything is (any text); on the tiny tokenizer (513 pieces) with 600 logits alike."""
    _, tok = tiny
    for t, width in ((tok, 600), (bpe_tok, 262208)):
        n = len(token_bytes(t))
        m = compile_constraint(regex="(?s:.*)").matcher(t, width)
        allowed = m.allowed()
        assert allowed.max() < n and len(allowed) > n // 2
        mask = np.array(m.mask())
        assert mask.shape == (width,) and not mask[n:].any() and mask[allowed].all() and mask.sum() == len(allowed)
        logits = mx.random.normal((1, width)).astype(mx.bfloat16)
        out = np.array(m.apply(logits).astype(mx.float32))
        assert np.isneginf(out[0, n:]).all() and np.isfinite(out[0, allowed]).all()
        assert (out[0, allowed] == np.array(logits.astype(mx.float32))[0, allowed]).all()
        assert int(mx.argmax(m.apply(mx.zeros((1, width)) + mx.arange(width)), axis=-1).item()) < n


def test_width_below_the_vocabulary_slices(tiny):
    """The tiny model has 512 logits for 513 pieces (its last, <mask>, is special): a matcher that narrow
    gives the full-width mask cut to 512; narrower still (505) drops the allowed pieces 505..509 too."""
    model, tok = tiny
    assert model.cfg.vocab_size == 512 and len(token_bytes(tok)) == 513
    c = compile_constraint(regex="<extra50[0-9]>|[a-c]")
    full = c.matcher(tok, 513).allowed()
    assert set(range(500, 510)) <= set(full.tolist())
    for width in (512, 505):
        m = c.matcher(tok, width)
        assert m.allowed().tolist() == [i for i in full.tolist() if i < width]
        mask = m.mask()
        assert mask.shape == (width,) and np.array(mask).sum() == len(m.allowed())
        assert m.apply(mx.zeros((1, width))).shape == (1, width)
    m = c.matcher(tok, 505)
    m.consume(502)  # a piece past the width can still be consumed (the matcher does not sample)
    assert m.accepting


# -- d. every sampler -------------------------------------------------------------------------------------

SAMPLERS = {
    "greedy": {},
    "temp": {"temp": 1.0},
    "hot": {"temp": 5.0},  # nearly uniform over what the mask allows: wanders the most
    "top_p": {"temp": 1.0, "top_p": 0.9},
    "top_k": {"temp": 1.0, "top_k": 5},
    "min_p": {"temp": 1.0, "min_p": 0.1},
    "top_k+top_p+min_p": {"temp": 0.8, "top_k": 20, "top_p": 0.95, "min_p": 0.05},
}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_gives_valid_json(tiny, name):
    """The mask is applied before any sampler: under each, the random tiny model's output parses and validates
    (jsonschema) and ends with "stop"; cut by max_tokens it ends with "length" and is an unfinished prefix."""
    jsonschema = pytest.importorskip("jsonschema")
    from mlx_gemma_qat import stream_generate

    model, tok = tiny
    language = set(json_language())
    longest = max(len(s.encode("utf-8")) for s in language)  # one piece per byte at worst
    c = compile_constraint(json_schema=JSON_SCHEMA)
    seen = set()
    for seed in range(3):
        rs = list(stream_generate(model, tok, "hi", longest + 8, constraint=c, seed=seed, **SAMPLERS[name]))
        text = "".join(r.text for r in rs)
        assert rs[-1].finish_reason == "stop" and rs[-1].token in tok.eos_token_ids, text
        jsonschema.validate(json.loads(text), JSON_SCHEMA)
        assert text in language
        seen.add(text)
    if name == "hot":  # near-uniform sampling within the mask: other seeds, other documents
        assert len(seen) == 3
    if name == "greedy":
        assert len(seen) == 1
    rs = list(stream_generate(model, tok, "hi", 9, constraint=c, seed=0, **SAMPLERS[name]))
    text = "".join(r.text for r in rs)
    assert rs[-1].finish_reason == "length" and rs[-1].generation_tokens == 9
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    assert text and any(s.startswith(text) for s in language)


def test_free_output_is_not_json(tiny):
    """The same prompt without a constraint: the random model's output is not JSON (so the test above is
    the mask's doing)."""
    from mlx_gemma_qat import generate

    model, tok = tiny
    text = generate(model, tok, "hi", 40)
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


@pytest.mark.parametrize("kind", ["regex", "grammar", "json"])
def test_each_kind_through_generate(tiny, kind):
    """regex=, grammar= and json= straight to generate(): the output is in the language."""
    from mlx_gemma_qat import generate, stream_generate

    model, tok = tiny
    if kind == "regex":
        text = generate(model, tok, "hi", 20, regex=r"(yes|no|maybe)( sir| café)?\.", temp=1.0, seed=3)
        assert text.encode() in CASES["regex-finite"][1]().language
    elif kind == "grammar":
        text = generate(model, tok, "hi", 20, grammar=GRAMMAR, temp=1.0, seed=3)
        assert text.encode() in CASES["grammar"][1]().language
    else:  # any object: the random model rambles inside a string, so give it a short leash and check the prefix
        rs = list(stream_generate(model, tok, "hi", 12, json=True))
        text = "".join(r.text for r in rs)
        assert text.startswith("{") and rs[-1].finish_reason == "length"
        m = compile_constraint(json=True).matcher(tok, model.cfg.vocab_size)
        for r in rs:
            m.consume(r.token)  # every token a valid step


# -- e. bad input ------------------------------------------------------------------------------------------

BAD = {
    "unknown type": (dict(json_schema={"type": "nonsense"}), "invalid JSON schema: Invalid type: nonsense"),
    "schema not an object": (dict(json_schema=[{"type": "string"}]), "a JSON schema must be an object, not list"),
    "schema text not JSON": (dict(json_schema='{"type": '), "the JSON schema is not JSON"),
    "unsupported keyword": (dict(json_schema={"type": "object", "if": {"required": ["a"]}, "then": {}}),
                            'invalid JSON schema: Unimplemented keys: \\["if", "then"\\]'),
    "unsatisfiable schema": (dict(json_schema={"type": "integer", "minimum": 5, "maximum": 1}),
                             r"minimum \(5\) is greater than maximum \(1\)"),
    "regex unclosed": (dict(regex="(ab"), "invalid regex: .* error: unclosed group"),
    "regex look-around": (dict(regex="(?=a)b"), "look-around, including look-ahead and look-behind, is not supported"),
    "regex back-reference": (dict(regex=r"(a)\1"), "backreferences are not supported"),
    "grammar unknown rule": (dict(grammar="start: foo"), 'invalid grammar: .*unknown name: "foo"'),
    "grammar syntax": (dict(grammar="start 'a'"), "invalid grammar: "),
    "two constraints": (dict(json=True, regex="a"), "give one constraint, not json and regex"),
    "constraint and a kind": (dict(constraint=Constraint("start: \"a\"", "grammar"), json=True),
                              "give either constraint= or one of json_schema="),
    "stop strings": (dict(json=True, stop_strings=["}"]), "stop strings cannot be given with a constraint"),
}


class Untouchable:
    """A model or tokenizer that fails the test if generation gets as far as using it."""

    def __getattr__(self, name):
        raise AssertionError(f"used .{name} before refusing the constraint")

    def __call__(self, *a, **k):
        raise AssertionError("called before refusing the constraint")


@pytest.mark.parametrize("case", list(BAD))
def test_bad_constraint_refused_before_any_work(case):
    from mlx_gemma_qat import generate, stream_generate

    kwargs, message = BAD[case]
    for run in (lambda: list(stream_generate(Untouchable(), Untouchable(), "hi", 8, **kwargs)),
                lambda: generate(Untouchable(), Untouchable(), "hi", 8, **kwargs)):
        with pytest.raises(ConstraintError, match=message) as e:
            run()
        assert isinstance(e.value, ValueError) and "\n" not in str(e.value) and len(str(e.value)) < 300
    if "stop_strings" not in kwargs and "constraint" not in kwargs:
        with pytest.raises(ConstraintError, match=message):
            compile_constraint(**kwargs)


def test_bad_constraint_in_a_chat_leaves_the_session_as_it_was(tiny):
    from mlx_gemma_qat.chat import ChatSession

    model, tok = tiny
    s = ChatSession(model, tok)
    list(s.send("hi", max_tokens=8, regex="[a-z]{3}"))
    messages = list(s.messages)
    calls = []
    real_call = type(model).__call__
    type(model).__call__ = lambda self, *a, **k: calls.append(1) or real_call(self, *a, **k)
    try:
        for kwargs, _ in BAD.values():
            with pytest.raises(ConstraintError):
                list(s.send("again", max_tokens=3, **kwargs))
    finally:
        type(model).__call__ = real_call
    # the model never ran, the conversation is as it was and the cache's record true (the random model's reply,
    # in byte pieces, renders back differently, so the turn had dropped the cache before the refusal, as any
    # turn after it would have)
    assert not calls and s.messages == messages and s.cache[0].offset == len(s.cached_ids)
    rs = list(s.send("again", max_tokens=8, regex="[a-z]{3}"))
    assert rs[-1].finish_reason == "stop" and len(s.messages) == 4


# -- f. reuse ----------------------------------------------------------------------------------------------


def test_a_constraint_serves_many_generations_and_chat_turns(tiny):
    """One compiled Constraint across generations and a ChatSession's turns (each drives its own Matcher);
    json=True in a chat turn too, its output brought to an end by a sampler that prefers closing."""
    jsonschema = pytest.importorskip("jsonschema")
    from mlx_gemma_qat import stream_generate
    from mlx_gemma_qat.chat import ChatSession

    model, tok = tiny
    c = compile_constraint(json_schema=json.dumps(JSON_SCHEMA))  # JSON text works as well as a dict
    assert c == compile_constraint(json_schema=JSON_SCHEMA)
    before = (c.grammar, c.kind)
    texts = []
    for seed in range(3):
        texts.append("".join(r.text for r in stream_generate(model, tok, "hi", 60, constraint=c, temp=5.0, seed=seed)))
    s = ChatSession(model, tok)
    for i, msg in enumerate(["hi", "more"]):
        rs = list(s.send(msg, max_tokens=60, constraint=c, temp=5.0))
        texts.append("".join(r.text for r in rs))
        assert rs[-1].finish_reason == "stop" and s.messages[-1]["content"] == texts[-1]
        assert len(s.messages) == 2 * (i + 1) and s.cache[0].offset == len(s.cached_ids)
    for t in texts:
        jsonschema.validate(json.loads(t), JSON_SCHEMA)
    assert len(set(texts)) > 2 and (c.grammar, c.kind) == before  # unchanged by use

    eos = sorted(tok.eos_token_ids)
    closing = [tok.convert_tokens_to_ids(p) for p in ("}", '"')]

    def prefer_closing(logprobs):  # among the allowed: eos, then "}", then '"', else the model's choice
        bonus = mx.zeros(logprobs.shape[-1]).at[mx.array(eos + closing)].add(mx.array([300.0] * len(eos) + [200.0, 100.0]))
        return mx.argmax(logprobs + bonus, axis=-1)

    rs = list(s.send("an object please", max_tokens=20, json=True, sampler=prefer_closing))
    assert rs[-1].finish_reason == "stop" and json.loads("".join(r.text for r in rs)) == {}
    rs = list(s.send("and again", max_tokens=60, constraint=c))
    assert rs[-1].finish_reason == "stop"  # within the tiny model's 256-token context
    jsonschema.validate(json.loads("".join(r.text for r in rs)), JSON_SCHEMA)


# -- the command line --------------------------------------------------------------------------------------


def _cli(*args, input=None):
    from click.testing import CliRunner

    from mlx_gemma_qat.cli import main

    return CliRunner().invoke(main, list(map(str, args)), input=input)


def _reply(r) -> str:
    """The generated text of `generate --no-stats`: stdout less its final newline."""
    assert r.exit_code == 0, r.output
    return r.stdout[:-1] if r.stdout.endswith("\n") else r.stdout


def test_cli_generate_constrained(tiny_folder, tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    base = ["generate", "-m", tiny_folder, "-p", "hi", "-n", 60, "--no-stats"]
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(JSON_SCHEMA), encoding="utf-8")
    for spec in (schema_file, json.dumps(JSON_SCHEMA)):
        text = _reply(_cli(*base, "--json-schema", spec, "--temp", 5, "--seed", 1))
        jsonschema.validate(json.loads(text), JSON_SCHEMA)
    text = _reply(_cli(*base, "--regex", r"(yes|no|maybe)( sir| café)?\.", "--temp", 5, "--seed", 2))
    assert text.encode() in CASES["regex-finite"][1]().language
    grammar_file = tmp_path / "greet.lark"
    grammar_file.write_text(GRAMMAR, encoding="utf-8")
    text = _reply(_cli(*base, "--grammar", grammar_file, "--temp", 5, "--seed", 3))
    assert text.encode() in CASES["grammar"][1]().language
    text = _reply(_cli(*base[:-3], "-n", 8, "--no-stats", "--json"))
    assert text.startswith("{")  # the random model rambles in a key: cut at 8 tokens


def test_cli_chat_constrains_every_reply(tiny_folder):
    jsonschema = pytest.importorskip("jsonschema")
    r = _cli("chat", "-m", tiny_folder, "-n", 60, "--json-schema", json.dumps(JSON_SCHEMA), "--temp", 5,
             "--seed", 0, input="hi\nmore\n/quit\n")
    assert r.exit_code == 0, r.output
    replies = [line for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(replies) == 2
    for reply in replies:
        jsonschema.validate(json.loads(reply), JSON_SCHEMA)


CLI_BAD = {
    "unknown type": (["--json-schema", '{"type": "nonsense"}'], "invalid JSON schema: Invalid type: nonsense"),
    "schema not an object": (["--json-schema", "[1]"], "a JSON schema must be an object, not list"),
    "schema text not JSON": (["--json-schema", '{"type": '], "the JSON schema is not JSON"),
    "no such schema file": (["--json-schema", "missing.json"], "--json-schema missing.json: no such file"),
    "unsupported keyword": (["--json-schema", '{"if": {}, "then": {}}'], "Unimplemented keys"),
    "regex": (["--regex", "(ab"], "invalid regex: .*unclosed group"),
    "grammar file": (["--grammar", "BAD_GRAMMAR"], 'invalid grammar: .*unknown name: "foo"'),
    "no such grammar file": (["--grammar", "missing.lark"], "--grammar missing.lark: no such file"),
    "two constraints": (["--json", "--regex", "a"], "give one constraint, not --json and --regex"),
}


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize("case", list(CLI_BAD))
def test_cli_bad_constraint_is_one_error_line(tmp_path, monkeypatch, command, case):
    """One 'Error: ...' line, exit 1, before the model is loaded (--model names nothing that exists)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "BAD_GRAMMAR").write_text("start: foo\n", encoding="utf-8")
    args, message = CLI_BAD[case]
    extra = ["-p", "hi"] if command == "generate" else []
    r = _cli(command, "-m", tmp_path / "no-such-model", *extra, *args, input="hi\n")
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.output
    assert __import__("re").search(message, lines[0]), lines[0]
