"""Models other local tools already keep: Ollama's store and LM Studio's folders, named ``ollama:NAME[:TAG]`` and
``lmstudio:PUBLISHER/REPO[/FILE.gguf]``. Each resolves to the GGUF files to convert (the model, and its mmproj
where the tool keeps one); nothing in the tool's folders is ever written.

* **Ollama**: ``$OLLAMA_MODELS``, else ``~/.ollama/models``, else the Linux service's
  ``/usr/share/ollama/.ollama/models``. ``manifests/<registry>/<namespace>/<name>/<tag>`` is a Docker v2
  manifest (``registry.ollama.ai/library`` for bare names; ``hf.co/ORG/REPO:TAG`` for pulls from the hub);
  its layers are blobs ``blobs/sha256-<hex>`` by media type: ``application/vnd.ollama.image.model`` (the GGUF),
  ``...image.projector`` (llama.cpp's mmproj, when the model has a separate one), ``...image.template`` and
  ``...image.params``. Ollama's own gemma3 GGUFs hold the vision tower inside the model GGUF (read by
  :mod:`.from_mmproj`). The template layer is a Go template, not Jinja: one in Gemma's turn format
  (``<start_of_turn>``) gives the model Gemma 3's chat template when its GGUF has none; the params layer's
  ``temperature``, ``top_p``, ``top_k``, ``min_p`` and ``stop`` become the model's default sampling (the
  command line's options and a request's fields override them; other params are not used).
* **LM Studio**: ``~/.lmstudio/models/<publisher>/<repo>/<file>.gguf`` (the legacy
  ``~/.cache/lm-studio/models`` too), the ``mmproj*.gguf`` beside it picked up.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .hub import is_mmproj, pick_projector
from .tokenizer import GEMMA3_CHAT_TEMPLATE

MODEL = "application/vnd.ollama.image.model"
PROJECTOR = "application/vnd.ollama.image.projector"
TEMPLATE = "application/vnd.ollama.image.template"
PARAMS = "application/vnd.ollama.image.params"
DEFAULT_REGISTRY = "registry.ollama.ai"


class StoreError(ValueError):
    """A name that no local store resolves to a usable model."""


@dataclass(frozen=True)
class StoredModel:
    name: str  # what to pass to -m
    gguf: Path
    mmproj: Path | None = None
    source: str = ""  # "ollama" or "lmstudio"
    params: dict | None = None  # Ollama's default sampling parameters, when the manifest has them
    template: str | None = None  # Ollama's (Go) chat template text, when the manifest has one

    @property
    def defaults(self) -> dict | None:
        """What the manifest adds to the GGUF: ``chat_template`` (Jinja) and ``sampling``; None for nothing."""
        out = {}
        if self.template and "<start_of_turn>" in self.template:
            out["chat_template"] = GEMMA3_CHAT_TEMPLATE
        sampling = {k: self.params[k] for k in _SAMPLING if _SAMPLING[k](self.params.get(k))} if self.params else {}
        if sampling:
            out["sampling"] = sampling
        return out or None


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) < 1e6


_SAMPLING = {  # Ollama's params that mean what ours do, each with its check
    "temperature": lambda v: _number(v) and v >= 0,
    "top_p": lambda v: _number(v) and 0 <= v <= 1,
    "top_k": lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1_000_000,
    "min_p": lambda v: _number(v) and 0 <= v <= 1,
    "stop": lambda v: isinstance(v, list) and 0 < len(v) <= 16 and all(isinstance(x, str) and 0 < len(x) <= 64
                                                                      for x in v),
}


# ------------------------------------------------------------------------------------------------ Ollama

def ollama_roots() -> list[Path]:
    env = os.environ.get("OLLAMA_MODELS")
    if env:
        return [Path(env).expanduser()]
    return [Path.home() / ".ollama" / "models", Path("/usr/share/ollama/.ollama/models")]


def _ollama_root() -> Path:
    for root in ollama_roots():
        if (root / "manifests").is_dir():
            return root
    raise StoreError("no Ollama models found (looked in " + ", ".join(map(str, ollama_roots()))
                     + "; set OLLAMA_MODELS to Ollama's models folder)")


def ollama_manifest_path(root: Path, name: str) -> tuple[Path, str]:
    """The manifest file of ``NAME[:TAG]`` (tag ``latest`` when omitted) and the name as Ollama shows it."""
    if not name or name.startswith(("/", ".")) or ".." in name.split("/"):
        raise StoreError(f"ollama:{name}: not a model name")
    base, _, tag = name.rpartition(":") if ":" in name.split("/")[-1] else (name, "", "latest")
    tag = tag or "latest"
    parts = base.split("/")
    if len(parts) == 1:
        parts = [DEFAULT_REGISTRY, "library", parts[0]]
    elif len(parts) == 2:
        parts = [DEFAULT_REGISTRY, *parts]
    if not all(re.fullmatch(r"[A-Za-z0-9._-]+", p) for p in [*parts, tag]):
        raise StoreError(f"ollama:{name}: not a model name")
    return root / "manifests" / Path(*parts) / tag, f"{base}:{tag}"


def _blob(root: Path, digest: str, where: str) -> Path:
    m = re.fullmatch(r"sha256[:-]([0-9a-f]{64})", str(digest))
    if not m:
        raise StoreError(f"{where}: bad layer digest {digest!r}")
    path = root / "blobs" / f"sha256-{m.group(1)}"
    if not path.is_file():
        raise StoreError(f"{where}: its layer {digest} is missing from {root / 'blobs'} (re-pull it with Ollama)")
    return path


def read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StoreError(f"{path}: not a readable Ollama manifest ({type(e).__name__})") from None
    layers = manifest.get("layers") if isinstance(manifest, dict) else None
    if not isinstance(layers, list) or not all(isinstance(x, dict) and "mediaType" in x for x in layers):
        raise StoreError(f"{path}: not an Ollama manifest (no layers)")
    return manifest


def ollama_model(name: str, root: Path | None = None) -> StoredModel:
    """Resolve ``ollama:NAME[:TAG]`` in Ollama's store."""
    root = root or _ollama_root()
    path, shown = ollama_manifest_path(root, name)
    if not path.is_file():
        have = sorted(p.parent.name + ":" + p.name for p in path.parent.parent.glob("*/*") if p.is_file())
        raise StoreError(f"ollama:{shown}: not in Ollama's store at {root}"
                         + (f" (it has: {', '.join(have)})" if have else ""))
    layers = read_manifest(path)["layers"]
    by_type: dict[str, list[dict]] = {}
    for layer in layers:
        by_type.setdefault(layer["mediaType"], []).append(layer)
    where = f"ollama:{shown}"
    if len(by_type.get(MODEL, [])) != 1:
        raise StoreError(f"{where}: its manifest has {len(by_type.get(MODEL, []))} model layers, not one")
    gguf = _blob(root, by_type[MODEL][0].get("digest"), where)
    mmproj = _blob(root, by_type[PROJECTOR][0].get("digest"), where) if by_type.get(PROJECTOR) else None
    params = template = None
    if by_type.get(PARAMS):
        try:
            params = json.loads(_blob(root, by_type[PARAMS][0].get("digest"), where).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise StoreError(f"{where}: its params layer is not JSON") from None
    if by_type.get(TEMPLATE):
        template = _blob(root, by_type[TEMPLATE][0].get("digest"), where).read_text(encoding="utf-8", errors="replace")
    return StoredModel(f"ollama:{shown}", gguf, mmproj, "ollama", params if isinstance(params, dict) else None,
                       template)


# ------------------------------------------------------------------------------------------------ LM Studio

def lmstudio_roots() -> list[Path]:
    return [Path.home() / ".lmstudio" / "models", Path.home() / ".cache" / "lm-studio" / "models"]


def lmstudio_model(name: str, roots: list[Path] | None = None) -> StoredModel:
    """Resolve ``lmstudio:PUBLISHER/REPO[/FILE.gguf]``."""
    parts = name.strip("/").split("/")
    if len(parts) not in (2, 3) or any(p in ("", ".", "..") for p in parts):
        raise StoreError(f"lmstudio:{name}: expected PUBLISHER/REPO or PUBLISHER/REPO/FILE.gguf")
    roots = roots if roots is not None else lmstudio_roots()
    folder = next((r / parts[0] / parts[1] for r in roots if (r / parts[0] / parts[1]).is_dir()), None)
    if folder is None:
        raise StoreError(f"lmstudio:{name}: no such model folder in " + ", ".join(map(str, roots)))
    ggufs = sorted(p.name for p in folder.glob("*.gguf"))
    models = [g for g in ggufs if not is_mmproj(g)]
    projectors = [g for g in ggufs if is_mmproj(g)]
    if len(parts) == 3:
        if parts[2] not in models:
            raise StoreError(f"lmstudio:{name}: no such model file; {folder} has: {', '.join(models) or 'none'}")
        models = [parts[2]]
    if len(models) != 1:
        raise StoreError(f"lmstudio:{name}: " + (f"{len(models)} model GGUFs; name one as lmstudio:{parts[0]}/"
                                                 f"{parts[1]}/FILE, one of: {', '.join(models)}" if models
                                                 else f"no model GGUF in {folder}"))
    mmproj = pick_projector(projectors)
    return StoredModel(f"lmstudio:{parts[0]}/{parts[1]}/{models[0]}", folder / models[0],
                       folder / mmproj if mmproj else None, "lmstudio")


def architecture(path: Path) -> str:
    """``general.architecture`` of a GGUF, from its checked header alone."""
    from .gguf_check import check_gguf
    from .tokenizer import read_gguf_keys

    check_gguf(path, StoreError)
    return str(read_gguf_keys(path, ("general.architecture",)).get("general.architecture", "unknown"))


def resolve_store(spec: str) -> StoredModel | None:
    """The stored Gemma 3 model ``spec`` names (``ollama:...`` or ``lmstudio:...``), or None for any other spec.
    A store's other models are refused here, by name, before anything is converted."""
    if spec.startswith("ollama:"):
        found = ollama_model(spec.removeprefix("ollama:"))
    elif spec.startswith("lmstudio:"):
        found = lmstudio_model(spec.removeprefix("lmstudio:"))
    else:
        return None
    arch = architecture(found.gguf)
    if arch != "gemma3":
        raise StoreError(f"{found.name}: a {arch!r} model, not Gemma 3 (expected 'gemma3'); not supported")
    return found
