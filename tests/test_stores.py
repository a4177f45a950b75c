"""Models from Ollama's store and LM Studio's folders, laid out as each tool writes them: ``-m ollama:NAME[:TAG]``
and ``-m lmstudio:PUBLISHER/REPO[/FILE]`` give what the GGUF files themselves give; every bad case is one
``Error:`` line with exit code 1."""

import hashlib
import json
import re
from pathlib import Path

import gguf
import pytest
from click.testing import CliRunner
from conftest import generated_text

from gguf_factory import write_ollama_gguf, write_tiny_gguf
from mlx_gemma_qat.cli import main
from mlx_gemma_qat.convert import stores
from mlx_gemma_qat.convert.tokenizer import GEMMA3_CHAT_TEMPLATE

FIX = Path(__file__).parent / "fixtures"
MMPROJ = FIX / "tiny_gemma3_vlm_gguf" / "mmproj-f32.gguf"
IMAGE = str(FIX / "images" / "a.png")
F32 = gguf.GGMLQuantizationType.F32


@pytest.fixture
def text_gguf(tmp_path):
    path = tmp_path / "src" / "text.gguf"
    path.parent.mkdir()
    write_tiny_gguf(path, F32, F32, source=FIX / "tiny_gemma3_vlm")
    return path


def _blob(root: Path, data: bytes) -> dict:
    digest = hashlib.sha256(data).hexdigest()
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "blobs" / f"sha256-{digest}").write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def pull(root: Path, name: str, tag: str, layers: dict[str, bytes], registry="registry.ollama.ai/library") -> Path:
    """Write a manifest and its blobs as ``ollama pull`` leaves them."""
    config = _blob(root, b'{"model_format":"gguf","model_family":"gemma3"}')
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                "config": {"mediaType": "application/vnd.docker.container.image.v1+json", **config},
                "layers": [{"mediaType": f"application/vnd.ollama.image.{kind}", **_blob(root, data)}
                           for kind, data in layers.items()]}
    path = root / "manifests" / registry / name / tag
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest))
    return path


@pytest.fixture
def ollama(tmp_path, monkeypatch, text_gguf):
    root = tmp_path / "ollama-models"
    monkeypatch.setenv("OLLAMA_MODELS", str(root))
    monkeypatch.setenv("MLX_GEMMA_CACHE", str(tmp_path / "cache"))
    pull(root, "gemma3", "tiny-it-qat", {"model": text_gguf.read_bytes(), "projector": MMPROJ.read_bytes(),
                                         "template": b"{{ .Prompt }}<start_of_turn>",
                                         "params": b'{"stop":["<end_of_turn>"],"temperature":1,"top_k":64}'})
    pull(root, "gemma3", "latest", {"model": text_gguf.read_bytes()})
    return root


def _generate(model, mmproj=None, image=True, *args):
    """`generate -m MODEL [--mmproj] [--image] ARGS`, converted first (so the CLI's output is the text and stats)."""
    from mlx_gemma_qat.models_cache import resolve_model

    resolve_model(model, mmproj=mmproj, progress=False)
    extra = (["--mmproj", str(mmproj)] if mmproj else []) + (["--image", IMAGE] if image else [])
    return CliRunner().invoke(main, ["generate", "-m", str(model), *extra, "--prompt", "What?", "-n", "6", "--raw",
                                     *args])


def _fails(model, starts):
    """`generate -m MODEL` is one Error line starting so, exit code 1."""
    _error(CliRunner().invoke(main, ["generate", "-m", model, "--prompt", "What?", "-n", "1", "--raw"]), starts)


def _error(r, starts):
    assert r.exit_code == 1 and r.output.count("\n") == 1 and r.output.startswith("Error: " + starts), r.output


def test_ollama_model_with_projector_generates_what_the_files_do(ollama, text_gguf):
    m = stores.ollama_model("gemma3:tiny-it-qat")
    assert m.gguf.read_bytes() == text_gguf.read_bytes() and m.mmproj.read_bytes() == MMPROJ.read_bytes()
    assert m.params == {"stop": ["<end_of_turn>"], "temperature": 1, "top_k": 64} and "<start_of_turn>" in m.template
    want = generated_text(_generate(text_gguf, MMPROJ, True, "--temp", "0"))
    assert generated_text(_generate("ollama:gemma3:tiny-it-qat", None, True, "--temp", "0")) == want
    # the params layer is the model's default sampling: the same draws as giving them, and said once
    sampled = _generate("ollama:gemma3:tiny-it-qat", None, True, "--seed", "3")
    assert sampled.output.count("Note: sampling from the model's defaults (its Ollama params): temperature 1, "
                                "top_k 64, stop ['<end_of_turn>']; the options override them") == 1
    given = _generate(text_gguf, MMPROJ, True, "--seed", "3", "--temp", "1", "--top-k", "64")
    assert generated_text(sampled) == generated_text(given) != want
    assert generated_text(_generate("ollama:gemma3:tiny-it-qat", None, True, "--temp", "0")) == want  # converted
    cached = [p for p in (ollama.parent / "cache").iterdir() if not p.name.startswith(".")]
    assert len(cached) == 2 and any(p.name.startswith("ollama-gemma3-tiny-it-qat-") for p in cached)
    # the Go template in Gemma's turn format gives Gemma 3's chat template (the GGUF has none)
    templates = {p.name.startswith("ollama-"): json.loads((p / "tokenizer_config.json").read_text()).get(
        "chat_template") for p in cached}
    assert templates == {True: GEMMA3_CHAT_TEMPLATE, False: None}


def test_serve_takes_the_ollama_params_as_its_defaults(ollama, monkeypatch):
    """`serve -m ollama:...`: requests that give no sampling get the params layer's; the options override them."""
    import mlx_gemma_qat.server.app as app
    import mlx_gemma_qat.server.engine as engine

    got = []
    monkeypatch.setattr(engine, "Engine", lambda *a, **k: type("E", (), {"speculative": False})())
    monkeypatch.setattr(app, "create_app", lambda eng, card, defaults, options: got.append(defaults))
    monkeypatch.setattr(app, "run", lambda *a: None)
    for extra in ([], ["--top-k", "5"]):
        r = CliRunner().invoke(main, ["serve", "-m", "ollama:gemma3:tiny-it-qat", *extra])
        assert r.exit_code == 0, r.output
    assert [(d.temperature, d.top_p, d.top_k, d.stop) for d in got] == [(1.0, 1.0, 64, ("<end_of_turn>",)),
                                                                         (1.0, 1.0, 5, ("<end_of_turn>",))]


def test_ollama_one_file_vision_model(ollama, text_gguf, tmp_path):
    """Ollama's own gemma3 pulls: one GGUF holding the vision tower (its names, no projector layer). It reads the
    image as llama.cpp's pair of files does, whether named in the store or given as the blob's path."""
    one = tmp_path / "one.gguf"
    write_ollama_gguf(one)
    pull(ollama, "gemma3", "4b", {"model": one.read_bytes(), "template": b"<start_of_turn>user\n{{ .Prompt }}"})
    m = stores.ollama_model("gemma3:4b")
    assert m.mmproj is None and m.defaults == {"chat_template": GEMMA3_CHAT_TEMPLATE}
    want = generated_text(_generate(text_gguf, MMPROJ, True, "--temp", "0"))
    assert generated_text(_generate("ollama:gemma3:4b")) == want  # no params layer: greedy
    assert generated_text(_generate(m.gguf)) == want
    r = CliRunner().invoke(main, ["list", "--json"])
    listed = [e for e in json.loads(r.output) if e["name"] == "ollama:gemma3:4b"]
    assert len(listed) == 1 and listed[0]["vision"] and listed[0]["converted"]
    r = CliRunner().invoke(main, ["generate", "-m", str(m.gguf), "--mmproj", str(MMPROJ), "--prompt", "x"])
    assert r.exit_code == 1 and r.output.endswith(
        f"\nError: {m.gguf}: holds its own vision tower (Ollama's one-file layout); give no --mmproj\n"), r.output


def test_ollama_tag_defaults_to_latest(ollama, text_gguf):
    assert stores.ollama_model("gemma3").gguf == stores.ollama_model("gemma3:latest").gguf
    assert stores.ollama_model("gemma3").mmproj is None  # text only
    want = generated_text(_generate(text_gguf, image=False))
    assert generated_text(_generate("ollama:gemma3", image=False)) == want


def test_ollama_bad_cases_are_one_error_line(ollama, tmp_path, monkeypatch):
    _fails("ollama:gemma3:27b", "ollama:gemma3:27b: not in Ollama's store at ")
    r = CliRunner().invoke(main, ["generate", "-m", "ollama:gemma3:27b", "--prompt", "x"])
    assert "(it has: gemma3:latest, gemma3:tiny-it-qat)" in r.output
    broken = pull(ollama, "gemma3", "broken", {"model": b"GGUF..."})
    (ollama / "blobs" / f"sha256-{hashlib.sha256(b'GGUF...').hexdigest()}").unlink()
    _fails("ollama:gemma3:broken", "ollama:gemma3:broken: its layer sha256:")
    broken.write_text("{not json")
    _fails("ollama:gemma3:broken", f"{broken}: not a readable Ollama manifest")
    write_tiny_gguf(tmp_path / "llama.gguf", arch="llama")
    pull(ollama, "llama3", "latest", {"model": (tmp_path / "llama.gguf").read_bytes()})
    _fails("ollama:llama3", "ollama:llama3:latest: a 'llama' model, not Gemma 3 (expected 'gemma3'); not supported")
    _fails("ollama:../../etc", "ollama:../../etc: not a model name")
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "nowhere"))
    _fails("ollama:gemma3", "no Ollama models found")


def test_ollama_names_map_to_manifest_paths(tmp_path):
    root = tmp_path
    assert stores.ollama_manifest_path(root, "gemma3")[0] == root / "manifests/registry.ollama.ai/library/gemma3/latest"
    assert stores.ollama_manifest_path(root, "me/mine:v1") == (root / "manifests/registry.ollama.ai/me/mine/v1",
                                                                "me/mine:v1")
    hf = stores.ollama_manifest_path(root, "hf.co/google/gemma-3-4b-it-qat-q4_0-gguf:latest")[0]
    assert hf == root / "manifests/hf.co/google/gemma-3-4b-it-qat-q4_0-gguf/latest"


@pytest.fixture
def lmstudio(tmp_path, monkeypatch, text_gguf):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLX_GEMMA_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "home" / ".lmstudio" / "models" / "lmstudio-community" / "gemma-3-tiny-it-GGUF"
    folder.mkdir(parents=True)
    (folder / "gemma-3-tiny-it-Q4_K_M.gguf").write_bytes(text_gguf.read_bytes())
    (folder / "mmproj-model-f16.gguf").write_bytes(MMPROJ.read_bytes())
    return folder


def test_lmstudio_model_with_mmproj_beside_it(lmstudio, text_gguf):
    want = generated_text(_generate(text_gguf, MMPROJ))
    assert generated_text(_generate("lmstudio:lmstudio-community/gemma-3-tiny-it-GGUF")) == want
    (lmstudio / "gemma-3-tiny-it-Q8_0.gguf").write_bytes(text_gguf.read_bytes())
    _fails("lmstudio:lmstudio-community/gemma-3-tiny-it-GGUF",
           "lmstudio:lmstudio-community/gemma-3-tiny-it-GGUF: 2 model GGUFs; name one as ")
    name = "lmstudio:lmstudio-community/gemma-3-tiny-it-GGUF/gemma-3-tiny-it-Q8_0.gguf"
    assert generated_text(_generate(name)) == want
    _fails("lmstudio:lmstudio-community/absent", "lmstudio:lmstudio-community/absent: no such")


def test_lmstudio_legacy_folder(tmp_path, monkeypatch, text_gguf):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    folder = tmp_path / "home" / ".cache" / "lm-studio" / "models" / "pub" / "repo"
    folder.mkdir(parents=True)
    (folder / "model.gguf").write_bytes(text_gguf.read_bytes())
    m = stores.lmstudio_model("pub/repo")
    assert (m.gguf, m.mmproj, m.name) == (folder / "model.gguf", None, "lmstudio:pub/repo/model.gguf")


def test_list_pull_and_rm_over_every_store(ollama, lmstudio, fake_hub, text_gguf, tmp_path):
    """`list` shows every Gemma 3 model of the four places once (name to pass to -m, source, size, types, vision,
    converted or not); `pull` converts now; `rm` removes only our converted copy, never the source."""
    snap = fake_hub("google/gemma-3-tiny-it-qat-q4_0-gguf")
    (snap / "gemma-3-tiny-it-q4_0.gguf").write_bytes(text_gguf.read_bytes())
    (snap / "mmproj-model-f16.gguf").write_bytes(MMPROJ.read_bytes())
    write_tiny_gguf(tmp_path / "llama.gguf", arch="llama")
    pull(ollama, "llama3", "latest", {"model": (tmp_path / "llama.gguf").read_bytes()})

    def listed(*flags):
        r = CliRunner().invoke(main, ["list", "--json", *flags])
        assert r.exit_code == 0, r.output
        return {e["name"]: e for e in json.loads(r.output)}

    names = {"google/gemma-3-tiny-it-qat-q4_0-gguf", "ollama:gemma3:tiny-it-qat", "ollama:gemma3:latest",
             "lmstudio:lmstudio-community/gemma-3-tiny-it-GGUF/gemma-3-tiny-it-Q4_K_M.gguf"}
    from mlx_gemma_qat.convert.gguf_check import check_gguf

    n_tensors = len(check_gguf(text_gguf).tensors)
    got = listed()
    assert set(got) == names
    assert all(not e["converted"] and e["supported"] and e["types"] == {"F32": n_tensors} for e in got.values())
    assert {n for n, e in got.items() if e["vision"]} == names - {"ollama:gemma3:latest"}
    hub = got["google/gemma-3-tiny-it-qat-q4_0-gguf"]
    assert hub["source"] == "hub" and hub["size"] == text_gguf.stat().st_size + MMPROJ.stat().st_size
    everything = listed("--all")
    assert everything["ollama:llama3:latest"]["supported"] is False and "llama3" not in str(set(got))

    for name in ("ollama:gemma3:tiny-it-qat", "google/gemma-3-tiny-it-qat-q4_0-gguf"):
        r = CliRunner().invoke(main, ["pull", name])  # with the conversion's note and progress bar
        assert r.exit_code == 0 and "converting: 100%" in r.output, r.output
        assert re.search(rf"{re.escape(name)} -> {re.escape(str(tmp_path / 'cache'))}/\S+\n", r.output), r.output
    got = listed()
    assert set(got) == names  # a converted copy shows beside its source, not as a model of its own
    assert {n for n, e in got.items() if e["converted"]} == {"ollama:gemma3:tiny-it-qat",
                                                            "google/gemma-3-tiny-it-qat-q4_0-gguf"}
    table = CliRunner().invoke(main, ["list"]).output
    assert table.splitlines()[0].split() == ["NAME", "(-m)", "SOURCE", "SIZE", "TYPES", "VISION", "CONVERTED"]
    assert len(table.splitlines()) == 1 + len(names)

    folder = Path(got["ollama:gemma3:tiny-it-qat"]["converted"])
    r = CliRunner().invoke(main, ["rm", "ollama:gemma3:tiny-it-qat"])
    assert r.exit_code == 0 and r.output == f"removed {folder}\n" and not folder.exists()
    assert stores.ollama_model("gemma3:tiny-it-qat").gguf.is_file()  # the store's blobs are untouched
    _error(CliRunner().invoke(main, ["rm", "ollama:gemma3:tiny-it-qat"]),
           "ollama:gemma3:tiny-it-qat: no converted copy in the cache")
    _error(CliRunner().invoke(main, ["rm", str(text_gguf.parent)]), f"{text_gguf.parent}: no config.json")
    assert {n for n, e in listed().items() if e["converted"]} == {"google/gemma-3-tiny-it-qat-q4_0-gguf"}
