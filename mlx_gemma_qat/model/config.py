"""Gemma 3 text configuration: one dataclass, read from any config form Google or transformers wrote.

Two config dialects exist in the wild:
- transformers < 5: ``sliding_window_pattern``, ``rope_theta``, ``rope_local_base_freq``, ``rope_scaling``;
- transformers >= 5: ``layer_types`` and nested ``rope_parameters`` keyed by layer type.
Multimodal checkpoints nest the text part under ``text_config``. We read all of them and write both,
so the folder stays readable by older tools (mlx-lm reads only the first dialect).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

SLIDING = "sliding_attention"
GLOBAL = "full_attention"


class ConfigError(ValueError):
    """A config that is not a Gemma 3 text config we can run."""


@dataclass
class TextConfig:
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int = 262144
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0  # global layers
    rope_local_base_freq: float = 10_000.0  # sliding layers
    rope_scaling: dict | None = None  # global layers only, e.g. {"rope_type": "linear", "factor": 8.0}
    query_pre_attn_scalar: float = 256.0
    sliding_window: int = 512
    layer_types: list[str] = field(default_factory=list)
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = True
    model_type: str = "gemma3_text"

    def __post_init__(self):
        if not self.layer_types:
            self.layer_types = default_layer_types(self.num_hidden_layers, 6)
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers"
            )
        bad = set(self.layer_types) - {SLIDING, GLOBAL}
        if bad:
            raise ConfigError(f"unknown layer types {sorted(bad)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("num_attention_heads must be a multiple of num_key_value_heads")

    # ---- derived facts -------------------------------------------------------------------------
    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    @property
    def sliding_window_pattern(self) -> int:
        """The period of the local:global pattern (6 for every released Gemma 3)."""
        if GLOBAL not in self.layer_types:
            return self.num_hidden_layers + 1
        return self.layer_types.index(GLOBAL) + 1

    @property
    def rope_scale(self) -> float:
        """Position multiplier for the global layers (1/factor for linear scaling)."""
        rs = self.rope_scaling or {}
        kind = rs.get("rope_type", rs.get("type", "default"))
        if kind in (None, "default"):
            return 1.0
        if kind == "linear":
            return 1.0 / float(rs["factor"])
        raise ConfigError(f"unsupported rope scaling {kind!r}")

    # ---- (de)serialisation ---------------------------------------------------------------------
    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> "TextConfig":
        if "text_config" in cfg and isinstance(cfg["text_config"], dict):
            cfg = {**cfg["text_config"]}
        mt = cfg.get("model_type", "gemma3_text")
        if mt not in ("gemma3_text", "gemma3"):
            raise ConfigError(f"not a Gemma 3 model (model_type={mt!r})")
        try:
            n_layers = int(cfg["num_hidden_layers"])
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            args = dict(
                hidden_size=hidden,
                num_hidden_layers=n_layers,
                intermediate_size=int(cfg["intermediate_size"]),
                num_attention_heads=heads,
                num_key_value_heads=int(cfg.get("num_key_value_heads", heads)),
                head_dim=int(cfg.get("head_dim", hidden // heads)),
            )
        except KeyError as e:
            raise ConfigError(f"config is missing {e.args[0]!r}") from None
        for k in ("vocab_size", "max_position_embeddings", "sliding_window"):
            if cfg.get(k) is not None:
                args[k] = int(cfg[k])
        for k in ("rms_norm_eps", "query_pre_attn_scalar"):
            if cfg.get(k) is not None:
                args[k] = float(cfg[k])
        if "tie_word_embeddings" in cfg:
            args["tie_word_embeddings"] = bool(cfg["tie_word_embeddings"])

        if cfg.get("layer_types"):
            args["layer_types"] = list(cfg["layer_types"])
        else:
            args["layer_types"] = default_layer_types(n_layers, int(cfg.get("sliding_window_pattern", 6)))

        # RoPE: new nested form first, then the old flat keys.
        rp = cfg.get("rope_parameters")
        if isinstance(rp, dict) and (GLOBAL in rp or SLIDING in rp):
            g, s = rp.get(GLOBAL, {}), rp.get(SLIDING, {})
            if g.get("rope_theta") is not None:
                args["rope_theta"] = float(g["rope_theta"])
            if s.get("rope_theta") is not None:
                args["rope_local_base_freq"] = float(s["rope_theta"])
            if g.get("rope_type", "default") != "default":
                args["rope_scaling"] = {k: v for k, v in g.items() if k != "rope_theta"}
        else:
            if isinstance(rp, dict):  # flat rope_parameters applies to the global layers
                cfg = {**cfg, "rope_theta": rp.get("rope_theta", cfg.get("rope_theta"))}
                if rp.get("rope_type", "default") != "default":
                    cfg["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
            if cfg.get("rope_theta") is not None:
                args["rope_theta"] = float(cfg["rope_theta"])
            if cfg.get("rope_local_base_freq") is not None:
                args["rope_local_base_freq"] = float(cfg["rope_local_base_freq"])
            rs = cfg.get("rope_scaling")
            if rs and rs.get("rope_type", rs.get("type", "default")) != "default":
                args["rope_scaling"] = dict(rs)
        conf = cls(**args)
        conf.rope_scale  # validate the scaling kind now, not at first forward
        return conf

    def to_dict(self) -> dict[str, Any]:
        """Both dialects: transformers 5 keys and the flat keys mlx-lm and older tools read."""
        d = asdict(self)
        if float(self.query_pre_attn_scalar).is_integer():  # transformers validates it as an int
            d["query_pre_attn_scalar"] = int(self.query_pre_attn_scalar)
        d["rms_norm_eps"] = float(f"{self.rms_norm_eps:.7g}")  # GGUF stores it as float32
        d["architectures"] = ["Gemma3ForCausalLM"]
        d["sliding_window_pattern"] = self.sliding_window_pattern
        d["hidden_activation"] = "gelu_pytorch_tanh"
        d["final_logit_softcapping"] = None
        d["attn_logit_softcapping"] = None
        g = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            g = {**self.rope_scaling, "rope_theta": self.rope_theta}
        d["rope_parameters"] = {
            GLOBAL: g,
            SLIDING: {"rope_type": "default", "rope_theta": self.rope_local_base_freq},
        }
        return d

    # ---- memory arithmetic ---------------------------------------------------------------------
    def kv_cache_bytes(self, context: int, bytes_per_element: int = 4, kv_bits: int | None = None,
                       kv_group_size: int = 64) -> int:
        """Theoretical KV cache size: window x sliding layers + context x global layers.

        ``bytes_per_element``: the cache dtype's size; with ``kv_bits``, each element takes ``kv_bits`` / 8
        bytes plus a scale and a bias (in the cache dtype) per ``kv_group_size`` elements."""
        per_element = (kv_bits / 8 + 2 * bytes_per_element / kv_group_size) if kv_bits else bytes_per_element
        per_token = 2 * self.num_key_value_heads * self.head_dim * per_element
        n_sliding = sum(self.is_sliding(i) for i in range(self.num_hidden_layers))
        n_global = self.num_hidden_layers - n_sliding
        return int(round(per_token * (n_sliding * min(context, self.sliding_window) + n_global * context)))


def default_layer_types(n_layers: int, pattern: int) -> list[str]:
    return [GLOBAL if (i + 1) % pattern == 0 else SLIDING for i in range(n_layers)]
