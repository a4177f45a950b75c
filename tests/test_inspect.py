"""`mlx-gemma inspect`: what precision each tensor group has, on disk and once loaded."""

import gguf
from click.testing import CliRunner

from gguf_factory import write_tiny_gguf
from mlx_gemma_qat.cli import main
from mlx_gemma_qat.convert import convert
from mlx_gemma_qat.inspect import inspect_path

QT = gguf.GGMLQuantizationType


def test_gguf_and_converted_folder_agree(tmp_path):
    write_tiny_gguf(tmp_path / "t.gguf", QT.Q4_0, QT.F16, override={"blk.0.ffn_down.weight": QT.Q8_0})
    g = inspect_path(tmp_path / "t.gguf")
    out = convert(tmp_path / "t.gguf", tmp_path / "m", progress=False)
    m = inspect_path(out)
    assert g.params == m.params == 330_304
    kinds = {(x.name, x.kind): x for x in g.groups}
    assert kinds[("layers.*.ffn_down", "Q4_0")].tensors == 7
    assert kinds[("layers.*.ffn_down", "Q8_0")].tensors == 1
    assert abs(kinds[("layers.*.ffn_gate", "Q4_0")].bits_per_weight - 4.5) < 1e-9  # 18 bytes / 32
    mk = {(x.name, x.kind): x for x in m.groups}
    assert mk[("layers.*.mlp.down_proj", "4-bit g32 (f16 scales)")].tensors == 7
    assert abs(mk[("layers.*.mlp.gate_proj", "4-bit g32 (f16 scales)")].bits_per_weight - 5.0) < 1e-9
    assert mk[("model.embed_tokens", "f16")].bits_per_weight == 16
    # KV cache at a context past the window: window x sliding layers + context x global layers
    assert m.kv_cache_bytes(200) == 2 * 1 * 32 * 4 * (7 * 16 + 1 * 200)


def test_cli_prints_precision_and_memory(tmp_path):
    write_tiny_gguf(tmp_path / "t.gguf")
    out = convert(tmp_path / "t.gguf", tmp_path / "m", progress=False)
    r = CliRunner().invoke(main, ["inspect", str(out), "--context", "128"])
    assert r.exit_code == 0, r.output
    for text in ("Gemma 3 text, 8 layers (7 sliding window 16, 1 global)", "4-bit g32", "KV cache at context 128",
                 "every tensor is bit-exact to its source", "memory for weights"):
        assert text in r.output
    r = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert r.exit_code != 0 and "not a GGUF file or an MLX model folder" in r.output
