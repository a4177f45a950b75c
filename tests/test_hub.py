"""GGUF repos on the Hugging Face hub (Google's QAT distribution: a model GGUF and an mmproj beside it), named by
repo id with an optional ``:FILE``, from an offline hub cache laid out as huggingface_hub writes it."""

from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import generated_text

from gguf_factory import write_tiny_gguf
from mlx_gemma_qat.cli import main
from mlx_gemma_qat.convert import hub
from mlx_gemma_qat.model.load import load_model
from mlx_gemma_qat.models_cache import resolve_model

FIX = Path(__file__).parent / "fixtures"
MMPROJ = FIX / "tiny_gemma3_vlm_gguf" / "mmproj-f32.gguf"
IMAGE = str(FIX / "images" / "a.png")
REPO = "google/gemma-3-tiny-it-qat-q4_0-gguf"
MODEL_FILE = "gemma-3-tiny-it-q4_0.gguf"


@pytest.fixture
def text_gguf(tmp_path):
    """The tiny vision checkpoint's text part as a GGUF (its mmproj is the committed fixture)."""
    path = tmp_path / "src" / MODEL_FILE
    path.parent.mkdir()
    f32 = gguf.GGMLQuantizationType.F32
    write_tiny_gguf(path, f32, f32, source=FIX / "tiny_gemma3_vlm")
    return path


@pytest.fixture
def qat_repo(fake_hub, text_gguf, tmp_path, monkeypatch):
    """A GGUF repo in the hub cache as Google's are laid out: the model GGUF, its mmproj, a README."""
    monkeypatch.setenv("MLX_GEMMA_CACHE", str(tmp_path / "cache"))
    snap = fake_hub(REPO)
    (snap / MODEL_FILE).write_bytes(text_gguf.read_bytes())
    (snap / "mmproj-model-f16.gguf").write_bytes(MMPROJ.read_bytes())
    (snap / "README.md").write_text("# Gemma 3 tiny QAT\n")
    return snap


def _generate(*args):
    return generated_text(CliRunner().invoke(main, ["generate", *args, "--image", IMAGE, "--prompt", "What?", "-n",
                                                    "6", "--raw"]))


def test_a_gguf_repo_brings_its_mmproj_and_generates_what_the_files_do(qat_repo, text_gguf):
    """``-m REPO``: the one model GGUF and the mmproj beside it, converted together once; the image prompt gives
    the same greedy text as the two files given by path."""
    folder = resolve_model(REPO, progress=False)
    assert folder == resolve_model(REPO, progress=False)  # converted once, then reused
    mine = load_model(folder)
    assert hasattr(mine, "vision_tower")  # the mmproj came along
    by_path = load_model(resolve_model(text_gguf, mmproj=MMPROJ, progress=False))
    x = mx.array([[2, 40, 41, 42]])
    np.testing.assert_array_equal(np.array(mine(x)), np.array(by_path(x)))
    assert _generate("-m", REPO) == _generate("-m", str(text_gguf), "--mmproj", str(MMPROJ))


def test_several_model_ggufs_need_a_file(qat_repo, text_gguf):
    (qat_repo / "gemma-3-tiny-it-q8_0.gguf").write_bytes(text_gguf.read_bytes())
    r = CliRunner().invoke(main, ["generate", "-m", REPO, "--prompt", "x", "-n", "1"])
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert r.output.startswith(f"Error: {REPO} holds 2 model GGUFs; name one as {REPO}:FILE, one of: "
                               f"gemma-3-tiny-it-q4_0.gguf, gemma-3-tiny-it-q8_0.gguf")
    folder = resolve_model(f"{REPO}:gemma-3-tiny-it-q8_0.gguf", progress=False)
    assert hasattr(load_model(folder), "vision_tower")
    r = CliRunner().invoke(main, ["generate", "-m", f"{REPO}:nope.gguf", "--prompt", "x", "-n", "1"])
    assert r.exit_code == 1 and f"Error: {REPO} has no nope.gguf; its GGUF files: " in r.output


def test_a_repo_missing_from_the_offline_cache_is_one_error(fake_hub):
    r = CliRunner().invoke(main, ["generate", "-m", "google/absent-gguf", "--prompt", "x", "-n", "1"])
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert r.output.startswith("Error: google/absent-gguf: not in the Hugging Face cache, and the hub cannot be "
                               "reached")


class _Forbidden(Exception):
    response = type("Response", (), {"status_code": 403})()


@pytest.mark.parametrize("kind", ["gated", "403"])
def test_a_gated_repo_says_to_accept_the_licence_and_log_in(fake_hub, monkeypatch, kind):
    import huggingface_hub.constants as c
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    if kind == "gated":
        error = GatedRepoError.__new__(GatedRepoError)
        Exception.__init__(error, "401 Client Error. Cannot access gated repo")
    else:
        error = _Forbidden("403 Client Error")

    def refuse(self, repo_id, **kw):
        raise error

    monkeypatch.setattr(HfApi, "list_repo_files", refuse)
    r = CliRunner().invoke(main, ["generate", "-m", REPO, "--prompt", "x", "-n", "1"])
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert r.output == (f"Error: {REPO} is gated: accept its licence on https://huggingface.co/{REPO} and log in "
                        "(hf auth login, or set HF_TOKEN)\n")


def test_specs_and_picks():
    assert hub.parse_spec("google/x-gguf") == ("google/x-gguf", None)
    assert hub.parse_spec("google/x-gguf:a.gguf") == ("google/x-gguf", "a.gguf")
    for bad in ("x", "a/b/c", "/abs/path", "./rel/x", "a/", "google/x:"):
        with pytest.raises(hub.HubError, match="no such file or folder"):
            hub.parse_spec(bad)
    files = ["README.md", "gemma-3-4b-it-q4_0.gguf", "mmproj-model-f16-4B.gguf"]
    assert hub.pick_gguf("r", files, None) == ("gemma-3-4b-it-q4_0.gguf", "mmproj-model-f16-4B.gguf")
    assert hub.pick_gguf("r", files[:2], None) == ("gemma-3-4b-it-q4_0.gguf", None)  # 1B: text only
    two = ["m.gguf", "mmproj-BF16.gguf", "mmproj-F16.gguf"]
    assert hub.pick_gguf("r", two, None) == ("m.gguf", "mmproj-F16.gguf")  # llama.cpp's choice among copies
    with pytest.raises(hub.HubError, match="no model GGUF"):
        hub.pick_gguf("r", ["mmproj-F16.gguf"], None)
