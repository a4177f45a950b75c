"""Re-lay a Gemma 3 GGUF in the layout of Google's QAT GGUFs: token_embd F16, every linear Q4_0, norms F32.

This is what llama.cpp's quantizer makes from the embedded 270M with ``ftype = Q4_0`` and
``token_embedding_type = F16`` (llama-cpp-python: ``llama_model_quantize`` with ``allow_requantize``):
every tensor is dequantized (gguf-py), the embedding rounded to float16, the 2-D weights quantized with
gguf-py's Q4_0 quantizer, which follows llama.cpp's ``quantize_row_q4_0_ref`` (d = max / -8,
q = trunc(x / d + 8.5) clipped to 15). Metadata is copied, ``general.file_type`` set to MOSTLY_Q4_0.

Checked once against llama.cpp (llama-cpp-python 0.3.36, ``llama_model_quantize``) on the embedded 270M: all 236
tensors (126 Q4_0, 1 F16, 109 F32) and every metadata key are byte-identical, and so are the two 398,695,104-byte
files (same sha256). The test suite makes this copy at test time (cached, see ``tests/conftest.py``), so it needs
no llama.cpp.

    python scripts/make_qat_layout.py [SRC.gguf] -o OUT.gguf      # SRC defaults to the embedded 270M
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT

MOSTLY_Q4_0 = 2  # llama_ftype


def _copy_metadata(reader: gguf.GGUFReader, writer: gguf.GGUFWriter) -> None:
    for name, f in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue  # written by GGUFWriter itself
        if name == "general.file_type":
            writer.add_uint32(name, MOSTLY_Q4_0)
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, f.contents(), vtype, sub_type=sub)


def relayout(src: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the QAT-layout copy of ``src`` to ``out`` (atomically: a temporary sibling renamed at the end)."""
    from mlx_gemma_qat.atomic import atomic_file
    from mlx_gemma_qat.convert.from_gguf import read_gguf  # gguf-py's reader, faster on a 262k vocabulary

    src, out = Path(src), Path(out)
    reader = read_gguf(src)
    arch = reader.fields["general.architecture"].contents()
    with atomic_file(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        try:
            _copy_metadata(reader, writer)
            for t in reader.tensors:
                shape = tuple(int(s) for s in reversed(t.shape))  # rows first
                data = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)
                if t.name == "token_embd.weight":
                    writer.add_tensor(t.name, data.astype(np.float16))
                elif data.ndim == 2 and shape[-1] % 32 == 0 and t.tensor_type != QT.F32:
                    q = gguf.quants.quantize(data.astype(np.float32), QT.Q4_0)
                    writer.add_tensor(t.name, q, raw_dtype=QT.Q4_0)  # byte shape -> element shape
                else:
                    writer.add_tensor(t.name, data.astype(np.float32))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return out


def cached(src: str | os.PathLike) -> Path:
    """The QAT-layout copy of ``src``, made once and kept in the conversion cache (test fixtures and dev checks
    share it); keyed by the source's size and mtime and by this script, so a changed re-layout makes a new one."""
    import hashlib

    from filelock import FileLock

    from mlx_gemma_qat.models_cache import cache_root

    st = Path(src).stat()
    key = hashlib.sha1(f"{st.st_size}|{st.st_mtime_ns}|".encode() + Path(__file__).read_bytes()).hexdigest()[:12]
    out = cache_root() / "test-fixtures" / f"gemma3-270m-qat-layout-{key}.gguf"
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):  # test workers and dev checks running at once make it once
        if not out.is_file():
            relayout(src, out)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", nargs="?", help="source GGUF (default: the embedded Gemma 3 270M)")
    ap.add_argument("-o", "--out", required=True)
    a = ap.parse_args(argv)
    src = a.src
    if src is None:
        from mlx_gemma_qat.models_cache import default_gguf

        src = default_gguf()
    print(relayout(src, a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
