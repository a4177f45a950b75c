"""evaluate/corpus.py: the evaluation text from a local file or a (cached) Hugging Face dataset, and its tokens."""

import json
from pathlib import Path

import numpy as np
import pytest
from mlx_lm.utils import load_tokenizer

from mlx_gemma_qat.evaluate.corpus import CorpusError, read_text, tokenize

FIX = Path(__file__).parent / "fixtures"


def jsonl(path: Path, lines) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


# ---------------------------------------------------------------------------------------------- local files

def test_plain_text_verbatim(tmp_path):
    raw = " = Title = \n\n  Some text, with trailing spaces.  \n\n\n"
    (tmp_path / "wiki.test.raw").write_text(raw)
    assert read_text(tmp_path / "wiki.test.raw") == (raw, "wiki.test.raw")
    assert read_text(str(tmp_path / "wiki.test.raw"))[0] == raw


def test_jsonl_join_and_errors(tmp_path):
    f = jsonl(tmp_path / "eval.jsonl", [{"text": "one", "id": 1}, "", {"text": "two"}])
    assert read_text(f) == ("one\n\ntwo", "eval.jsonl")
    jsonl(f, [{"body": "x"}, {"body": "y"}])
    assert read_text(f, field="body")[0] == "x\n\ny"
    jsonl(f, [{"text": "a"}, "", '{"text": "b"'])
    with pytest.raises(CorpusError, match=r"eval\.jsonl:3: malformed JSON"):
        read_text(f)
    jsonl(f, [{"text": "a"}, {"content": "b"}])
    with pytest.raises(CorpusError, match=r"eval\.jsonl:2: no string 'text'"):
        read_text(f)
    jsonl(f, [{"text": "a"}, {"text": 3}])
    with pytest.raises(CorpusError, match=r"eval\.jsonl:2: "):
        read_text(f)


def test_json_list(tmp_path):
    f = tmp_path / "eval.json"
    f.write_text(json.dumps([{"text": "alpha"}, {"text": "beta"}]))
    assert read_text(f)[0] == "alpha\n\nbeta"
    f.write_text(json.dumps({"text": "alpha"}))
    with pytest.raises(CorpusError, match="JSON list"):
        read_text(f)


def test_file_errors(tmp_path):
    (tmp_path / "empty.txt").write_text(" \n\n")
    with pytest.raises(CorpusError, match=r"empty\.txt: no text"):
        read_text(tmp_path / "empty.txt")
    with pytest.raises(CorpusError, match=r"nope\.txt: no such file"):
        read_text(tmp_path / "nope.txt")
    with pytest.raises(CorpusError, match="a directory"):
        read_text(tmp_path)
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    with pytest.raises(CorpusError, match=r"latin1\.txt: cannot read"):
        read_text(tmp_path / "latin1.txt")
    with pytest.raises(CorpusError, match="exactly one"):
        read_text()
    with pytest.raises(CorpusError, match="exactly one"):
        read_text(tmp_path / "empty.txt", dataset="a/b")


# -------------------------------------------------------------------------------------- Hugging Face datasets

@pytest.fixture
def hub(fake_hub):
    return lambda repo_id: fake_hub(repo_id, "datasets")


def test_dataset_jsonl_under_data(hub):
    snap = hub("tiny-org/eval")
    jsonl(snap / "data" / "test.jsonl", [{"text": "first"}, {"text": "second"}])
    jsonl(snap / "data" / "train.jsonl", [{"text": "not this"}])
    assert read_text(dataset="tiny-org/eval") == ("first\n\nsecond", "tiny-org/eval test (2 records)")
    assert read_text(dataset="tiny-org/eval", split="train")[0] == "not this"
    with pytest.raises(CorpusError, match=r"no 'validation' split .*data/test\.jsonl, data/train\.jsonl"):
        read_text(dataset="tiny-org/eval", split="validation")
    with pytest.raises(CorpusError, match="tiny-org/absent: neither .* in the cache nor downloadable"):
        read_text(dataset="tiny-org/absent")


def test_dataset_wikitext_line_records_joined_with_nothing(hub):
    snap = hub("tiny-org/lines")
    lines = ["", " = Title = \n", "", " Some text . \n", "", " = = Section = = \n", ""]
    jsonl(snap / "test.jsonl", [{"text": x} for x in lines])
    assert read_text(dataset="tiny-org/lines")[0] == "".join(lines)


def test_dataset_config_parquet_shards(hub):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    snap = hub("tiny-org/wiki")
    for cfg in ("wiki-2-raw", "wiki-103-raw"):
        (snap / cfg).mkdir()
        for i, rows in enumerate([["", f" = {cfg} = \n", ""], [" more . \n", ""]]):
            pq.write_table(pa.table({"text": rows}), snap / cfg / f"test-0000{i}-of-00002.parquet")
        pq.write_table(pa.table({"text": ["train\n"]}), snap / cfg / "train-00000-of-00001.parquet")
    with pytest.raises(CorpusError, match=r"pass --config: wiki-103-raw, wiki-2-raw"):
        read_text(dataset="tiny-org/wiki")
    text, name = read_text(dataset="tiny-org/wiki", config="wiki-2-raw")
    assert text == " = wiki-2-raw = \n more . \n"  # shards in order, line records joined with ""
    assert name == "tiny-org/wiki wiki-2-raw/test (5 records)"
    with pytest.raises(CorpusError, match="no column 'body'"):
        read_text(dataset="tiny-org/wiki", config="wiki-2-raw", field="body")
    with pytest.raises(CorpusError, match="no 'test' split in config 'other'"):
        read_text(dataset="tiny-org/wiki", config="other")
    # a split folder (test/0000.parquet) and a local parquet file
    snap = hub("tiny-org/folders")
    (snap / "test").mkdir()
    pq.write_table(pa.table({"text": ["doc one", "doc two"]}), snap / "test" / "0000.parquet")
    assert read_text(dataset="tiny-org/folders")[0] == "doc one\n\ndoc two"
    assert read_text(snap / "test" / "0000.parquet") == ("doc one\n\ndoc two", "0000.parquet")


# ------------------------------------------------------------------------------------------------ tokenize

def test_tokenize_bos_once():
    tok = load_tokenizer(FIX / "tiny_gemma3")
    text = "Hello world.\n\nA second paragraph."
    ids = tokenize(tok, text)
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert ids.tolist() == list(tok.encode(text))
    assert ids[0] == tok.bos_token_id and (ids == tok.bos_token_id).sum() == 1

    class NoBos:  # a tokenizer that does not add BOS itself: tokenize prepends it
        bos_token_id = tok.bos_token_id

        def encode(self, s):
            return list(tok.encode(s))[1:]

    assert tokenize(NoBos(), text).tolist() == ids.tolist()
