"""Fuse an adapter into its base model folder, on the base's own quantization grid.

- ``pooled`` (group-pooled) adapters: the update is constant within each quantization group, so it is added to
  the groups' affine biases. Packed integers and scales stay the base's, bit for bit; the only rounding is the
  new bias to the dtype the folder stores it in (float16 for the GGML types), reported.
- ``lora`` adapters on a quantized layer: the updated weight is rounded onto the layer's own grid (its stored
  scales and biases kept; each integer re-chosen, clipped to the bit width). A zero update changes nothing.
  That rounding is lossy; give validation data to see how far the loss moved.
- ``lora`` adapters on a dense layer: added and rounded to the stored dtype.

The fused folder is a normal MLX folder (this package and mlx_lm.load read it) with the fuse recorded in its
config; ``gguf=`` also exports it as a GGUF (convert/to_gguf.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..convert.grids import pack_bits, unpack_bits
from ..convert.writer import atomic_output_dir
from ..model.load import load_weights, model_identity, read_config
from ..model.multimodal import is_multimodal
from .adapters import WEIGHTS_FILE, AdapterError, read_adapter_config


def _deltas(adapter: dict[str, mx.array], name: str, cfg) -> mx.array:
    a, b = adapter[f"{name}.lora_a"].astype(mx.float32), adapter[f"{name}.lora_b"].astype(mx.float32)
    if name.endswith("embed_tokens"):
        return cfg.scale * (a @ b)  # (vocab, hidden[/g])
    return cfg.scale * (a @ b).T     # (out, in[/g])


def _fuse_biases(biases: mx.array, delta: mx.array) -> tuple[mx.array, dict]:
    want = biases.astype(mx.float32) + delta
    new = want.astype(biases.dtype)
    err = mx.abs(new.astype(mx.float32) - want)
    return new, {"max_delta": float(mx.abs(delta).max().item()), "max_rounding": float(err.max().item())}


def _fuse_on_grid(w: mx.array, scales: mx.array, biases: mx.array, delta: mx.array, bits: int, group: int):
    """Re-choose the integers of ``dequantize(w) + delta`` with the layer's scales and biases kept."""
    rows = w.shape[0]
    n = w.shape[1] * 32 // bits
    q_old = unpack_bits(np.array(w), bits, n).reshape(rows, n // group, group)
    s = np.array(scales.astype(mx.float32))[..., None]
    b = np.array(biases.astype(mx.float32))[..., None]
    d = np.array(delta).reshape(rows, n // group, group)
    target = q_old * s + b + d
    pos = (target - b) / np.where(s != 0, s, 1)  # the target's place on the grid (a group of scale 0 keeps q)
    q = np.clip(np.where(s != 0, np.rint(pos), q_old), 0, (1 << bits) - 1).astype(np.uint8)
    fused = q * s + b
    stats = {"changed_fraction": float((q != q_old).mean()),
             "max_delta": float(np.abs(d).max()),
             "rms_delta": float(np.sqrt((d ** 2).mean())),
             "rms_grid_error": float(np.sqrt(((fused - target) ** 2).mean())),
             "clipped_fraction": float((pos > (1 << bits) - 0.5).mean() + (pos < -0.5).mean())}
    return mx.array(pack_bits(q.reshape(rows, n), bits)), stats


def fuse(model_path, adapter_path, out, *, force: bool = False, progress: bool = True) -> dict:
    """Write ``out``: the MLX folder ``model_path`` with the adapter of ``adapter_path`` fused in. Returns the
    per-layer report (also stored in the new folder's config under ``mlx_gemma_qat.fused``)."""
    model_path, adapter_path = Path(model_path), Path(adapter_path)
    cfg = read_adapter_config(adapter_path)
    ident = model_identity(model_path)
    if cfg.base_identity and cfg.base_identity != ident:
        raise AdapterError(f"{adapter_path}: this adapter was trained on another model ({cfg.base_model}, identity "
                           f"{cfg.base_identity}); {model_path} is identity {ident}")
    config = read_config(model_path)
    prefix = "language_model." if is_multimodal(config) else ""
    quant = config.get("quantization") or {}
    weights = load_weights(model_path)
    try:
        adapter = mx.load(str(adapter_path / WEIGHTS_FILE))
    except Exception as e:  # noqa: BLE001
        raise AdapterError(f"{adapter_path / WEIGHTS_FILE}: cannot read the adapter ({e})") from None
    changed: dict[str, mx.array] = {}
    report = {}
    for name, kind in cfg.layers.items():
        full = prefix + name
        if f"{name}.lora_a" not in adapter or f"{full}.weight" not in weights:
            raise AdapterError(f"{adapter_path}: layer {name} is missing from the adapter or the model")
        delta = _deltas(adapter, name, cfg)
        q = quant.get(full) if isinstance(quant.get(full), dict) else (quant if f"{full}.scales" in weights else None)
        if kind == "pooled":
            if q is None:
                raise AdapterError(f"{name}: a group-pooled adapter on a layer that is not quantized")
            if delta.shape != weights[f"{full}.biases"].shape:
                raise AdapterError(f"{name}: adapter update {tuple(delta.shape)} does not match the layer's groups "
                                   f"{tuple(weights[f'{full}.biases'].shape)}")
            changed[f"{full}.biases"], stats = _fuse_biases(weights[f"{full}.biases"], delta)
            report[name] = {"how": "biases (exact)", **stats}
        elif q is not None:
            changed[f"{full}.weight"], stats = _fuse_on_grid(weights[f"{full}.weight"], weights[f"{full}.scales"],
                                                            weights[f"{full}.biases"], delta, q["bits"], q["group_size"])
            report[name] = {"how": f"re-rounded on its {q['bits']}-bit grid", **stats}
        else:
            w = weights[f"{full}.weight"]
            if delta.shape != w.shape:
                raise AdapterError(f"{name}: adapter update {tuple(delta.shape)} does not match the weight {tuple(w.shape)}")
            want = w.astype(mx.float32) + delta
            changed[f"{full}.weight"] = want.astype(w.dtype)
            report[name] = {"how": f"dense ({str(w.dtype).removeprefix('mlx.core.')})",
                            "max_delta": float(mx.abs(delta).max().item()),
                            "max_rounding": float(mx.abs(changed[f"{full}.weight"].astype(mx.float32) - want).max().item())}
    with atomic_output_dir(out, force=force) as tmp:
        for f in sorted(model_path.iterdir()):
            if f.suffix == ".safetensors":
                arrays = mx.load(str(f))
                arrays.update({k: v for k, v in changed.items() if k in arrays})
                mx.save_safetensors(str(tmp / f.name), arrays, metadata={"format": "mlx"})
            elif f.name == "config.json":
                continue
            elif f.is_file():
                shutil.copy2(f, tmp / f.name)
        prov = dict(config.get("mlx_gemma_qat") or {})
        prov["fused"] = {"adapter": str(adapter_path), "kind": cfg.kind, "rank": cfg.rank, "scale": cfg.scale,
                         "base_identity": ident, "layers": report}
        config["mlx_gemma_qat"] = prov
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    if progress:
        print(summary(report))
    return report


def summary(report: dict) -> str:
    kinds: dict[str, int] = {}
    for r in report.values():
        kinds[r["how"]] = kinds.get(r["how"], 0) + 1
    lines = [f"fused {len(report)} layer(s): " + ", ".join(f"{n} {h}" for h, n in kinds.items())]
    rb = [r["max_rounding"] for r in report.values() if "max_rounding" in r]
    if rb:
        lines.append(f"  largest rounding of a fused bias/weight to its stored dtype: {max(rb):.3g} "
                     f"(largest update {max(r['max_delta'] for r in report.values()):.3g})")
    grid = [r for r in report.values() if "rms_grid_error" in r]
    if grid:
        lines.append(f"  re-rounded layers: {100 * np.mean([r['changed_fraction'] for r in grid]):.2f}% of integers changed, "
                     f"grid error rms {np.mean([r['rms_grid_error'] for r in grid]):.3g} vs update rms "
                     f"{np.mean([r['rms_delta'] for r in grid]):.3g} (lossy: check the validation loss)")
    return "\n".join(lines)
