"""Every command the README and docs/ show runs, so none goes stale.

Each fenced ``sh`` or ``python`` block of README.md and docs/*.md runs, in page order, in one scratch folder per
page (with ``tests``, ``examples`` and ``scripts`` linked in, so fixture paths work and outputs land there), unless
the line before its fence says why not: ``<!-- not run: REASON -->`` (a download, a model the reader has, a server
that runs until stopped...). ``sh`` blocks hold ``mlx-gemma`` commands (run in-process; each must exit 0) and
``export VAR=value`` lines; ``python`` blocks are executed, sharing one namespace per page. Commands without ``-m``
use the embedded Gemma 3 270M (its conversion is the session's shared one). Relative links must resolve.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"^(`{3,})([\w+-]*)[^\n]*$")
_NOT_RUN = re.compile(r"^<!-- not run: (\S.*\S|\S) -->$")
_LINK = re.compile(r"\]\(([^)\s]+)\)")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    not_run: str | None  # the reason, when the page says the block is not run

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    lines = page.read_text(encoding="utf-8").splitlines()
    out, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith(m.group(1))
                    and not lines[j].strip("`")), None)
        assert end is not None, f"{page}:{i + 1}: unclosed fence"
        before = _NOT_RUN.match(lines[i - 1].strip()) if i else None
        out.append(Block(page, i + 1, m.group(2), "\n".join(lines[i + 1:end]), before.group(1) if before else None))
        i = end + 1
    return out


def commands(block: Block) -> list[list[str]]:
    """The block's command lines, continuations joined and comments dropped, each split as the shell would."""
    joined = re.sub(r"\\\n", " ", block.text)
    return [argv for line in joined.splitlines() if (argv := shlex.split(line, comments=True))]


RUNNABLE = [b for p in PAGES for b in blocks(p) if b.lang in ("sh", "python")]


def test_every_shown_block_runs_or_says_why_not():
    """Runnable ``sh`` blocks hold only commands this test can run; a block left out says why."""
    assert len(PAGES) >= 2 and RUNNABLE, "no docs pages or no blocks found"
    for b in RUNNABLE:
        if b.not_run is not None or b.lang != "sh":
            continue
        for argv in commands(b):
            assert argv[0] in ("mlx-gemma", "export"), f"{b.where}: {argv[0]!r} is not run here; mark the block " \
                                                      "<!-- not run: REASON -->"
    assert sum(b.not_run is None for b in RUNNABLE) >= 5, "hardly anything shown is run"


def test_relative_links_resolve():
    for page in PAGES:
        for target in _LINK.findall(page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            assert path.exists(), f"{page.relative_to(ROOT)}: link {target} goes nowhere"


@pytest.fixture(scope="module")
def embedded_cache(real_270m, tmp_path_factory):
    """A model cache where the embedded default is already converted (the session's conversion, linked in)."""
    from conftest import shared

    from mlx_gemma_qat.models_cache import cache_root, converted_folder, default_gguf

    def build(path):
        os.environ["MLX_GEMMA_CACHE"] = str(path)
        try:
            folder = converted_folder(default_gguf())
        finally:
            del os.environ["MLX_GEMMA_CACHE"]
        assert folder.parent == path
        path.mkdir(parents=True)
        folder.symlink_to(real_270m, target_is_directory=True)

    root = shared(tmp_path_factory, "docs-cache", build)
    assert cache_root() != root
    return root


@pytest.fixture(scope="module")
def one_tokenizer_load():
    """mlx-lm's tokenizer load (~5 s for the 270M's vocabulary) once per folder for the whole module: every
    command still loads its model and runs; only that repeated parse is shared."""
    import mlx_lm.utils

    real, memo = mlx_lm.utils.load_tokenizer, {}

    def load_tokenizer(path, *args, **kwargs):
        key = (str(Path(path).resolve()), repr(args), repr(sorted(kwargs.items())))
        if key not in memo:
            memo[key] = real(path, *args, **kwargs)
        return memo[key]

    mlx_lm.utils.load_tokenizer = load_tokenizer
    yield
    mlx_lm.utils.load_tokenizer = real


def _run_page(page: Path, tmp_path, monkeypatch):
    from mlx_gemma_qat.cli import main

    for name in ("tests", "examples", "scripts"):
        (tmp_path / name).symlink_to(ROOT / name, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    ran = 0
    for b in blocks(page):
        if b.lang not in ("sh", "python") or b.not_run is not None:
            continue
        ran += 1
        if b.lang == "python":
            exec(compile(b.text, b.where, "exec"), namespace)
            continue
        for argv in commands(b):
            if argv[0] == "export":
                for assignment in argv[1:]:
                    monkeypatch.setenv(*assignment.split("=", 1))
                continue
            r = CliRunner().invoke(main, argv[1:], input="", catch_exceptions=False)
            assert r.exit_code == 0, f"{b.where}: {shlex.join(argv)} exited {r.exit_code}:\n{r.output[-2000:]}"
    return ran


@pytest.mark.real
@pytest.mark.parametrize("page", PAGES, ids=[p.stem for p in PAGES])
def test_page_runs(page, tmp_path, monkeypatch, embedded_cache, one_tokenizer_load):
    monkeypatch.setenv("MLX_GEMMA_CACHE", str(embedded_cache))
    _run_page(page, tmp_path, monkeypatch)
