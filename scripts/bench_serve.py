"""HTTP serving benchmark: ``mlx-gemma serve`` against mlx-lm's own server, on the same MLX folder.

Each server runs alone, as a subprocess on a free port on 127.0.0.1 (never both at once: the CPU is shared).
Once it answers ``GET /v1/models`` and one warm-up request, N clients (``--clients``, default 1, 4, 8) start
together, each with ONE streaming ``POST /v1/chat/completions`` (its own short prompt, greedy:
``temperature 0``, ``max_tokens`` from ``--max-tokens``, ``stream_options.include_usage``). Per client:

* TTFT: from sending the request to the first chunk whose ``choices[0].delta.content`` is non-empty;
* completion tokens: from the usage chunk when the server sends one, else the number of content chunks;
* decode tokens/s: (tokens - 1) / (time of the last content chunk - time of the first).

Per (server, clients): mean and max TTFT, mean per-client decode tokens/s, and aggregate throughput = all
completion tokens / wall time of the level (first request sent to last stream closed). Then the ratios
ours / mlx-lm at each level. These are single runs on whatever CPU (or GPU) this is: the ratios matter, the
absolute times do not. Nothing here asserts a time; a server that fails to start, or a request that fails,
is written into the table.

The peer is ``python -m mlx_lm server --model FOLDER --host 127.0.0.1 --port PORT --temp 0.0`` (no draft
model, so its requests are batchable: mlx-lm decodes concurrent requests together in one BatchGenerator),
run with HF_HUB_OFFLINE=1 and an empty HF_HUB_CACHE of its own (its /v1/models scans that cache).

    .venv/bin/python scripts/bench_serve.py
    .venv/bin/python scripts/bench_serve.py --only peer --clients 1,2 --max-tokens 8 --out /tmp/peer.md
    .venv/bin/python scripts/bench_serve.py --model ~/models/gemma-3-1b-mlx --ours-args "--kv-bits 8"

Default model: the project's embedded Gemma 3 270M, converted once into the MLX model cache
(``mlx_gemma_qat.models_cache.resolve_model(None)``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIDES = ("ours", "peer")
LABEL = {"ours": "mlx-gemma serve", "peer": "mlx_lm server"}

TOPICS = [
    "why the sky is blue", "how a bicycle stays upright", "what a prime number is", "how bread rises",
    "why leaves change colour", "how a compass works", "what causes tides", "how bees make honey",
    "why ice floats", "how a rainbow forms", "what a black hole is", "how vaccines work",
    "why cats purr", "how a lighthouse works", "what makes thunder", "how glass is made",
]


def prompt_for(level: int, client: int) -> str:
    """A distinct short prompt per (level, client): no request can reuse another's cached prompt whole."""
    topic = TOPICS[client % len(TOPICS)]
    return f"In two sentences, explain {topic}. (request {level}.{client})"


# ---------------------------------------------------------------------------------------------- servers

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ships_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    try:
        return bool(json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, ValueError):
        return False


def server_command(side: str, folder: Path, port: int, extra: str) -> list[str]:
    if side == "ours":
        cmd = [sys.executable, "-m", "mlx_gemma_qat.cli", "serve", "-m", str(folder),
               "--host", "127.0.0.1", "--port", str(port)]
    else:
        cmd = [sys.executable, "-m", "mlx_lm", "server", "--model", str(folder),
               "--host", "127.0.0.1", "--port", str(port), "--temp", "0.0"]
        if not ships_chat_template(folder) and "--chat-template" not in extra:
            # A folder converted from a base model's GGUF has no template: the project then formats chats with
            # the official Gemma 3 one, while mlx-lm would fall back to a plain "USER: ... ASSISTANT:" prompt.
            # Give mlx-lm the same template, so both servers see the same prompt tokens.
            from mlx_gemma_qat.convert.tokenizer import GEMMA3_CHAT_TEMPLATE

            cmd += ["--chat-template", GEMMA3_CHAT_TEMPLATE]
    return cmd + shlex.split(extra)


def show_command(cmd: list[str]) -> str:
    """The command line, with a long --chat-template value abbreviated."""
    shown = list(cmd)
    for i, a in enumerate(shown[:-1]):
        if a == "--chat-template" and len(shown[i + 1]) > 60:
            shown[i + 1] = "<the Gemma 3 chat template>"
    return shlex.join(shown)


class ServerFailed(RuntimeError):
    """``summary``: one line for the table (with the last line the server printed); the message: its tail."""

    def __init__(self, summary: str, tail: str):
        last = next((ln.strip() for ln in reversed(tail.splitlines()) if ln.strip()), "")
        self.summary = f"{summary}: {last}" if last else summary
        super().__init__(f"{summary}; its output ends with:\n{tail}")


class Server:
    """One server subprocess, its output in a temporary log file; always stopped by ``stop``."""

    def __init__(self, side: str, cmd: list[str]):
        self.side, self.cmd = side, cmd
        self.log = tempfile.NamedTemporaryFile(prefix=f"bench_serve_{side}_", suffix=".log", delete=False)
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        self.hub = None
        if side == "peer":
            # mlx-lm's GET /v1/models scans the Hugging Face hub cache and dies mid-answer (after sending 200)
            # when that folder does not exist; it serves a local folder, so give it an empty cache of its own.
            self.hub = tempfile.TemporaryDirectory(prefix="bench_serve_hub_")
            env["HF_HUB_CACHE"] = self.hub.name
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     cwd=ROOT, env=env, start_new_session=True)

    def tail(self, n: int = 25) -> str:
        try:
            lines = Path(self.log.name).read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def wait_ready(self, base: str, timeout: float) -> list[dict]:
        """Poll GET /v1/models until 200; return its model list. Raise ServerFailed if the process dies."""
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            rc = self.proc.poll()
            if rc is not None:
                raise ServerFailed(f"exited with code {rc} before it was ready", self.tail())
            try:
                r = httpx.get(f"{base}/v1/models", timeout=5)
            except httpx.HTTPError as e:
                last = type(e).__name__
            else:
                if r.status_code == 200:
                    try:
                        return r.json().get("data", []) or []
                    except (ValueError, AttributeError):
                        print(f"[{self.side}] GET /v1/models answered 200 with no JSON list; using the folder "
                              "path as the model id", file=sys.stderr, flush=True)
                        return []
                last = f"HTTP {r.status_code}"
            time.sleep(0.5)
        raise ServerFailed(f"not ready after {timeout:.0f} s (last: {last})", self.tail())

    def stop(self):
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                try:
                    os.killpg(self.proc.pid, sig)  # its own session: the server and anything it started
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self.log.close()
        try:
            os.unlink(self.log.name)
        except OSError:
            pass
        if self.hub is not None:
            self.hub.cleanup()


def pick_model_id(models: list[dict], folder: Path) -> str:
    """The /v1/models entry that is our folder (mlx-lm also lists hub-cache models), else the first one."""
    ids = [m.get("id") for m in models if isinstance(m, dict) and m.get("id")]
    for i in ids:
        try:
            if Path(i).expanduser().resolve() == folder:
                return i
        except (OSError, ValueError):
            pass
    return ids[0] if ids else str(folder)


# ---------------------------------------------------------------------------------------------- clients

@dataclass
class Result:
    ttft: float | None = None
    tokens: int = 0
    tok_s: float | None = None
    t_sent: float = 0.0
    t_end: float = 0.0
    text: str = ""
    finish: str | None = None
    error: str | None = None
    chunk_times: list[float] = field(default_factory=list, repr=False)


def stream_chat(base: str, model_id: str, prompt: str, max_tokens: int, timeout: float,
                start: threading.Barrier | None = None) -> Result:
    body = {"model": model_id, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    res = Result()
    usage_tokens = None
    parts = []
    try:
        with httpx.Client(timeout=httpx.Timeout(timeout, connect=30)) as client:
            if start is not None:
                start.wait()
            res.t_sent = time.perf_counter()
            with client.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    r.read()
                    raise RuntimeError(f"HTTP {r.status_code}: {r.text.strip()[:200]}")
                for line in r.iter_lines():
                    line = line.strip()
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    now = time.perf_counter()
                    obj = json.loads(data)
                    if obj.get("error"):
                        raise RuntimeError(f"error in stream: {str(obj['error'])[:200]}")
                    if obj.get("usage") and obj["usage"].get("completion_tokens") is not None:
                        usage_tokens = int(obj["usage"]["completion_tokens"])
                    choices = obj.get("choices") or []
                    if not choices:
                        continue
                    content = (choices[0].get("delta") or {}).get("content")
                    if content:
                        res.chunk_times.append(now)
                        parts.append(content)
                    if choices[0].get("finish_reason"):
                        res.finish = choices[0]["finish_reason"]
    except Exception as e:  # noqa: BLE001 - any failure is a result to report, not a crash
        res.error = f"{type(e).__name__}: {e}".splitlines()[0][:200]
    res.t_end = time.perf_counter()
    res.text = "".join(parts)
    res.tokens = usage_tokens if usage_tokens is not None else len(res.chunk_times)
    if res.chunk_times:
        res.ttft = res.chunk_times[0] - res.t_sent
        span = res.chunk_times[-1] - res.chunk_times[0]
        if res.tokens >= 2 and span > 0:
            res.tok_s = (res.tokens - 1) / span
    elif res.error is None:
        res.error = "no content in the stream"
    return res


def run_level(base: str, model_id: str, n: int, max_tokens: int, timeout: float) -> tuple[list[Result], float]:
    """N clients released together by a barrier; returns their results and the level's wall time."""
    results: list[Result | None] = [None] * n
    barrier = threading.Barrier(n)

    def work(i):
        results[i] = stream_chat(base, model_id, prompt_for(n, i), max_tokens, timeout, barrier)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done = [r if r is not None else Result(error="client thread died") for r in results]
    sent = [r.t_sent for r in done if r.t_sent]
    wall = max(r.t_end for r in done) - min(sent) if sent else 0.0
    return done, wall


@dataclass
class Level:
    clients: int
    results: list[Result]
    wall: float

    @property
    def ok(self) -> list[Result]:
        return [r for r in self.results if r.error is None]

    @property
    def errors(self) -> list[str]:
        return [r.error for r in self.results if r.error is not None]

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.ok)

    @property
    def mean_ttft(self):
        v = [r.ttft for r in self.ok if r.ttft is not None]
        return statistics.fmean(v) if v else None

    @property
    def max_ttft(self):
        v = [r.ttft for r in self.ok if r.ttft is not None]
        return max(v) if v else None

    @property
    def mean_tok_s(self):
        v = [r.tok_s for r in self.ok if r.tok_s is not None]
        return statistics.fmean(v) if v else None

    @property
    def aggregate(self):
        return self.tokens / self.wall if self.ok and self.wall > 0 else None


@dataclass
class SideRun:
    side: str
    cmd: list[str]
    model_id: str | None = None
    startup_s: float | None = None
    warmup: Result | None = None
    levels: dict[int, Level] = field(default_factory=dict)
    error: str | None = None


def bench_side(side: str, folder: Path, clients: list[int], max_tokens: int, extra: str, ready_timeout: float,
               request_timeout: float) -> SideRun:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    run = SideRun(side, server_command(side, folder, port, extra))
    print(f"[{side}] {show_command(run.cmd)}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    server = None
    try:
        server = Server(side, run.cmd)
        models = server.wait_ready(base, ready_timeout)
        run.model_id = pick_model_id(models, folder)
        run.warmup = stream_chat(base, run.model_id, "Say hello.", max_tokens, request_timeout)
        run.startup_s = time.perf_counter() - t0
        if run.warmup.error:
            print(f"[{side}] warm-up request failed: {run.warmup.error}", file=sys.stderr, flush=True)
        else:
            print(f"[{side}] ready, model id {run.model_id!r}, warm-up done {run.startup_s:.1f} s after start",
                  file=sys.stderr, flush=True)
        for n in clients:
            if server.proc.poll() is not None:
                run.error = f"server exited with code {server.proc.returncode} before {n} clients"
                print(f"[{side}] {run.error}:\n{server.tail()}", file=sys.stderr, flush=True)
                break
            results, wall = run_level(base, run.model_id, n, max_tokens, request_timeout)
            level = run.levels[n] = Level(n, results, wall)
            print(f"[{side}] {n} clients: {level.tokens} tokens in {wall:.1f} s, "
                  f"mean TTFT {fmt(level.mean_ttft, 2)} s, aggregate {fmt(level.aggregate, 2)} tok/s"
                  + (f", {len(level.errors)} failed: {level.errors[0]}" if level.errors else ""),
                  file=sys.stderr, flush=True)
    except ServerFailed as e:
        run.error = e.summary
        print(f"[{side}] server failed: {e}", file=sys.stderr, flush=True)
    finally:
        if server is not None:
            server.stop()
    return run


# ---------------------------------------------------------------------------------------------- report

def fmt(v, digits=2):
    return "n/a" if v is None else f"{v:.{digits}f}"


def ratio(a, b, digits=2):
    return "n/a" if a is None or b is None or b == 0 else f"{a / b:.{digits}f}"


def cell(text: str) -> str:
    return text.replace("|", "/").replace("\n", " ")


def report(runs: dict[str, SideRun], folder: Path, clients: list[int], max_tokens: int, argv: list[str]) -> str:
    import mlx.core as mx
    import mlx_lm

    lines = ["# HTTP serving: mlx-gemma serve vs mlx_lm server", ""]
    if set(runs) != set(SIDES):
        lines += [f"**Partial run: only {', '.join(LABEL[s] for s in runs)} was measured; no ratios.**", ""]
    for side, run in runs.items():
        if not run.levels:
            lines += [f"**{LABEL[side]} was not measured ({run.error or 'no level ran'}); no ratios.**", ""]
    lines += [
        f"- machine: {platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs; "
        f"MLX device {mx.default_device()}; mlx {mx.__version__}, mlx-lm {mlx_lm.__version__}",
        f"- model folder: `{folder}`",
        f"- workload: N clients started together, each one streaming chat completion of a distinct short prompt, "
        f"max_tokens {max_tokens}, temperature 0; clients {', '.join(map(str, clients))}; one warm-up request "
        f"per server first",
        "- each server ran alone (one subprocess at a time on 127.0.0.1). Figures are single runs on a shared "
        "machine (here a 2-core CPU, slow): the ratios matter, the absolute times do not.",
        "- TTFT: request sent to first non-empty content delta. Per-client tok/s: (tokens - 1) / (last content "
        "chunk - first). Aggregate: all completion tokens / wall time of the level.",
        f"- command: `python scripts/bench_serve.py {shlex.join(argv)}`",
    ]
    for side, run in runs.items():
        lines.append(f"- {LABEL[side]}: `{show_command(run.cmd)}`"
                     + (f", start + warm-up {run.startup_s:.1f} s" if run.startup_s is not None else ""))
    lines += ["", "| server | clients | mean TTFT (s) | max TTFT (s) | per-client tok/s | aggregate tok/s | "
                  "tokens | wall (s) | errors |",
              "|---|---|---|---|---|---|---|---|---|"]
    for side, run in runs.items():
        if not run.levels:
            lines.append(f"| {LABEL[side]} | - | n/a | n/a | n/a | n/a | 0 | n/a | "
                         f"{cell(run.error or 'not run')} |")
            continue
        for n in clients:
            lv = run.levels.get(n)
            if lv is None:
                lines.append(f"| {LABEL[side]} | {n} | n/a | n/a | n/a | n/a | 0 | n/a | "
                             f"{cell(run.error or 'not run')} |")
                continue
            errs = f"{len(lv.errors)}/{n}: {cell(lv.errors[0])}" if lv.errors else "0"
            lines.append(f"| {LABEL[side]} | {n} | {fmt(lv.mean_ttft)} | {fmt(lv.max_ttft)} | {fmt(lv.mean_tok_s)} | "
                         f"{fmt(lv.aggregate)} | {lv.tokens} | {fmt(lv.wall, 1)} | {errs} |")
    if set(runs) == set(SIDES) and all(run.levels for run in runs.values()):
        ours, peer = runs["ours"], runs["peer"]
        lines += ["", "## ours / mlx-lm", "",
                  "Aggregate and per-client tok/s: above 1 is faster. TTFT: below 1 is faster. Same text: greedy "
                  "completions identical to the peer's for the same prompt (float and batching differences can "
                  "make them part ways).", "",
                  "| clients | aggregate tok/s | mean TTFT | per-client tok/s | same text |", "|---|---|---|---|---|"]
        for n in clients:
            a, b = ours.levels.get(n), peer.levels.get(n)
            if a is None or b is None:
                lines.append(f"| {n} | n/a | n/a | n/a | n/a |")
                continue
            same = sum(1 for x, y in zip(a.results, b.results) if x.error is None and y.error is None
                       and x.text == y.text)
            lines.append(f"| {n} | {ratio(a.aggregate, b.aggregate)} | {ratio(a.mean_ttft, b.mean_ttft)} | "
                         f"{ratio(a.mean_tok_s, b.mean_tok_s)} | {same}/{n} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- main

def parse_clients(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None
    if not levels or any(n < 1 for n in levels):
        raise argparse.ArgumentTypeError("client counts must be positive integers")
    return levels


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(
        description="Benchmark `mlx-gemma serve` against mlx-lm's server (streaming chat completions at several "
                    "client counts, each server alone); prints a markdown table and writes it to --out.")
    ap.add_argument("--model", default=None, metavar="PATH",
                    help="MLX model folder (default: the embedded Gemma 3 270M, converted once into the cache)")
    ap.add_argument("--clients", type=parse_clients, default=[1, 4, 8], metavar="N,N,...",
                    help="concurrency levels, run in this order (default: 1,4,8)")
    ap.add_argument("--max-tokens", type=int, default=32, help="max_tokens of every request (default: 32)")
    ap.add_argument("--only", choices=SIDES, default=None, help="run just one server (no ratios)")
    ap.add_argument("--ours-args", default="", metavar="ARGS",
                    help="extra arguments for `mlx-gemma serve`, one shell-quoted string")
    ap.add_argument("--peer-args", default="", metavar="ARGS",
                    help="extra arguments for `mlx_lm server`, one shell-quoted string")
    ap.add_argument("--ready-timeout", type=float, default=300.0,
                    help="seconds to wait for GET /v1/models to answer 200 (default: 300)")
    ap.add_argument("--request-timeout", type=float, default=1800.0,
                    help="read timeout of one streaming request, seconds (default: 1800)")
    ap.add_argument("--out", type=Path, default=ROOT / "scripts" / "bench_serve_results.md",
                    help="markdown results file (default: scripts/bench_serve_results.md)")
    args = ap.parse_args(argv)
    if args.max_tokens < 1:
        ap.error("--max-tokens must be at least 1")

    from mlx_gemma_qat.models_cache import resolve_model

    folder = Path(resolve_model(args.model)).expanduser().resolve()
    sides = [args.only] if args.only else list(SIDES)

    # SIGTERM ends the run like Ctrl-C does, so the `finally` that stops a server subprocess runs.
    def on_sigterm(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    runs: dict[str, SideRun] = {}
    for side in sides:
        extra = args.ours_args if side == "ours" else args.peer_args
        runs[side] = bench_side(side, folder, args.clients, args.max_tokens, extra, args.ready_timeout,
                                args.request_timeout)
    text = report(runs, folder, args.clients, args.max_tokens, argv)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; server stopped", file=sys.stderr)
        sys.exit(130)
