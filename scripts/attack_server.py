"""Hostile requests against a real `mlx-gemma serve` (the tiny vision checkpoint by default), then a flood.

Starts the server as a subprocess with its default limits, records its resident memory (`ps`, every 50 ms)
throughout, and sends what an attacker or a buggy client would: huge bodies (declared and chunked), many
images, a megabyte of tiny images, deeply nested JSON, a foreign Host header (DNS rebinding), a cross-site
page's Origin, a form POST, 50 stop strings of 5,000 characters, a decompression bomb, an image URL to the
cloud-metadata address, a prompt past the context; then FLOOD concurrent chat requests. Each hostile request
must get its 4xx within FAST seconds; flooded requests get an answer or a 503 with Retry-After (the median
refusal within FAST seconds); the server's
memory must stay within BOUND_MB of what it held after a normal request; and a normal request afterwards must
get the same answer as before the attack. Prints a markdown table (README: "Serving safely").

    python scripts/attack_server.py [--model FOLDER] [--flood 200] [--bound-mb 128] [--shard tensor|pipeline]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
FAST = 2.0  # seconds a refusal may take
HI = [{"role": "user", "content": "Describe the sea."}]


def _png(width: int, height: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, "PNG")
    return buf.getvalue()


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MiB (`ps` reports KiB on Linux and macOS alike)."""
    out = subprocess.run(["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
    return int(out) / 1024 if out else 0.0


class Memory(threading.Thread):
    """Samples the RSS of processes (summed) every 50 ms; ``peak`` since the last ``reset``."""

    def __init__(self, pids: list[int]):
        super().__init__(daemon=True)
        self.pids, self.peak, self.running = pids, 0.0, True
        self.start()

    def now(self) -> float:
        return sum(rss_mb(pid) for pid in self.pids)

    def run(self):
        while self.running:
            self.peak = max(self.peak, self.now())
            time.sleep(0.05)

    def reset(self) -> float:
        self.peak = now = self.now()
        return now


def server_pids(proc: subprocess.Popen, shard: str | None) -> list[int]:
    """The serving processes: the server itself, or under mlx.launch every process below the launcher (its ranks,
    and the shells it starts them through)."""
    if shard is None:
        return [proc.pid]
    found, todo = [], [proc.pid]
    while todo:
        out = subprocess.run(["pgrep", "-P", str(todo.pop())], capture_output=True, text=True).stdout.split()
        found += [int(p) for p in out]
        todo += [int(p) for p in out]
    return found


def raw_status(port: int, head: str, body_chunks=(), timeout: float = 30.0) -> str:
    """Send a request by hand (headers, then chunks until the server answers) and return its status line."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n")
        for chunk in body_chunks:
            if select.select([sock], [], [], 0)[0]:
                break  # answered before the body ended
            try:
                sock.sendall(chunk)
            except OSError:
                break  # the server closed the connection: its answer is waiting
        line = sock.makefile("rb").readline().decode().strip()
        return line.split(" ", 2)[1] if line else "no answer"


def attacks(url: str, port: int, context: int) -> list[tuple[str, int, object]]:
    """(name, expected status, how to send it) for each hostile request (``context``: the model's, in tokens)."""
    json_head = "Host: 127.0.0.1\nContent-Type: application/json\n"
    tiny = _data_url(_png(1, 1))
    many = [{"type": "image_url", "image_url": {"url": tiny}}] * 40
    n_small = 1_000_000 // len(tiny)
    megabyte = [{"type": "image_url", "image_url": {"url": tiny}}] * n_small
    bomb = _data_url(_png(10_000, 6_000))

    def post(body, headers=None, path="/v1/chat/completions"):
        return lambda: httpx.post(url + path, json=body, headers=headers, timeout=60).status_code

    def chunked_30mb():
        head = f"POST /v1/chat/completions HTTP/1.1\n{json_head}Transfer-Encoding: chunked\n"
        chunk = b"100000\r\n" + b"x" * 0x100000 + b"\r\n"
        return int(raw_status(port, head, [chunk] * 30))

    return [
        ("30 MB body (Content-Length)", 413, lambda: int(raw_status(
            port, f"POST /v1/chat/completions HTTP/1.1\n{json_head}Content-Length: 31457280\n"))),
        ("30 MB body (chunked, no length)", 413, chunked_30mb),
        ("40 images in one request", 400, post({"messages": [{"role": "user", "content": many}]})),
        (f"1 MB of tiny base64 PNGs ({n_small:,} images)", 400, post({"messages": [{"role": "user", "content": megabyte}]})),
        ("JSON nested 100,000 deep", 400, lambda: httpx.post(
            url + "/api/chat", content=b"[" * 100_000, headers={"Content-Type": "application/json"}, timeout=60).status_code),
        ("foreign Host header (DNS rebinding)", 403, post({"messages": HI}, {"Host": "attacker.example"})),
        ("cross-site page (Origin)", 403, post({"messages": HI}, {"Origin": "https://attacker.example"})),
        ("form POST (text/plain)", 415, lambda: httpx.post(
            url + "/api/generate", content=b'{"prompt": "x"}', headers={"Content-Type": "text/plain"}, timeout=60).status_code),
        ("50 stop strings of 5,000 characters", 400, post({"messages": HI, "stop": ["x" * 5000] * 50})),
        ("decompression bomb (60 MP PNG, 58 KB)", 400, post({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": bomb}}]}]})),
        ("image URL to the cloud-metadata address", 400, post({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest/meta-data/"}}]}]})),
        ("prompt past the context", 400, post({"prompt": "word " * (context + 16)}, path="/v1/completions")),
    ]


def flood(url: str, n: int) -> dict:
    """``n`` chat requests at once: their statuses and how long the refusals took."""
    go = threading.Barrier(n)
    out = [None] * n
    client = httpx.Client(limits=httpx.Limits(max_connections=n, max_keepalive_connections=n), timeout=300)

    def one(i):
        go.wait()
        t = time.perf_counter()
        try:
            r = client.post(url + "/v1/chat/completions", json={"messages": HI, "max_tokens": 16})
            out[i] = (r.status_code, time.perf_counter() - t, r.headers.get("retry-after"))
        except httpx.HTTPError as e:
            out[i] = (type(e).__name__, time.perf_counter() - t, None)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    client.close()
    refused = sorted(s[1] for s in out if s[0] == 503)
    return {"answered": sum(s[0] == 200 for s in out), "busy": len(refused),
            "other": [s[0] for s in out if s[0] not in (200, 503)],
            "busy_median_s": refused[len(refused) // 2] if refused else 0.0,
            "busy_max_s": refused[-1] if refused else 0.0,
            "busy_with_retry_after": sum(s[2] is not None for s in out if s[0] == 503)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model to serve (default: the tiny vision fixture, converted to a temp folder)")
    ap.add_argument("--flood", type=int, default=200, help="concurrent requests in the flood")
    ap.add_argument("--bound-mb", type=float, default=128.0, help="most the server's RSS may grow over its baseline")
    ap.add_argument("--shard", choices=["tensor", "pipeline"],
                    help="serve split over 2 local ranks (mlx.launch -n 2 --backend ring); RSS summed over the ranks")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="attack-"))
    model = args.model
    if model is None:
        sys.path.insert(0, str(ROOT))
        from mlx_gemma_qat.convert import convert

        model = str(convert(ROOT / "tests/fixtures/tiny_gemma3_vlm", work / "tiny-vlm", mode="none", progress=False))
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(work / "server.log", "w")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "mlx_gemma_qat.cli", "serve", "-m", model, "--port", str(port)]
    if args.shard:
        sys.path.insert(0, str(ROOT / "tests"))
        from launcher import ring_port  # the tests' helper: consecutive free ports for the ring's ranks

        cmd = [str(Path(sys.executable).parent / "mlx.launch"), "-n", "2", "--backend", "ring", "--starting-port",
               str(ring_port(2)), "--", *cmd, "--shard", args.shard]
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                print((work / "server.log").read_text())
                raise SystemExit("the server did not start")
            time.sleep(0.2)
        mem = Memory(server_pids(server, args.shard))
        normal = {"messages": HI, "max_tokens": 12}
        before = httpx.post(url + "/v1/chat/completions", json=normal, timeout=120).json()["choices"][0]["message"]
        base = mem.reset()
        rows, ok = [], True
        context = httpx.post(url + "/api/show", json={}, timeout=60).json()["model_info"]["gemma3.context_length"]
        for name, want, send in attacks(url, port, context):
            t = time.perf_counter()
            try:
                got = send()
            except httpx.HTTPError as e:
                got = type(e).__name__
            dt = time.perf_counter() - t
            good = got == want and dt < FAST
            ok &= good
            rows.append(f"| {name} | {want} | {got} | {dt:.2f} s | {'ok' if good else 'FAIL'} |")
        hostile_peak = mem.peak
        mem.reset()
        f = flood(url, args.flood)
        flood_peak = mem.peak
        after = httpx.post(url + "/v1/chat/completions", json=normal, timeout=120).json()["choices"][0]["message"]
        peak = max(hostile_peak, flood_peak)
        same = after == before
        flood_ok = not f["other"] and f["busy"] == f["busy_with_retry_after"] and f["busy_median_s"] < FAST
        mem_ok = peak - base <= args.bound_mb
        ok &= same and flood_ok and mem_ok
        split = f", split over 2 local ranks ({args.shard} parallel; RSS of both)" if args.shard else ""
        print(f"server: {model} (default limits){split}, {sys.platform}\n")
        print("| hostile request | expected | got | time | |\n|---|---|---|---|---|")
        print("\n".join(rows))
        print(f"\nflood of {args.flood} concurrent chat requests (16 tokens each): {f['answered']} answered, "
              f"{f['busy']} refused 503 (all with Retry-After: {f['busy'] == f['busy_with_retry_after']}; refusals "
              f"took {f['busy_median_s']:.2f} s median, {f['busy_max_s']:.2f} s at most, measured from the client "
              f"thread's start among {args.flood}), other: {f['other'] or 'none'}")
        print(f"server RSS: {base:.0f} MiB after a normal request; peak {hostile_peak:.0f} MiB during the hostile "
              f"requests, {flood_peak:.0f} MiB during the flood: +{peak - base:.0f} MiB (bound +{args.bound_mb:.0f} MiB)")
        print(f"a normal request afterwards: {'the same answer' if same else 'A DIFFERENT ANSWER'} "
              f"({json.dumps(after['content'])[:60]})")
        print("\nall passed" if ok else "\nFAILED")
        return 0 if ok else 1
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server, or the launcher and its ranks
        server.wait(30)
        log.close()


if __name__ == "__main__":
    sys.exit(main())
