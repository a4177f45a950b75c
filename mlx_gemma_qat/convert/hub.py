"""Models on the Hugging Face hub, named by repo id: a safetensors checkpoint, or a GGUF repo such as Google's QAT
ones (``google/gemma-3-4b-it-qat-q4_0-gguf``: the model GGUF and, from 4B up, an ``mmproj`` GGUF beside it).

``REPO`` or ``REPO:FILE.gguf`` (a repo holding several model GGUFs needs ``:FILE``). huggingface_hub downloads,
with its progress bars, resumes an interrupted download, and serves its cache with no network
(``HF_HUB_OFFLINE=1``, or when the hub cannot be reached). Gated repos (Google's are) need the licence accepted on
the model's page and a login (``hf auth login`` or ``HF_TOKEN``); a refusal says so in one line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

SAFETENSORS_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]


class HubError(ValueError):
    """A repo id that cannot be resolved to a model (absent, gated, ambiguous, not downloadable)."""


@dataclass(frozen=True)
class HubModel:
    path: Path  # a checkpoint folder, or the model GGUF
    mmproj: Path | None = None  # the repo's vision GGUF, beside a model GGUF


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``REPO`` or ``REPO:FILE`` -> (repo id, file or None); a HubError if it is not a repo id's shape."""
    repo, _, file = spec.partition(":")
    if repo.count("/") != 1 or repo.startswith((".", "/", "~")) or not all(repo.split("/")) or (_ and not file):
        raise HubError(f"{spec}: no such file or folder")
    return repo, file or None


def is_mmproj(name: str) -> bool:
    return "mmproj" in Path(name).name.lower()


def _offline(offline: bool | None) -> bool:
    if offline is None:
        return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    return offline


def _refusal(repo: str, e: Exception) -> HubError:
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, GatedRepoError) or status in (401, 403):
        return HubError(f"{repo} is gated: accept its licence on https://huggingface.co/{repo} and log in "
                        "(hf auth login, or set HF_TOKEN)")
    if isinstance(e, RepositoryNotFoundError):
        return HubError(f"{repo}: no such repo on the Hugging Face hub (or it is private: log in with hf auth login)")
    return HubError(f"{repo}: not a local path and not downloadable from the Hugging Face hub ({e})")


def repo_files(repo: str, offline: bool | None = None) -> list[str]:
    """The repo's file names: from the hub, or from its cached snapshot when offline or the hub is unreachable."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if not _offline(offline):
        try:
            return sorted(HfApi().list_repo_files(repo))
        except (GatedRepoError, RepositoryNotFoundError) as e:
            raise _refusal(repo, e) from None
        except Exception as e:  # noqa: BLE001 - no network: the cache may still have it
            status = getattr(getattr(e, "response", None), "status_code", None)
            if status in (401, 403):
                raise _refusal(repo, e) from None
    try:
        snap = Path(snapshot_download(repo, local_files_only=True))
    except Exception as e:  # noqa: BLE001
        raise HubError(f"{repo}: not in the Hugging Face cache, and the hub cannot be reached "
                       f"({type(e).__name__})") from None
    return sorted(str(p.relative_to(snap)) for p in snap.rglob("*") if p.is_file())


def pick_gguf(repo: str, files: list[str], want: str | None) -> tuple[str, str | None]:
    """(model GGUF, mmproj GGUF or None) among ``files``; ``want``: the model file the user named."""
    ggufs = [f for f in files if f.lower().endswith(".gguf")]
    models, projectors = [f for f in ggufs if not is_mmproj(f)], [f for f in ggufs if is_mmproj(f)]
    if want is not None:
        if want not in ggufs:
            raise HubError(f"{repo} has no {want}; its GGUF files: {', '.join(ggufs) or 'none'}")
        models = [want]
    if not models:
        raise HubError(f"{repo}: no model GGUF in the repo")
    if len(models) > 1:
        raise HubError(f"{repo} holds {len(models)} model GGUFs; name one as {repo}:FILE, one of: "
                       + ", ".join(models))
    return models[0], pick_projector(projectors)


def pick_projector(names: list[str]) -> str | None:
    """The mmproj to use among ``names`` (a repo or a folder may hold f16 and bf16 copies: the f16 one, as
    llama.cpp's own scripts take; else the first by name); None when there is none."""
    f16 = [f for f in names if "f16" in Path(f).name.lower() and "bf16" not in Path(f).name.lower()]
    return f16[0] if len(f16) == 1 else min(names, default=None)


def fetch(spec: str, *, offline: bool | None = None) -> HubModel:
    """Download (or find in the cache) the model ``spec`` names: see the module docstring."""
    from huggingface_hub import hf_hub_download, snapshot_download

    repo, want = parse_spec(spec)
    offline = _offline(offline)
    files = repo_files(repo, offline)
    if want is None and not any(f.lower().endswith(".gguf") for f in files):
        try:
            return HubModel(Path(snapshot_download(repo, allow_patterns=SAFETENSORS_PATTERNS,
                                                   local_files_only=offline)))
        except Exception as e:  # noqa: BLE001
            raise _refusal(repo, e) from None
    model, mmproj = pick_gguf(repo, files, want)
    try:
        paths = [Path(hf_hub_download(repo, f, local_files_only=offline)) if f else None for f in (model, mmproj)]
    except Exception as e:  # noqa: BLE001
        raise _refusal(repo, e) from None
    return HubModel(paths[0], paths[1])
