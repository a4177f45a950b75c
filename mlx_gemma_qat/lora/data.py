"""LoRA training data: JSONL records -> token ids with per-token target masks -> length-bucketed batches.

Three record formats (one per file; mlx-lm's keys):

- ``{"text": ...}``: the text with BOS (and EOS appended when missing); every token but BOS is a target.
- ``{"prompt": ..., "completion": ...}``: the prompt as a user turn through the chat template (the
  tokenizer's own, else the built-in Gemma 3 one: the base 270M ships none), then the completion as the model's
  turn, as mlx-lm's CompletionsDataset lays it out. With ``mask_prompt`` only the completion is a target.
- ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}``: the conversation through
  the template; with ``mask_prompt`` the targets are the assistant turns' content and their closing
  ``<end_of_turn>``. Content is a string or a list of ``{"type": "text", "text": ...}`` and
  ``{"type": "image", "image": PATH_OR_URL_OR_PIL}`` items (as ``generate`` accepts); images are laid out as
  ``generate.encode_prompt`` lays them out and their soft tokens are never targets. A relative image path in a
  JSONL file is read relative to that file's folder when it exists there.

Masks come from rendering prefixes of the conversation (before each assistant message with the generation
prompt, then through it) and tokenizing the pieces between them: no token ids are hard-coded. The whitespace
the template puts after a turn's end marker (Gemma's "\\n" after ``<end_of_turn>``) is not a target (mlx-lm
counts it): generation stops at the marker, so that "\\n" is never produced.

``read_jsonl`` keeps each record's origin in two reserved keys, ``"__file__"`` (the name used in messages) and
``"__line__"`` (1-based line number); ``encode`` uses them in its errors and otherwise ignores them.

``Batches`` is a pure function of (examples, settings, seed, step): see its docstring.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..convert.tokenizer import template_kwargs

LINE, FILE = "__line__", "__file__"
FORMATS = ("text", "completions", "chat")
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """Bad training data (the message names the file and the 1-based line)."""


@dataclass
class Example:
    tokens: list[int]  # full token ids, BOS first
    mask: list[bool]  # per token: True where it is a training target
    images: list = ()  # image sources of a chat record, in order
    # (start, end) token ranges of each image's soft tokens (set by ``encode``; used to cut a sequence
    # only between images, never inside one)
    image_runs: list = field(default=())
    origin: str = ""  # "file:line" of its record (set by ``encode``), for errors found later (an unreadable image)


# ----------------------------------------------------------------------------------------------- reading

def _where(rec: dict, source: str = "data", index: int | None = None) -> str:
    line = rec.get(LINE, None if index is None else index + 1) if isinstance(rec, dict) else None
    name = rec.get(FILE, source) if isinstance(rec, dict) else source
    return f"{name}:{line}" if line is not None else str(name)


def record_format(rec: dict) -> str:
    """"text", "completions" or "chat" from a record's keys (prompt+completion, messages, text)."""
    if not isinstance(rec, dict):
        raise DataError(f"a record must be a JSON object, not {type(rec).__name__}")
    if "prompt" in rec and "completion" in rec:
        return "completions"
    if "messages" in rec:
        return "chat"
    if "text" in rec:
        return "text"
    keys = sorted(k for k in rec if k not in (LINE, FILE))
    raise DataError(f"{_where(rec)}: unknown record format (keys {keys}); expected \"text\", "
                    "\"prompt\" + \"completion\", or \"messages\"")


def _is_url(s: str) -> bool:
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", s)) or s.startswith("data:")


def _resolve_images(rec: dict, folder: Path) -> None:
    for m in rec.get("messages") or []:
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, list):
            continue
        for item in content:
            if isinstance(item, dict) and item.get("type") == "image" and isinstance(item.get("image"), str):
                src = item["image"]
                if src and not _is_url(src) and not Path(src).expanduser().is_absolute():
                    p = folder / src
                    if p.exists():
                        item["image"] = str(p)


def read_jsonl(path, name: str | None = None) -> list[dict]:
    """The records of a JSONL file (one JSON object per non-blank line), all of one format.

    Each record gets ``"__file__"`` (``name``, default the path) and ``"__line__"`` (1-based line number).
    """
    path = Path(path)
    name = name or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{name}: not UTF-8 text ({e})") from None
    except OSError as e:
        raise DataError(f"{name}: cannot read ({e.strerror or e})") from None
    records, first = [], None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{name}:{n}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(rec, dict):
            raise DataError(f"{name}:{n}: each line must be a JSON object, not {type(rec).__name__}")
        if LINE in rec or FILE in rec:
            raise DataError(f"{name}:{n}: the keys {LINE!r} and {FILE!r} are reserved")
        rec[FILE], rec[LINE] = name, n
        fmt = record_format(rec)
        if first is None:
            first = (fmt, n)
        elif fmt != first[0]:
            raise DataError(f"{name}:{n}: a {fmt} record in a file of {first[0]} records (line {first[1]}): "
                            "one format per file")
        _resolve_images(rec, path.parent)
        records.append(rec)
    if not records:
        raise DataError(f"{name}: empty file (no records)")
    return records


_REPO_PART = r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9])?"
_REPO_ID = re.compile(f"{_REPO_PART}/{_REPO_PART}")


def is_repo_id(data: str) -> bool:
    """Whether a string that is no local path is clearly a Hugging Face dataset id: ``owner/name`` of the hub's
    characters (letters, digits, ``-_.``, not at either end, no ``--`` or ``..``), not ending like a data file.
    Anything else that does not exist (``./x``, ``~/x``, ``a/b/c``, ``x.jsonl``, ``C:\\x``) is a missing path."""
    return (bool(_REPO_ID.fullmatch(data)) and "--" not in data and ".." not in data
            and not data.lower().endswith((".jsonl", ".json", ".parquet")))


def _hub_snapshot(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover
        raise DataError(f"{repo_id}: no such folder (and huggingface_hub is not installed)") from None
    patterns = ["*.jsonl", "data/*.jsonl"]
    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", allow_patterns=patterns))
    except Exception as e:
        raise DataError(f"{repo_id}: not a local folder, and not a Hugging Face dataset in the cache or "
                        f"downloadable ({type(e).__name__}: {e})") from None


def load_splits(data, *, splits=("train", "valid", "test"), required=("train",)) -> dict[str, list[dict]]:
    """{split: records} from a folder with {split}.jsonl files, or a Hugging Face dataset repo id (its cache
    first, so it works offline; {split}.jsonl at the top of the repo or under data/). Missing optional splits
    are absent; a missing required one is a DataError."""
    p = Path(data).expanduser()
    if p.exists():
        if not p.is_dir():
            raise DataError(f"{data}: not a folder (give a folder with train.jsonl, valid.jsonl, test.jsonl)")
        root, label = p, None
    elif isinstance(data, str) and is_repo_id(data):
        root, label = _hub_snapshot(data), data
    else:
        raise DataError(f"{data}: no such folder (a Hugging Face dataset is named owner/name)")
    out = {}
    for split in splits:
        for rel in (f"{split}.jsonl", f"data/{split}.jsonl"):
            f = root / rel
            if f.is_file():
                out[split] = read_jsonl(f, f"{label}/{rel}" if label else str(f))
                break
    missing = [s for s in required if s not in out]
    if missing:
        raise DataError(f"{data}: no {', '.join(m + '.jsonl' for m in missing)} (required)")
    return out


# ---------------------------------------------------------------------------------------------- encoding

def _check_messages(rec: dict, where: str, mask_prompt: bool) -> list[dict]:
    msgs = rec["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: \"messages\" must be a non-empty list")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise DataError(f"{where}: message {i} is not an object")
        role = m.get("role")
        if role not in ROLES:
            raise DataError(f"{where}: message {i} has role {role!r}; expected one of {', '.join(ROLES)}")
        content = m.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise DataError(f"{where}: message {i} content must be a string or a list of items")
        for item in content:
            kind = item.get("type") if isinstance(item, dict) else None
            if kind == "text":
                if not isinstance(item.get("text"), str):
                    raise DataError(f"{where}: message {i}: a text item needs a string \"text\"")
            elif kind == "image":
                if item.get("image") is None or item.get("image") == "":
                    raise DataError(f"{where}: message {i}: an image item needs its image: "
                                    '{"type": "image", "image": PATH_OR_URL}')
            else:
                raise DataError(f"{where}: message {i}: content items are {{\"type\": \"text\"|\"image\"}}, "
                                f"not {item!r:.80}")
    if mask_prompt and not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{where}: no assistant message to train on (mask_prompt is on)")
    return [{k: v for k, v in m.items()} for m in msgs]


def _render(tokenizer, messages, gen: bool, where: str, kw: dict) -> str:
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False, **kw)
    except Exception as e:
        raise DataError(f"{where}: the chat template rejects this conversation ({type(e).__name__}: {e})") from None


def _tokens(tokenizer, text: str, image_ids, where: str) -> list[int]:
    from ..generate import BOI, layout_images

    if not text:
        return []
    n = text.count(BOI)
    if not n:
        return list(tokenizer.encode(text, add_special_tokens=False))
    if image_ids is None:
        raise DataError(f"{where}: the conversation has images but this model has no vision tower")
    return layout_images(tokenizer, text, n, image_ids)


def _encode_chat(tokenizer, msgs: list[dict], mask_prompt: bool, image_ids, where: str) -> tuple[list, list]:
    kw = template_kwargs(tokenizer)
    # text offsets: [0, P1) prompt, [P1, Q1) assistant turn 1, [Q1, P2) prompt, ..., [Qk, end) prompt
    cuts = []
    for i, m in enumerate(msgs):
        if m["role"] == "assistant":
            cuts.append((_render(tokenizer, msgs[:i], True, where, kw), False))
            cuts.append((_render(tokenizer, msgs[:i + 1], False, where, kw), True))
    full = _render(tokenizer, msgs, False, where, kw)
    tokens, mask, start = [], [], 0
    for text, is_turn in cuts + [(full, False)]:
        if not full.startswith(text) or len(text) < start:
            raise DataError(f"{where}: the chat template does not render this conversation incrementally "
                            "(a prefix is not a prefix of the whole): cannot tell the targets")
        piece = text[start:]
        start = len(text)
        if is_turn:
            core = piece.rstrip()  # the turn, through its end marker; the whitespace after is no target
            ids = _tokens(tokenizer, core, image_ids, where)
            tail = _tokens(tokenizer, piece[len(core):], image_ids, where)
            tokens += ids + tail
            mask += [True] * len(ids) + [False] * len(tail)
        else:
            ids = _tokens(tokenizer, piece, image_ids, where)
            tokens += ids
            mask += [False] * len(ids)
    if not mask_prompt:
        mask = [True] * len(tokens)
    return tokens, mask


def _bos_first(tokenizer, tokens: list[int], mask: list[bool]) -> None:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and (not tokens or tokens[0] != bos):
        tokens.insert(0, bos)
        mask.insert(0, False)
    if mask:
        mask[0] = False  # BOS (or whatever comes first) is never a target


def _runs(tokens: list[int], img: int) -> list[tuple[int, int]]:
    runs, i, n = [], 0, len(tokens)
    while i < n:
        if tokens[i] == img:
            j = i
            while j < n and tokens[j] == img:
                j += 1
            runs.append((i, j))
            i = j
        else:
            i += 1
    return runs


def encode(records: list[dict], tokenizer, *, mask_prompt: bool = True, image_ids=None,
           source: str = "data") -> list[Example]:
    """Examples (tokens, target mask, images) of ``records`` (see the module docstring for the formats).

    ``image_ids``: ``generate.image_token_ids(model)`` (boi, eoi, image token, tokens per image), needed for
    records with images. ``source`` names records that carry no ``"__file__"`` in errors."""
    from ..generate import message_images

    out = []
    for idx, rec in enumerate(records):
        where = _where(rec, source, idx)
        if not isinstance(rec, dict):
            raise DataError(f"{where}: a record must be a JSON object")
        try:
            fmt = record_format(rec)
        except DataError as e:
            raise DataError(f"{where}: {str(e).split(': ', 1)[-1]}") from None
        images = []
        if fmt == "text":
            text = rec["text"]
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{where}: \"text\" must be a non-empty string")
            tokens = list(tokenizer.encode(text))
            eos = tokenizer.eos_token_id
            if eos is not None and (not tokens or tokens[-1] != eos):
                tokens.append(eos)
            mask = [True] * len(tokens)
        elif fmt == "completions":
            prompt, completion = rec["prompt"], rec["completion"]
            if not isinstance(prompt, str) or not isinstance(completion, str):
                raise DataError(f"{where}: \"prompt\" and \"completion\" must be strings")
            if not completion.strip():
                raise DataError(f"{where}: empty \"completion\"")
            msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
            tokens, mask = _encode_chat(tokenizer, msgs, mask_prompt, None, where)
        else:
            msgs = _check_messages(rec, where, mask_prompt)
            images = message_images(msgs)
            if images and image_ids is None:
                raise DataError(f"{where}: the conversation has images but this model has no vision tower")
            try:
                tokens, mask = _encode_chat(tokenizer, msgs, mask_prompt, image_ids, where)
            except ValueError as e:
                if isinstance(e, DataError):
                    raise
                raise DataError(f"{where}: {e}") from None
        _bos_first(tokenizer, tokens, mask)
        runs = []
        if image_ids is not None:
            runs = _runs(tokens, image_ids[2])
            for a, b in runs:
                mask[a:b] = [False] * (b - a)
            if len(runs) != len(images):
                raise DataError(f"{where}: {len(runs)} image token runs for {len(images)} image(s)")
        out.append(Example(tokens, mask, list(images), runs, where))
    return out


def fingerprint(examples: list[Example]) -> str:
    """sha256 (hex) of examples as the model sees them, in order: each one's token ids, target mask and image
    sources. Taken over the tokenized form rather than the raw records, it also changes when the tokenizer or the
    chat template does (the same JSONL would then train on other tokens). Images count by their source (path,
    URL) only, not by the content of the file it names; an in-memory image (PIL, array) by its pixels."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(np.array([len(ex.tokens), len(ex.images)], np.int64).tobytes())
        h.update(np.asarray(ex.tokens, np.int64).tobytes())
        h.update(np.packbits(np.asarray(ex.mask, bool)).tobytes())
        for src in ex.images:
            if isinstance(src, (str, Path)):
                b = str(src).encode()
            else:
                a = np.asarray(src)
                b = str(a.shape).encode() + a.tobytes()
            h.update(len(b).to_bytes(8, "little") + b)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- batching

def _cut(ex: Example, n: int) -> Example:
    """The first ``n`` tokens of ``ex``, shortened further so no image is split (an image's soft tokens must
    all be in the inputs, tokens[:-1]); images past the cut are dropped."""
    keep = len(ex.images)
    for i, (a, b) in enumerate(ex.image_runs):
        if b > n - 1:  # not wholly inside tokens[:n - 1]
            n = max(a - 1, 0) if a < n else n  # cut before its <start_of_image>
            keep = i
            break
    return Example(ex.tokens[:n], ex.mask[:n], list(ex.images[:keep]), list(ex.image_runs[:keep]), ex.origin)


class Batches:
    """Batches of a split. ``batch(step)`` is a pure function of (examples, settings, seed, step).

    Sequences longer than ``max_seq_length`` are cut to their first ``max_seq_length`` tokens (never inside an
    image); one ``warn`` says how many and the longest length. Examples with no target token left are dropped.

    Without ``pack``: examples are sorted by length (stable) and cut into batches of ``batch_size`` (length
    bucketing: little padding); when the count does not divide, the last batch is the ``batch_size`` longest
    examples, so it overlaps the one before it (every example is seen every epoch). Epoch ``e`` visits the
    batches in the order ``np.random.default_rng((seed, e)).permutation``. A batch's width L is its longest
    row minus one (inputs are tokens[:-1]), padded with ``pad_id`` and loss mask 0.

    ``pack``: examples are concatenated, in an order shuffled once by ``seed``, into rows of ``max_seq_length``
    tokens (next fit; an example never straddles two rows), packed once so every epoch has the same rows; each
    epoch shuffles the rows (``default_rng((seed, e))``) and cuts them into batches (when the count does not
    divide, the last batch is completed with the epoch's first rows). Attention is NOT blocked between examples
    packed in one row: a later example can see the earlier ones (as in mlx-lm and most packers).

    Distributed: ``batch_size`` is the global batch; rank ``r`` of ``world`` gets rows ``r::world`` of it, all
    ranks at the same width L.

    ``fingerprint``: ``fingerprint(examples)``; checkpoints record it and ``--resume`` compares it.
    """

    def __init__(self, examples: list[Example], batch_size: int, max_seq_length: int, *, seed: int = 0,
                 pack: bool = False, pad_id: int = 0, rank: int = 0, world: int = 1, warn=print):
        if batch_size < 1 or max_seq_length < 2:
            raise DataError(f"batch_size must be >= 1 and max_seq_length >= 2 (got {batch_size}, {max_seq_length})")
        if world < 1 or not 0 <= rank < world:
            raise DataError(f"rank {rank} is not in a world of {world}")
        if batch_size % world:
            raise DataError(f"the batch size {batch_size} is not divisible by the {world} data-parallel processes")
        if not examples:
            raise DataError("no examples")
        self.batch_size, self.max_seq_length, self.seed = batch_size, max_seq_length, seed
        self.fingerprint = fingerprint(examples)  # of the examples as given (cut and dropped follow the settings)
        self.pack, self.pad_id, self.rank, self.world = pack, pad_id, rank, world
        kept, cut, dropped, longest = [], 0, 0, 0
        for ex in examples:
            if len(ex.tokens) > max_seq_length:
                cut += 1
                longest = max(longest, len(ex.tokens))
                ex = _cut(ex, max_seq_length)
            if not any(ex.mask[1:]):
                dropped += 1
                continue
            kept.append(ex)
        if cut or dropped:
            msg = []
            if cut:
                msg.append(f"{cut} of {len(examples)} sequences are longer than max_seq_length={max_seq_length} "
                           f"(the longest has {longest} tokens): cut to their first {max_seq_length} tokens")
            if dropped:
                msg.append(f"{dropped} example(s) with no target token left dropped")
            warn("Warning: " + "; ".join(msg))
        if not kept:
            raise DataError("no examples left (none has a target token within max_seq_length)")
        self.examples = kept
        if pack:
            self.rows = self._pack(kept)
            n = len(self.rows)
            what = "packed rows"
        else:
            order = sorted(range(len(kept)), key=lambda i: len(kept[i].tokens))  # stable
            n = len(kept)
            what = "examples"
        if n < batch_size:
            raise DataError(f"{n} {what}, fewer than the batch size {batch_size}")
        self._n = -(-n // batch_size)
        if not pack:
            self._batches = [order[k * batch_size:(k + 1) * batch_size] for k in range(n // batch_size)]
            if n % batch_size:
                self._batches.append(order[n - batch_size:])
        self._memo = (None, None)

    def _pack(self, examples: list[Example]) -> list[list[int]]:
        order = np.random.default_rng((self.seed, 1 << 30)).permutation(len(examples))
        rows, used = [], []
        for i in order:
            n = len(examples[i].tokens)
            if rows and used[-1] + n <= self.max_seq_length:
                rows[-1].append(int(i))
                used[-1] += n
            else:
                rows.append([int(i)])
                used.append(n)
        return rows

    def __len__(self) -> int:
        return self._n

    def _global(self, step: int) -> list[list[int]]:
        """The example indices of each row of the global batch of ``step``."""
        if step < 0:
            raise ValueError(f"step {step} < 0")
        epoch, k = divmod(int(step), self._n)
        if self._memo[0] != epoch:
            self._memo = (epoch, np.random.default_rng((self.seed, epoch)).permutation(
                len(self.rows) if self.pack else self._n))
        perm = self._memo[1]
        B = self.batch_size
        if self.pack:
            idx = [int(j) for j in perm[k * B:(k + 1) * B]]
            if len(idx) < B:
                idx += [int(j) for j in perm[:B - len(idx)]]
            return [self.rows[j] for j in idx]
        return [[i] for i in self._batches[int(perm[k])]]

    def _row(self, parts: list[int]) -> tuple[list[int], list[bool], list]:
        tokens, mask, images = [], [], []
        for i in parts:
            ex = self.examples[i]
            tokens += ex.tokens
            mask += ex.mask
            images += list(ex.images)
        return tokens, mask, images

    def batch(self, step: int):
        """(inputs int32 [B/world, L], targets int32, loss mask float32, images of each row) of global ``step``."""
        rows = [self._row(p) for p in self._global(step)]
        L = self.max_seq_length - 1 if self.pack else max(len(t) for t, _, _ in rows) - 1
        mine = rows[self.rank::self.world]
        b = len(mine)
        inputs = np.full((b, L), self.pad_id, np.int32)
        targets = np.full((b, L), self.pad_id, np.int32)
        weights = np.zeros((b, L), np.float32)
        for r, (t, m, _) in enumerate(mine):
            n = len(t) - 1
            inputs[r, :n] = t[:-1]
            targets[r, :n] = t[1:]
            weights[r, :n] = m[1:]
        return inputs, targets, weights, [tuple(im) for _, _, im in mine]

    def tokens_in(self, step: int) -> int:
        """Target tokens in the global batch of ``step`` (all ranks together)."""
        return int(sum(sum(m[1:]) for _, m, _ in (self._row(p) for p in self._global(step))))


__all__ = ["DataError", "Example", "read_jsonl", "record_format", "load_splits", "is_repo_id", "encode", "fingerprint",
           "Batches"]
