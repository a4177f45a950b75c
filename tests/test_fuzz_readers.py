"""Readers under attack: a short seeded run of scripts/fuzz_readers.py, the harness's own checks, and each bug the
fuzzer found as a small crafted file.

The full campaign (>= 10,000 cases) is `nice -n 10 python scripts/fuzz_readers.py --cases 12000 --seed 0`; its
summary is in scripts/fuzz_results.md.
"""

import importlib.util
import json
import shutil
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from gguf_factory import write_tiny_gguf
from mlx_gemma_qat.cli import main
from mlx_gemma_qat.convert import IncompleteModelError, convert
from mlx_gemma_qat.convert.from_gguf import GGUFError
from mlx_gemma_qat.convert.from_hf import HFError
from mlx_gemma_qat.convert.from_mmproj import MmprojError
from mlx_gemma_qat.convert.safetensors_check import SafetensorsError, read_header
from mlx_gemma_qat.convert.tokenizer import TokenizerError, derive_merges, tokenizer_from_gguf
from mlx_gemma_qat.inspect import inspect_path
from mlx_gemma_qat.model.load import ModelLoadError, load_model

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures"
TINY = FIX / "tiny_gemma3"
MMPROJ = FIX / "tiny_gemma3_vlm_gguf" / "mmproj-f32.gguf"
QT = gguf.GGMLQuantizationType


def _fuzzer():
    spec = importlib.util.spec_from_file_location("fuzz_readers", ROOT / "scripts" / "fuzz_readers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


fz = _fuzzer()


# ------------------------------------------------------------------ the seeded run and the harness


def test_short_seeded_campaign_has_no_failure(capsys):
    """Every mutated file loads correctly or fails with one of our errors naming it; no crash, hang, huge
    allocation, foreign exception or leftover at OUT."""
    rc = fz.main(["--cases", "300", "--seed", "11", "--workers", "2", "--quick", "--time-limit", "60"])
    out = capsys.readouterr().out
    assert "| **total** | 300 |" in out, out
    assert "FAILURES: 0" in out and rc == 0, out
    for reader in ("gguf-tiny", "gguf-real", "mmproj", "safetensors-hf", "safetensors-mlx"):
        assert f"| **{reader}** |" in out, out


def test_harness_reports_crash_hang_and_huge_allocation(capsys):
    """A worker that dies is detected and its case re-run alone; a case stuck where no alarm reaches it is killed;
    an allocation past the address-space cap fails (where the OS enforces the cap: Linux); the others still run."""
    sabotage = "crash:0,hang:1" + (",alloc:2" if fz.CAPS_ADDRESS_SPACE else "")
    rc = fz.main(["--cases", "4", "--seed", "0", "--workers", "1", "--time-limit", "2", "--grace", "2",
                  "--mem-gb", "1", "--_sabotage", sabotage])
    out = capsys.readouterr().out
    assert rc == 1 and f"FAILURES: {2 + fz.CAPS_ADDRESS_SPACE}" in out, out
    assert "case 0 (" in out and "worker crashed (exit -6)" in out and "crashes again alone" in out, out
    assert "case 1 (" in out and "hang (killed); hangs again alone" in out, out
    if fz.CAPS_ADDRESS_SPACE:
        assert "case 2 (" in out and "MemoryError" in out, out
    assert "| **total** | 4 |" in out, out


# ------------------------------------------------------------------ crafted GGUFs


def _convert_cli(src, out, *extra):
    return CliRunner().invoke(main, ["convert", str(src), "-o", str(out), "--quiet", *extra])


def _assert_clean_failure(result, out, src, *words):
    assert result.exit_code == 1, result.output
    msg = result.output.strip()
    assert msg.startswith("Error: ") and len(msg.splitlines()) == 1, msg
    assert src.name in msg, msg
    for w in words:
        assert w.lower() in msg.lower(), msg
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.fixture(scope="module")
def tiny_gguf_bytes(tmp_path_factory):
    p = tmp_path_factory.mktemp("seed") / "tiny.gguf"
    write_tiny_gguf(p)
    return p.read_bytes()


def _patched(data: bytes, kind: str, value: int, which: int = 0) -> bytearray:
    """``data`` with the ``which``-th header field of ``kind`` (see fuzz_readers.gguf_fields) set to ``value``."""
    fields, _ = fz.gguf_fields(data)
    off, width, _ = [f for f in fields if f[2] == kind][which]
    b = bytearray(data)
    struct.pack_into("<" + fz._FMT[width], b, off, value)
    return b


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _key_value_offset(path: Path, key: str) -> int:
    """Where the (scalar) value of ``key`` starts in the file."""
    f = gguf.GGUFReader(str(path)).fields[key]
    return f.offset + 8 + len(key.encode()) + 4


@pytest.mark.parametrize("kind,value,which,words", [
    # absurd counts: gguf-py would loop over them (one object per element) until the file ends, or run out of memory
    ("n_tensors", 2**63, 0, "tensors cannot fit"),
    ("n_kv", 2**64 - 1, 0, "metadata keys cannot fit"),
    ("array-len", 2**62, 0, "elements of"),  # the vocabulary's length
    ("str-len", 2**63, 0, "needs"),
    ("key-len", 2**40, 3, "needs"),
    ("value-type", 13, 2, "unknown value type 13"),
    ("array-type", 9, 0, "array of arrays"),
    ("array-type", 77, 0, "unknown array element type"),
    # tensor infos: gguf-py overflows its element counts, numpy fails on the views, or data past the end is read
    ("n_dims", 0, 0, "0 dims"),
    ("n_dims", 2**32 - 1, 5, "dims (1 to 4"),
    ("dim", 2**40, -1, "runs past the end"),
    ("dim", 0, 3, "zero dim"),
    ("dim", 2**64 - 1, 0, "row length"),
    ("ggml-type", 4, 1, "unknown GGML type id 4"),  # Q4_2, removed from ggml
    ("ggml-type", 2**32 - 1, 0, "unknown GGML type id"),
    ("ggml-type", int(QT.Q4_K), 2, "block size 256"),  # rows of 64 cannot hold 256-element blocks
    ("tensor-offset", 2**63, 4, "runs past the end"),
    ("tensor-name-len", 100, 0, ""),  # the name swallows the fields after it
])
def test_gguf_header_field_is_a_clear_error(tmp_path, tiny_gguf_bytes, kind, value, which, words):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(_patched(tiny_gguf_bytes, kind, value, which))
    _assert_clean_failure(_convert_cli(bad, tmp_path / "out"), tmp_path / "out", bad, words)
    r = CliRunner().invoke(main, ["inspect", str(bad)])
    assert r.exit_code == 1 and r.output.startswith("Error: ") and "bad.gguf" in r.output, r.output
    with pytest.raises(TokenizerError, match="bad.gguf"):
        tokenizer_from_gguf(bad)


def test_gguf_offsets_misaligned_overlapping_past_end(tmp_path, tiny_gguf_bytes):
    fields, _ = fz.gguf_fields(tiny_gguf_bytes)
    offs = [off for off, _, kind in fields if kind == "tensor-offset"]
    first = struct.unpack_from("<Q", tiny_gguf_bytes, offs[1])[0]
    for value, words in ((first + 1, "not a multiple of the alignment"), (0, "overlap")):
        bad = tmp_path / "bad.gguf"
        b = bytearray(tiny_gguf_bytes)
        struct.pack_into("<Q", b, offs[1], value)
        bad.write_bytes(b)
        with pytest.raises(GGUFError, match=words):
            convert(bad, tmp_path / "out", progress=False)
        assert not any(p.name.startswith((".out", "out")) for p in tmp_path.iterdir())


@pytest.mark.parametrize("value,vtype,words", [
    (3, 4, "not a power of two"), (0, 4, "not a power of two"), (2**31, 4, "alignment"),
    (64, 5, "not UINT32"), (64, 8, "not UINT32"),
])
def test_gguf_alignment_is_checked(tmp_path, tiny_gguf_bytes, value, vtype, words):
    b = bytearray(tiny_gguf_bytes)
    fz.insert_alignment(b, value, vtype)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b)
    with pytest.raises(GGUFError, match=words):
        convert(bad, tmp_path / "out", progress=False)


def test_gguf_valid_alignment_still_loads(tmp_path, tiny_gguf_bytes):
    b = bytearray(tiny_gguf_bytes)
    fz.insert_alignment(b, 32)  # explicit, as llama.cpp's default
    (tmp_path / "a.gguf").write_bytes(b)
    model = load_model(convert(tmp_path / "a.gguf", tmp_path / "out", progress=False))
    assert model.cfg.num_hidden_layers == 8


def test_gguf_key_not_utf8_or_duplicate(tmp_path, tiny_gguf_bytes):
    # was: gguf-py's UnicodeDecodeError (masked by a BufferError from the header walk's memory view)
    fields, _ = fz.gguf_fields(tiny_gguf_bytes)
    off = [f for f in fields if f[2] == "key-len"][1][0]
    b = bytearray(tiny_gguf_bytes)
    b[off + 8] = 0xFF
    (tmp_path / "bad.gguf").write_bytes(b)
    with pytest.raises(GGUFError, match="not UTF-8"):
        convert(tmp_path / "bad.gguf", tmp_path / "out", progress=False)
    b = bytearray(tiny_gguf_bytes)  # a key twice (gguf-py: KeyError)
    fz.insert_alignment(b, 32)
    fz.insert_alignment(b, 32)
    (tmp_path / "dup.gguf").write_bytes(b)
    with pytest.raises(GGUFError, match="duplicate key 'general.alignment'"):
        convert(tmp_path / "dup.gguf", tmp_path / "out", progress=False)


@pytest.mark.parametrize("key,value,fmt,words", [
    ("gemma3.block_count", 2**32 - 1, "<I", "out of range"),  # was: a 4-billion-entry list of layer types
    ("gemma3.block_count", 7, "<I", "block_count is 7 but the tensors are for 8 blocks"),
    ("gemma3.attention.head_count", 0, "<I", "out of range"),  # was: ZeroDivisionError
    ("gemma3.attention.head_count_kv", 0, "<I", "out of range"),  # was: ZeroDivisionError
    ("gemma3.attention.head_count_kv", 3, "<I", "not a multiple"),
    ("gemma3.embedding_length", 65, "<I", "has shape"),  # every tensor shape is checked against the metadata
    ("gemma3.feed_forward_length", 2**31, "<I", "out of range"),
    ("gemma3.attention.layer_norm_rms_epsilon", float("nan"), "<f", "not a finite number"),
    ("gemma3.context_length", 0, "<I", "out of range"),
])
def test_gguf_config_values_are_checked(tmp_path, key, value, fmt, words):
    src = tmp_path / "t.gguf"
    write_tiny_gguf(src)
    off = _key_value_offset(src, key)
    b = bytearray(src.read_bytes())
    struct.pack_into(fmt, b, off, value)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b)
    _assert_clean_failure(_convert_cli(bad, tmp_path / "out"), tmp_path / "out", bad, words)
    r = CliRunner().invoke(main, ["inspect", str(bad)])
    assert r.exit_code == 1 and "bad.gguf" in r.output and words.split()[0] in r.output, r.output


def test_gguf_metadata_of_the_wrong_type(tmp_path):
    src = tmp_path / "t.gguf"
    write_tiny_gguf(src)
    for key, words, error in (("gemma3.block_count", "has type FLOAT32, expected int", GGUFError),
                              ("tokenizer.ggml.bos_token_id", "bos_token_id has GGUF type 6", TokenizerError)):
        off = _key_value_offset(src, key)
        b = bytearray(src.read_bytes())
        struct.pack_into("<I", b, off - 4, 6)  # a float32 of the same size where an integer belongs
        bad = tmp_path / "bad.gguf"
        bad.write_bytes(b)
        with pytest.raises(error, match=words):
            convert(bad, tmp_path / "out", progress=False)
        if error is TokenizerError:
            with pytest.raises(TokenizerError, match="bad.gguf.*" + words):
                tokenizer_from_gguf(bad)


def test_gguf_quantized_norm_error_names_the_file(tmp_path, tiny_gguf_bytes):
    # found by the fuzzer: a norm's type id rewritten to Q8_0 (fewer bytes, still inside the file); the message
    # named the tensor only
    names = [t.name for t in gguf.GGUFReader(str(_write(tmp_path / "t.gguf", tiny_gguf_bytes))).tensors]
    (tmp_path / "qn.gguf").write_bytes(_patched(tiny_gguf_bytes, "ggml-type", int(QT.Q8_0),
                                                names.index("blk.1.attn_norm.weight")))
    _assert_clean_failure(_convert_cli(tmp_path / "qn.gguf", tmp_path / "out"), tmp_path / "out",
                          tmp_path / "qn.gguf", "quantized norm")


def test_gguf_with_a_tensor_of_another_shape_is_a_clear_error(tmp_path):
    write_tiny_gguf(tmp_path / "t.gguf")
    data = bytearray((tmp_path / "t.gguf").read_bytes())
    fields, _ = fz.gguf_fields(bytes(data))
    off = [f for f in fields if f[2] == "dim"][-1][0]  # the last tensor's last dimension
    struct.pack_into("<Q", data, off, 2**40)
    (tmp_path / "bad.gguf").write_bytes(bytes(data))
    with pytest.raises(GGUFError, match="bad.gguf"):
        convert(tmp_path / "bad.gguf", tmp_path / "out", progress=False)
    assert not any(p.name.startswith((".out", "out")) for p in tmp_path.iterdir())


def test_long_vocabulary_pieces_are_refused_before_allocating():
    # derive_merges holds (pieces x longest piece) cells: one 300-character piece in 300k would ask for ~1 GB
    with pytest.raises(TokenizerError, match="too large to derive merges"):
        derive_merges(["a"] * 300_000 + ["x" * 300], np.zeros(300_001))
    assert derive_merges(["a", "b", "ab"], [0.0, 0.0, 1.0]) == [("a", "b")]


# ------------------------------------------------------------------ crafted mmproj GGUFs


@pytest.fixture(scope="module")
def vlm_text_gguf(tmp_path_factory):
    p = tmp_path_factory.mktemp("vlm") / "text.gguf"
    write_tiny_gguf(p, source=FIX / "tiny_gemma3_vlm")
    return p


@pytest.mark.parametrize("key,value,words", [
    ("clip.vision.attention.head_count", 3, "not a multiple"),  # found by the fuzzer: ZeroDivisionError
    ("clip.vision.attention.head_count", 64, "not a multiple"),
    ("clip.vision.block_count", 2**31 - 1, "out of range"),  # was: a set of 2**35 tensor names
    ("clip.vision.patch_size", 0, "out of range"),
])
def test_mmproj_config_values_are_checked(tmp_path, vlm_text_gguf, key, value, words):
    off = _key_value_offset(MMPROJ, key)
    b = bytearray(MMPROJ.read_bytes())
    struct.pack_into("<I", b, off, value)
    bad = tmp_path / "mm.gguf"
    bad.write_bytes(b)
    with pytest.raises(MmprojError, match=f"mm.gguf.*{words}"):
        convert(vlm_text_gguf, tmp_path / "out", mmproj=bad, progress=False)
    assert not any(p.name.startswith((".out", "out")) for p in tmp_path.iterdir())


def test_mmproj_tensor_shape_names_the_mmproj(tmp_path, vlm_text_gguf):
    # found by the fuzzer: a soft-embedding norm of 31 elements was caught only by the writer, naming the text GGUF
    data = MMPROJ.read_bytes()
    fields, _ = fz.gguf_fields(data)
    f = gguf.GGUFReader(str(MMPROJ))
    i = [t.name for t in f.tensors].index("mm.soft_emb_norm.weight")
    off = [x for x in fields if x[2] == "n_dims"][i][0] + 4  # its first dim
    b = bytearray(data)
    struct.pack_into("<Q", b, off, 31)
    (tmp_path / "mm.gguf").write_bytes(b)
    with pytest.raises(MmprojError, match=r"mm\.gguf: mm.soft_emb_norm.weight: shape \(31,\)"):
        convert(vlm_text_gguf, tmp_path / "out", mmproj=tmp_path / "mm.gguf", progress=False)


# ------------------------------------------------------------------ crafted safetensors


def _rewrite_header(src: Path, dst: Path, edit=None, text=None) -> None:
    data = src.read_bytes()
    (n,) = struct.unpack_from("<Q", data, 0)
    if text is None:
        header = json.loads(data[8 : 8 + n])
        edit(header)
        text = json.dumps(header)
    raw = text.encode()
    dst.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


@pytest.fixture
def mlx_folder(tmp_path):
    write_tiny_gguf(tmp_path / "t.gguf")
    return convert(tmp_path / "t.gguf", tmp_path / "m", progress=False)


def _shard(folder: Path) -> Path:
    return next(folder.glob("*.safetensors"))


@pytest.mark.parametrize("edit,needle", [
    (lambda h: h["model.norm.weight"].update(data_offsets=[0, 2**40]), "outside"),  # MLX: RuntimeError
    (lambda h: h["model.norm.weight"].update(data_offsets=[h["model.norm.weight"]["data_offsets"][0] - 1,
                                                           h["model.norm.weight"]["data_offsets"][1]]), "bytes for shape"),
    (lambda h: h["model.norm.weight"].update(dtype="f32"), "unknown dtype"),  # was a KeyError in inspect
    (lambda h: h.__setitem__("model.norm.weight", {"dtype": "F32"}), "entry is not"),  # was KeyError: 'shape'
    (lambda h: h["model.norm.weight"].update(shape=[-1]), "bad shape"),
    (lambda h: h["model.norm.weight"].update(shape=[2**64]), "bad shape"),
    (lambda h: h["model.norm.weight"].update(data_offsets=[-8, 248]), "bad data_offsets"),
    (lambda h: h.__setitem__("__metadata__", {"format": 5}), "__metadata__"),  # MLX: json type_error
])
def test_corrupt_mlx_shard_is_a_clear_error(mlx_folder, edit, needle):
    shard = _shard(mlx_folder)
    _rewrite_header(shard, shard, edit)
    with pytest.raises(ModelLoadError, match=needle):
        load_model(mlx_folder)
    with pytest.raises(SafetensorsError, match=needle):
        inspect_path(mlx_folder)


def test_safetensors_duplicate_names_and_huge_numbers(tmp_path, mlx_folder):
    shard = _shard(mlx_folder)
    h = json.loads(shard.read_bytes()[8 : 8 + struct.unpack_from("<Q", shard.read_bytes())[0]])
    entry = json.dumps({"model.norm.weight": h["model.norm.weight"]})[1:-1]
    # was: silently the last of the two entries
    _rewrite_header(shard, tmp_path / "dup.safetensors", text="{" + entry + "," + json.dumps(h)[1:])
    with pytest.raises(SafetensorsError, match="names 'model.norm.weight' twice"):
        read_header(tmp_path / "dup.safetensors")
    # was: json's own ValueError (integers of more than 4300 digits), not a JSONDecodeError
    _rewrite_header(shard, tmp_path / "big.safetensors", text='{"a": {"dtype": "F32", "shape": [' + "9" * 5000 +
                    '], "data_offsets": [0, 4]}}')
    with pytest.raises(SafetensorsError, match="not JSON"):
        read_header(tmp_path / "big.safetensors")


def test_quantized_weight_stored_as_float_or_odd_dtype(mlx_folder):
    shard = _shard(mlx_folder)
    h0 = json.loads(shard.read_bytes()[8 : 8 + struct.unpack_from("<Q", shard.read_bytes())[0]])
    packed = next(k for k, v in h0.items() if k.endswith(".weight") and v.get("dtype") == "U32")

    def as_f32(h):  # same size, another dtype: found by the fuzzer (quantized_matmul's ValueError at run time)
        h[packed]["dtype"] = "F32"

    _rewrite_header(shard, shard, as_f32)
    with pytest.raises(ModelLoadError, match="quantized, but stored as"):
        load_model(mlx_folder)

    def as_u16(h):  # found by the fuzzer: inspect's KeyError 'U16'
        h[packed]["dtype"] = "U16"
        h[packed]["shape"][-1] *= 2

    _rewrite_header(shard, shard, lambda h: (h.clear(), h.update(h0), as_u16(h)))
    with pytest.raises(ModelLoadError, match="has dtype uint16, not one an MLX model folder holds"):
        load_model(mlx_folder)
    with pytest.raises(SafetensorsError, match="dtype U16"):
        inspect_path(mlx_folder)


def test_overlapping_tensors_and_absurd_header_length(tmp_path, mlx_folder):
    shard = _shard(mlx_folder)
    bad = tmp_path / "overlap.safetensors"

    def overlap(h):
        a = h["model.norm.weight"]["data_offsets"]
        other = next(k for k in h if k not in ("__metadata__", "model.norm.weight") and h[k]["dtype"] == "F32"
                     and h[k]["shape"] == h["model.norm.weight"]["shape"])
        h[other]["data_offsets"] = list(a)

    _rewrite_header(shard, bad, overlap)
    with pytest.raises(SafetensorsError, match="overlap"):
        read_header(bad)
    data = bytearray(shard.read_bytes())
    struct.pack_into("<Q", data, 0, 2**63)
    bad.write_bytes(bytes(data))
    with pytest.raises(SafetensorsError, match="runs past the end"):
        read_header(bad)
    bad.write_bytes(bytes(data[:5]))
    with pytest.raises(SafetensorsError, match="shorter than"):
        read_header(bad)


def test_hf_folder_with_a_corrupt_shard_or_a_missing_tensor_leaves_nothing(tmp_path):
    src = tmp_path / "hf"
    shutil.copytree(TINY, src)
    _rewrite_header(TINY / "model.safetensors", src / "model.safetensors",
                    lambda h: h["model.norm.weight"].update(data_offsets=[0, 2**40]))
    _assert_clean_failure(_convert_cli(src, tmp_path / "out"), tmp_path / "out", src, "outside")

    def drop(h):  # a whole tensor gone, the rest consistent: the converter must notice
        del h["model.layers.1.mlp.up_proj.weight"]

    _rewrite_header(TINY / "model.safetensors", src / "model.safetensors", drop)
    with pytest.raises(IncompleteModelError, match="lacks tensors for this model: model.layers.1.mlp.up_proj.weight"):
        convert(src, tmp_path / "out", progress=False)
    assert not any(p.name.startswith((".out", "out")) for p in tmp_path.iterdir())


def test_hf_tensor_of_another_shape_is_refused_before_quantizing(tmp_path):
    src = tmp_path / "hf"
    shutil.copytree(TINY, src)
    name = "model.layers.0.mlp.up_proj.weight"

    def flat(h):  # the same bytes as one row: the Q4_0 grid would have quantized it as such
        h[name]["shape"] = [h[name]["shape"][0] * h[name]["shape"][1] // 2, 2]

    _rewrite_header(TINY / "model.safetensors", src / "model.safetensors", flat)
    with pytest.raises(HFError, match=f"{name} has shape"):
        convert(src, tmp_path / "out", progress=False)

    def transposed(h):
        h[name]["shape"] = h[name]["shape"][::-1]

    _rewrite_header(TINY / "model.safetensors", src / "model.safetensors", transposed)
    with pytest.raises(IncompleteModelError, match=f"{name} has shape"):
        convert(src, tmp_path / "out", progress=False)
    assert not any(p.name.startswith((".out", "out")) for p in tmp_path.iterdir())
