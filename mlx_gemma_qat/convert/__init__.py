"""Convert Gemma 3 checkpoints (GGUF or Hugging Face safetensors) into an MLX model folder.

``convert(src, out)`` picks the route from ``src``: a ``.gguf`` file, a local Hugging Face folder, or a
hub repo id. The result is a standard MLX folder that this package and ``mlx_lm.load`` both read.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from ..model.multimodal import MultimodalConfig, is_multimodal
from . import from_gguf, from_hf
from .writer import atomic_output_dir, write_model

GEMMA3_EOS_IDS = [1, 106]  # <eos> and <end_of_turn>: chat turns end with the latter


def is_gguf(path: str | Path) -> bool:
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as fh:
        return fh.read(4) == b"GGUF"


def _provenance(src: str, fmt: str, tensors: dict[str, str], exact: dict[str, bool], **opts) -> dict:
    counts = Counter(tensors.values())
    return {
        "source": str(src),
        "source_format": fmt,
        "options": opts,
        "source_types": dict(sorted(counts.items())),
        "inexact_tensors": sorted(n for n, e in exact.items() if not e),
    }


def convert(
    src: str | Path,
    out: str | Path,
    *,
    q6k: str = "int8",
    dequantize: bool = False,
    mmproj: str | Path | None = None,
    mode: str = "q4_0",
    bits: int = 4,
    group_size: int = 32,
    embed_bits: int | None = None,
    dtype: str | None = None,
    force: bool = False,
    progress: bool = True,
    chat_template: str | None = None,
    sampling: dict | None = None,
) -> Path:
    """Convert ``src`` into an MLX folder at ``out``; nothing is left at ``out`` if anything fails.

    ``chat_template`` (Jinja) is the model's when the source ships none; ``sampling`` (temperature, top_p, top_k,
    min_p, stop) is recorded as the model's default sampling: both come from an Ollama manifest's layers."""
    import mlx.core as mx

    dense_dtype = {None: None, "bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}[dtype]
    out = Path(out)
    types: dict[str, str] = {}
    exact: dict[str, bool] = {}

    def tracked(it, total):
        bar = tqdm(total=total, desc="converting", unit="tensor", disable=not progress)
        for name, t in it:
            types[name], exact[name] = t.source_type, t.exact
            yield name, t
            bar.update(1)
        bar.close()

    if not Path(src).expanduser().exists():  # a repo id: a checkpoint folder, or a GGUF repo's model and mmproj
        from .hub import fetch

        found = fetch(str(src))  # its mmproj is None but beside a model GGUF
        src, mmproj = found.path, mmproj if mmproj is not None else found.mmproj
    if is_gguf(src):
        with from_gguf.reading(src):
            return _convert_gguf(src, out, tracked, types, exact, q6k=q6k, dequantize=dequantize, mmproj=mmproj,
                                 dense_dtype=dense_dtype, force=force, chat_template=chat_template,
                                 sampling=sampling)
    if chat_template is not None or sampling is not None:
        raise from_hf.HFError("a chat template or default sampling goes with a GGUF source")

    if mmproj is not None:
        raise from_hf.HFError("--mmproj goes with a text GGUF; a Hugging Face folder carries its vision tower")
    folder = Path(src).expanduser()
    if folder.is_file():
        raise from_hf.HFError(f"{src}: not a GGUF file and not a model folder")
    raw, cfg = from_hf.read_config(folder)
    files = from_hf.weight_files(folder)
    vision = is_multimodal(raw)
    with from_gguf.reading(folder, from_hf.HFError), atomic_output_dir(out, force) as tmp:
        config = MultimodalConfig.from_dict(raw).to_dict() if vision else cfg.to_dict()
        it = from_hf.iter_tensors(folder, cfg, mode=mode, bits=bits, group_size=group_size, embed_bits=embed_bits,
                                  vision=vision)
        _write(tmp, config, tracked(it, None), dense_dtype, {"eos_id": raw.get("eos_token_id", 1)}, folder)
        for f in from_hf.TOKENIZER_FILES:
            if (folder / f).is_file():
                shutil.copy(folder / f, tmp / f)
        if not (tmp / "tokenizer.json").is_file() and not (tmp / "tokenizer.model").is_file():
            raise from_hf.HFError(f"{folder}: no tokenizer.json or tokenizer.model")
        opts = dict(mode=mode, bits=bits, group_size=group_size, embed_bits=embed_bits, weight_files=len(files))
        _finish(tmp, _provenance(src, "safetensors", types, exact, **opts))
    return out


def _convert_gguf(src, out, tracked, types, exact, *, q6k, dequantize, mmproj, dense_dtype, force, chat_template,
                  sampling) -> Path:
    from .tokenizer import special_token_ids, tokenizer_from_gguf, write_tokenizer_files

    reader = from_gguf.open_gguf(src)
    cfg = from_gguf.config_from_gguf(reader)
    tokenizer = tokenizer_from_gguf(reader)  # fail early, before any weight is written
    ids = special_token_ids(reader)
    config = cfg.to_dict()
    text_it = from_gguf.iter_tensors(reader, q6k=q6k, dequantize=dequantize)
    n_tensors = sum(from_gguf.is_text_tensor(t.name) for t in reader.tensors)
    embedded = from_gguf.has_embedded_vision(reader)
    if embedded and mmproj is not None:
        raise from_gguf.GGUFError(f"{src}: holds its own vision tower (Ollama's one-file layout); give no --mmproj")
    if mmproj is not None or embedded:
        mcfg, vision_tensors = multimodal_config_from_gguf(reader, cfg, mmproj)
        config = mcfg.to_dict()
        n_tensors += len(vision_tensors)
        text_it = _chain_multimodal(text_it, vision_tensors)
    with atomic_output_dir(out, force) as tmp:
        it = tracked(text_it, n_tensors)
        _write(tmp, config, it, dense_dtype, ids, src)
        # A GGUF carries a chat template only when its model was tuned for chat (Google's -it
        # files do); base models get none, so generation defaults to plain completion for them.
        template = from_gguf.meta(reader, "tokenizer.chat_template", str) or chat_template
        write_tokenizer_files(tmp, tokenizer, **ids, chat_template=template)
        prov = _provenance(src, "gguf", types, exact, q6k=q6k, dequantize=dequantize,
                           mmproj=str(mmproj) if mmproj else None)
        if sampling:
            prov["sampling"] = dict(sampling)
        _finish(tmp, prov)
    return out


def multimodal_config_from_gguf(reader, text_cfg, mmproj=None):
    """The multimodal config and the vision tensors: of llama.cpp's pair (text GGUF + ``mmproj`` GGUF), or
    of Ollama's one file (``mmproj`` None: the vision tower is in ``reader``'s file)."""
    from ..model.vision import VisionConfig
    from .from_mmproj import MmprojError, read_embedded_vision, read_mmproj

    vcfg, tokens, tensors = read_mmproj(mmproj) if mmproj is not None else read_embedded_vision(reader)
    mmproj = mmproj if mmproj is not None else from_gguf.where(reader)
    toks = from_gguf.field(reader, "tokenizer.ggml.tokens") or []
    index = {t: i for i, t in enumerate(toks)}
    # <image_soft_token> is an added token outside tokenizer.model, so llama.cpp's text GGUF lacks it:
    # transformers puts it at the first id past the SentencePiece vocabulary (262144)
    mcfg = MultimodalConfig(
        text=text_cfg,
        vision=VisionConfig.from_dict(vcfg),
        mm_tokens_per_image=tokens,
        image_token_index=index.get("<image_soft_token>", len(toks)),
        boi_token_index=index.get("<start_of_image>", 255999),
        eoi_token_index=index.get("<end_of_image>", 256000),
    )
    tensors = list(tensors)
    width = next(t.shape[1] for n, t in tensors if n.endswith("mm_input_projection_weight"))
    if width != text_cfg.hidden_size:
        raise MmprojError(f"{mmproj}: projects to width {width}, the text model is {text_cfg.hidden_size} wide")
    return mcfg, tensors


def _chain_multimodal(text_it, vision_tensors):
    for name, t in text_it:
        yield "language_model." + name, t
    yield from vision_tensors


def _write(tmp: Path, config: dict, tensors, dense_dtype, ids: dict, src):
    eos = ids.get("eos_id", 1)
    eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    config["eos_token_id"] = sorted(set(eos) | set(GEMMA3_EOS_IDS))
    for k in ("bos_id", "pad_id"):
        if k in ids:
            config[k.replace("_id", "_token_id")] = ids[k]
    expected = _expected_shapes(config)
    written = []

    def checked():
        for name, t in tensors:
            want = expected.get(name)
            if want is not None and tuple(t.shape) != want:
                raise IncompleteModelError(f"{src}: tensor {name} has shape {tuple(t.shape)}, the config implies {want}")
            written.append(name)
            yield name, t

    write_model(tmp, config, checked(), dense_dtype=dense_dtype)
    _check_complete(src, expected, written)


class IncompleteModelError(ValueError):
    """The source lacks tensors the model needs, has ones it does not know, or ones of the wrong shape."""


def _expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every parameter of the config's model and its (logical, unquantized) shape; a tied head has no lm_head.
    The model is built lazily: no parameter is computed."""
    from mlx.utils import tree_flatten

    from ..model.config import TextConfig
    from ..model.multimodal import Model as MultimodalModel
    from ..model.text import Model

    model = MultimodalModel(MultimodalConfig.from_dict(config)) if is_multimodal(config) else Model(
        TextConfig.from_dict(config))
    return {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}


def _check_complete(src, expected: dict, written: list[str]) -> None:
    """Every parameter the config's model has was written, once, and nothing else (before the folder is kept)."""
    dup = sorted(n for n, c in Counter(written).items() if c > 1)
    missing, extra = sorted(set(expected) - set(written)), sorted(set(written) - set(expected))
    for what, names in (("lacks", missing), ("has unexpected", extra), ("repeats", dup)):
        if names:
            more = f" (+{len(names) - 3} more)" if len(names) > 3 else ""
            raise IncompleteModelError(f"{src}: the source {what} tensors for this model: {', '.join(names[:3])}{more}")


def _finish(tmp: Path, provenance: dict):
    cfg_path = tmp / "config.json"
    config = json.loads(cfg_path.read_text())
    config["mlx_gemma_qat"] = provenance
    cfg_path.write_text(json.dumps(config, indent=2))
