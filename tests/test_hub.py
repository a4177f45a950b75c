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


@pytest.mark.parametrize("status", [401, 403])
def test_a_gated_repo_says_to_accept_the_licence_and_log_in(tmp_path, monkeypatch, status):
    """The hub's answers to a gated repo without an accepted licence (401 with X-Error-Code GatedRepo, or 403),
    through huggingface_hub's own client, are one line saying what to do."""
    from fake_hub_server import FakeHub, serve

    hub = FakeHub(REPO, {}, refuse=status)
    serve(monkeypatch, hub, tmp_path / "hub")
    try:
        r = CliRunner().invoke(main, ["generate", "-m", REPO, "--prompt", "x", "-n", "1"])
    finally:
        hub.close()
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert r.output == (f"Error: {REPO} is gated: accept its licence on https://huggingface.co/{REPO} and log in "
                        "(hf auth login, or set HF_TOKEN)\n")
    assert hub.requests and not list((tmp_path / "hub").rglob("*.gguf"))


def test_pull_downloads_with_progress_and_resumes_a_dropped_connection(text_gguf, tmp_path, monkeypatch):
    """`pull` from the hub (a local stand-in speaking its HTTP API): the model GGUF's connection drops halfway,
    huggingface_hub asks for the rest (a Range request from where it stopped) and the file arrives whole; its
    progress bar shows; the model converted from it generates what the file itself does."""
    from fake_hub_server import FakeHub, serve

    monkeypatch.setenv("MLX_GEMMA_CACHE", str(tmp_path / "cache"))
    files = {MODEL_FILE: text_gguf.read_bytes(), "mmproj-model-f16.gguf": MMPROJ.read_bytes(), "README.md": b"#\n"}
    hub = FakeHub(REPO, files, drop=MODEL_FILE)
    serve(monkeypatch, hub, tmp_path / "hub")
    try:
        r = CliRunner().invoke(main, ["pull", REPO])
    finally:
        hub.close()
    assert r.exit_code == 0, r.output
    gets = [rng for method, path, rng in hub.requests if method == "GET" and path.endswith("/" + MODEL_FILE)]
    assert len(gets) == 2 and gets[0] is None and 0 < int(gets[1].removeprefix("bytes=").rstrip("-")) < len(
        files[MODEL_FILE]), hub.requests
    assert not any(path.endswith("README.md") for _, path, _ in hub.requests)  # only the GGUFs are fetched
    assert MODEL_FILE in r.output and "100%" in r.output  # huggingface_hub's progress bar
    snap = next((tmp_path / "hub").glob("models--*/snapshots/*"))
    assert (snap / MODEL_FILE).read_bytes() == files[MODEL_FILE]
    assert not list((tmp_path / "hub").rglob("*.incomplete"))
    resolve_model(text_gguf, mmproj=MMPROJ, progress=False)
    assert _generate("-m", REPO) == _generate("-m", str(text_gguf), "--mmproj", str(MMPROJ))  # from the cache


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
