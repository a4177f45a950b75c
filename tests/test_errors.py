"""Bad input: one clear error line, a non-zero exit code, and nothing left at the output path."""

import json
import shutil

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from gguf_factory import TINY, write_tiny_gguf
from mlx_gemma_qat.cli import main

QT = gguf.GGMLQuantizationType


def _convert(src, out, *extra):
    return CliRunner().invoke(main, ["convert", str(src), "-o", str(out), "--quiet", *extra])


def _assert_clean_failure(result, out, *words):
    assert result.exit_code != 0
    msg = result.output.strip()
    assert msg.startswith("Error: "), msg
    assert len(msg.splitlines()) == 1, msg
    for w in words:
        assert w in msg.lower(), msg
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no partial folder


@pytest.fixture
def tiny_gguf(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf")
    return tmp_path / "tiny.gguf"


@pytest.mark.parametrize("keep", [0.3, 0.9999])
def test_truncated_gguf(tmp_path, tiny_gguf, keep):
    data = tiny_gguf.read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[: int(len(data) * keep)])
    _assert_clean_failure(_convert(bad, tmp_path / "out"), tmp_path / "out", "truncated")


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + np.random.default_rng(0).bytes(5000))
    _assert_clean_failure(_convert(bad, tmp_path / "out"), tmp_path / "out", "gguf")
    (tmp_path / "x.bin").write_bytes(b"hello")
    _assert_clean_failure(_convert(tmp_path / "x.bin", tmp_path / "out"), tmp_path / "out")


def test_non_gemma_architecture(tmp_path):
    write_tiny_gguf(tmp_path / "llama.gguf", arch="llama")
    _assert_clean_failure(_convert(tmp_path / "llama.gguf", tmp_path / "out"), tmp_path / "out", "llama", "gemma 3")


def test_unknown_block_type(tmp_path):
    # IQ4_NL has no MLX affine form: refuse it, naming the tensor, after writing nothing
    write_tiny_gguf(tmp_path / "iq.gguf", override={"blk.3.ffn_up.weight": QT.IQ4_NL})
    _assert_clean_failure(_convert(tmp_path / "iq.gguf", tmp_path / "out"), tmp_path / "out", "iq4_nl", "blk.3.ffn_up")


def test_folder_without_weights(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    shutil.copy(TINY / "config.json", folder)
    _assert_clean_failure(_convert(folder, tmp_path / "out"), tmp_path / "out", "safetensors")
    (folder / "config.json").unlink()
    _assert_clean_failure(_convert(folder, tmp_path / "out"), tmp_path / "out", "config.json")


def test_missing_source(tmp_path):
    _assert_clean_failure(_convert(tmp_path / "nope.gguf", tmp_path / "out"), tmp_path / "out", "no such")


def test_existing_output_needs_force(tmp_path, tiny_gguf):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = _convert(tiny_gguf, out)
    assert r.exit_code != 0 and "exists" in r.output and (out / "keep.txt").exists()
    assert _convert(tiny_gguf, out, "--force").exit_code == 0
    assert (out / "config.json").exists() and not (out / "keep.txt").exists()


def test_failure_midway_leaves_nothing(tmp_path, tiny_gguf, monkeypatch):
    """A conversion interrupted after some shards/tensors were written leaves no trace at OUT."""
    from mlx_gemma_qat.convert import writer

    calls = {"n": 0}
    real = writer.tensor_arrays

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(writer, "tensor_arrays", flaky)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        from mlx_gemma_qat.convert import convert

        convert(tiny_gguf, out, progress=False)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["tiny.gguf"]


def test_prompt_longer_than_context(tmp_path, tiny_gguf):
    from mlx_gemma_qat.convert import convert

    model = convert(tiny_gguf, tmp_path / "m", progress=False)
    ctx = json.loads((model / "config.json").read_text())["max_position_embeddings"]
    r = CliRunner().invoke(main, ["generate", "--model", str(model), "--raw", "--prompt", "a " * (ctx + 10)])
    assert r.exit_code != 0
    assert r.output.strip().splitlines()[-1].startswith("Error: prompt is") and "context is 256" in r.output


def test_generate_on_tiny_gguf_streams_and_reports(tmp_path, tiny_gguf):
    r = CliRunner().invoke(main, ["generate", "--model", str(tiny_gguf), "--raw", "--prompt", "abc", "-n", "8"],
                           env={"MLX_GEMMA_CACHE": str(tmp_path / "cache")})
    assert r.exit_code == 0, r.output
    assert "Generation: 8 tokens" in r.output and "Peak memory" in r.output
    assert [p.name.startswith(".") for p in (tmp_path / "cache").iterdir()].count(False) == 1  # converted once
