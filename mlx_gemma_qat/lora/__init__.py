"""LoRA fine-tuning on the quantized model: adapters (layers.py, adapters.py), data (data.py), training
(trainer.py), fusing (fuse.py); GGUF export of a fused folder is convert/to_gguf.py.

    from mlx_gemma_qat.lora import finetune
    result = finetune(None, "data/", "adapters/", adapter={"kind": "pooled", "rank": 8}, train={"iters": 200})
"""

from __future__ import annotations

from .adapters import AdapterConfig, AdapterError, apply_adapters, load_adapters, save_adapters
from .layers import KINDS
from .trainer import NonFiniteError, TrainConfig, TrainingError, TrainResult, evaluate, train
from ..world import PeerFailed


def _config(cls, value):
    if value is None:
        return cls()
    return value if isinstance(value, cls) else cls.from_dict(dict(value))


def datasets(data, tokenizer, train_cfg: TrainConfig, *, model=None, splits=("train", "valid"), warn=print,
             rank: int = 0, world: int = 1, image_cache=None) -> dict:
    """``data.Batches`` for each split present (train shuffled by the run's seed; the others in a fixed order).
    ``image_cache``: an images.ImageCache that checks (and keeps) every image of every split now."""
    from ..generate import image_token_ids
    from .data import Batches, encode, load_splits

    records = load_splits(data, splits=splits, required=(splits[0],))
    ids = image_token_ids(model) if model is not None else None
    pad = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
    out = {}
    for name in splits:
        if name not in records:
            continue
        ex = encode(records[name], tokenizer, mask_prompt=train_cfg.mask_prompt, image_ids=ids, source=name)
        if image_cache is not None:
            image_cache.check(ex)
        out[name] = Batches(ex, train_cfg.batch_size, train_cfg.max_seq_length, seed=train_cfg.seed if name == "train" else 0,
                            pack=train_cfg.pack and name == "train", pad_id=pad, rank=rank, world=world,
                            warn=warn if name == "train" else (lambda *_: None))
    return out


def finetune(model=None, data=None, adapter_path="adapters", *, adapter=None, train_config=None, resume: bool = False,
             dtype=None, widen=None, test: bool = False, progress: bool = True, log=print, stop_after=None,
             resume_command: str | None = None, allow_data_change: bool = False) -> TrainResult:
    """Train an adapter on ``model`` (path, GGUF, repo id; None: the embedded 270M) with the JSONL data of
    ``data`` (a folder with train/valid[/test].jsonl, or a hub dataset id). ``adapter``: AdapterConfig or dict
    (kind, rank, scale, dropout, num_layers, keys, embedding); ``train_config``: TrainConfig or dict (a key that is
    not a setting is an error). ``resume_command``: the command that resumes this run, told when it stops early.
    ``allow_data_change``: ``resume`` on training data that differ from the checkpoint's warns instead of failing."""
    from .. import load
    from ..generate import image_token_ids
    from .images import ImageCache
    from ..world import World

    a_cfg, t_cfg = _config(AdapterConfig, adapter), _config(TrainConfig, train_config)
    world = World()
    with world.together("loading the model"):  # each machine loads its own copy (see world.py)
        m, tok = load(model, dtype=dtype, widen=widen)
    images = ImageCache(m.mcfg.vision.image_size) if image_token_ids(m) is not None else None
    with world.together("reading the data"):
        sets = datasets(data, tok, t_cfg, model=m, rank=world.rank, world=world.size,
                        splits=("train", "valid", "test") if test else ("train", "valid"),
                        warn=log if world.rank == 0 else (lambda *_: None), image_cache=images)
    result = train(m, sets["train"], sets.get("valid"), adapter_path, a_cfg, t_cfg, resume=resume, progress=progress,
                   log=log, stop_after=stop_after, resume_command=resume_command, allow_data_change=allow_data_change,
                   image_cache=images)
    if test and "test" in sets:
        result.test_loss = evaluate(m, sets["test"], -1, t_cfg, world, image_cache=images)
    return result


__all__ = ["AdapterConfig", "AdapterError", "TrainConfig", "TrainResult", "TrainingError", "NonFiniteError", "PeerFailed",
           "KINDS", "finetune", "datasets", "train", "evaluate", "apply_adapters", "load_adapters", "save_adapters"]
