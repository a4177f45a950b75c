"""Which layers get adapters, and adapter files: ``adapter_config.json`` + ``adapters.safetensors``.

Layer names are the text model's (``model.layers.3.self_attn.q_proj``, ``model.embed_tokens``), as in
mlx-lm's adapter files. The config records the base model's identity (model/load.py ``model_identity``): an
adapter trained on another model is refused rather than silently producing nonsense.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..atomic import atomic_file, write_text
from ..model.multimodal import text_model  # noqa: F401  (adapters live in the text model; trainer imports it here)
from ..model.quantized import Embedding, Linear, QuantizedEmbedding, QuantizedLinear
from .layers import KINDS, AdapterError, LoRAEmbedding, LoRALinear, group_size_of, wrap
from .settings import from_dict

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapters.safetensors"
EMBEDDING = "model.embed_tokens"


@dataclass
class AdapterConfig:
    kind: str = "lora"              # "lora" or "pooled" (group-pooled, fuses exactly into the affine biases)
    rank: int = 8
    scale: float = 20.0
    dropout: float = 0.0
    num_layers: int = 16            # the last N transformer blocks (-1 or more than there are: all)
    keys: list[str] | None = None   # module names inside a block (q_proj, self_attn.v_proj, ...); None: every linear
    embedding: bool = False         # adapt the tied embedding / output head too
    layers: dict[str, str] = field(default_factory=dict)  # resolved: layer name -> kind (filled by apply_adapters)
    base_identity: str | None = None
    base_model: str | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise AdapterError(f"unknown adapter kind {self.kind!r} (one of {', '.join(KINDS)})")
        if self.rank < 1:
            raise AdapterError(f"rank must be >= 1, got {self.rank}")

    @classmethod
    def from_dict(cls, d: dict) -> "AdapterConfig":
        """From a dict of fields; an unknown key is an AdapterError."""
        return from_dict(cls, d, "adapter", AdapterError)


def _targets(text: nn.Module, cfg: AdapterConfig) -> list[str]:
    blocks = text.model.layers
    n = len(blocks) if cfg.num_layers < 0 else min(cfg.num_layers, len(blocks))  # 16 on a smaller model: all
    names = []
    for i in range(len(blocks) - n, len(blocks)):
        found = []
        for path, m in blocks[i].named_modules():
            if isinstance(m, (QuantizedLinear, Linear)) and (
                    cfg.keys is None or any(path == k or path.endswith("." + k) for k in cfg.keys)):
                found.append(f"model.layers.{i}.{path}")
        names += sorted(found)
    if cfg.keys is not None:
        present = {n.split(".")[-1] for n in names} | {".".join(n.split(".")[-2:]) for n in names}
        missing = [k for k in cfg.keys if k not in present]
        if missing:
            raise AdapterError(f"no linear layer named {', '.join(missing)} in the adapted blocks")
    if cfg.embedding:
        if not text.cfg.tie_word_embeddings:
            raise AdapterError("this model's head is not tied to the embedding; adapt lm_head through --keys")
        names.append(EMBEDDING)
    if not names:
        raise AdapterError("no layer to adapt (--num-layers 0 and no embedding)")
    return names


def apply_adapters(model, cfg: AdapterConfig, warn=print) -> AdapterConfig:
    """Freeze the whole model and wrap the chosen layers with trainable adapters. Returns the config with
    ``layers`` resolved (a group-pooled adapter on a dense layer, which has no groups, becomes ``lora`` there,
    with a warning). A config whose ``layers`` are already resolved (a saved adapter) is applied as saved."""
    text = text_model(model)
    model.freeze()
    names = list(cfg.layers) if cfg.layers else _targets(text, cfg)
    modules = dict(text.named_modules())
    swaps, kinds, demoted = [], {}, []
    for name in names:
        base = modules.get(name)
        if base is None or not isinstance(base, (QuantizedLinear, Linear, QuantizedEmbedding, Embedding)):
            raise AdapterError(f"the model has no adaptable layer {name}")
        kind = cfg.layers.get(name, cfg.kind)
        if kind == "pooled" and group_size_of(base) is None:
            kind = "lora"
            demoted.append(name)
        kinds[name] = kind
        swaps.append((name, wrap(base, cfg.rank, cfg.scale, cfg.dropout, kind)))
    if demoted and warn:
        warn(f"{len(demoted)} adapted layer(s) are dense (not quantized), so they get a standard LoRA adapter "
             f"instead of a group-pooled one: {', '.join(demoted[:3])}{' ...' if len(demoted) > 3 else ''}")
    text.update_modules(tree_unflatten(swaps))
    for _, layer in swaps:
        layer.base.freeze()
    cfg.layers = kinds
    cfg.base_identity = getattr(model, "identity", cfg.base_identity)
    cfg.base_model = str(getattr(model, "path", cfg.base_model))
    return cfg


def adapter_layers(model) -> dict[str, nn.Module]:
    return {n: m for n, m in text_model(model).named_modules() if isinstance(m, (LoRALinear, LoRAEmbedding))}


def adapter_weights(model) -> dict[str, mx.array]:
    """The trainable adapter tensors, by text-model name (``...q_proj.lora_a``)."""
    return dict(tree_flatten(text_model(model).trainable_parameters()))


def save_safetensors(path: Path, arrays: dict[str, mx.array], metadata: dict | None = None) -> None:
    with atomic_file(path) as tmp:
        mx.save_safetensors(str(tmp), arrays, metadata=metadata or {})


def save_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2))


def save_adapters(model, cfg: AdapterConfig, folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(folder / WEIGHTS_FILE, adapter_weights(model))
    save_json(folder / CONFIG_FILE, asdict(cfg))
    return folder


def read_adapter_config(folder: str | os.PathLike) -> AdapterConfig:
    folder = Path(folder)
    p = folder / CONFIG_FILE
    if not p.is_file():
        raise AdapterError(f"{folder}: no {CONFIG_FILE} (not an adapter folder)")
    try:
        return AdapterConfig.from_dict(json.loads(p.read_text()))
    except (json.JSONDecodeError, TypeError, AdapterError) as e:
        raise AdapterError(f"{p}: not a valid adapter config ({e})") from None


def check_identity(model, cfg: AdapterConfig, where) -> None:
    have = getattr(model, "identity", None)
    if cfg.base_identity and have and cfg.base_identity != have:
        raise AdapterError(f"{where}: this adapter was trained on another model ({cfg.base_model}, identity "
                           f"{cfg.base_identity}); the loaded model is {getattr(model, 'path', '?')} (identity {have})")


def load_adapters(model, folder: str | os.PathLike, warn=print) -> AdapterConfig:
    """Apply the adapter saved in ``folder`` to ``model`` (checked: same base model, same names and shapes)."""
    folder = Path(folder)
    cfg = read_adapter_config(folder)
    check_identity(model, cfg, folder)
    apply_adapters(model, cfg, warn=warn)
    f = folder / WEIGHTS_FILE
    if not f.is_file():
        raise AdapterError(f"{folder}: no {WEIGHTS_FILE}")
    try:
        saved = mx.load(str(f))
    except Exception as e:  # noqa: BLE001 - MLX raises RuntimeError/ValueError for a corrupt file
        raise AdapterError(f"{f}: not a readable safetensors file ({e})") from None
    set_adapter_weights(model, saved, f)
    if getattr(model, "identity", None):  # prompt caches made without this adapter must not be reused with it
        import hashlib

        model.identity = hashlib.sha256(model.identity.encode() + f.read_bytes()).hexdigest()[:16]
    model.eval()
    return cfg


def set_adapter_weights(model, saved: dict[str, mx.array], where) -> None:
    want = adapter_weights(model)
    missing, extra = sorted(set(want) - set(saved)), sorted(set(saved) - set(want))
    if missing or extra:
        raise AdapterError(f"{where}: adapter tensors do not match the model's adapted layers "
                           f"(missing {missing[:2]}, unexpected {extra[:2]})")
    for k, v in want.items():
        if saved[k].shape != v.shape:
            raise AdapterError(f"{where}: {k} has shape {tuple(saved[k].shape)}, the model needs {tuple(v.shape)}")
    text_model(model).update(tree_unflatten([(k, saved[k].astype(mx.float32)) for k in want]))
