"""Write a standard MLX model folder, atomically.

Layout (what ``mlx_lm.load`` also reads): ``config.json`` with a per-layer ``quantization`` map,
``model-0000N-of-0000M.safetensors`` shards plus ``model.safetensors.index.json``, tokenizer files.
Everything is written into a temporary sibling folder and renamed into place at the end, so an
interrupted or failed conversion leaves nothing at the destination.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

import mlx.core as mx
import numpy as np

from ..atomic import atomic_dir
from .grids import MLXTensor

SHARD_BYTES = 2 << 30


class OutputExistsError(FileExistsError):
    pass


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; it becomes ``out`` only if the block succeeds (atomic.atomic_dir);
    an existing ``out`` is refused unless ``force``."""
    out = Path(out)
    if out.exists() and not force:
        raise OutputExistsError(f"{out} already exists (use --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        yield tmp


def _to_mx(a: np.ndarray, dtype: mx.Dtype | None = None) -> mx.array:
    arr = mx.array(a)
    return arr.astype(dtype) if dtype is not None and arr.dtype != dtype else arr


def tensor_arrays(name: str, t: MLXTensor, dense_dtype: mx.Dtype | None = None) -> dict[str, mx.array]:
    """The safetensors entries for one weight: ``name.weight`` (+ ``.scales``, ``.biases``)."""
    base = name[: -len(".weight")] if name.endswith(".weight") else name
    if t.quantized:
        return {
            f"{base}.weight": _to_mx(t.weight),
            f"{base}.scales": _to_mx(t.scales),
            f"{base}.biases": _to_mx(t.biases),
        }
    dtype = dense_dtype
    if dtype is None and t.source_type == "BF16":
        dtype = mx.bfloat16  # the float32 array holds bf16 values exactly; store them as bf16
    return {name: _to_mx(t.weight, dtype)}


def quantization_entry(t: MLXTensor) -> dict:
    return {"group_size": t.group_size, "bits": t.bits, "mode": "affine"}


def write_model(
    out_dir: Path,
    config: dict,
    tensors: Iterable[tuple[str, MLXTensor]],
    *,
    dense_dtype: mx.Dtype | None = None,
    progress=None,
) -> dict:
    """Write shards and config.json into ``out_dir`` (already created). Returns the config written.

    ``tensors`` yields (hf_name, MLXTensor) lazily so a big model never sits in memory whole.
    """
    quant: dict[str, dict] = {}
    index: dict[str, str] = {}
    shard: dict[str, mx.array] = {}
    shard_size, n_shards, total = 0, 0, 0
    shard_files: list[str] = []

    def flush():
        nonlocal shard, shard_size, n_shards
        if not shard:
            return
        n_shards += 1
        fname = f"model-{n_shards:05d}.safetensors"
        mx.save_safetensors(str(out_dir / fname), shard, metadata={"format": "mlx"})
        shard_files.append(fname)
        for k in shard:
            index[k] = fname
        shard, shard_size = {}, 0

    for name, t in tensors:
        arrays = tensor_arrays(name, t, dense_dtype)
        if t.quantized:
            quant[name[: -len(".weight")]] = quantization_entry(t)
        size = sum(a.nbytes for a in arrays.values())
        if shard and shard_size + size > SHARD_BYTES:
            flush()
        shard.update(arrays)
        shard_size += size
        total += size
        if progress is not None:
            progress(name)
    flush()

    # Rename shards to the -0000N-of-0000M form once the count is known.
    final_index = {}
    renames = {}
    for i, f in enumerate(shard_files, 1):
        new = f"model-{i:05d}-of-{n_shards:05d}.safetensors"
        (out_dir / f).rename(out_dir / new)
        renames[f] = new
    for k, f in index.items():
        final_index[k] = renames[f]
    with open(out_dir / "model.safetensors.index.json", "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(final_index.items()))}, fh, indent=2)

    config = dict(config)
    if quant:
        common = Counter((q["bits"], q["group_size"]) for q in quant.values()).most_common(1)[0][0]
        qcfg = {"group_size": common[1], "bits": common[0], "mode": "affine", **quant}
        config["quantization"] = qcfg
        config["quantization_config"] = qcfg
    with open(out_dir / "config.json", "w") as fh:
        json.dump(config, fh, indent=2)
    return config
