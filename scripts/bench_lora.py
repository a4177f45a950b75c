#!/usr/bin/env python3
"""LoRA training speed and memory: this project's trainer against mlx-lm's ``mlx_lm.lora`` (0.32), same
checkpoint, same data, with both loss curves.

Checkpoint: the embedded Gemma 3 270M as this project converts it (``models_cache.resolve_model(None)``, an MLX
folder that ``mlx_lm.load`` also reads; float16 scales). Runs, one training process at a time, each in its own
process (its max RSS from ``os.wait4``; MLX's peak from the trainer's own report):

* mlx-lm at "equal settings": on a float32 copy of that folder (every float16/bfloat16 tensor cast to float32,
  the other files copied), which is what our CPU loader does in memory by default (``--widen``): both compute
  in float32 on identical values;
* ours, ``--kind lora`` (standard LoRA: rank 8, scale 20, dropout 0, the last 16 blocks, every linear: the
  same layers mlx-lm adapts by default on gemma3_text) and ``--kind pooled`` (our default), on the folder as is;
* mlx-lm at its defaults: on the folder as is (float16 compute on the CPU), under ``--peer-default-timeout``.

All: batch ``--batch-size``, max length ``--max-seq-length``, learning rate 1e-5 held constant (mlx-lm's
default Adam; ours AdamW with weight decay 0 and ``--min-lr-ratio 1``), seed 0, one validation batch (the
validation set is exactly one batch, so both validate on the same tokens), a report every step, no
checkpoints in between. mlx-lm's metrics are taken from its own training callback (``TrainingCallback``:
the values it prints, unrounded, plus its peak memory, which 0.32 does not print), installed by this script's
``--peer-child`` wrapper; its training code runs unchanged.

    .venv/bin/python scripts/bench_lora.py [--iters 4] [--batch-size 2] [--max-seq-length 128]
        [--skip-peer-defaults] [--peer-default-timeout 600] [--out scripts/bench_lora_results.md]

Goal (issue): >= 1.0x mlx-lm's tokens/s at equal settings and <= its peak memory.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
# public texts the records are cut from, in order: the committed GPL-3, then (only if more records are asked for than
# it holds, and only where the folder exists, e.g. Debian) other licence texts of the system
GPL3 = ROOT / "tests" / "fixtures" / "texts" / "GPL-3"
MORE_TEXTS = ["GPL-2", "LGPL-2.1", "Apache-2.0", "MPL-2.0", "GFDL-1.3", "Artistic"]
LICENSES = Path("/usr/share/common-licenses")


# ------------------------------------------------------------------ peer child (runs mlx_lm.lora as is)
def peer_child(metrics_path: str, argv: list[str]) -> None:
    """mlx_lm.lora's main() with a TrainingCallback that writes every report to ``metrics_path`` (JSONL)."""
    import mlx_lm.lora as L
    from mlx_lm.tuner.trainer import TrainingCallback

    class Record(TrainingCallback):
        def _w(self, kind, info):
            with open(metrics_path, "a") as fh:
                fh.write(json.dumps({"kind": kind, "t": time.time(), **{k: float(v) for k, v in info.items()}}) + "\n")

        def on_train_loss_report(self, info):
            self._w("train", info)

        def on_val_loss_report(self, info):
            self._w("val", info)

    L.get_reporting_callbacks = lambda *a, **k: Record()
    sys.argv = ["mlx_lm.lora", *argv]
    L.main()


# ------------------------------------------------------------------ helpers
def run_proc(cmd: list[str], log: Path, timeout: float) -> dict:
    """Run ``cmd`` (stdout+stderr to ``log``) with a wall-clock cap; rc, seconds, max RSS (os.wait4)."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        timed_out = False
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - t0 > timeout:
                timed_out = True
                os.killpg(p.pid, signal.SIGKILL)  # the group of the process this function started
                pid, status, ru = os.wait4(p.pid, 0)
                break
            time.sleep(0.5)
        p.returncode = os.waitstatus_to_exitcode(status)
    return {"rc": p.returncode, "seconds": time.perf_counter() - t0, "max_rss_gb": ru.ru_maxrss * (1 if sys.platform == "darwin" else 1024) / 1e9,
            "timed_out": timed_out, "cmd": cmd, "log": str(log)}


def make_data(folder: Path, out: Path, max_len: int, batch: int, n_train: int) -> dict:
    """{"text"} records of about ``max_len - 8`` tokens (never cut by either trainer) from the license texts."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    body = max(max_len - 8, 4)
    records = []
    for path in [GPL3, *(LICENSES / n for n in MORE_TEXTS if (LICENSES / n).is_file())]:
        ids = tok.encode(path.read_text(errors="replace"), add_special_tokens=False)
        for s in range(0, len(ids) - body + 1, body):
            text = tok.decode(ids[s:s + body]).strip()
            n = len(tok.encode(text)) + 1  # + BOS as encode adds it, + EOS both trainers append
            if text and n <= max_len:
                records.append(text)
            if len(records) >= n_train + batch:
                break
        if len(records) >= n_train + batch:
            break
    if len(records) < n_train + batch:
        raise SystemExit(f"the texts give only {len(records)} records of <= {max_len} tokens; {n_train} + {batch} asked for")
    out.mkdir(parents=True, exist_ok=True)
    train, valid = records[:n_train], records[n_train:n_train + batch]
    for split, recs in (("train", train), ("valid", valid)):
        (out / f"{split}.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in recs))
    lens = [len(tok.encode(r)) + 1 for r in train]
    return {"train": len(train), "valid": len(valid), "min_len": min(lens), "max_len": max(lens),
            "mean_len": sum(lens) / len(lens)}


def float32_copy(src: Path, dst: Path) -> dict:
    import mlx.core as mx

    dst.mkdir(parents=True, exist_ok=True)
    cast = 0
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            w = mx.load(str(f))
            out = {}
            for k, v in w.items():
                if v.dtype in (mx.float16, mx.bfloat16):
                    v, cast = v.astype(mx.float32), cast + 1
                out[k] = v
            mx.save_safetensors(str(dst / f.name), out, metadata={"format": "mlx"})
        elif f.is_file():
            shutil.copy2(f, dst / f.name)
    return {"cast": cast}


def steps_of(train_rows: list[dict], tps_cumulative: bool) -> list[dict]:
    """Per step: tokens, seconds, loss (ours reports cumulative tokens/s since the first step; mlx-lm per report)."""
    out, prev_tok, prev_t = [], 0.0, 0.0
    for m in train_rows:
        tok_total = m["trained_tokens"]
        if tps_cumulative:
            t_total = tok_total / m["tps"] if m["tps"] else float("nan")
        else:
            t_total = prev_t + ((tok_total - prev_tok) / m["tps"] if m["tps"] else float("nan"))
        out.append({"step": m["step"], "tokens": tok_total - prev_tok, "seconds": t_total - prev_t,
                    "loss": m["loss"], "peak_gb": m.get("peak_gb")})
        prev_tok, prev_t = tok_total, t_total
    return out


def ours_metrics(adapter: Path) -> dict:
    f = adapter / "metrics.jsonl"
    rows = [json.loads(line) for line in f.read_text().splitlines()] if f.is_file() else []
    train = [{"step": r["step"], "loss": r["train_loss"], "tps": r["tokens_per_s"], "trained_tokens": r["trained_tokens"],
              "peak_gb": r["peak_memory_gb"]} for r in rows if "train_loss" in r]
    vals = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    layers = None
    cfg = adapter / "adapter_config.json"
    if cfg.is_file():
        layers = sorted(json.loads(cfg.read_text()).get("layers", {}))
    return {"steps": steps_of(train, True), "vals": vals, "peak_gb": max((r["peak_gb"] for r in train), default=None),
            "layers": layers}


def peer_metrics(metrics: Path, adapter: Path) -> dict:
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    train = [{"step": int(r["iteration"]), "loss": r["train_loss"], "tps": r["tokens_per_second"],
              "trained_tokens": r["trained_tokens"], "peak_gb": r["peak_memory"]} for r in rows if r["kind"] == "train"]
    # mlx-lm validates before the step of its iteration number: "iteration" in the callback is it - 1,
    # i.e. the number of steps done before that validation
    vals = [(int(r["iteration"]), r["val_loss"]) for r in rows if r["kind"] == "val"]
    layers = None
    f = adapter / "adapters.safetensors"
    if f.is_file():
        import mlx.core as mx

        layers = sorted({k.rsplit(".", 1)[0] for k in mx.load(str(f))})
    return {"steps": steps_of(train, False), "vals": vals, "peak_gb": max((r["peak_gb"] for r in train), default=None),
            "layers": layers}


def rate(steps: list[dict], skip_first: bool) -> float | None:
    s = steps[1:] if skip_first else steps
    t = sum(x["seconds"] for x in s)
    return sum(x["tokens"] for x in s) / t if s and t > 0 else None


def fmt(x, spec=".3f", none="-"):
    return none if x is None else format(x, spec)


# ------------------------------------------------------------------ main
def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--max-seq-length", type=int, default=128)
    ap.add_argument("--learning-rate", type=float, default=1e-5)
    ap.add_argument("--train-records", type=int, default=40)
    ap.add_argument("--skip-peer-defaults", action="store_true")
    ap.add_argument("--peer-default-timeout", type=float, default=600)
    ap.add_argument("--run-timeout", type=float, default=3600, help="wall-clock cap of every other run (s)")
    ap.add_argument("--only", default=None, help="comma-separated subset of runs: peer,lora,pooled,peer-default")
    ap.add_argument("--workdir", default=None, help="keep data, float32 copy, adapters and logs here")
    ap.add_argument("--out", default=str(ROOT / "scripts" / "bench_lora_results.md"))
    ap.add_argument("--plot", default=str(ROOT / "scripts" / "bench_lora_curves.png"))
    ap.add_argument("--peer-child", default=None, help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    if args.peer_child:
        return peer_child(args.peer_child, [a for a in rest if a != "--"])
    if rest:
        ap.error(f"unknown arguments {rest}")

    import mlx.core as mx
    import mlx_lm

    from mlx_gemma_qat.models_cache import resolve_model

    folder = Path(resolve_model(None))
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_lora_"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    info = make_data(folder, data, args.max_seq_length, args.batch_size, args.train_records)
    print(f"data: {info} in {data}", flush=True)
    f32 = work / "model-f32"
    if not (f32 / "config.json").is_file():
        c = float32_copy(folder, f32)
        print(f"float32 copy: {c['cast']} tensors cast -> {f32}", flush=True)

    common = ["--iters", str(args.iters), "--batch-size", str(args.batch_size), "--max-seq-length",
              str(args.max_seq_length), "--learning-rate", str(args.learning_rate)]
    ours_cmd = lambda kind, ad: [str(ROOT / ".venv" / "bin" / "mlx-gemma"), "lora", "-m", str(folder), "--data", str(data),
                                 "--adapter-path", str(ad), "--kind", kind, "--rank", "8", "--scale", "20", "--dropout", "0",
                                 "--num-layers", "16", *common, "--min-lr-ratio", "1.0", "--weight-decay", "0",
                                 "--val-every", "0", "--val-batches", "1", "--save-every", "0", "--report-every", "1",
                                 "--seed", "0"]
    peer_cmd = lambda model, ad, met: [PY, __file__, "--peer-child", str(met), "--", "--model", str(model), "--train",
                                       "--data", str(data), "--adapter-path", str(ad), "--fine-tune-type", "lora",
                                       "--num-layers", "16", *common, "--val-batches", "1", "--steps-per-report", "1",
                                       "--steps-per-eval", "1000000", "--save-every", "1000000", "--seed", "0"]
    runs = [
        ("peer", "mlx-lm, equal settings (float32 copy)", "peer"),
        ("lora", "ours --kind lora (folder as is, widened to float32 in memory)", "ours"),
        ("pooled", "ours --kind pooled (our default)", "ours"),
    ]
    if not args.skip_peer_defaults:
        runs.append(("peer-default", "mlx-lm, its defaults (folder as is: float16 compute)", "peer"))
    if args.only:
        keep = set(args.only.split(","))
        runs = [r for r in runs if r[0] in keep]

    results = {}
    for key, label, side in runs:
        ad = work / f"adapter-{key}"
        shutil.rmtree(ad, ignore_errors=True)
        met = work / f"peer-{key}.jsonl"
        met.unlink(missing_ok=True)
        if side == "ours":
            cmd = ours_cmd(key, ad)
        else:
            cmd = peer_cmd(f32 if key == "peer" else folder, ad, met)
        timeout = args.peer_default_timeout if key == "peer-default" else args.run_timeout
        print(f"\n== {label}\n$ {' '.join(cmd)}", flush=True)
        r = run_proc(cmd, work / f"log-{key}.txt", timeout)
        m = ours_metrics(ad) if side == "ours" else peer_metrics(met, ad)
        r.update(m, label=label, side=side, timeout=timeout)
        results[key] = r
        print(f"rc {r['rc']}{' (timed out)' if r['timed_out'] else ''}, {r['seconds']:.0f} s, max RSS {r['max_rss_gb']:.2f} GB, "
              f"steps {[(s['step'], round(s['tokens']), round(s['seconds'], 1), round(s['loss'], 4)) for s in r['steps']]}, "
              f"val {r['vals']}, MLX peak {r['peak_gb']}", flush=True)
        if r["rc"] != 0 and not r["timed_out"]:
            print("--- log tail:\n" + Path(r["log"]).read_text()[-3000:], flush=True)
        (work / "results.json").write_text(json.dumps(results, indent=1, default=str))

    report(args, results, info, folder, work, mx.__version__, mlx_lm.__version__)


def report(args, results, info, folder, work, mlx_version, mlx_lm_version):
    ref = results.get("peer")
    ref_all = rate(ref["steps"], False) if ref else None
    ref_steady = rate(ref["steps"], True) if ref else None
    rows = []
    hdr = ("| run | settings | steps done | tokens/s (all steps) | vs equal peer | tokens/s (steps 2+) | vs equal peer "
           "| MLX peak (GB) | max RSS (GB) | train loss first / last | val loss before / after | wall (s) |")
    rows.append(hdr)
    rows.append("|" + "---|" * (hdr.count("|") - 1))
    for key, r in results.items():
        s = r["steps"]
        a, b = rate(s, False), rate(s, True)
        ra = f"{a / ref_all:.2f}x" if a and ref_all else "-"
        rb = f"{b / ref_steady:.2f}x" if b and ref_steady else "-"
        if not s and r["timed_out"]:
            a_txt = f"no step finished in {r['timeout']:.0f} s"
        else:
            a_txt = fmt(a, ".2f")
        loss = f"{s[0]['loss']:.4f} / {s[-1]['loss']:.4f}" if s else "-"
        vb = next((v for st, v in r["vals"] if st == 0), None)
        va = max(r["vals"], default=None) if r["vals"] else None
        va_txt = f"{va[1]:.4f} (after {va[0]})" if va and va[0] > 0 else "-"
        settings = "float32" if key != "peer-default" else "float16 (as stored)"
        rows.append(f"| {r['label']} | {settings}, b{args.batch_size}, L{args.max_seq_length}, lr {args.learning_rate:g} "
                    f"| {len(s)}/{args.iters} | {a_txt} | {ra} | {fmt(b, '.2f')} | {rb} | {fmt(r['peak_gb'], '.3f')} "
                    f"| {r['max_rss_gb']:.3f} | {loss} | {fmt(vb, '.4f')} / {va_txt} | {r['seconds']:.0f}"
                    f"{' (killed)' if r['timed_out'] else ''} |")
    table = "\n".join(rows)
    print("\n" + table)

    steps_tbl = ["| run | step | target tokens | seconds | train loss |", "|---|---|---|---|---|"]
    for key, r in results.items():
        for s in r["steps"]:
            steps_tbl.append(f"| {key} | {s['step']} | {s['tokens']:.0f} | {s['seconds']:.1f} | {s['loss']:.4f} |")

    same_layers = None
    if results.get("peer", {}).get("layers") and results.get("lora", {}).get("layers"):
        same_layers = results["peer"]["layers"] == results["lora"]["layers"]

    cmdline = "python scripts/bench_lora.py " + " ".join(sys.argv[1:])
    lines = [
        "# LoRA training: ours vs mlx-lm (`mlx_lm.lora`), embedded Gemma 3 270M", "",
        f"{datetime.date.today().isoformat()}; `{cmdline}`", "",
        f"Machine: {platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores (shared with other work), MLX {mlx_version} CPU "
        f"backend, mlx-lm {mlx_lm_version}. GPU speed unmeasured.", "",
        f"Checkpoint: `{folder.name}` (this project's conversion, float16 scales/biases; mlx-lm reads the same folder). "
        "Equal settings: mlx-lm on a float32 copy (every float16/bfloat16 tensor cast), ours on the folder as is "
        "(the CPU loader widens the same tensors to float32 in memory): both compute in float32 on identical values.", "",
        f"Data: {info['train']} train + {info['valid']} valid `{{\"text\"}}` records cut from tests/fixtures/texts/GPL-3 "
        f"(then other licence texts if more were needed), {info['min_len']}-{info['max_len']} tokens with BOS and EOS (mean {info['mean_len']:.1f}); "
        "no record is truncated. The validation set is exactly one batch, so both sides validate on the same tokens.", "",
        f"Settings: batch {args.batch_size}, max length {args.max_seq_length}, {args.iters} steps, learning rate "
        f"{args.learning_rate:g} constant (mlx-lm: Adam, its default; ours: AdamW weight decay 0, --min-lr-ratio 1), "
        "rank 8, scale 20, dropout 0, last 16 of 18 blocks, every linear (q/k/v/o, gate/up/down: mlx-lm's default "
        "keys on gemma3_text), seed 0, report every step, 1 validation batch, no intermediate checkpoints."
        + ("" if same_layers is None else f" Adapted layers identical on both sides (from the adapter files): {same_layers}."), "",
        table, "",
        "Tokens/s: target tokens of the training steps divided by the time of those steps (validation, loading and "
        "saving excluded on both sides); the ratio column is against mlx-lm at equal settings. \"steps 2+\" leaves "
        "out the first step (graph building, allocator warm-up).", "",
        "MLX peak: `mx.get_peak_memory()` as each trainer reports it. Ours resets the peak just before the first "
        "step (so loading and the first validation are not in it); mlx-lm never resets it (loading and validation "
        "are in it). Max RSS (`os.wait4` ru_maxrss) covers the whole process on both sides and is the like-for-like "
        "memory figure.", "",
        "Validation: ours before step 1 and after the last step; mlx-lm before step 1 and before its last step "
        "(its `it == iters` validation runs ahead of that iteration's step), i.e. after iters-1 steps.", "",
        "## Per step", "", *steps_tbl, "",
        f"Curves: `{Path(args.plot).name}`.", "",
        "## How tokens are counted", "",
        TOKENS_NOTE, "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print(f"\nwrote {args.out}")
    plot(results, args.plot)


TOKENS_NOTE = (
    "* Ours (`metrics.jsonl` `tokens_per_s`, `trained_tokens`): the sum of the target weights of the steps, i.e. "
    "positions with a real next token (padding and masked prompt excluded): L-1 per record of L tokens (BOS...EOS); "
    "`tokens_per_s` is cumulative since the first step (its per-step time is derived from it).\n"
    "* mlx-lm (`tuner/trainer.py` `default_loss`): `ntoks = mask.sum()` with `mask = offset <= steps <= length`, "
    "steps = 1..T over the T = padded length - 1 target positions. For an untruncated record of L tokens "
    "(offset 0) that is L positions: the L-1 real next tokens plus one position whose target is the first padding "
    "token (id 0) after EOS, which is also in its loss (when the row is shorter than the padded batch). "
    "Its tokens/s is that count per second of the step(s) of each report.\n"
    "* So mlx-lm counts one more token per row than ours on the same batch (e.g. 2 of ~240 per step here, ~0.8%); "
    "the ratios above are of each side's own count. The per-step table shows both counts.\n"
    "* The same extra position is in mlx-lm's loss: the cross-entropy of predicting padding (id 0) after EOS is "
    "~30+ nats, so its reported losses sit ~1 nat/token (at ~25-token rows) or ~0.25 (at ~120) above ours on the same "
    "tokens. Checked on a 2-row validation batch (L = 26, float32 copy, mlx-lm's model): mean over the real targets "
    "5.2048 (ours reports 5.2042 on that batch), pad targets 33.6 and 35.0, mlx-lm's mean 6.3232 (it reports "
    "6.3232). The models agree; the loss definitions differ, and mlx-lm's gradient also pushes towards padding "
    "after EOS.")


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, r in results.items():
        if r["steps"]:
            line, = ax.plot([s["step"] for s in r["steps"]], [s["loss"] for s in r["steps"]], "o-", label=f"{key}: train")
            if r["vals"]:
                ax.plot([v[0] for v in r["vals"]], [v[1] for v in r["vals"]], "s--", color=line.get_color(), alpha=0.6,
                        label=f"{key}: validation")
        elif r["vals"]:
            ax.plot([v[0] for v in r["vals"]], [v[1] for v in r["vals"]], "s", label=f"{key}: validation")
    ax.set_xlabel("step (validation: steps done before it)")
    ax.set_ylabel("loss (nats / target token)")
    ax.set_title("LoRA on Gemma 3 270M: ours vs mlx_lm.lora")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
