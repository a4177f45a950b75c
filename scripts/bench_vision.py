#!/usr/bin/env python3
"""Benchmark our Gemma 3 image path against mlx-vlm on the same checkpoint: ratios, not thresholds.

No real Gemma 3 vision checkpoint can be downloaded here, so the bench builds one once (cached in
--workdir) with transformers + torch: a Hugging Face ``Gemma3ForConditionalGeneration`` folder (Google's
tensor names) with the real image geometry (896x896 pixels, 14-pixel patches = 64x64 = 4096 patches,
pooled 4x4 to 256 soft tokens) but a narrow SigLIP, and a small text model (hidden 256, 6 layers so that
the 6th is global as in Gemma 3, 4 heads, 1 KV head, head_dim 64, sliding window 512, vocab 512), so that
the vision tower dominates an image prompt as it does in a real model. Weights are random with a fixed
seed (make_tiny_gemma3_vlm.py's rules), saved in float32; tokenizer and processor files come from
tests/fixtures/tiny_gemma3_vlm with the image size set to 896 and 256 tokens per image.

SigLIP size: MLX's CPU backend is slow on this 2-core machine (matmul ~3-6 GFLOP/s; attention over 4096
patches ~10 s per layer at width 384), so the default is hidden 192, intermediate 768, 2 layers, 3 heads
(head_dim 64): ~10-14 s per image encode. The width 384 / 1536 / 4 layers / 6 heads variant takes ~52 s per
encode here (``--vision-hidden 384 --vision-intermediate 1536 --vision-layers 4 --vision-heads 6``,
~30 min in all); ``--real-size`` (Gemma 3's 1152 / 4304 / 27 layers / 16 heads, ~165x the default's
vision FLOPs) takes hours here and is meant for a faster machine.

Systems: "ours" is our dense float32 conversion of the folder (convert(..., mode="none"): the very
weights mlx-vlm computes with); "ours-q4" is load(HF folder) as a user gets it (its default conversion
puts the text linears on the Q4_0 grid; the vision tower stays float); "mlx-vlm" is mlx_vlm.load(folder).
Each runs in its own process (``--worker ours|ours-q4|mlxvlm``), so time and memory are per process:
  1. image encode: vision tower + projector, pixels -> 256 soft-token embeddings;
  2. first-token latency: from the call of each library's stream_generate (image file + the same raw
     prompt, greedy; image preprocessing, tokenizing, vision, prefill included) until its first
     response; prompt token counts are printed for all;
  3. peak MLX memory (mx.get_peak_memory) during the image prompts, the encode alone, after loading;
  4. precision (``--worker precision``): our tower + projector in bfloat16 and float16 against float32;
     and mlx-vlm's and transformers' float32 image features and greedy ids against ours (the same model?).
One image prompt first warms everything up; timings are medians of the runs after it.

    python scripts/bench_vision.py            # ~7 min here (+20 s the first time: checkpoint, conversions)
    python scripts/bench_vision.py --quick    # ~3 min: 1 repeat; no ours-q4, no transformers, no report file

It writes its report to scripts/bench_vision_results.md (not with --quick; --results to choose).
mlx-vlm is a dev tool, not a project dependency: ``pip install --no-deps mlx-vlm==0.7.10`` (its own
dependency list pulls in audio, server and dataset packages that Gemma 3 does not need).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "tiny_gemma3_vlm"
PY = sys.executable
SEED = 20250
PROMPT = "Describe this image in one sentence."
BOI = "<start_of_image>"
MARK = "BENCH_JSON "
MISSING_MLXVLM = ("mlx-vlm is not installed; it is a dev tool for this benchmark, not a project dependency: "
                  "pip install --no-deps mlx-vlm==0.7.10")

SMALL_VISION = dict(hidden=192, intermediate=768, layers=2, heads=3)
REAL_VISION = dict(hidden=1152, intermediate=4304, layers=27, heads=16)
TEXT = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=1, head_dim=64, query_pre_attn_scalar=64, sliding_window=512,
            max_position_embeddings=4096)


def log(msg: str):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str]) -> tuple[str, float]:
    """Run cmd; return (its stdout and stderr, max RSS in GB of that process alone)."""
    log("$ " + shlex.join(cmd)[:300])
    with tempfile.TemporaryFile("w+") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(p.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
    if code != 0:
        raise SystemExit(f"command failed ({code}): {shlex.join(cmd)}\n{text[-3000:]}")
    return text, usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024) / 1e9  # KiB on Linux, bytes on macOS


def worker(kind: str, a, work: Path, folder: Path, image: Path) -> dict:
    cmd = [PY, __file__, "--worker", kind, "--model", str(folder), "--image", str(image), "--workdir", str(work),
           "--repeats", str(a.repeats), "--max-tokens", str(a.max_tokens)]
    text, rss = run(cmd)
    lines = [ln for ln in text.splitlines() if ln.startswith(MARK)]
    if not lines:
        raise SystemExit(f"worker {kind} printed no result:\n{text[-3000:]}")
    res = json.loads(lines[-1][len(MARK):])
    res["rss"] = rss
    return res


def emit(res: dict):
    print(MARK + json.dumps(res), flush=True)


# ---------------------------------------------------------------- checkpoint and image (builder only)


def build_checkpoint(folder: Path, vision: dict):
    """A random float32 Gemma3ForConditionalGeneration folder with the real image geometry."""
    import torch
    from transformers import (AutoProcessor, Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig,
                              SiglipVisionConfig)

    from mlx_gemma_qat.atomic import commit

    sys.path.insert(0, str(ROOT / "scripts"))
    import make_tiny_gemma3_vlm as tiny  # its weight rules, text defaults and token ids

    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(SEED)
    cfg = Gemma3Config(
        text_config=Gemma3TextConfig(**{**tiny.TEXT, **TEXT}),
        vision_config=SiglipVisionConfig(**{**tiny.VISION, "image_size": 896, "hidden_size": vision["hidden"],
                                            "intermediate_size": vision["intermediate"],
                                            "num_hidden_layers": vision["layers"],
                                            "num_attention_heads": vision["heads"]}),
        mm_tokens_per_image=256, boi_token_index=tiny.BOI, eoi_token_index=tiny.EOI,
        image_token_index=tiny.IMAGE_TOKEN, tie_word_embeddings=True,
        architectures=["Gemma3ForConditionalGeneration"],
    )
    model = Gemma3ForConditionalGeneration(cfg)
    tiny.randomize(model, SEED)
    model.to(torch.float32).save_pretrained(tmp)
    # transformers 5 writes the tower as vision_tower.*; Google's Gemma 3 checkpoints (and mlx-vlm) have
    # vision_tower.vision_model.*, which transformers reads too: use that layout
    from safetensors.numpy import load_file, save_file

    weights = load_file(tmp / "model.safetensors")
    save_file({("vision_tower.vision_model." + k[len("vision_tower."):] if k.startswith("vision_tower.") else k): v
               for k, v in weights.items()}, tmp / "model.safetensors", metadata={"format": "pt"})
    _, info = Gemma3ForConditionalGeneration.from_pretrained(tmp, dtype=torch.float32, output_loading_info=True)
    if any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")):
        raise SystemExit(f"transformers does not read the renamed checkpoint back: {info}")
    for name in ("tokenizer.json", "generation_config.json"):
        shutil.copy(FIXTURE / name, tmp / name)

    def patch(name, **kv):
        d = {**json.loads((FIXTURE / name).read_text()), **kv}
        (tmp / name).write_text(json.dumps(d, indent=2) + "\n")

    patch("tokenizer_config.json", model_max_length=TEXT["max_position_embeddings"])
    patch("preprocessor_config.json", size={"height": 896, "width": 896}, image_seq_length=256)
    patch("processor_config.json", image_seq_length=256)
    # mlx-vlm divides the image features by sqrt(config.hidden_size) (top level, default 2048) before its
    # text model multiplies every embedding by sqrt(text hidden): only equal widths give the Gemma 3 model
    config = json.loads((tmp / "config.json").read_text())
    config["hidden_size"] = TEXT["hidden_size"]
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    proc = AutoProcessor.from_pretrained(tmp)
    from PIL import Image

    enc = proc(text=BOI + PROMPT, images=Image.new("RGB", (64, 48)), return_tensors="np")
    n_img = int((enc["input_ids"] == tiny.IMAGE_TOKEN).sum())
    if enc["pixel_values"].shape != (1, 3, 896, 896) or n_img != 256:
        raise SystemExit(f"transformers' processor gives {enc['pixel_values'].shape}, {n_img} image tokens")
    log(f"transformers AutoProcessor: {type(proc).__name__}, {enc['input_ids'].shape[1]} prompt tokens")
    commit(tmp, folder)


def make_image(path: Path):
    """640x480 RGB PNG: gradients, a pattern, blocks and noise, from a fixed seed."""
    from PIL import Image

    rng = np.random.default_rng(SEED)
    y, x = np.mgrid[0:480, 0:640].astype(np.float64)
    img = np.stack([255 * x / 639, 255 * y / 479, 128 + 100 * np.sin(x / 17) * np.cos(y / 23)], -1)
    img += rng.normal(0, 20, img.shape)
    img[60:180, 80:260] = [240, 30, 40]
    img[300:420, 400:600] = [30, 200, 60]
    Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8)).save(path)


# ---------------------------------------------------------------- workers (one system per process)


def timed(fn, repeats: int) -> tuple[list[float], object]:
    """`repeats` timed calls; return the times and the last result."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


def measure(a, load, prepare, encode, generate) -> dict:
    """The common protocol: load; one image prompt that warms everything up; then prepare inputs, image
    encode and image prompts `repeats` times each; peak MLX memory per phase."""
    import mlx.core as mx

    t0 = time.perf_counter()
    ctx = load()
    res = {"load_s": time.perf_counter() - t0, "peak_load": mx.get_peak_memory() / 1e9}

    def gen():
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        stamps, r = [], None
        for r in generate(ctx):  # one stamp per generated token
            stamps.append(time.perf_counter() - t0)
        ids = r.pop("ids")
        n = len(ids)
        return {**r, "ids": ids, "ttft": stamps[0], "peak": mx.get_peak_memory() / 1e9,
                "decode_tps": (n - 1) / (stamps[-1] - stamps[0]) if n > 1 and stamps[-1] > stamps[0] else None}

    warm = gen()
    prep_t, pixels = timed(lambda: prepare(ctx), a.repeats)

    def enc():
        f = encode(ctx, pixels)
        mx.eval(f)
        return f

    mx.reset_peak_memory()
    enc_t, feats = timed(enc, a.repeats)
    res.update(prep_s=prep_t, encode_s=enc_t, peak_encode=mx.get_peak_memory() / 1e9)
    runs = [gen() for _ in range(a.repeats)]
    res.update(ttft_s=[r["ttft"] for r in runs], ttft_warmup_s=warm["ttft"], peak_gen=max(r["peak"] for r in runs),
               prompt_tokens=runs[-1]["prompt_tokens"], ids=runs[-1]["ids"],
               decode_tps=statistics.median([r["decode_tps"] or 0 for r in runs]),
               feature_dtype=str(feats.dtype).removeprefix("mlx.core."), param_dtype=ctx["param_dtype"])
    np.save(Path(a.workdir) / f"features_{a.worker}.npy", np.array(feats.astype(mx.float32)))
    np.save(Path(a.workdir) / f"pixels_{a.worker}.npy", np.array(pixels))
    return res


def worker_ours(a):
    import mlx.core as mx

    from mlx_gemma_qat import load, stream_generate
    from mlx_gemma_qat.generate import encode_prompt
    from mlx_gemma_qat.image import preprocess_all

    def _load():
        model, tok = load(a.model)
        return {"model": model, "tok": tok,
                "param_dtype": str(model.vision_tower.post_layernorm.weight.dtype).removeprefix("mlx.core.")}

    def prepare(ctx):  # what stream_generate does before the model: pixels and ids
        m = ctx["model"].mcfg
        pixels, crops = preprocess_all([a.image], m.vision.image_size)
        encode_prompt(ctx["tok"], PROMPT, chat=False, n_images=1, crops=crops,
                      image_ids=(m.boi_token_index, m.eoi_token_index, m.image_token_index, m.mm_tokens_per_image))
        return mx.array(pixels)

    def encode(ctx, pixels):
        return ctx["model"].encode_images(pixels)

    def generate(ctx):
        ids = []
        for r in stream_generate(ctx["model"], ctx["tok"], PROMPT, a.max_tokens, images=[a.image], chat=False):
            ids.append(r.token)  # one response per token; the last one carries the finish reason
            yield {"prompt_tokens": r.prompt_tokens, "ids": ids}

    emit(measure(a, _load, prepare, encode, generate))


def worker_mlxvlm(a):
    try:
        import mlx_vlm
        from mlx_vlm import load, stream_generate
        from mlx_vlm.utils import prepare_inputs, should_add_special_tokens
    except ImportError as e:
        raise SystemExit(f"{MISSING_MLXVLM} ({e})")
    import mlx.core as mx

    prompt = BOI + PROMPT  # raw, no chat template: what ours builds with chat=False

    def _load():
        model, processor = load(a.model)
        dtype = model.language_model.model.embed_tokens.weight.dtype
        return {"model": model, "processor": processor, "param_dtype": str(dtype).removeprefix("mlx.core."),
                "dtype": dtype}

    def prepare(ctx):  # what mlx-vlm's stream_generate does first (_prepare_generation_inputs)
        m = ctx["model"]
        inputs = prepare_inputs(ctx["processor"], images=[a.image], prompts=prompt,
                                image_token_index=m.config.image_token_index,
                                add_special_tokens=should_add_special_tokens(m.config.model_type, ctx["processor"]))
        return inputs["pixel_values"]

    def encode(ctx, pixels):  # the vision part of mlx-vlm's Gemma 3 get_input_embeddings
        m = ctx["model"]
        hidden, _, _ = m.vision_tower(pixels.transpose(0, 2, 3, 1).astype(ctx["dtype"]), output_hidden_states=True)
        return m.multi_modal_projector(hidden)

    def generate(ctx):
        ids = []
        for r in stream_generate(ctx["model"], ctx["processor"], prompt, image=[a.image], max_tokens=a.max_tokens,
                                 temperature=0.0):
            # one response per token, then a closing one (token_ids set) that repeats the last token, or
            # brings the end-of-sequence token that stopped generation
            if r.token_ids is None or len(r.token_ids) > len(ids):
                ids.append(r.token)
                yield {"prompt_tokens": r.prompt_tokens, "ids": ids}

    res = measure(a, _load, prepare, encode, generate)
    res["version"] = mlx_vlm.__version__
    ours_px = Path(a.workdir) / "pixels_ours.npy"
    if ours_px.is_file():  # the very same pixels: do both compute one function?
        ctx = _load()
        f = encode(ctx, mx.array(np.load(ours_px)))
        np.save(Path(a.workdir) / "features_mlxvlm_on_our_pixels.npy", np.array(f.astype(mx.float32)))
    emit(res)


def worker_hf(a):
    """transformers, float32: image features on our pixels, and greedy ids from its own processor."""
    import torch
    from transformers import AutoProcessor, Gemma3ForConditionalGeneration
    from transformers.image_utils import load_image

    m = Gemma3ForConditionalGeneration.from_pretrained(a.model, dtype=torch.float32).eval()
    px = torch.from_numpy(np.load(Path(a.workdir) / "pixels_ours.npy"))
    enc = AutoProcessor.from_pretrained(a.model)(text=BOI + PROMPT, images=load_image(a.image), return_tensors="pt")
    with torch.inference_mode():
        f = m.model.get_image_features(px, return_dict=True).pooler_output
        out = m.generate(**enc, max_new_tokens=a.max_tokens, do_sample=False)
    np.save(Path(a.workdir) / "features_hf.npy", f.float().numpy().reshape(1, 256, -1))
    emit({"torch": torch.__version__, "prompt_tokens": enc["input_ids"].shape[1],
          "ids": out[0, enc["input_ids"].shape[1]:].tolist()})


def worker_precision(a):
    """Our tower + projector with its parameters and activations in bfloat16 / float16 vs float32; and our
    first greedy token with the image attended bidirectionally (Gemma 3) and causally (as mlx-vlm does)."""
    import mlx.core as mx
    from mlx.utils import tree_map

    from mlx_gemma_qat import load
    from mlx_gemma_qat.generate import encode_prompt, prefill
    from mlx_gemma_qat.image import preprocess_all

    model, tok = load(a.model, dtype="float32")
    m = model.mcfg
    pixels, crops = preprocess_all([a.image], m.vision.image_size)
    px = mx.array(pixels)
    ids = encode_prompt(tok, PROMPT, chat=False, n_images=1, crops=crops,
                        image_ids=(m.boi_token_index, m.eoi_token_index, m.image_token_index, m.mm_tokens_per_image))
    emb, groups = model.embed_prompt(ids, px)
    first = {name: int(mx.argmax(prefill(model, mx.array(ids), model.make_cache(), embeddings=emb, groups=g)).item())
             for name, g in (("bidirectional", groups), ("causal", None))}
    tower, proj = model.vision_tower, model.multi_modal_projector
    h, peak_act = tower.embeddings(px), []  # the residual stream, layer by layer, for float16 headroom
    for layer in tower.encoder.layers:
        h = layer(h)
        peak_act.append(mx.abs(h).max())
    ref = np.array(proj(tower.post_layernorm(h)))
    res = {"first_token": first, "max_abs_residual_f32": max(float(v) for v in peak_act),
           "max_abs_features_f32": float(np.abs(ref).max())}
    saved = {"t": tower.parameters(), "p": proj.parameters()}
    for name, dt in (("bfloat16", mx.bfloat16), ("float16", mx.float16)):
        tower.update(tree_map(lambda x: x.astype(dt), saved["t"]))
        proj.update(tree_map(lambda x: x.astype(dt), saved["p"]))
        model.vision_dtype = dt  # encode_images casts the pixels to it (and the result back to float32)
        t0 = time.perf_counter()
        out = model.encode_images(px)
        mx.eval(out)
        secs = time.perf_counter() - t0
        o = np.array(out.astype(mx.float32)).astype(np.float64)
        d = np.where(np.isfinite(o), o - ref, 0.0)
        res[name] = {"rel_rms": float(np.sqrt((d**2).mean() / (ref.astype(np.float64) ** 2).mean())),
                     "max_abs": float(np.abs(d).max()), "nonfinite": int((~np.isfinite(o)).sum()), "seconds": secs}
    emit(res)


# ---------------------------------------------------------------- report


def fmt(v, spec):
    """A value, or the median of runs with their range."""
    if isinstance(v, list):
        rng = f" ({min(v):{spec}}–{max(v):{spec}})" if len(v) > 1 else ""
        return format(statistics.median(v), spec) + rng
    return "—" if v is None else format(v, spec) if spec else str(v)


def table(systems: dict, base: str, rows: list) -> list[str]:
    """Markdown rows: the value of each system, then each other system / base."""
    others = [k for k in systems if k != base]
    head = ["metric", *systems, *(f"{k} / {base}" for k in others)]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, key, spec in rows:
        vals = {k: (key(r) if callable(key) else r.get(key)) for k, r in systems.items()}
        med = {k: statistics.median(v) if isinstance(v, list) else v for k, v in vals.items()}
        b = med[base]
        ratios = [f"{med[k] / b:.2f}×" if isinstance(b, (int, float)) and b and isinstance(med[k], (int, float))
                  else "—" for k in others]
        out.append("| " + " | ".join([label, *(fmt(v, spec) for v in vals.values()), *ratios]) + " |")
    return out


def max_abs(work: Path, a: str, b: str):
    fa, fb = work / f"{a}.npy", work / f"{b}.npy"
    if not (fa.is_file() and fb.is_file()):
        return None
    x, y = np.load(fa), np.load(fb)
    return float(np.abs(x - y.reshape(x.shape)).max())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", help="checkpoint, image and conversions, reused (default: a folder in the temp dir)")
    ap.add_argument("--image", help="image file (default: a generated 640x480 PNG in the work dir)")
    ap.add_argument("--quick", action="store_true",
                    help="1 repeat; no ours-q4 run, no transformers reference, no report file (~3 min)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each measurement after the warm-up (default 3)")
    ap.add_argument("--max-tokens", type=int, default=8, help="tokens generated per image prompt (default 8)")
    ap.add_argument("--real-size", action="store_true",
                    help="Gemma 3's real SigLIP (1152/4304/27 layers/16 heads): ~165x the default's vision work, hours here")
    ap.add_argument("--vision-hidden", type=int, default=SMALL_VISION["hidden"])
    ap.add_argument("--vision-intermediate", type=int, default=SMALL_VISION["intermediate"])
    ap.add_argument("--vision-layers", type=int, default=SMALL_VISION["layers"])
    ap.add_argument("--vision-heads", type=int, default=SMALL_VISION["heads"])
    ap.add_argument("--ours-q4", action=argparse.BooleanOptionalAction, default=None,
                    help="also time load(HF folder) as a user gets it: text weights on the Q4_0 grid (default on, "
                    "off with --quick)")
    ap.add_argument("--precision", action=argparse.BooleanOptionalAction, default=True,
                    help="bfloat16/float16 vs float32 of our tower (default on)")
    ap.add_argument("--hf-reference", action=argparse.BooleanOptionalAction, default=None,
                    help="transformers' float32 features and greedy ids as a third opinion (default on, off with --quick)")
    ap.add_argument("--results", help="write the markdown report here (default: scripts/bench_vision_results.md, "
                    "not with --quick; '' for none)")
    ap.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return WORKERS[a.worker](a)
    if importlib.util.find_spec("mlx_vlm") is None:
        raise SystemExit(MISSING_MLXVLM)
    if a.quick and "--repeats" not in sys.argv:
        a.repeats = 1
    a.ours_q4 = not a.quick if a.ours_q4 is None else a.ours_q4
    a.hf_reference = not a.quick if a.hf_reference is None else a.hf_reference
    if a.results is None:
        a.results = "" if a.quick else str(ROOT / "scripts" / "bench_vision_results.md")
    vision = dict(REAL_VISION) if a.real_size else dict(
        hidden=a.vision_hidden, intermediate=a.vision_intermediate, layers=a.vision_layers, heads=a.vision_heads)

    t_start = time.perf_counter()
    import mlx.core as mx
    import mlx_vlm

    work = Path(a.workdir or Path(tempfile.gettempdir()) / "mlx_gemma_bench_vision").resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ["MLX_GEMMA_CACHE"] = str(work / "mlx_gemma_cache")  # load(HF folder) converts into this
    tag = "v{hidden}x{intermediate}x{layers}h{heads}".format(**vision)
    folder = work / f"gemma3_896_{tag}_t{TEXT['hidden_size']}x{TEXT['num_hidden_layers']}"
    if not (folder / "config.json").is_file():
        log(f"building the checkpoint {folder} (once)")
        build_checkpoint(folder, vision)
    image = Path(a.image).resolve() if a.image else work / "bench_640x480.png"
    if not a.image and not image.is_file():
        make_image(image)
    for f in work.glob("*.npy"):
        f.unlink()
    # our conversions, once, outside the measured processes: dense float32 (the very weights mlx-vlm
    # computes with), and the default of load(HF folder), text linears on the Q4_0 grid
    dense = work / (folder.name + "-ours-dense")
    if not (dense / "config.json").is_file():
        run([PY, "-c", "import sys; from mlx_gemma_qat.convert import convert; "
             "convert(sys.argv[1], sys.argv[2], mode='none', progress=False)", str(folder), str(dense)])
    if a.ours_q4:
        run([PY, "-c", "import sys; from mlx_gemma_qat.models_cache import resolve_model; resolve_model(sys.argv[1])",
             str(folder)])
    header = [
        "## mlx-gemma-qat vs mlx-vlm: Gemma 3 image prompts",
        "",
        f"- command: `{shlex.join([Path(sys.executable).name] + sys.argv)}`",
        f"- machine: {platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs, MLX device "
        f"{mx.default_device()}, load average at start {os.getloadavg()[0]:.2f}",
        f"- versions: python {platform.python_version()}, mlx {mx.__version__}, mlx-vlm {mlx_vlm.__version__}",
        f"- checkpoint: `{folder.name}`, random weights (seed {SEED}), float32: SigLIP hidden {vision['hidden']}, "
        f"intermediate {vision['intermediate']}, {vision['layers']} layers, {vision['heads']} heads, 896x896 / "
        f"patch 14 = 4096 patches -> 256 soft tokens; text hidden {TEXT['hidden_size']}, "
        f"{TEXT['num_hidden_layers']} layers, vocab 512",
        f"- image `{image.name}`, prompt {BOI + PROMPT!r} raw (no chat template), greedy, {a.max_tokens} new "
        f"tokens; one image prompt warms up each process, then medians of {a.repeats} run(s)",
        "- systems: **ours** = our dense float32 conversion (the same weights mlx-vlm uses), **mlx-vlm** = "
        "mlx_vlm.load(HF folder)"
        + (", **ours-q4** = load(HF folder) with its default conversion (text linears on the Q4_0 grid, "
           "vision tower kept float)" if a.ours_q4 else ""),
    ]
    print("\n".join(header), flush=True)

    runs = {"ours": dense, "mlxvlm": folder, "ours-q4": folder}
    res = {k: worker(k, a, work, m, image) for k, m in runs.items() if k != "ours-q4" or a.ours_q4}
    hf = worker("hf", a, work, folder, image) if a.hf_reference else None
    prec = worker("precision", a, work, dense, image) if a.precision else None

    systems = {"ours": res["ours"], **({"ours-q4": res["ours-q4"]} if a.ours_q4 else {}), "mlx-vlm": res["mlxvlm"]}
    lines = table(systems, "mlx-vlm", [
        ("prompt tokens", "prompt_tokens", "d"),
        ("prepare inputs: image file + prompt -> pixels, ids (ms)", lambda r: [1e3 * t for t in r["prep_s"]], ".1f"),
        ("image encode: tower + projector (s)", "encode_s", ".2f"),
        ("first-token latency, image prompt (s)", "ttft_s", ".2f"),
        (f"decode tok/s ({a.max_tokens} tokens, tiny text model)", "decode_tps", ".1f"),
        ("peak MLX GB, image prompt", "peak_gen", ".3f"),
        ("peak MLX GB, image encode", "peak_encode", ".3f"),
        ("peak MLX GB, after load", "peak_load", ".3f"),
        ("max RSS GB (process)", "rss", ".3f"),
        ("weights / features dtype", lambda r: f"{r['param_dtype']} / {r['feature_dtype']}", None),
    ])
    prec_lines = []
    if prec:
        prec_lines = ["| our tower + projector | rel. RMS error vs float32 | max abs error | inf/nan | encode (s) |",
                      "|---|---|---|---|---|"]
        for name in ("bfloat16", "float16"):
            q = prec[name]
            prec_lines.append(f"| {name} | {q['rel_rms']:.2e} | {q['max_abs']:.3e} | {q['nonfinite']} | "
                              f"{q['seconds']:.2f} |")
    diffs = {"mlx-vlm on our pixels": max_abs(work, "features_ours", "features_mlxvlm_on_our_pixels"),
             "mlx-vlm on its own pixels": max_abs(work, "features_ours", "features_mlxvlm"),
             "transformers on our pixels": max_abs(work, "features_ours", "features_hf"),
             "ours-q4 (same tower)": max_abs(work, "features_ours", "features_ours-q4")}
    scale = float(np.abs(np.load(work / "features_ours.npy")).max())
    ids = {k: r["ids"] for k, r in systems.items()} | ({"transformers": hf["ids"]} if hf else {})
    notes = [
        f"- float32 image features (max abs {scale:.3f}), max abs difference from ours: "
        + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items() if v is not None)
        + f"; pixels, mlx-vlm vs ours: {max_abs(work, 'pixels_ours', 'pixels_mlxvlm'):.2e}.",
        "- greedy ids: " + "; ".join(f"{k} {v}" for k, v in ids.items())
        + (f"; transformers' prompt has {hf['prompt_tokens']} tokens" if hf else "") + ".",
    ]
    if prec:
        ft = prec["first_token"]
        notes.append(f"- our dense model's first token with the image attended bidirectionally (Gemma 3): "
                     f"{ft['bidirectional']}; with causal attention over the image, as mlx-vlm 0.7.10 does (its "
                     f"Gemma 3 language model gets no image mask): {ft['causal']}.")
        notes.append("- weights are random (no real Gemma 3 checkpoint can be downloaded here), so the precision "
                     "figures are a proxy: random weights keep activations small (the float32 residual stream peaks "
                     f"at {prec['max_abs_residual_f32']:.1f} here, float16 overflows past 65504); real checkpoints "
                     "can have much larger outliers. The float16 row is the vision tower alone, cast by hand: "
                     "load() refuses float16 compute.")
    notes += [
        "- mlx-vlm as seen in 0.7.10 (installed with `pip install --no-deps mlx-vlm==0.7.10`): it reads Google's "
        "tensor names only (vision_tower.vision_model.*; transformers 5 saves vision_tower.*, which it rejects as "
        "'parameters not in model', so the bench writes Google's names), takes mm_tokens_per_image from "
        "text_config (default 256) and uses eps 1e-5 in the tower's final LayerNorm (config: 1e-6), which is "
        "immaterial here: its features equal ours to float32 rounding.",
        "- dtypes: mlx-vlm computes in the checkpoint's dtype (float32 here; it does not cast), ours in float32 on "
        "the CPU by default.",
        "- mlx-vlm divides image features by sqrt(config.hidden_size) (top level, default 2048) before its text "
        "model scales every embedding by sqrt(text hidden): the checkpoint's config.json carries hidden_size = "
        "text hidden so that mlx-vlm runs the Gemma 3 model.",
        "- ratios are system / mlx-vlm (of medians): below 1 is faster (times) or smaller (memory); above 1 is "
        "faster for tok/s. Timings show median (min–max) over the runs.",
        f"- wall time {time.perf_counter() - t_start:.0f} s; load average at end {os.getloadavg()[0]:.2f} "
        "(MLX's CPU backend kept about one core busy; the same encode took 9-15 s from run to run on this "
        "machine, in one process or not, so time ratios between about 0.75 and 1.3 are noise).",
    ]
    report = "\n".join(header + ["", *lines, "", *prec_lines, "", *notes]) + "\n"
    print("\n" + "\n".join(lines) + "\n\n" + "\n".join(prec_lines) + "\n\n" + "\n".join(notes), flush=True)
    if a.results:
        Path(a.results).write_text(report)
        log(f"wrote {a.results}")


WORKERS = {"ours": worker_ours, "ours-q4": worker_ours, "mlxvlm": worker_mlxvlm, "hf": worker_hf,
           "precision": worker_precision}

if __name__ == "__main__":
    main()
