"""Give the tiny test checkpoints (tests/fixtures/tiny_gemma3*) a small Gemma-style tokenizer.

The tiny models are random; their tokenizer only has to be a valid Gemma-layout tokenizer so the
Hugging Face conversion route (which requires one) and text generation can run end to end:
<pad>=0 <eos>=1 <bos>=2 <unk>=3, <start_of_turn>=105 <end_of_turn>=106, byte-fallback pieces and
single characters after that. Run: python scripts/make_tiny_tokenizer.py
"""

import json
import string
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, processors

FIX = Path(__file__).resolve().parent.parent / "tests" / "fixtures"


def build(vocab_size: int) -> Tokenizer:
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for i in range(4, 105):
        vocab[f"<unused{i - 4}>"] = i
    vocab["<start_of_turn>"] = 105
    vocab["<end_of_turn>"] = 106
    pieces = ["\u2581"] + list(string.ascii_letters + string.digits + string.punctuation) + ["\n"]
    pieces += [f"<0x{b:02X}>" for b in range(256)]
    for p in pieces:
        if len(vocab) >= vocab_size:
            break
        vocab.setdefault(p, len(vocab))
    while len(vocab) < vocab_size:  # every model id decodes to something
        vocab[f"<extra{len(vocab)}>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"])
    tok.add_tokens([t for t in vocab if t.startswith("<extra")])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return tok


def main():
    from mlx_gemma_qat.convert.tokenizer import GEMMA3_CHAT_TEMPLATE

    for folder in ("tiny_gemma3", "tiny_gemma3_linear_rope"):
        d = FIX / folder
        vocab = json.loads((d / "config.json").read_text())["vocab_size"]
        build(vocab).save(str(d / "tokenizer.json"))
        cfg = {
            "tokenizer_class": "GemmaTokenizerFast",
            "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
            "add_bos_token": True, "add_eos_token": False, "model_max_length": 256,
            "chat_template": GEMMA3_CHAT_TEMPLATE,
        }
        (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
        print("wrote", d)


if __name__ == "__main__":
    main()
