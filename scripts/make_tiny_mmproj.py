#!/usr/bin/env python3
"""Make llama.cpp's pair of GGUF files (text model + ``mmproj`` vision projector) for the tiny Gemma 3
vision-language fixture, with llama.cpp's own converter (nothing of llama.cpp is copied or patched).

Writes
  tests/fixtures/tiny_gemma3_vlm_gguf/mmproj-f32.gguf  vision tower + projector (--mmproj --outtype f32)

No text GGUF is made: for a folder without ``tokenizer.model`` (ours has only tokenizer.json) the
Gemma 3 converter takes the GPT-2 BPE vocabulary path, which refuses any tokenizer whose pre-tokenizer
hash is not in its table ("BPE pre-tokenizer was not recognized - update get_vocab_base_pre()"); real
Gemma 3 folders ship a SentencePiece ``tokenizer.model`` and never reach that path. Making one needs
patching llama.cpp or building a SentencePiece model, so the text side is covered by
tests/gguf_factory.py instead (``--text`` tries the converter anyway).

Source of the converter: the llama-cpp-python 0.3.36 source distribution, e.g.

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/lcpp_src
    tar xzf /tmp/lcpp_src/llama_cpp_python-0.3.36.tar.gz -C /tmp/lcpp_src
    python3 scripts/make_tiny_mmproj.py --llama-cpp /tmp/lcpp_src/llama_cpp_python-0.3.36/vendor/llama.cpp

The command this runs (from inside the llama.cpp folder, with its own gguf-py first on PYTHONPATH):

    PYTHONPATH=gguf-py python3 convert_hf_to_gguf.py STAGED --outtype f32 --mmproj --outfile OUT/mmproj-f32.gguf

(and with ``--text``: ``... convert_hf_to_gguf.py STAGED --outtype f16 --outfile OUT/text-f16.gguf``).

STAGED is a temporary copy of tests/fixtures/tiny_gemma3_vlm with two input-side adjustments (the converter
rejects the fixture as saved by transformers 5; llama.cpp itself is not modified):

  * tensor names: transformers 5 saves the vision tower as ``vision_tower.embeddings.*`` /
    ``vision_tower.encoder.*`` / ``vision_tower.post_layernorm.*``; llama.cpp's tensor map knows the
    layout of the published Gemma 3 checkpoints (``vision_tower.vision_model.*``), so the copy uses that
    (values unchanged, still bf16);
  * tokenizer_config.json: transformers 5's GemmaTokenizerFast adds a default ``mask_token="<mask>"``
    which the tiny vocabulary lacks, so it becomes id 512 = vocab_size and the converter's check
    ``max(tokenizer.vocab.values()) < vocab_size`` fails; the copy names ``<unused0>`` (id 4, where real
    Gemma 3 keeps ``<mask>``) as the mask token.

What llama.cpp's Gemma3VisionModel converter does to the tensors (see mlx_gemma_qat/convert/from_mmproj.py):
``mm_soft_emb_norm.weight`` is stored + 1, ``mm_input_projection_weight`` is forced to F16 and the
``.embeddings.`` tensors to F32, ``clip.vision.projector.scale_factor`` is written only when it is not 4
(here: 8 patches per side / 4 tokens per side = 2).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "tests" / "fixtures" / "tiny_gemma3_vlm"
OUT = ROOT / "tests" / "fixtures" / "tiny_gemma3_vlm_gguf"


def stage(dst: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    for f in SRC.iterdir():
        if f.name != "model.safetensors":
            shutil.copy2(f, dst / f.name)
    tensors = load_file(str(SRC / "model.safetensors"))
    renamed = {}
    for k, v in tensors.items():
        if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model."):
            k = "vision_tower.vision_model." + k[len("vision_tower.") :]
        renamed[k] = v.contiguous()
    assert all(v.dtype == torch.bfloat16 for v in renamed.values())
    save_file(renamed, str(dst / "model.safetensors"), metadata={"format": "pt"})
    tc = json.loads((dst / "tokenizer_config.json").read_text())
    tc["mask_token"] = "<unused0>"
    (dst / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp", required=True, help="llama.cpp source folder (has convert_hf_to_gguf.py)")
    ap.add_argument("--text", action="store_true", help="also try the text GGUF (fails on this fixture, see above)")
    args = ap.parse_args()
    lcpp = Path(args.llama_cpp).resolve()
    if not (lcpp / "convert_hf_to_gguf.py").is_file():
        sys.exit(f"{lcpp}: no convert_hf_to_gguf.py")
    OUT.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(lcpp / "gguf-py")}
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "tiny_gemma3_vlm"
        staged.mkdir()
        stage(staged)
        runs = [["--outtype", "f32", "--mmproj", "--outfile", str(OUT / "mmproj-f32.gguf")]]
        if args.text:
            runs.append(["--outtype", "f16", "--outfile", str(OUT / "text-f16.gguf")])
        for extra in runs:
            cmd = [sys.executable, "convert_hf_to_gguf.py", str(staged), *extra]
            print("+", " ".join(cmd), flush=True)
            subprocess.run(cmd, cwd=lcpp, env=env, check=True)
    for f in sorted(OUT.glob("*.gguf")):
        print(f"{f.relative_to(ROOT)}: {f.stat().st_size} bytes")


if __name__ == "__main__":
    main()
