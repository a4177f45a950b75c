"""lora/data.py: JSONL reading, formats, target masks, images, length-bucketed / packed / sharded batches."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from mlx_lm.utils import load_tokenizer

from mlx_gemma_qat.generate import encode_prompt
from mlx_gemma_qat.lora.data import (Batches, DataError, Example, encode, fingerprint, load_splits, read_jsonl,
                                     record_format)

FIX = Path(__file__).parent / "fixtures"
IMAGES = FIX / "images"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(FIX / "tiny_gemma3")


def targets(tok, ex: Example) -> str:
    return tok.decode([t for t, m in zip(ex.tokens, ex.mask) if m])


def runs(ex: Example) -> list[tuple[int, int]]:
    out, start = [], None
    for i, m in enumerate(list(ex.mask) + [False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i))
            start = None
    return out


def write(path: Path, lines) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


CHAT = {"messages": [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "a"},
                     {"role": "assistant", "content": "b c"}, {"role": "user", "content": "d"},
                     {"role": "assistant", "content": "e f"}]}


# ------------------------------------------------------------------------------------------------- formats

def test_text_format(tok):
    (ex,) = encode([{"text": "hello world"}], tok)
    assert ex.tokens[0] == tok.bos_token_id and ex.tokens[-1] == tok.eos_token_id
    assert ex.tokens == list(tok.encode("hello world")) + [tok.eos_token_id]  # mlx-lm's TextDataset
    assert ex.mask == [False] + [True] * (len(ex.tokens) - 1)
    assert targets(tok, ex) == "hello world<eos>"


def test_completions_format_masks_and_mlx_lm_tokens(tok):
    (ex,) = encode([{"prompt": "Say hi", "completion": "hi there"}], tok)
    msgs = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi there"}]
    assert ex.tokens == tok.apply_chat_template(msgs, return_dict=False)  # what CompletionsDataset tokenizes
    assert targets(tok, ex) == "hi there<end_of_turn>"
    assert len(runs(ex)) == 1
    prompt = tok.apply_chat_template(msgs[:1], add_generation_prompt=True, return_dict=False)
    assert runs(ex)[0][0] == len(prompt)  # targets start right after the generation prompt
    assert not ex.mask[0] and ex.tokens[0] == tok.bos_token_id
    (full,) = encode([{"prompt": "Say hi", "completion": "hi there"}], tok, mask_prompt=False)
    assert full.tokens == ex.tokens and full.mask == [False] + [True] * (len(ex.tokens) - 1)


def test_completions_without_a_template_uses_gemma3(tok, tmp_path):
    folder = tmp_path / "tok"
    shutil.copytree(FIX / "tiny_gemma3", folder, ignore=shutil.ignore_patterns("*.safetensors"))
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    bare = load_tokenizer(folder)
    assert not getattr(bare, "chat_template", None)
    rec = [{"prompt": "Say hi", "completion": "hi there"}]
    (a,), (b,) = encode(rec, bare), encode(rec, tok)
    assert a.tokens == b.tokens and a.mask == b.mask
    assert targets(bare, a) == "hi there<end_of_turn>"


def test_chat_masks_each_assistant_turn(tok):
    (ex,) = encode([CHAT], tok)
    assert ex.tokens[0] == tok.bos_token_id and not ex.mask[0]
    rs = runs(ex)
    assert [tok.decode(ex.tokens[a:b]) for a, b in rs] == ["b c<end_of_turn>", "e f<end_of_turn>"]
    assert tok.decode(ex.tokens) == tok.apply_chat_template(CHAT["messages"], tokenize=False)
    (full,) = encode([CHAT], tok, mask_prompt=False)
    assert full.tokens == ex.tokens and full.mask == [False] + [True] * (len(ex.tokens) - 1)
    # no assistant turn: fine without prompt masking, an error with it
    only_user = {"messages": [{"role": "user", "content": "hi"}]}
    (u,) = encode([only_user], tok, mask_prompt=False)
    assert sum(u.mask) == len(u.tokens) - 1
    with pytest.raises(DataError, match=r"^data:1: no assistant message"):
        encode([only_user], tok)


def test_record_format():
    assert record_format({"text": "x"}) == "text"
    assert record_format({"prompt": "x", "completion": "y", "id": 3}) == "completions"
    assert record_format({"messages": []}) == "chat"
    with pytest.raises(DataError, match="unknown record format"):
        record_format({"input": "x"})


def test_bad_records_name_file_and_line(tok, tmp_path):
    cases = [
        ({"text": ""}, "non-empty"),
        ({"text": 3}, "non-empty"),
        ({"prompt": 1, "completion": "x"}, "must be strings"),
        ({"prompt": "x", "completion": " "}, "empty"),
        ({"messages": "hi"}, "non-empty list"),
        ({"messages": [{"role": "model", "content": "x"}]}, "role 'model'"),
        ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}, "content"),
        ({"messages": [{"role": "user", "content": [{"type": "audio"}]}, {"role": "assistant", "content": "x"}]},
         "content items"),
    ]
    for rec, msg in cases:
        fmt = record_format(rec)
        f = write(tmp_path / "train.jsonl", [{"text": "ok"} if fmt == "text" else
                                             {"prompt": "p", "completion": "c"} if fmt == "completions" else CHAT,
                                             "", rec])
        with pytest.raises(DataError, match=rf"train\.jsonl:3: .*{msg}"):
            encode(read_jsonl(f), tok)
    # records not from a file: the source name and the 1-based index
    with pytest.raises(DataError, match=r"^valid:2: "):
        encode([{"text": "a"}, {"text": ""}], tok, source="valid")


# ------------------------------------------------------------------------------------------------- reading

def test_read_jsonl_errors(tmp_path):
    f = write(tmp_path / "train.jsonl", [{"text": "a"}, "", '{"text": "b"', {"text": "c"}])
    with pytest.raises(DataError, match=r"train\.jsonl:3: malformed JSON"):
        read_jsonl(f)
    write(f, [{"text": "a"}, "[1, 2]"])
    with pytest.raises(DataError, match=r"train\.jsonl:2: .*JSON object"):
        read_jsonl(f)
    write(f, ["", "  "])
    with pytest.raises(DataError, match=r"train\.jsonl: empty"):
        read_jsonl(f)
    write(f, [{"text": "a"}, {"question": "b"}])
    with pytest.raises(DataError, match=r"train\.jsonl:2: unknown record format"):
        read_jsonl(f)
    write(f, [{"text": "a"}, "", {"prompt": "p", "completion": "c"}])
    with pytest.raises(DataError, match=r"train\.jsonl:3: a completions record in a file of text records"):
        read_jsonl(f)
    write(f, [{"text": "a"}, "", {"text": "b"}])
    recs = read_jsonl(f)
    assert [r["text"] for r in recs] == ["a", "b"] and [r["__line__"] for r in recs] == [1, 3]


def test_load_splits_folder(tmp_path):
    write(tmp_path / "train.jsonl", [{"text": "a"}])
    write(tmp_path / "valid.jsonl", [{"text": "b"}])
    out = load_splits(tmp_path)
    assert sorted(out) == ["train", "valid"] and out["valid"][0]["text"] == "b"
    with pytest.raises(DataError, match=r"no test\.jsonl \(required\)"):
        load_splits(tmp_path, required=("train", "test"))
    (tmp_path / "train.jsonl").unlink()
    with pytest.raises(DataError, match=r"no train\.jsonl"):
        load_splits(tmp_path)
    with pytest.raises(DataError, match="no such folder"):
        load_splits(tmp_path / "nope")


def test_a_missing_local_path_is_an_error_never_a_hub_download(tmp_path, monkeypatch):
    from mlx_gemma_qat.lora import data as data_mod

    asked = []

    def hub(repo_id):
        asked.append(repo_id)
        return tmp_path

    monkeypatch.setattr(data_mod, "_hub_snapshot", hub)
    monkeypatch.chdir(tmp_path)
    for missing in ("data/train.jsonl", "./data", "~/no-such-data-here", str(tmp_path / "nope"),
                    "data\\train", "one/two/three", "org/set.parquet", "x"):
        with pytest.raises(DataError, match=f"{re.escape(missing)}: no such folder"):
            load_splits(missing)
    assert asked == []
    write(tmp_path / "train.jsonl", [{"text": "a"}])
    assert load_splits("tiny-org/tiny.data")["train"][0]["text"] == "a" and asked == ["tiny-org/tiny.data"]


def test_load_splits_hub_offline_cache(fake_hub):
    snap = fake_hub("tiny-org/tiny-data", "datasets")
    (snap / "data").mkdir(parents=True)
    write(snap / "train.jsonl", [{"text": "from the hub"}, {"text": "two"}])
    write(snap / "data" / "valid.jsonl", [{"prompt": "p", "completion": "c"}])
    out = load_splits("tiny-org/tiny-data")
    assert [r["text"] for r in out["train"]] == ["from the hub", "two"]
    assert out["valid"][0]["completion"] == "c" and "test" not in out
    assert out["train"][1]["__file__"] == "tiny-org/tiny-data/train.jsonl"
    with pytest.raises(DataError, match="tiny-org/other: not a local folder"):
        load_splits("tiny-org/other")


# -------------------------------------------------------------------------------------------------- images

def test_images_laid_out_as_encode_prompt(tmp_path):
    vtok = load_tokenizer(FIX / "tiny_gemma3_vlm")
    cfg = json.loads((FIX / "tiny_gemma3_vlm" / "config.json").read_text())
    ids = (cfg["boi_token_index"], cfg["eoi_token_index"], cfg["image_token_index"], cfg["mm_tokens_per_image"])
    shutil.copy(IMAGES / "a.png", tmp_path / "a.png")
    user = [{"type": "image", "image": "a.png"}, {"type": "text", "text": "what is it"},
            {"type": "image", "image": str(IMAGES / "b.jpg")}]
    rec = {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": "a cat"},
                        {"role": "user", "content": [{"type": "image", "image": str(IMAGES / "wide.png")}]},
                        {"role": "assistant", "content": "a road"}]}
    f = write(tmp_path / "train.jsonl", [rec])
    (ex,) = encode(read_jsonl(f), vtok, image_ids=ids)
    assert ex.images == [str(tmp_path / "a.png"), str(IMAGES / "b.jpg"), str(IMAGES / "wide.png")]
    first = encode_prompt(vtok, rec["messages"][:1], n_images=2, image_ids=ids)
    assert ex.tokens[:len(first)] == first
    upto3 = encode_prompt(vtok, rec["messages"][:3], n_images=3, image_ids=ids)
    assert ex.tokens[:len(upto3)] == upto3
    assert ex.tokens.count(ids[2]) == 3 * ids[3] and ex.tokens.count(ids[0]) == 3
    assert [vtok.decode(ex.tokens[a:b]) for a, b in runs(ex)] == ["a cat<end_of_turn>", "a road<end_of_turn>"]
    (full,) = encode([rec], vtok, image_ids=ids, mask_prompt=False)
    assert not any(m for t, m in zip(full.tokens, full.mask) if t == ids[2])  # soft tokens never targets
    assert sum(full.mask) == len(full.tokens) - 1 - 3 * ids[3]
    with pytest.raises(DataError, match=r"train\.jsonl:1: .*no vision tower"):
        encode(read_jsonl(f), vtok)
    # a cut inside the third image drops that image (and cuts before its <start_of_image>)
    start3 = [i for i, t in enumerate(ex.tokens) if t == ids[0]][2]
    b = Batches([ex], 1, start3 + 5, warn=lambda *a: None)
    x, _, _, imgs = b.batch(0)
    assert imgs == [tuple(ex.images[:2])] and x.shape[1] == start3 - 1  # tokens[:start3], less one
    assert (x == ids[2]).sum() == 2 * ids[3]


# ------------------------------------------------------------------------------------------------- batches

def synthetic(lengths, seed=0, prompt=0):
    r = np.random.default_rng(seed)
    out = []
    for n in lengths:
        t = [2] + [int(v) for v in r.integers(3, 200, n - 1)]
        out.append(Example(t, [False] + [i >= prompt for i in range(1, n)]))
    return out


def test_batch_layout_and_purity():
    exs = synthetic([5, 9, 3, 12, 7, 7, 4, 10, 6, 8], seed=1)
    b = Batches(exs, 3, 64, seed=7, pad_id=0)
    assert len(b) == 4  # 10 examples: 3 full batches + the 3 longest
    x, y, w, imgs = b.batch(0)
    assert x.dtype == np.int32 and y.dtype == np.int32 and w.dtype == np.float32 and x.shape == y.shape == w.shape
    assert imgs == [(), (), ()]
    for r in range(3):
        n = int(w[r].sum())
        ex = next(e for e in exs if len(e.tokens) == n + 1 and e.tokens[1:n + 1] == y[r, :n].tolist())
        assert x[r, :n].tolist() == ex.tokens[:-1] and (x[r, n:] == 0).all() and (w[r, n:] == 0).all()
    assert x.shape[1] == max(int(r.sum()) for r in w)  # L = the longest row
    again, fresh = b.batch(0), Batches(exs, 3, 64, seed=7).batch(0)
    for a, c, d in zip(again[:3], fresh[:3], (x, y, w)):
        np.testing.assert_array_equal(a, d)
        np.testing.assert_array_equal(c, d)
    # steps run on across epochs; each epoch is a permutation of the same batches, in a new order
    firsts = [[tuple(b.batch(e * len(b) + k)[0][0].tolist()) for k in range(len(b))] for e in range(6)]
    assert all(sorted(f) == sorted(firsts[0]) for f in firsts)
    assert len({tuple(f) for f in firsts}) > 1
    np.testing.assert_array_equal(Batches(exs, 3, 64, seed=7).batch(9)[0], b.batch(9)[0])
    assert Batches(exs, 3, 64, seed=7).tokens_in(5) == int(b.batch(5)[2].sum())
    # every example is in every epoch
    seen = {tuple(r[r != 0].tolist()) for k in range(len(b)) for r in b.batch(k)[0]}
    assert seen == {tuple(e.tokens[:-1]) for e in exs}


def test_bucketing_pads_less_than_a_shuffle():
    r = np.random.default_rng(0)
    lengths = [int(v) for v in r.integers(4, 200, 64)]
    b = Batches(synthetic(lengths), 8, 512)
    pad = sum(int((b.batch(k)[2] == 0).sum()) for k in range(len(b)))
    perm, naive = r.permutation(64), 0
    for k in range(8):
        ls = [lengths[i] - 1 for i in perm[k * 8:(k + 1) * 8]]
        naive += sum(max(ls) - v for v in ls)
    assert pad < naive / 4, (pad, naive)


def test_rank_slices_make_the_global_batch():
    exs = synthetic([int(v) for v in np.random.default_rng(3).integers(3, 40, 20)], seed=3)
    one = Batches(exs, 4, 64, seed=5)
    r0, r1 = (Batches(exs, 4, 64, seed=5, rank=r, world=2) for r in (0, 1))
    assert len(one) == len(r0) == len(r1)
    for k in range(len(one) + 2):
        g, a, c = one.batch(k), r0.batch(k), r1.batch(k)
        assert a[0].shape == c[0].shape == (2, g[0].shape[1])
        for i in range(3):
            np.testing.assert_array_equal(g[i][0::2], a[i])
            np.testing.assert_array_equal(g[i][1::2], c[i])
        assert r0.tokens_in(k) == one.tokens_in(k) == int(g[2].sum())
    with pytest.raises(DataError, match="not divisible"):
        Batches(exs, 3, 64, world=2)


def test_pack_rows_full_length():
    lengths = [int(v) for v in np.random.default_rng(4).integers(3, 30, 40)]
    exs = synthetic(lengths, seed=4)
    b = Batches(exs, 2, 64, pack=True, seed=1)
    total = sum(sum(e.mask[1:]) for e in exs)
    assert sum(len(r) for r in b.rows) == len(exs)
    assert all(sum(lengths[i] for i in r) <= 64 for r in b.rows)  # no example straddles two rows
    filled = []
    for k in range(len(b)):
        x, y, w, _ = b.batch(k)
        assert x.shape == (2, 63)
        filled += [int((r != 0).sum()) for r in x]
    assert np.mean(filled) > 0.75 * 63
    if len(b.rows) % 2 == 0:
        assert sum(b.tokens_in(k) for k in range(len(b))) == total
    # rows are reshuffled between epochs, the packing itself stays
    e0 = [b.batch(k)[0].tolist() for k in range(len(b))]
    e1 = [b.batch(len(b) + k)[0].tolist() for k in range(len(b))]
    assert e0 != e1
    assert {str(r) for x in e0 for r in x} == {str(r) for x in e1 for r in x}  # the same rows
    assert len({str(r) for x in e0 for r in x}) == len(b.rows)
    for bs in (3, 5, 7):  # a last batch completed to full size when the rows do not divide
        p = Batches(exs, bs, 64, pack=True, seed=1)
        assert len(p) == -(-len(p.rows) // bs)
        assert all(p.batch(k)[0].shape == (bs, 63) for k in range(len(p)))


def test_long_sequences_cut_and_dropped_with_one_warning(tok):
    recs = [{"text": "short"}, {"text": "a much longer text than the limit"},
            {"prompt": "a very long prompt indeed, longer than the limit", "completion": "x"},
            {"text": "also short"}]
    exs = encode(recs[:2] + recs[3:], tok) + encode(recs[2:3], tok)
    msgs = []
    b = Batches(exs, 2, 12, warn=msgs.append)
    assert len(msgs) == 1
    longest = max(len(e.tokens) for e in exs)
    assert "2 of 4 sequences" in msgs[0] and f"longest has {longest} tokens" in msgs[0]
    assert "1 example(s) with no target token left dropped" in msgs[0]
    assert len(b.examples) == 3 and max(len(e.tokens) for e in b.examples) == 12
    cut = next(e for e in b.examples if len(e.tokens) == 12)
    assert cut.tokens == exs[1].tokens[:12]
    assert max(b.batch(k)[0].shape[1] for k in range(len(b))) == 11
    quiet = []
    Batches(exs[:1] + exs[2:3], 2, 64, warn=quiet.append)
    assert quiet == []


def test_fingerprint_follows_tokens_masks_order_and_images(tok):
    recs = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    base = fingerprint(encode(recs, tok))
    assert fingerprint(encode([dict(r) for r in recs], tok)) == base
    assert fingerprint(encode(recs[::-1], tok)) != base
    assert fingerprint(encode(recs, tok, mask_prompt=False)) != base  # same tokens, other targets
    assert fingerprint(encode([recs[0], {"prompt": "c", "completion": "e"}], tok)) != base
    ex = synthetic([5, 6])
    with_image = [Example(ex[0].tokens, ex[0].mask, ["a.png"]), ex[1]]
    assert len({fingerprint(ex), fingerprint(with_image),
                fingerprint([Example(ex[0].tokens, ex[0].mask, ["b.png"]), ex[1]])}) == 3
    assert Batches(ex, 1, 16, warn=lambda *a: None).fingerprint == fingerprint(ex)


def test_batches_errors():
    with pytest.raises(DataError, match="no examples"):
        Batches([], 2, 16)
    with pytest.raises(DataError, match="fewer than the batch size 4"):
        Batches(synthetic([5, 6, 7]), 4, 16)
    with pytest.raises(DataError, match="no examples left"):
        Batches(synthetic([10], prompt=10), 1, 16, warn=lambda *a: None)
