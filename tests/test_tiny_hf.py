"""Hugging Face route on tiny random Gemma 3 checkpoints made by transformers (scripts/make_tiny_gemma3.py).

References are transformers' float32 logits computed from the same bf16 weights.
"""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma_qat.convert import convert
from mlx_gemma_qat.generate import generate_step
from mlx_gemma_qat.model.load import load_model

FIX = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def ref():
    return np.load(FIX / "tiny_gemma3_reference.npz")


@pytest.mark.parametrize("folder,key", [("tiny_gemma3", "main"), ("tiny_gemma3_linear_rope", "linrope")])
def test_float_route_matches_transformers(tmp_path, ref, folder, key):
    """New (layer_types/rope_parameters) and old (sliding_window_pattern/rope_scaling) config forms."""
    out = convert(FIX / folder, tmp_path / "m", mode="none", progress=False)
    model = load_model(out)
    logits = np.array(model(mx.array(ref[f"{key}_prompt40_ids"][None]))[0])
    np.testing.assert_allclose(logits, ref[f"{key}_prompt40_logits"], atol=5e-4, rtol=0)
    # the same through the KV caches, token by token past the window of 16
    cache = model.make_cache()
    steps = [np.array(model(mx.array([[int(t)]]), cache=cache)[0, 0]) for t in ref[f"{key}_prompt40_ids"]]
    np.testing.assert_allclose(np.stack(steps), ref[f"{key}_prompt40_logits"], atol=5e-4, rtol=0)
    gen = [t for t, _ in generate_step(mx.array(ref[f"{key}_gen_prompt_ids"]), model, max_tokens=16)]
    assert gen == [int(t) for t in ref[f"{key}_gen_ids"]]


def test_q4_0_route_is_on_the_grid_and_close(tmp_path, ref):
    out = convert(FIX / "tiny_gemma3", tmp_path / "q", progress=False)
    cfg = json.loads((out / "config.json").read_text())
    q = cfg["quantization"]
    assert q["model.layers.0.mlp.down_proj"] == {"group_size": 32, "bits": 4, "mode": "affine"}
    assert "model.embed_tokens" not in q  # the embedding stays float, as in Google's Q4_0 QAT files
    model = load_model(out)
    lin = model.model.layers[0].self_attn.q_proj
    w = mx.dequantize(lin.weight, lin.scales, lin.biases, group_size=32, bits=4)
    # symmetric Q4_0 grid: bias = -8 * scale, so every weight is scale * (q - 8)
    np.testing.assert_array_equal(np.array(lin.biases), -8 * np.array(lin.scales))
    assert np.isfinite(np.array(w)).all()
    # Same logits as the float model whose linear weights went through llama.cpp's Q4_0 (gguf-py's copy)
    import gguf
    from mlx.utils import tree_flatten

    dense = load_model(convert(FIX / "tiny_gemma3", tmp_path / "f", mode="none", progress=False))
    fake = []
    for name, v in tree_flatten(dense.parameters()):
        if "_proj" in name:
            a = np.array(v, dtype=np.float32)
            v = mx.array(gguf.quants.dequantize(gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q4_0),
                                                gguf.GGMLQuantizationType.Q4_0).reshape(a.shape))
        fake.append((name, v))
    dense.load_weights(fake)
    x = mx.array(ref["main_prompt40_ids"][None])
    np.testing.assert_allclose(np.array(model(x)), np.array(dense(x)), atol=5e-4, rtol=0)


def test_affine_route_options(tmp_path):
    out = convert(FIX / "tiny_gemma3", tmp_path / "a", mode="affine", bits=8, group_size=64, embed_bits=8,
                  progress=False)
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert q["model.layers.3.self_attn.o_proj"] == {"group_size": 64, "bits": 8, "mode": "affine"}
    assert q["model.embed_tokens"]["bits"] == 8
    load_model(out)


def test_hub_repo_id_offline_from_cache(tmp_path, fake_hub, ref):
    """A repo id resolves through huggingface_hub's cache with no network (HF_HUB_OFFLINE=1)."""
    shutil.copytree(FIX / "tiny_gemma3", fake_hub("tiny-org/tiny-gemma3"), dirs_exist_ok=True)
    out = convert("tiny-org/tiny-gemma3", tmp_path / "m", mode="none", progress=False)
    logits = np.array(load_model(out)(mx.array(ref["main_prompt40_ids"][None]))[0])
    np.testing.assert_allclose(logits, ref["main_prompt40_logits"], atol=5e-4, rtol=0)


def test_mlx_lm_reads_the_folder(tmp_path, ref):
    from mlx_lm.utils import load as mlx_lm_load

    out = convert(FIX / "tiny_gemma3", tmp_path / "q", progress=False)
    model, tok = mlx_lm_load(str(out))
    ours = load_model(out)
    x = mx.array(ref["main_prompt40_ids"][None, :12])  # within the window: mlx-lm's masks agree there
    a = np.array(model(x).astype(mx.float32))
    b = np.array(ours(x))
    assert np.abs(a - b).max() < 0.1 * np.abs(b).max()
