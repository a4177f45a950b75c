"""Every Gemma 3 model on this machine, wherever it is kept: our conversion cache, the Hugging Face cache (GGUF repos
and checkpoints), Ollama's store and LM Studio's folders; what ``mlx-gemma list`` prints.

Each entry gives the name to pass to ``-m``, where it is, its size on disk, its quantization types, whether it
reads images and whether our converted copy exists already. Headers are walked, never whole files read (a
262k-token vocabulary is skipped over, not parsed)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .convert import stores
from .convert.hub import is_mmproj, pick_projector
from .models_cache import cache_root, converted_folder, is_mlx_folder


@dataclass
class Entry:
    name: str  # what to pass to -m
    source: str  # "converted", "hub", "ollama" or "lmstudio"
    path: str
    size: int  # bytes on disk, model and mmproj
    types: dict[str, int] = field(default_factory=dict)  # quantization type -> tensors
    vision: bool = False
    architecture: str = "gemma3"
    converted: str | None = None  # our converted copy's folder, when it exists

    @property
    def supported(self) -> bool:
        return self.architecture == "gemma3"

    def to_dict(self) -> dict:
        return {**asdict(self), "supported": self.supported}


def _gguf_facts(path: Path) -> tuple[str, dict[str, int], bool]:
    """(architecture, tensors per GGML type, vision tensors inside) of a GGUF, from its header alone."""
    import gguf

    from .convert.gguf_check import check_gguf

    layout = check_gguf(path)
    types = Counter(gguf.GGMLQuantizationType(t.ggml_type).name for t in layout.tensors)
    inside = any(t.name.startswith("v.") for t in layout.tensors)
    return stores.architecture(path), dict(sorted(types.items())), inside


def _entry(name: str, source: str, model: Path, mmproj: Path | None, display: str | None = None,
           defaults: dict | None = None) -> Entry:
    try:
        arch, types, inside = _gguf_facts(model)
    except (ValueError, OSError) as e:
        return Entry(name, source, str(model), 0, architecture=f"unreadable ({type(e).__name__})")
    size = model.stat().st_size + (mmproj.stat().st_size if mmproj else 0)
    out = converted_folder(model, mmproj, display, defaults)
    return Entry(name, source, str(model), size, types, bool(mmproj) or inside, arch,
                 str(out) if (out / "config.json").is_file() else None)


def converted() -> list[Entry]:
    out = []
    root = cache_root()
    folders = sorted(p for p in root.glob("*") if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []
    for folder in folders:
        if not is_mlx_folder(folder):
            continue
        cfg = json.loads((folder / "config.json").read_text())
        text = cfg.get("text_config", cfg)
        ours = cfg.get("mlx_gemma_qat", {})
        size = sum(f.stat().st_size for f in folder.glob("*") if f.is_file())
        out.append(Entry(str(folder), "converted", str(folder), size, dict(ours.get("source_types", {})),
                         "vision_config" in cfg, "gemma3" if text.get("model_type", "gemma3_text").startswith(
                             "gemma3") else str(text.get("model_type")), str(folder)))
    return out


def hub() -> list[Entry]:
    from huggingface_hub import constants

    out = []
    root = Path(constants.HF_HUB_CACHE)
    for repo in sorted(root.glob("models--*--*")) if root.is_dir() else []:
        repo_id = "/".join(repo.name.split("--")[1:])
        ref = repo / "refs" / "main"
        snaps = [repo / "snapshots" / ref.read_text().strip()] if ref.is_file() else sorted(repo.glob("snapshots/*"))
        for snap in (s for s in snaps if s.is_dir()):
            ggufs = sorted(p for p in snap.glob("*.gguf"))
            models = [p for p in ggufs if not is_mmproj(p.name)]
            projector = pick_projector([p.name for p in ggufs if is_mmproj(p.name)])
            for m in models:
                name = repo_id if len(models) == 1 else f"{repo_id}:{m.name}"
                out.append(_entry(name, "hub", m, snap / projector if projector else None))
            cfg = snap / "config.json"
            if not models and cfg.is_file() and any(snap.glob("*.safetensors")):
                raw = json.loads(cfg.read_text())
                kind = raw.get("model_type", "?")
                size = sum(f.stat().st_size for f in snap.glob("*") if f.is_file())
                folder = converted_folder(snap)
                out.append(Entry(repo_id, "hub", str(snap), size, {str(raw.get("torch_dtype", "?")): 1},
                                 "vision_config" in raw, "gemma3" if str(kind).startswith("gemma3") else str(kind),
                                 str(folder) if (folder / "config.json").is_file() else None))
    return out


def ollama() -> list[Entry]:
    out = []
    for root in stores.ollama_roots():
        manifests = root / "manifests"
        for path in sorted(p for p in manifests.rglob("*") if p.is_file()) if manifests.is_dir() else []:
            parts = path.relative_to(manifests).parts
            if len(parts) != 4:
                continue
            registry, namespace, model, tag = parts
            name = (model if (registry, namespace) == (stores.DEFAULT_REGISTRY, "library")
                    else f"{namespace}/{model}" if registry == stores.DEFAULT_REGISTRY
                    else f"{registry}/{namespace}/{model}")
            try:
                m = stores.ollama_model(f"{name}:{tag}", root)
            except stores.StoreError as e:
                out.append(Entry(f"ollama:{name}:{tag}", "ollama", str(path), 0, architecture=f"unusable ({e})"))
                continue
            out.append(_entry(m.name, "ollama", m.gguf, m.mmproj, m.name, m.defaults))
    return out


def lmstudio() -> list[Entry]:
    out = []
    for root in stores.lmstudio_roots():
        for folder in sorted(p for p in root.glob("*/*") if p.is_dir()) if root.is_dir() else []:
            ggufs = sorted(folder.glob("*.gguf"))
            projector = pick_projector([p.name for p in ggufs if is_mmproj(p.name)])
            mmproj = folder / projector if projector else None
            for m in (p for p in ggufs if not is_mmproj(p.name)):
                name = f"lmstudio:{folder.parent.name}/{folder.name}/{m.name}"
                out.append(_entry(name, "lmstudio", m, mmproj, name))
    return out


def find_models(include_unsupported: bool = False) -> list[Entry]:
    """Every model the four places hold; other architectures only with ``include_unsupported``."""
    sources = hub() + ollama() + lmstudio()
    of_sources = {e.converted for e in sources}
    found = [e for e in converted() if e.path not in of_sources] + sources  # each model once
    return [e for e in found if include_unsupported or e.supported]
