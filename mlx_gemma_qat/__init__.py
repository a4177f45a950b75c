"""mlx-gemma-qat: Gemma 3 QAT models with MLX, converted exactly.

    from mlx_gemma_qat import load, generate
    model, tokenizer = load()            # the embedded Gemma 3 270M, or a path / GGUF / repo id
    print(generate(model, tokenizer, "Why is the sky blue?", max_tokens=64))
"""

from __future__ import annotations

import os

__version__ = "0.1.0"


def _device_from_env() -> None:
    """``MLX_GEMMA_DEVICE=cpu`` (or ``gpu``) runs everything on that MLX device instead of MLX's default (the GPU
    where there is one), in this process and in every process that imports this package (the test suite sets
    cpu, so a Mac computes what Linux CI computes, its subprocesses included)."""
    name = os.environ.get("MLX_GEMMA_DEVICE", "").strip().lower()
    if not name:
        return
    if name not in ("cpu", "gpu"):
        raise ValueError(f"MLX_GEMMA_DEVICE={name!r}: expected cpu or gpu")
    import mlx.core as mx

    mx.set_default_device(mx.cpu if name == "cpu" else mx.gpu)


_device_from_env()


def load(path_or_repo=None, *, mmproj=None, dtype=None, widen=None, scales=None, lazy: bool = False,
         adapter_path=None, shard=None, pipeline_split=None):
    """Return ``(model, tokenizer)`` like ``mlx_lm.load``.

    ``path_or_repo``: an MLX folder, a GGUF file, a Hugging Face folder or repo id; None for the
    embedded Gemma 3 270M. Non-MLX sources are converted once into a cache folder.
    ``mmproj``: with a text GGUF, llama.cpp's vision GGUF, for a model that reads images.
    ``dtype``: compute dtype, by default float32 on the CPU and bfloat16 on a GPU.
    ``widen``: hold float16/bfloat16 weights (and quantization scales) as float32 copies: exact, faster on
    the CPU, more memory. Default: on when computing in float32 (the CPU); off keeps the stored precision.
    ``scales``: "stored" or "float32": quantized scales held as the file stores them, or widened once (exact,
    fewer bytes read per decoded token on a GPU). Default: float32 with bfloat16 compute when it fits the
    device's memory (see model/load.py), else stored; ``model.holding`` says which was used.
    ``adapter_path``: a LoRA adapter folder (``mlx-gemma lora``) to run with, checked against the model.
    ``shard``: "tensor" or "pipeline": split the model over the processes ``mlx.launch`` started (model/shard.py;
    every process calls ``load`` with the same arguments and then generates in step with the others);
    ``pipeline_split``: layers per process (default: by each one's memory). ``model.shard`` says how it is split.
    """
    from mlx_lm.utils import load_tokenizer

    from .model.load import load_model, read_config
    from .models_cache import resolve_model

    if shard is not None:
        from .world import World

        world = World()
        with world.together("finding the model"):
            if adapter_path is not None:
                raise ValueError("a LoRA adapter cannot be used with a split model yet: fuse it first (mlx-gemma fuse)")
            folder = resolve_model(path_or_repo, mmproj=mmproj)
        model = load_model(folder, dtype=dtype, lazy=lazy, widen=widen, scales=scales, shard=shard,
                           pipeline_split=pipeline_split, world=world)
        world.same_random_numbers()
    else:
        folder = resolve_model(path_or_repo, mmproj=mmproj)
        model = load_model(folder, dtype=dtype, lazy=lazy, widen=widen, scales=scales)
    if adapter_path is not None:
        from .lora.adapters import load_adapters

        load_adapters(model, adapter_path, warn=None)
    eos = read_config(folder).get("eos_token_id")
    tokenizer = load_tokenizer(folder, eos_token_ids=eos if isinstance(eos, list) else None)
    return model, tokenizer


def load_draft(path_or_repo, tokenizer, *, dtype=None, widen=None):
    """A draft model for speculative decoding with the model whose tokenizer is ``tokenizer``: loaded as ``load``
    loads (any Gemma 3 drafts for any other, e.g. the 270M for the 12B QAT), its vocabulary checked against the
    target's (``speculative.check_vocab``: a ``speculative.DraftError`` otherwise). Pass it as ``draft_model=``."""
    from .speculative import check_vocab

    draft, draft_tokenizer = load(path_or_repo, dtype=dtype, widen=widen)
    check_vocab(tokenizer, draft_tokenizer)
    return draft


# Imported eagerly: a lazy wrapper would be replaced by the submodule of the same name (mlx_gemma_qat.generate)
# as soon as anything imported that submodule.
from .chat import ChatSession  # noqa: E402
from .generate import generate, stream_generate  # noqa: E402


def convert(*args, **kwargs):
    from .convert import convert as _c

    return _c(*args, **kwargs)


__all__ = ["load", "load_draft", "generate", "stream_generate", "ChatSession", "convert", "__version__"]
