"""The evaluation text for ``perplexity`` / ``kld``: a local file or a Hugging Face dataset split, and its tokens.

Record files (.jsonl, .json, .parquet) hold one text per record, in ``field``. Records are joined with ``"\\n\\n"``,
except when every record ends with ``"\\n"`` or is empty: that is a text stored one line per record (wikitext's
parquet files: ``" = Title = \\n"``, ``""``, ...), and those are joined with ``""`` to give back the raw text.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

EXTENSIONS = (".parquet", ".jsonl", ".json", ".txt")


class CorpusError(ValueError):
    """The evaluation text cannot be read: the message names the file (and line) or the dataset."""


def _join(records: list[str]) -> str:
    return "".join(records) if all(r == "" or r.endswith("\n") for r in records) else "\n\n".join(records)


def _records(path: Path, field: str, name: str) -> list[str]:
    """The ``field`` strings of a .jsonl / .json / .parquet file; ``[text]`` for any other file."""
    try:
        if path.suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise CorpusError(f"{name}: reading .parquet needs pyarrow (pip install pyarrow)") from None
            table = pq.read_table(path)
            if field not in table.column_names:
                raise CorpusError(f"{name}: no column {field!r} (columns: {', '.join(table.column_names)})")
            out = table.column(field).to_pylist()
            bad = next((i for i, v in enumerate(out) if not isinstance(v, str)), None)
            if bad is not None:
                raise CorpusError(f"{name}: row {bad}: {field!r} is not a string")
            return out
        raw = path.read_text(encoding="utf-8")
    except CorpusError:
        raise
    except (OSError, ValueError) as e:  # UnicodeDecodeError, pyarrow's ArrowInvalid are ValueErrors
        raise CorpusError(f"{name}: cannot read ({type(e).__name__}: {e})") from None
    if path.suffix == ".jsonl":
        lines = [(n, line) for n, line in enumerate(raw.splitlines(), 1) if line.strip()]
    elif path.suffix == ".json":
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{name}:{e.lineno}: malformed JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise CorpusError(f"{name}: expected a JSON list of objects with {field!r}")
        lines = [(n, rec) for n, rec in enumerate(data, 1)]  # n: the record's 1-based index
    else:
        return [raw]  # verbatim, like llama.cpp (no stripping)
    out = []
    for n, rec in lines:
        if isinstance(rec, str):
            try:
                rec = json.loads(rec)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{name}:{n}: malformed JSON ({e.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get(field), str):
            raise CorpusError(f"{name}:{n}: no string {field!r} in this record")
        out.append(rec[field])
    return out


def _is_split(rel: Path, split: str) -> bool:
    stem = rel.name[: -len(rel.suffix)] if rel.suffix else rel.name
    return rel.suffix in EXTENSIONS and (stem == split or stem.startswith((f"{split}-", f"{split}."))
                                         or rel.parent.name == split)


def _config_of(rel: Path, split: str) -> str | None:
    """The folder that names a dataset config (``wikitext-2-raw-v1/test-0.parquet``); None for data/, split/."""
    folders = [p for p in rel.parts[:-1] if p not in ("data", split)]
    return folders[0] if folders else None


def _dataset_text(repo_id: str, split: str, field: str, config: str | None) -> tuple[str, str]:
    from huggingface_hub import snapshot_download

    where = f"{config}/" if config else ""
    patterns = [f"*{where}*{split}*{ext}" for ext in EXTENSIONS]
    found: list[Path] = []
    files: list[Path] = []
    root = None
    for local in (True, False):
        try:
            root = Path(snapshot_download(repo_id, repo_type="dataset", allow_patterns=patterns,
                                          local_files_only=local))
        except Exception as e:
            if local:
                continue
            if root is not None:
                break  # in the cache without this split, and not downloadable: list what the cache has
            raise CorpusError(f"{repo_id}: neither a Hugging Face dataset in the cache nor downloadable "
                              f"({type(e).__name__}: {e})") from None
        found = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
        files = [p for p in found if _is_split(p, split) and (config is None or config in p.parts[:-1])]
        if files:
            break
    configs = sorted({_config_of(p, split) or "" for p in files})
    if config is None and len(configs) > 1:
        raise CorpusError(f"{repo_id}: split {split!r} is in several configs, pass --config: {', '.join(configs)}")
    if not files:
        have = [p.as_posix() for p in found if p.suffix in EXTENSIONS]
        raise CorpusError(f"{repo_id}: no {split!r} split{f' in config {config!r}' if config else ''} "
                          f"(files found: {', '.join(have) or 'none'})")
    records = [r for p in files for r in _records(root / p, field, f"{repo_id}/{p.as_posix()}")]
    name = f"{repo_id} {config + '/' if config else ''}{split} ({len(records)} records)"
    return _join(records), name


def read_text(text: str | Path | None = None, *, dataset: str | None = None, split: str = "test",
              field: str = "text", config: str | None = None) -> tuple[str, str]:
    """(the evaluation text, where it came from: the file name, or e.g.
    ``'Salesforce/wikitext wikitext-2-raw-v1/test (4358 records)'``).

    ``text`` is a local file: .jsonl / .json (a list) / .parquet take ``field`` of each record (joined as the
    module docstring says); anything else is read as UTF-8 verbatim. ``dataset`` is a Hugging Face dataset repo
    id: the files of ``split`` (``test.jsonl``, ``data/test-00000-of-00001.parquet``, ``test/0.parquet``; those
    under the folder ``config`` when given), from the cache first (works offline), then downloaded."""
    if (text is None) == (dataset is None):
        raise CorpusError("give exactly one of a text file or a dataset")
    if dataset is not None:
        out, name = _dataset_text(dataset, split, field, config)
    else:
        path = Path(text).expanduser()
        if not path.is_file():
            raise CorpusError(f"{path}: {'a directory, not a file' if path.is_dir() else 'no such file'}")
        out, name = _join(_records(path, field, str(path))), path.name
    if not out.strip():
        raise CorpusError(f"{name}: no text")
    return out, name


def tokenize(tokenizer, text: str) -> np.ndarray:
    """int32 token ids with BOS first, as llama.cpp's ``common_tokenize(ctx, text, add_special=true)`` for Gemma:
    ``tokenizer.encode(text)`` with the BOS it adds (prepended here if it does not add one)."""
    inner = getattr(tokenizer, "_tokenizer", tokenizer)
    limit = getattr(inner, "model_max_length", None)
    if limit is not None:  # a whole corpus is meant to be longer than the context: no length warning
        inner.model_max_length = 1 << 62
    try:
        ids = list(tokenizer.encode(text))
    finally:
        if limit is not None:
            inner.model_max_length = limit
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and (not ids or ids[0] != bos):
        ids.insert(0, bos)
    return np.asarray(ids, dtype=np.int32)
