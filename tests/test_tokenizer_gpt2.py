"""GGUF tokenizers of type ``gpt2`` (BPE with a merges list), as llama.cpp's convert_hf_to_gguf.py writes
them for a Gemma 3 folder without ``tokenizer.model``.

The fixture GGUF (tests/fixtures/tiny_gemma3_gpt2_tokenizer.gguf.xz: the real Gemma 3 vocabulary with a
tiny random model) and the reference ids in tests/fixtures/gpt2_tokenizer_cases.json were made by
llama.cpp's own converter and tokenizer (scripts/make_gpt2_tokenizer_fixture.py); nothing here needs
llama.cpp, torch or the network.
"""

from __future__ import annotations

import hashlib
import json
import lzma
from pathlib import Path

import numpy as np
import pytest

from mlx_gemma_qat.convert.tokenizer import (
    GEMMA_BPE_PRE_TOKENIZERS,
    TokenizerError,
    parse_merges,
    read_tokenizer_metadata,
    special_token_ids,
    tokenizer_from_gguf,
)

FIXTURES = Path(__file__).parent / "fixtures"
DATA = json.loads((FIXTURES / "gpt2_tokenizer_cases.json").read_text(encoding="utf-8"))
META, CASES, FUZZ = DATA["meta"], DATA["cases"], DATA["fuzz"]
CASE_IDS = [c["name"] for c in CASES]


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory) -> Path:
    raw = lzma.decompress((FIXTURES / META["gguf"]).read_bytes())
    assert hashlib.sha256(raw).hexdigest() == META["gguf_sha256"]
    path = tmp_path_factory.mktemp("gpt2") / "tiny_gemma3_gpt2_tokenizer.gguf"
    path.write_bytes(raw)
    return path


@pytest.fixture(scope="module")
def tok(gguf_path):
    return tokenizer_from_gguf(gguf_path)


# ------------------------------------------------------------------------------------------------
# the file is what the tests think it is
# ------------------------------------------------------------------------------------------------


def test_fixture_is_llama_cpp_gpt2_type(gguf_path):
    meta = read_tokenizer_metadata(gguf_path)
    assert meta.model == "gpt2" and meta.pre == META["tokenizer.ggml.pre"] and meta.pre in GEMMA_BPE_PRE_TOKENIZERS
    assert len(meta.tokens) == 262144 and len(meta.merges) == META["n_merges"] > 500_000
    assert not meta.scores.any()  # no SentencePiece scores: only the merges can say how to join
    assert special_token_ids(gguf_path) == {"bos_id": 2, "eos_id": 1, "pad_id": 0, "unk_id": 3}
    assert len(CASES) == 44 and len(FUZZ) >= 300


def test_vocabulary(tok):
    assert tok.get_vocab_size() == 262144
    for s, i in {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<start_of_turn>": 105, "<end_of_turn>": 106,
                 "\n": 107, "<0x00>": 238, "<start_of_image>": 255999, "<end_of_image>": 256000}.items():
        assert tok.token_to_id(s) == i, s


# ------------------------------------------------------------------------------------------------
# ids against llama.cpp's
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_ids_match_llama_cpp(tok, case):
    text = case["text"]
    assert tok.encode(text, add_special_tokens=False).ids == case["ids"]
    assert tok.encode(text).ids == case["ids_bos"]
    tok.encode_special_tokens = True  # llama.cpp's special=False: control tokens spelled as text
    try:
        ids = tok.encode(text, add_special_tokens=False).ids
    finally:
        tok.encode_special_tokens = False
    assert ids == case.get("ids_no_special", case["ids"])


def test_fuzzed_ids_match_llama_cpp(tok):
    texts = [c["text"] for c in FUZZ]
    got = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    bad = [c["name"] for c, ids in zip(FUZZ, got) if ids != c["ids"]]
    assert not bad, f"{len(bad)}/{len(FUZZ)} fuzzed texts differ from llama.cpp: {bad[:10]}"
    tok.encode_special_tokens = True
    try:
        got = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    finally:
        tok.encode_special_tokens = False
    bad = [c["name"] for c, ids in zip(FUZZ, got) if ids != c.get("ids_no_special", c["ids"])]
    assert not bad, f"{len(bad)}/{len(FUZZ)} fuzzed texts differ from llama.cpp (special=False): {bad[:10]}"


def test_same_ids_as_the_sentencepiece_gguf():
    # the same vocabulary, stored SentencePiece-style (scores) in the real 270M GGUF: llama.cpp gives the
    # same ids for it (tests/fixtures/tokenizer_cases.json), so the two routes must agree too
    spm = {c["name"]: c for c in json.loads((FIXTURES / "tokenizer_cases.json").read_text(encoding="utf-8"))["cases"]}
    differ = [c["name"] for c in CASES if c["ids"] != spm[c["name"]]["ids"]]
    assert not differ, differ


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_decode(tok, case):
    decoded = tok.decode(case["ids"], skip_special_tokens=False)
    # llama.cpp spells this file's byte pieces as "<0xNN>" (they are NORMAL tokens in it); we decode them
    assert decoded == case["text"].replace("\u2581", " ")


# ------------------------------------------------------------------------------------------------
# end to end: convert, load, generate
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(gguf_path, tmp_path_factory) -> Path:
    """`mlx-gemma convert FIXTURE.gguf -o OUT` (once: reading the 776k strings of this file takes gguf-py
    about 20 s)."""
    from click.testing import CliRunner

    from mlx_gemma_qat.cli import main

    out = tmp_path_factory.mktemp("gpt2-mlx") / "out"
    r = CliRunner().invoke(main, ["convert", str(gguf_path), "-o", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    return out


def test_converted_tokenizer_files(converted):
    cfg = json.loads((converted / "tokenizer_config.json").read_text())
    assert cfg["add_bos_token"] is True and (cfg["bos_token"], cfg["eos_token"]) == ("<bos>", "<eos>")
    assert "chat_template" in cfg  # transformers saved one, llama.cpp's converter carried it into the GGUF


def test_convert_load_generate(converted):
    from mlx_gemma_qat import load, stream_generate

    model, tokenizer = load(str(converted))
    for case in CASES:
        assert tokenizer.encode(case["text"]) == case["ids_bos"], case["name"]
    out = list(stream_generate(model, tokenizer, "The capital of France is", max_tokens=8, chat=False))
    assert len(out) == 8 and out[-1].finish_reason == "length"
    ids = [r.token for r in out]
    assert all(0 <= i < META["embed_rows_random"] for i in ids), ids  # the only rows with non-zero weights
    assert "".join(r.text for r in out) == tokenizer.decode(ids)


# ------------------------------------------------------------------------------------------------
# small synthetic gpt2-type GGUFs
# ------------------------------------------------------------------------------------------------

TOY = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "  ", "\n"] + [f"<0x{b:02X}>" for b in range(256)] + [
    "▁", "a", "b", "c", "d", "ab", "bc", "abc", "cd", "▁a", "▁ab", "abcd",
]
TOY_TYPES = [3, 3, 3, 3, 3, 4, 4] + [1] * 256 + [1] * 12  # byte pieces are NORMAL, as convert_hf_to_gguf.py writes
# "bc" before "ab", so "abc" comes from "a" + "bc"; "ĠĠ Ġ" is how the converter writes a merge of space runs;
# the second "b c" must not move the pair's rank
TOY_MERGES = ["b c", "a bc", "ab c", "c d", "▁ a", "a b", "ĠĠ Ġ", "▁ ab", "▁a b", "ab cd", "abc d", "b c"]


def _write(path: Path, *, model="gpt2", pre="granite-embed-multi-311m", merges=TOY_MERGES, tokens=TOY,
           types=TOY_TYPES, add_bos=None):
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), arch="gemma3")
    w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if merges is not None:
        w.add_token_merges(merges)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_toy_bpe_semantics(tmp_path):
    tok = tokenizer_from_gguf(_write(tmp_path / "toy.gguf"))
    enc = tok.encode("abcd ab  a\n<start_of_turn>é", add_special_tokens=False)
    # a b c d ▁ a b -> a bc d ▁ a b -> abc d ▁ a b -> abc d ▁a b (rank 4) -> abc d ▁ab -> abcd ▁ab;
    # "  " and "\n" are matched whole, "é" is not a piece: its UTF-8 bytes
    assert enc.tokens == ["abcd", "▁ab", "  ", "a", "\n", "<start_of_turn>", "<0xC3>", "<0xA9>"]
    assert tok.decode(enc.ids, skip_special_tokens=False) == "abcd ab  a\n<start_of_turn>é"
    # the merges run inside newline-free words only
    assert tok.encode("a\n\nbc", add_special_tokens=False).tokens == ["a", "\n", "\n", "bc"]


@pytest.mark.parametrize("add_bos", [None, False, True])
def test_bos_always_added(tmp_path, add_bos):
    # llama.cpp forces add_bos for this pre-tokenizer whatever the file says
    tok = tokenizer_from_gguf(_write(tmp_path / "toy.gguf", add_bos=add_bos))
    assert tok.encode("ab").tokens == ["<bos>", "ab"]


def test_parse_merges():
    vocab = {t: i for i, t in enumerate(TOY)}
    merges = parse_merges(TOY_MERGES, vocab)
    assert merges == [("b", "c"), ("a", "bc"), ("ab", "c"), ("c", "d"), ("▁", "a"), ("a", "b"), ("▁", "ab"),
                      ("▁a", "b"), ("ab", "cd"), ("abc", "d")]
    with pytest.raises(ValueError, match="not a piece"):
        parse_merges(["b d"], vocab)


@pytest.mark.parametrize("pre", [None, "default", "gpt-2", "llama-bpe", "qwen2"])
def test_other_pre_tokenizers_refused(tmp_path, pre):
    path = _write(tmp_path / "pre.gguf", pre=pre)
    with pytest.raises(TokenizerError, match=r"tokenizer\.ggml\.pre"):  # a ValueError: the CLI's 'Error: ...' line
        tokenizer_from_gguf(path)


def test_missing_merges_refused(tmp_path):
    with pytest.raises(ValueError, match="merges"):
        tokenizer_from_gguf(_write(tmp_path / "nomerges.gguf", merges=None))


def test_reader_and_path_agree(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = _write(tmp_path / "toy.gguf")
    a = read_tokenizer_metadata(path)
    b = read_tokenizer_metadata(gguf.GGUFReader(str(path)))
    assert a.merges == b.merges == TOY_MERGES and a.tokens == b.tokens == TOY
    assert (a.model, a.pre, a.bos_id, a.eos_id, a.add_bos) == (b.model, b.pre, b.bos_id, b.eos_id, b.add_bos)
    assert tokenizer_from_gguf(gguf.GGUFReader(str(path))).to_str() == tokenizer_from_gguf(path).to_str()


def test_cli_refuses_unknown_pre(tmp_path):
    from click.testing import CliRunner

    from mlx_gemma_qat.cli import main

    path = _write(tmp_path / "toy.gguf", pre="llama-bpe")
    r = CliRunner().invoke(main, ["convert", str(path), "-o", str(tmp_path / "out"), "--quiet"])
    assert r.exit_code == 1 and not (tmp_path / "out").exists()
