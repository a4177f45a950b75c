#!/usr/bin/env python3
"""Fuzz the GGUF and safetensors readers: every mutated file must load correctly or fail with a clear error.

Seeds (made once per worker):
- two tiny Gemma 3 GGUFs written by tests/gguf_factory.py (Google's QAT layout: Q4_0 linears + F16 embedding;
  a mix of Q8_0/Q5_1/Q4_1/Q5_0 linears + BF16 embedding), and the tiny vision model's text GGUF;
- llama.cpp's tiny mmproj GGUF (tests/fixtures/tiny_gemma3_vlm_gguf);
- the real embedded Gemma 3 270M GGUF (~250 MB): its header (~6.5 MB, with the 262k-token vocabulary) is
  mutated and written over a sparse copy of the full size, so the tensor data reads as zeros and a case costs
  what its header costs;
- the safetensors of tests/fixtures/tiny_gemma3 and tiny_gemma3_vlm (Hugging Face folders), and the MLX folders
  `convert` writes from the tiny GGUF and from the tiny vision folder.

GGUF mutations are aimed by walking the seed's header: absurd values (0, 1, 2**31, 2**32-1, 2**63, 2**64-1,
random, or the old value nudged) written over the tensor and key counts, key/string/array lengths, value and
element types, config values (block_count, head counts, ...), n_dims, dims, GGML type ids and tensor offsets
(also: another tensor's offset, misaligned, past the end); bit flips and random bytes in the header, the key/
value section, the tensor infos and the data; truncations at random and at structural boundaries.
Safetensors mutations: the header length (absurd, off by one, past the end), bytes of the JSON (invalid JSON,
invalid UTF-8), dtypes (unknown, another size, same size), shapes (absurd, negative, non-integer, reversed,
reshaped with the same size), data_offsets (swapped, past the end, overlapping, negative, non-integer),
missing, extra, renamed, swapped and duplicated tensors, __metadata__ of the wrong type, truncations, bit flips
in the data.

Each case runs a user-facing path on the mutated file: `convert` to OUT (API or `mlx-gemma convert`),
`mlx-gemma inspect`, `load_model`, `tokenizer_from_gguf(path)`, or for the real file opening it and reading its
config, tokenizer and first tensors. It runs in a worker process under an address-space cap (the worker's
baseline plus --mem-gb: an attempted huge allocation fails as a MemoryError or a crash instead of thrashing;
Linux only: macOS does not enforce RLIMIT_AS, so there the workers run uncapped) and a time limit. The outcome
must be one of:
- loaded correctly: the call succeeded and its result works (a converted or loaded model runs a forward pass,
  a tokenizer encodes);
- a clear error: an exception of this package (a ValueError/OSError subclass defined in mlx_gemma_qat) whose
  message names the file or folder; for the CLI, exit code 1 and one 'Error: ...' line;
and after a failed convert nothing may be left at OUT (no folder, no temporary sibling). Anything else, a
foreign exception, a MemoryError, a crash of the worker (re-run alone to confirm), a hang, is a FAILURE,
listed with its case number: `--seed S --only CASE` reproduces it with a traceback.

    nice -n 10 python scripts/fuzz_readers.py --cases 10000 --seed 0 [--workers 2] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures"
# share of the cases per reader (the real file's cases are the slow ones: gguf-py takes ~15 s on its header)
WEIGHTS = {"gguf-tiny": 0.40, "gguf-real": 0.05, "mmproj": 0.11, "safetensors-hf": 0.22, "safetensors-mlx": 0.22}
ABSURD = [0, 1, 2, 3, 7, 255, 2**16 - 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**62, 2**63 - 1, 2**63,
          2**64 - 1]
_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_FMT = {1: "B", 2: "H", 4: "I", 8: "Q"}


# ---------------------------------------------------------------- the GGUF header, as fields to aim at


def gguf_fields(data: bytes, keep_strings: int = 64) -> tuple[list[tuple[int, int, str]], dict]:
    """(offset, width, kind) of the integer fields of a little-endian GGUF header, and its section bounds
    ({"kv": (start, end), "tinfo": (start, end), "data": start}). Long string arrays contribute their first
    ``keep_strings`` element lengths and every 4096th."""
    out = [(8, 8, "n_tensors"), (16, 8, "n_kv")]
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    p = 24

    def string(p, kind):
        out.append((p, 8, kind))
        (n,) = struct.unpack_from("<Q", data, p)
        return p + 8 + n

    for _ in range(n_kv):
        p = string(p, "key-len")
        out.append((p, 4, "value-type"))
        (t,) = struct.unpack_from("<I", data, p)
        p += 4
        if t == 8:
            p = string(p, "str-len")
        elif t == 9:
            out.append((p, 4, "array-type"))
            out.append((p + 4, 8, "array-len"))
            at, n = struct.unpack_from("<IQ", data, p)
            p += 12
            if at == 8:
                for i in range(n):
                    if i < keep_strings or i % 4096 == 0:
                        out.append((p, 8, "str-len"))
                    (m,) = struct.unpack_from("<Q", data, p)
                    p += 8 + m
            else:
                p += _SIZES[at] * n
        else:
            if t in (4, 5, 10, 11):  # integer config values: block_count, head counts, lengths, token ids...
                out.append((p, _SIZES[t], "config-value"))
            elif t == 6:
                out.append((p, 4, "config-float"))
            p += _SIZES[t]
    kv_end = p
    for _ in range(n_tensors):
        p = string(p, "tensor-name-len")
        out.append((p, 4, "n_dims"))
        (nd,) = struct.unpack_from("<I", data, p)
        p += 4
        for _ in range(nd):
            out.append((p, 8, "dim"))
            p += 8
        out.append((p, 4, "ggml-type"))
        out.append((p + 4, 8, "tensor-offset"))
        p += 12
    data_start = -(-p // 32) * 32
    return out, {"kv": (24, kv_end), "tinfo": (kv_end, p), "data": data_start}


def insert_alignment(b: bytearray, value: int, vtype: int = 4) -> None:
    """Put a ``general.alignment`` key (GGUF value type ``vtype``) in front of the others, with a filler key
    that keeps the data where a 32- or 64-byte alignment expects it."""
    key = b"general.alignment"
    if vtype == 8:
        entry = struct.pack("<Q", len(key)) + key + struct.pack("<IQ", 8, 2) + b"64"
    else:
        fmt, v = {4: ("<I", value % 2**32), 5: ("<i", value % 2**31), 10: ("<Q", value % 2**64)}[vtype]
        entry = struct.pack("<Q", len(key)) + key + struct.pack("<I", vtype) + struct.pack(fmt, v)
    pad = b"fuzz.pad"
    fill = (-(len(entry) + 8 + len(pad) + 4 + 8)) % 64
    entry += struct.pack("<Q", len(pad)) + pad + struct.pack("<IQ", 8, fill) + b"x" * fill
    (n_kv,) = struct.unpack_from("<Q", b, 16)
    struct.pack_into("<Q", b, 16, n_kv + 2)
    b[24:24] = entry


def _tensor_offsets(fields) -> list[int]:
    return [off for off, _, kind in fields if kind == "tensor-offset"]


def mutate_gguf(data: bytes, layout: tuple, rng: random.Random, size: int | None = None) -> tuple[bytearray, str, int | None]:
    """A mutated copy of a GGUF (``data``: the whole file, or only its header when ``size`` gives the full
    size of a sparse copy). Returns (bytes, kind, truncate_to) where truncate_to cuts a sparse copy."""
    fields, sec = layout
    b = bytearray(data)
    full = size or len(b)
    kind = rng.choice(["field"] * 6 + ["fields", "offset", "alignment", "flip-header", "flip-kv", "flip-tinfo",
                                       "flip-data", "random-bytes", "truncate", "truncate-struct", "truncate-struct"])
    cut = None
    if kind == "alignment":  # a valid value, an absurd one, or the wrong type
        v = rng.choice([1, 8, 32, 64, 64, 0, 3, 48, 2**31, 2**32 - 1])
        vtype = rng.choice([4] * 5 + [5, 10, 8])
        insert_alignment(b, v, vtype)
        label = "wrong-type" if vtype != 4 else "valid" if v in (1, 8, 32, 64) else "absurd"
        return b, f"alignment:{label}", None
    if kind in ("field", "fields"):
        picks = [rng.choice(fields) for _ in range(1 if kind == "field" else rng.randint(2, 4))]
        for off, width, fkind in picks:
            if fkind == "config-float":
                struct.pack_into("<f", b, off, rng.choice([0.0, -1.0, float("nan"), float("inf"), 1e38, 1e-45]))
            else:
                (old,) = struct.unpack_from("<" + _FMT[width], b, off)
                r = rng.random()
                if r < 0.25:
                    v = old + rng.choice([-2, -1, 1, 2, 32, 4096])
                elif r < 0.35:
                    v = rng.getrandbits(width * 8)
                else:
                    v = rng.choice(ABSURD)
                struct.pack_into("<" + _FMT[width], b, off, v % (1 << (width * 8)))
        if kind == "field":
            kind = f"field:{picks[0][2]}"
    elif kind == "offset":  # tensor offsets: overlapping, misaligned, past the end
        offs = _tensor_offsets(fields)
        off = rng.choice(offs)
        how = rng.choice(["overlap", "misalign", "past-end"])
        if how == "overlap":
            (v,) = struct.unpack_from("<Q", b, rng.choice(offs))
        elif how == "misalign":
            (v,) = struct.unpack_from("<Q", b, off)
            v += rng.randint(1, 31)
        else:
            v = full - sec["data"] - rng.choice([0, 32, 64, 4096])
        struct.pack_into("<Q", b, off, max(0, v))
        kind = f"offset:{how}"
    elif kind.startswith("flip-") or kind == "random-bytes":
        region = {"flip-header": (0, 24), "flip-kv": sec["kv"], "flip-tinfo": sec["tinfo"],
                  "flip-data": (sec["data"], full), "random-bytes": (0, sec["tinfo"][1])}[kind]
        lo, hi = region[0], max(region[0] + 1, region[1])
        if kind == "random-bytes":
            i = rng.randrange(lo, hi)
            for j in range(i, min(i + rng.randint(1, 64), len(b))):
                b[j] = rng.randrange(256)
        else:
            for _ in range(rng.randint(1, 8)):
                i = rng.randrange(lo, hi)
                if i < len(b):
                    b[i] ^= 1 << rng.randrange(8)
                else:  # the data of a sparse copy: zeros, written where flipped
                    cut = cut or []
                    cut.append((i, 1 << rng.randrange(8)))
        if cut is not None:
            return b, kind, ("flips", cut)
    else:
        if kind == "truncate":
            at = rng.randrange(full)
        else:  # at a boundary of the structure, give or take a few bytes
            at = rng.choice([off for off, _, _ in fields] + [sec["kv"][1], sec["tinfo"][1], sec["data"], full - 1])
            at = max(0, min(full - 1, at + rng.randint(-3, 3)))
        if at < len(b):
            del b[at:]
        else:
            return b, kind, ("truncate", at)
    return b, kind, None


# ---------------------------------------------------------------- safetensors


def mutate_safetensors(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    (n,) = struct.unpack_from("<Q", data, 0)
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    names = [k for k in header if k != "__metadata__"]
    kind = rng.choice(["header-len", "json-bytes", "json-utf8", "dtype", "dtype", "shape", "shape", "reshape",
                       "offsets", "offsets", "offsets", "drop", "extra", "rename", "swap", "duplicate", "truncate",
                       "flip-data", "metadata", "type-confusion"])
    if kind in ("header-len", "json-bytes", "json-utf8", "truncate", "flip-data"):
        b = bytearray(data)
        if kind == "header-len":
            v = rng.choice(ABSURD + [n - 1, n + 1, len(data) - 8, len(data) - 7, len(data)])
            struct.pack_into("<Q", b, 0, v % 2**64)
        elif kind == "json-bytes":
            for _ in range(rng.randint(1, 4)):
                b[8 + rng.randrange(n)] = rng.choice(b'"{}[],:-0.eE ' + bytes([0, rng.randrange(256)]))
        elif kind == "json-utf8":
            i = 8 + rng.randrange(n)
            b[i : i + 2] = rng.choice([b"\xff\xfe", b"\xc3\x28", b"\xed\xa0", b"\x80\x80"])
        elif kind == "truncate":
            del b[rng.choice([rng.randrange(len(b)), 8 + n, 8 + n + rng.randrange(max(1, len(body))), len(b) - 1, 4]):]
        else:
            for _ in range(rng.randint(1, 16)):
                b[8 + n + rng.randrange(len(body))] ^= 1 << rng.randrange(8)
        return bytes(b), kind
    name = rng.choice(names)
    e = header[name]
    a, z = e["data_offsets"]
    dup = None
    if kind == "dtype":
        e["dtype"] = rng.choice(["F64", "I64", "Q4", "", "f32", "BOOL", "U16", "I32", "U32", "F32", "F16", "BF16",
                                 "F8_E4M3", "F8_E5M2", "C64", 7, None, ["F32"]])
    elif kind == "shape":
        e["shape"] = rng.choice([[], [0], [-1], [2**31], [2**40, 2**40], [2**63], [2**64], [1] * 70,
                                 e["shape"][::-1], [int(x) + 1 for x in e["shape"]], ["a"], [1.5], None, 5, [True]])
    elif kind == "reshape":  # the same bytes, another shape: only the model can tell
        numel = 1
        for s in e["shape"]:
            numel *= s
        e["shape"] = rng.choice([[numel], [1, numel], [numel, 1], e["shape"][::-1], [2, numel // 2] if numel % 2 == 0
                                 else [numel]])
    elif kind == "offsets":
        other = header[rng.choice(names)]["data_offsets"]
        e["data_offsets"] = rng.choice([[z, a], [a, z + 1], [a + 1, z + 1], [a - 1, z], [0, 2**63], [-8, z - a - 8],
                                        [a, len(body) + 16], [len(body), len(body) + z - a], list(other),
                                        [other[0], other[0] + z - a], [a], [a, z, 0], None, [str(a), z],
                                        [2**64, 2**64 + z - a], [float(a), float(z)]])
    elif kind == "drop":
        del header[name]
    elif kind == "extra":
        header[rng.choice(["model.layers.0.extra.weight", "lm_head.weight", "model.layers.99.mlp.up_proj.weight",
                           name + "x"])] = dict(e) if rng.random() < 0.5 else {"dtype": "F32", "shape": [0],
                                                                              "data_offsets": [0, 0]}
    elif kind == "rename":
        header[rng.choice(["", "model.embed_tokens.weight", "x" * 300, "model.layers.-1.mlp.up_proj.weight",
                           "\u00e9\u0000"])] = header.pop(name)
    elif kind == "swap":
        other = rng.choice(names)
        header[name], header[other] = header[other], header[name]
    elif kind == "metadata":
        header["__metadata__"] = rng.choice([{"format": 5}, [1, 2], "x", {"format": "pt" * 50000}, None, {"a": None}])
    elif kind == "type-confusion":
        header[name] = rng.choice([[], "x", 3, None, {"dtype": "F32"}, {"dtype": "F32", "shape": [1],
                                                                       "data_offsets": [0, 4], "more": 1}])
    elif kind == "duplicate":
        dup = json.dumps({name: e})[1:-1]
    text = json.dumps(header)
    if dup is not None:
        text = "{" + dup + "," + text[1:]
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw + body, kind


# ---------------------------------------------------------------- seeds


def make_seeds(work: Path) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    import gguf
    from gguf_factory import write_tiny_gguf

    from mlx_gemma_qat.convert import convert

    QT = gguf.GGMLQuantizationType
    s: dict = {"work": work}
    mix = {f"blk.{i}.{n}.weight": t for i in range(8) for n, t in
           (("attn_q", QT.Q8_0), ("attn_k", QT.Q5_1), ("attn_v", QT.Q4_1), ("attn_output", QT.Q5_0),
            ("ffn_gate", QT.Q8_0), ("ffn_up", QT.Q4_1), ("ffn_down", QT.Q5_1))}
    for name, kw in (("tiny-q4_0", {}), ("tiny-mix", {"override": mix, "embed_type": QT.BF16})):
        p = work / f"{name}.gguf"
        write_tiny_gguf(p, **kw)
        s[name] = p.read_bytes()
        s[name + ":layout"] = gguf_fields(s[name])
    s["vlm-text"] = work / "vlm-text.gguf"
    write_tiny_gguf(s["vlm-text"], source=FIX / "tiny_gemma3_vlm")
    s["mmproj"] = (FIX / "tiny_gemma3_vlm_gguf" / "mmproj-f32.gguf").read_bytes()
    s["mmproj:layout"] = gguf_fields(s["mmproj"])
    s["hf"] = [FIX / "tiny_gemma3", FIX / "tiny_gemma3_vlm"]
    s["mlx"] = [convert(work / "tiny-q4_0.gguf", work / "mlx-q4_0", progress=False),
                convert(FIX / "tiny_gemma3_vlm", work / "mlx-vlm", progress=False)]
    try:
        from mlx_gemma_qat.models_cache import default_gguf

        real = Path(default_gguf())
        with open(real, "rb") as fh:
            head = fh.read(16 << 20)
        layout = gguf_fields(head)
        s["real"] = (head[: layout[1]["data"]], real.stat().st_size, layout)
    except Exception:  # the embedded model is not installed: its share goes to the tiny GGUFs
        s["real"] = None
    return s


# ---------------------------------------------------------------- one case


class Case:
    def __init__(self, seed: int, index: int):
        self.rng = random.Random(f"{seed}:{index}")
        self.index = index
        r, acc = self.rng.random(), 0.0
        for t, w in WEIGHTS.items():
            acc += w
            if r < acc:
                break
        self.target = t


class Failure(Exception):
    """The outcome broke a rule (a leftover at OUT, a bad CLI message, a result that does not work)."""


class CaseTimeout(BaseException):
    """The case ran past its time limit (a BaseException: no ``except Exception`` in the readers can hide it)."""


def run_case(case: Case, seeds: dict) -> dict:
    rng, target = case.rng, case.target
    d = Path(tempfile.mkdtemp(prefix=f"case{case.index}-", dir=seeds["work"]))
    out = d / "out"
    try:
        if target == "gguf-real" and seeds["real"] is None:
            target = "gguf-tiny"
        if target in ("gguf-tiny", "mmproj"):
            seed = "mmproj" if target == "mmproj" else rng.choice(["tiny-q4_0", "tiny-mix"])
            data, kind, _ = mutate_gguf(seeds[seed], seeds[seed + ":layout"], rng)
            f = d / "m.gguf"
            f.write_bytes(data)
            route = "convert+mmproj" if target == "mmproj" else rng.choice(
                ["convert"] * 5 + ["cli-convert", "cli-convert", "cli-inspect", "cli-inspect", "tokenizer"])
        elif target == "gguf-real":
            head, size, layout = seeds["real"]
            data, kind, extra = mutate_gguf(head, layout, rng, size=size)
            f = d / "m.gguf"
            with open(f, "wb") as fh:  # sparse: the tensor data reads as zeros
                fh.write(data)
                if extra and extra[0] == "truncate":
                    fh.truncate(extra[1])
                elif not kind.startswith("truncate"):
                    fh.truncate(size + len(data) - len(head))  # an inserted key moved the data along
                    for i, bit in (extra[1] if extra else []):
                        fh.seek(i)
                        fh.write(bytes([bit]))
            route = rng.choice(["tokenizer"] * 5 + ["open"] * 2 + ["convert"] * 2 + ["cli-inspect"])
            if seeds.get("quick"):  # header-only readers: a fraction of a second each
                route = "tokenizer"
        else:
            src = rng.choice(seeds["hf" if target == "safetensors-hf" else "mlx"])
            f = d / "folder"
            shutil.copytree(src, f)
            shard = next(f.glob("*.safetensors"))
            data, kind = mutate_safetensors(shard.read_bytes(), rng)
            shard.write_bytes(data)
            route = rng.choice(["convert"] * 4 + ["cli-convert"]) if target == "safetensors-hf" else rng.choice(
                ["load"] * 3 + ["cli-inspect", "inspect"])
        case.route = route
        t0 = time.time()
        outcome = attempt(route, f, out, seeds)
        left = sorted(p.name for p in d.iterdir() if p.name.startswith((".out", "out")))
        if outcome.startswith("error") and left:
            raise Failure(f"left at OUT after a failed convert: {left}")
        return {"kind": f"{case.target}/{kind}", "route": route, "outcome": outcome,
                "seconds": round(time.time() - t0, 3)}
    finally:
        shutil.rmtree(d, ignore_errors=True)


def is_clear(e: BaseException, f: Path) -> bool:
    """An error of this package's own kind, with a message naming the mutated file (or its folder)."""
    mod = type(e).__module__ or ""
    msg = str(e)
    return (isinstance(e, (ValueError, OSError)) and mod.startswith("mlx_gemma_qat")
            and (f.name in msg or f.parent.name in msg))


_FOREIGN = re.compile(r"\((\w+(?:Error|Exception|Iteration)): ")


def _error(e: BaseException, f: Path) -> str:
    """'error: Class', with ' (wrapped Foreign)' when a wrapper turned a library's exception into ours."""
    if not is_clear(e, f):
        raise e
    m = _FOREIGN.search(str(e))
    return f"error: {type(e).__name__}" + (f" (wrapped {m.group(1)})" if m else "")


def _check_model(model) -> None:
    """A loaded model runs: logits for three tokens, the right shape, computed."""
    import mlx.core as mx

    text = getattr(model, "language_model", model)
    vocab = text.cfg.vocab_size
    logits = model(mx.array([[2, 3, 4]]) % vocab)
    mx.eval(logits)
    if tuple(logits.shape) != (1, 3, vocab):
        raise Failure(f"the loaded model gives logits of shape {logits.shape}")


def _cli(args: list[str], f: Path) -> str:
    from click.testing import CliRunner

    from mlx_gemma_qat.cli import main

    r = CliRunner().invoke(main, args)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        if isinstance(r.exception, MemoryError):
            raise r.exception
        raise Failure(f"CLI raised {type(r.exception).__name__}: {r.exception}")
    if r.exit_code == 0:
        return "loaded"
    msg = r.output.strip()
    if r.exit_code != 1 or not msg.startswith("Error: ") or len(msg.splitlines()) != 1 or (
            f.name not in msg and f.parent.name not in msg):
        raise Failure(f"CLI exit {r.exit_code} with output {msg[-300:]!r}")
    m = _FOREIGN.search(msg)
    return "error: CLI" + (f" (wrapped {m.group(1)})" if m else "")


def attempt(route: str, f: Path, out: Path, seeds: dict) -> str:
    """Run ``route`` on the mutated ``f``: 'loaded', 'error: ...', or an exception (a finding)."""
    from mlx_gemma_qat.convert import convert
    from mlx_gemma_qat.model.load import load_model

    if route.startswith("cli-"):
        args = ["convert", str(f), "-o", str(out), "--quiet"] if route == "cli-convert" else ["inspect", str(f)]
        res = _cli(args, f)
        if res == "loaded" and route == "cli-convert":
            _check_model(load_model(out))
        return res
    try:
        if route in ("convert", "convert+mmproj"):
            if route == "convert":
                convert(f, out, progress=False)
            else:
                convert(seeds["vlm-text"], out, mmproj=f, progress=False)
            model = load_model(out)
        elif route == "load":
            model = load_model(f)
        elif route == "inspect":
            from mlx_gemma_qat.inspect import inspect_path

            inspect_path(f)
            return "loaded"
        elif route == "tokenizer":
            from mlx_gemma_qat.convert.tokenizer import tokenizer_from_gguf

            tok = tokenizer_from_gguf(f)
            tok.encode("The capital of France is <start_of_turn>Paris")
            return "loaded"
        elif route == "open":  # what convert and inspect do first, on the real file
            from mlx_gemma_qat.convert import from_gguf
            from mlx_gemma_qat.convert.tokenizer import special_token_ids, tokenizer_from_gguf

            with from_gguf.reading(f):
                reader = from_gguf.open_gguf(f)
                from_gguf.config_from_gguf(reader)
                tokenizer_from_gguf(reader)
                special_token_ids(reader)
                for i, _ in enumerate(from_gguf.iter_tensors(reader)):
                    if i >= 3:
                        break
            return "loaded"
        else:
            raise ValueError(f"unknown route {route}")
    except (MemoryError, Failure):
        raise
    except Exception as e:  # noqa: BLE001 - sorted by is_clear: ours, or a finding
        return _error(e, f)
    _check_model(model)
    return "loaded"


# ---------------------------------------------------------------- worker and driver


# RLIMIT_AS is enforced by Linux; macOS accepts it and ignores it (and has no /proc to read a baseline from)
CAPS_ADDRESS_SPACE = sys.platform.startswith("linux")


def _vm_size() -> int:
    """This process's virtual size in bytes (Linux)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _sabotage(what: str, mem_gb: float) -> None:
    import signal

    if what == "crash":
        os.abort()
    elif what == "hang":
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])  # as if stuck in native code
        time.sleep(3600)
    elif what == "alloc":
        import numpy as np

        np.ones(int((mem_gb + 1) * (1 << 30)), dtype=np.uint8)  # fits the machine, not the cap


def worker(seed: int, mem_gb: float, time_limit: int, quick: bool = False, sabotage: dict | None = None,
           workdir: str | None = None) -> None:
    sabotage = sabotage or {}
    import resource
    import signal
    import warnings

    warnings.simplefilter("ignore")
    work = Path(tempfile.mkdtemp(prefix="fuzz-worker-", dir=workdir))
    try:
        seeds = make_seeds(work)
        seeds["quick"] = quick
        import mlx.core as mx

        mx.eval(mx.ones(4) + 1)  # the runtime's own start-up allocations come before the baseline
        cap = 0  # none
        if CAPS_ADDRESS_SPACE:
            cap = _vm_size() + int(mem_gb * (1 << 30))
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

        def on_alarm(*_):
            raise CaseTimeout(f"case ran past {time_limit} s")

        signal.signal(signal.SIGALRM, on_alarm)
        print(f"READY {cap}", flush=True)
        for line in sys.stdin:
            i = int(line)
            case = Case(seed, i)
            signal.alarm(time_limit)
            try:
                if i in sabotage:  # the harness's own tests: a crash, a hang in native code, a huge allocation
                    _sabotage(sabotage[i], mem_gb)
                res = {"case": i, **run_case(case, seeds)}
            except BaseException as e:  # noqa: BLE001 - every escape is a finding
                signal.alarm(0)
                tb = traceback.format_exc(limit=-6)
                inner = e.__context__ or getattr(e, "__cause__", None)
                while inner is not None:  # what a wrapper caught (raised 'from None', so not in the text above)
                    tb = "".join(traceback.format_exception(type(inner), inner, inner.__traceback__, limit=-8,
                                                            chain=False)) + "-> " + tb
                    inner = inner.__context__
                res = {"case": i, "kind": case.target, "route": getattr(case, "route", "?"), "outcome": "FAILURE",
                       "error": f"{type(e).__name__}: {str(e)[:300]}", "traceback": tb[-3000:]}
            finally:
                signal.alarm(0)
            print("RESULT " + json.dumps(res), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


class Worker:
    def __init__(self, args):
        self.args = args
        self.current = None
        self.start()

    def start(self):
        cmd = [sys.executable, __file__, "--_worker", "--seed", str(self.args.seed), "--mem-gb",
               str(self.args.mem_gb), "--time-limit", str(self.args.time_limit), "--_sabotage", self.args._sabotage,
               "--_workdir", self.args._workdir]
        cmd += ["--quick"] if self.args.quick else []
        self.err = tempfile.TemporaryFile()
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True,
                                  bufsize=1, cwd=ROOT)
        line = self.p.stdout.readline()
        if not line.startswith("READY"):
            self.err.seek(0)
            raise RuntimeError(f"fuzz worker did not start: {line!r} {self.err.read()[-2000:]!r}")

    def feed(self, i):
        self.current, self.started = i, time.time()
        self.p.stdin.write(f"{i}\n")
        self.p.stdin.flush()

    def stderr_tail(self) -> str:
        self.err.seek(0)
        return self.err.read()[-600:].decode("utf-8", "replace")

    def close(self):
        try:
            self.p.stdin.close()
        except OSError:
            pass
        self.p.wait()


def _died(w: Worker, how: str, args) -> dict:
    """The worker died or hung on w.current: re-run that case alone in a fresh worker to confirm."""
    i = w.current
    alone = "not re-run"
    if not args.no_rerun:
        solo = Worker(args)
        solo.feed(i)
        ready, _, _ = select.select([solo.p.stdout], [], [], args.time_limit + args.grace)
        line = solo.p.stdout.readline() if ready else ""
        if not ready:
            solo.p.kill()
            alone = "hangs again alone"
        elif not line:
            alone = f"crashes again alone (exit {solo.p.wait()}): {solo.stderr_tail()!r}"
        else:
            alone = "passes alone: " + line.strip()[7:300]
        solo.close()
    return {"case": i, "kind": Case(args.seed, i).target, "outcome": "FAILURE", "error": f"{how}; {alone}"}


def drive(args) -> list[dict]:
    cases = [args.only] if args.only is not None else list(range(args.first, args.first + args.cases))
    todo = list(reversed(cases))
    workers = [Worker(args) for _ in range(max(1, min(args.workers, len(cases))))]
    results = []
    t0 = time.time()

    def feed(w):
        if todo:
            w.feed(todo.pop())
        else:
            w.current = None

    for w in workers:
        feed(w)
    while any(w.current is not None for w in workers):
        busy = [w for w in workers if w.current is not None]
        ready, _, _ = select.select([w.p.stdout for w in busy], [], [], 1.0)
        for w in busy:
            if w.p.stdout not in ready:
                if time.time() - w.started > args.time_limit + args.grace:  # no alarm fired: stuck in native code
                    w.p.kill()
                    w.p.wait()
                    results.append(_died(w, "hang (killed)", args))
                    w.start()
                    feed(w)
                continue
            line = w.p.stdout.readline()
            if not line:  # the worker died while running w.current: a crash
                code = w.p.wait()
                results.append(_died(w, f"worker crashed (exit {code}): {w.stderr_tail()!r}", args))
                w.start()
                feed(w)
            elif line.startswith("RESULT "):
                results.append(json.loads(line[7:]))
                feed(w)
                if len(results) % 500 == 0:
                    print(f"[fuzz] {len(results)}/{len(cases)} cases, {time.time() - t0:.0f} s", file=sys.stderr,
                          flush=True)
    for w in workers:
        w.close()
    return results


def summary(results: list[dict], args, seconds: float) -> str:
    table = defaultdict(Counter)
    for r in results:
        key = r["outcome"] if r["outcome"] in ("loaded", "FAILURE") else "clear error"
        table[r["kind"]][key] += 1
    lines = [f"fuzz_readers: {len(results)} cases, seed {args.seed}, {seconds / 60:.1f} min, "
             f"{args.workers} workers, " + (f"address-space cap baseline + {args.mem_gb:g} GB" if CAPS_ADDRESS_SPACE
                                           else "no address-space cap (Linux only)") + f", {args.time_limit} s per case",
             "", "| reader / mutation | cases | loaded correctly | clear error | FAILURE |", "|---|---:|---:|---:|---:|"]
    readers = defaultdict(Counter)
    for k in sorted(table):
        c = table[k]
        readers[k.split("/")[0]].update(c)
        lines.append(f"| {k} | {sum(c.values())} | {c['loaded']} | {c['clear error']} | {c['FAILURE']} |")
    for k in sorted(readers):
        c = readers[k]
        lines.append(f"| **{k}** | {sum(c.values())} | {c['loaded']} | {c['clear error']} | {c['FAILURE']} |")
    tot = Counter()
    for c in table.values():
        tot.update(c)
    lines.append(f"| **total** | {sum(tot.values())} | {tot['loaded']} | {tot['clear error']} | {tot['FAILURE']} |")
    routes = Counter(r.get("route", "?") for r in results)
    lines += ["", "Routes: " + ", ".join(f"{k} x{v}" for k, v in sorted(routes.items()))]
    errors = Counter(r["outcome"][7:] for r in results if r["outcome"].startswith("error: "))
    lines += ["", "Errors raised: " + ", ".join(f"{k} x{v}" for k, v in errors.most_common())]
    slow = sorted((r for r in results if "seconds" in r), key=lambda r: -r["seconds"])[:3]
    if slow:
        lines += ["", "Slowest cases: " + ", ".join(f"{r['case']} ({r['kind']}, {r['route']}): {r['seconds']:.1f} s"
                                                    for r in slow)]
    fails = [r for r in results if r["outcome"] == "FAILURE"]
    lines += ["", f"FAILURES: {len(fails)}" + (" (reproduce: --seed S --only CASE)" if fails else "")]
    lines += [f"- case {r['case']} ({r['kind']}): {r.get('error')}" for r in fails[:50]]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=1000)
    ap.add_argument("--first", type=int, default=0, help="number of the first case")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--only", type=int, default=None, help="run this one case, and print its traceback")
    ap.add_argument("--mem-gb", type=float, default=3.0, help="address space each worker may add to its baseline")
    ap.add_argument("--time-limit", type=int, default=90, help="seconds per case")
    ap.add_argument("--no-rerun", action="store_true", help="do not re-run a crashing case alone")
    ap.add_argument("--quick", action="store_true",
                    help="the real GGUF's cases only through the header-only tokenizer reader (for the tests)")
    ap.add_argument("--json", default=None, help="write every result here")
    ap.add_argument("--grace", type=int, default=30, help="seconds past the time limit before a stuck worker is killed")
    ap.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_sabotage", default="", help=argparse.SUPPRESS)  # e.g. crash:3,hang:5,alloc:7
    ap.add_argument("--_workdir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._worker:
        sabotage = dict((int(c), w) for w, c in (x.split(":") for x in args._sabotage.split(",") if x))
        worker(args.seed, args.mem_gb, args.time_limit, args.quick, sabotage, args._workdir)
        return 0
    t0 = time.time()
    args._workdir = tempfile.mkdtemp(prefix="fuzz-readers-")  # every worker's files, removed even after crashes
    try:
        results = drive(args)
    finally:
        shutil.rmtree(args._workdir, ignore_errors=True)
    print(summary(results, args, time.time() - t0))
    if args.only is not None:
        for r in results:
            print(json.dumps({k: v for k, v in r.items() if k != "traceback"}, indent=1))
            print(r.get("traceback", ""))
    if args.json:
        Path(args.json).write_text(json.dumps(results))
    return 1 if any(r["outcome"] == "FAILURE" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
