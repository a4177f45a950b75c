"""The server against hostile and unlucky requests, over real HTTP (tiny fixtures): each is refused with its 4xx
(or a 503 when the server is full) before the work it would cost is done, and the server answers normally
afterwards. Image URLs: tests/test_server_urls.py. The same requests at scale: scripts/attack_server.py.
"""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from served import serve

from mlx_gemma_qat.fetch import SERVER_POLICY
from mlx_gemma_qat.generate import generate
from mlx_gemma_qat.server import prompts
from mlx_gemma_qat.server.app import ServerOptions
from mlx_gemma_qat.server.engine import Engine
from mlx_gemma_qat.server.reuse import device_memory

FIX = Path(__file__).parent / "fixtures"
HI = [{"role": "user", "content": "Hello there"}]
K1, K2 = {"Authorization": "Bearer k1"}, {"Authorization": "Bearer k2"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from mlx_gemma_qat import load
    from mlx_gemma_qat.convert import convert

    folder = convert(FIX / "tiny_gemma3", tmp_path_factory.mktemp("limits") / "tiny-gemma", mode="none", progress=False)
    return (folder, *load(folder))


@pytest.fixture(scope="module")
def srv(tiny):
    """Two API keys, no cross-client reuse, a 64 KiB body limit, one more host name and one web origin."""
    s = serve(*tiny, options=ServerOptions(api_keys=("k1", "k2"), max_body=64 * 1024, allowed_hosts=("models.example",),
                                           cors_origins=("http://localhost:3000",), cross_client_reuse=False))
    yield s
    s.close()


@pytest.fixture(scope="module")
def vsrv(vlm):
    """The vision fixture (context 256, 16 tokens an image) taking up to 12 images a request."""
    s = serve(*vlm, options=ServerOptions(max_images=12))
    yield s
    s.close()


def chat(s, body, headers=K1, path="/v1/chat/completions", **kw):
    return httpx.post(s.url + path, json=body, headers=headers, timeout=60, **kw)


def raw(port: int, head: str, body: bytes = b"", *, pause: float = 0.0) -> str:
    """The status line a raw HTTP request gets (the body sent after ``pause`` seconds, maybe not whole)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n")
        time.sleep(pause)
        if body:
            sock.sendall(body)
        return sock.makefile("rb").readline().decode().strip()


def ok(s, headers=K1) -> bool:
    r = chat(s, {"messages": HI, "max_tokens": 3}, headers)
    return r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == generate(s.model, s.tok, HI, 3)


# -- bodies -----------------------------------------------------------------------------------------------------


def test_a_body_over_the_limit_is_refused_before_it_is_read(srv):
    head = ("POST /v1/chat/completions HTTP/1.1\nHost: 127.0.0.1\nAuthorization: Bearer k1\n"
            "Content-Type: application/json\nContent-Length: 30000000\n")
    assert raw(srv.port, head).startswith("HTTP/1.1 413")  # on its Content-Length: not one byte was sent

    def chunks():  # no Content-Length: counted as it arrives
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(100):
            yield b"x" * 1024
        yield b'"}]}'

    for path, shape in (("/v1/chat/completions", dict), ("/api/chat", str)):
        r = httpx.post(srv.url + path, content=chunks(), headers={**K1, "Content-Type": "application/json"}, timeout=60)
        assert r.status_code == 413 and isinstance(r.json()["error"], shape), r.text
    assert ok(srv)


def test_a_body_that_does_not_arrive_in_time_is_408(srv, monkeypatch):
    monkeypatch.setattr(prompts, "BODY_SECONDS", 0.5)
    head = ("POST /api/chat HTTP/1.1\nHost: 127.0.0.1\nAuthorization: Bearer k1\nContent-Type: application/json\n"
            "Content-Length: 100\n")
    t = time.monotonic()
    assert raw(srv.port, head, b'{"messages": ', pause=0.1).startswith("HTTP/1.1 408")
    assert time.monotonic() - t < 10
    assert ok(srv)


def test_json_nested_deeply_is_a_400(srv):
    for path, body in (("/v1/chat/completions", b"[" * 50_000), ("/api/generate", b'{"prompt": ' + b"[" * 50_000),
                       ("/v1/completions", b'{"prompt": "a", "stop": ' + b'{"a": ' * 5_000 + b"1" + b"}" * 5_000 + b"}")):
        r = httpx.post(srv.url + path, content=body, headers={**K1, "Content-Type": "application/json"}, timeout=60)
        assert r.status_code == 400 and "nested too deeply" in r.text, r.text
    assert ok(srv)


def test_prompts_are_parsed_and_tokenized_off_the_event_loop(srv, monkeypatch):
    """While one request's prompt is being tokenized (held here), the server answers others."""
    inside, release, threads = threading.Event(), threading.Event(), []
    real = prompts.encode_prompt

    def held(*args, **kw):
        threads.append(threading.current_thread())
        inside.set()
        assert release.wait(30)
        return real(*args, **kw)

    monkeypatch.setattr(prompts, "encode_prompt", held)
    result = {}
    worker = threading.Thread(target=lambda: result.update(r=chat(srv, {"messages": HI, "max_tokens": 3})))
    worker.start()
    assert inside.wait(30)
    assert httpx.get(srv.url + "/v1/models", headers=K1, timeout=5).status_code == 200  # the loop is free
    release.set()
    worker.join(60)
    assert result["r"].status_code == 200 and threads and srv.thread not in threads


# -- stop strings, hosts, origins, content types, keys ------------------------------------------------------------


def test_stop_strings_are_capped(srv):
    for stop in (["a", "b", "c", "d", "e"], ["x" * 257]):
        r = chat(srv, {"messages": HI, "stop": stop})
        assert r.status_code == 400 and r.json()["error"]["param"] == "stop"
        r = chat(srv, {"prompt": "a", "options": {"stop": stop}}, path="/api/generate")
        assert r.status_code == 400 and "at most 4" in r.json()["error"]
    r = chat(srv, {"messages": HI, "max_tokens": 3, "stop": ["y" * 256, "z", "w", "v"]})
    assert r.status_code == 200


@pytest.mark.parametrize("host,status", [
    ("evil.example", 403), ("127.0.0.1.evil.example", 403), ("evil.example:{port}", 403), ("", 403),
    ("localhost:{port}", 200), ("127.0.0.1:{port}", 200), ("[::1]:{port}", 200), ("models.example:{port}", 200),
    ("MODELS.example.", 200),
])
def test_host_header_must_name_this_server(srv, host, status):
    """A DNS-rebinding page reaches 127.0.0.1 under its own name: refused. IP addresses, localhost and
    --allowed-hosts names are answered."""
    headers = {**K1, "Host": host.format(port=srv.port)}
    for r in (httpx.get(srv.url + "/v1/models", headers=headers),
              httpx.post(srv.url + "/api/generate", json={"prompt": "a", "stream": False, "options": {"num_predict": 2}},
                         headers=headers, timeout=60)):
        assert r.status_code == status, r.text
        if status == 403:
            assert "allowed-hosts" in r.text


def test_origins_only_those_allowed(srv, tiny):
    evil = {**K1, "Origin": "http://evil.example"}
    assert chat(srv, {"messages": HI, "max_tokens": 2}, evil).status_code == 403
    assert httpx.get(srv.url + "/v1/models", headers=evil).status_code == 403
    pre = httpx.options(srv.url + "/v1/chat/completions", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert pre.status_code == 403 and "access-control-allow-origin" not in pre.headers
    friend = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
              "Access-Control-Request-Headers": "authorization, content-type"}
    pre = httpx.options(srv.url + "/v1/chat/completions", headers=friend)
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://localhost:3000"
    r = chat(srv, {"messages": HI, "max_tokens": 2}, {**K1, "Origin": "http://localhost:3000"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
    plain = serve(*tiny)  # no --cors-origin: no page may call it
    try:
        r = chat(plain, {"messages": HI, "max_tokens": 2}, {"Origin": "http://localhost:3000"})
        assert r.status_code == 403 and "cors-origin" in r.text
        assert httpx.get(plain.url + "/v1/models").status_code == 200
    finally:
        plain.close()


def test_posts_must_be_json(srv):
    body = b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}'
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {**K1, **({"Content-Type": kind} if kind else {})}
        for path in ("/v1/chat/completions", "/api/chat"):
            r = httpx.post(srv.url + path, content=body, headers=headers, timeout=60)
            assert r.status_code == 415, (kind, path, r.text)
    r = httpx.post(srv.url + "/v1/chat/completions", content=body,
                   headers={**K1, "Content-Type": "Application/JSON; charset=utf-8"}, timeout=60)
    assert r.status_code == 200


def test_reuse_stays_within_one_api_key(srv, tiny):
    """--no-cross-client-reuse: another key's request starts fresh (cached_tokens 0), the same key's reuses."""
    body = {"prompt": "the sea and the ships on it", "max_tokens": 3}

    def cached(server, headers):
        r = chat(server, body, headers, path="/v1/completions")
        assert r.status_code == 200
        return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    cached(srv, K1)
    assert cached(srv, K2) == 0
    assert cached(srv, K1) > 0
    assert httpx.get(srv.url + "/v1/models", headers={"Authorization": "Bearer k3"}).status_code == 401
    shared = serve(*tiny)  # the default: reuse across clients
    try:
        cached(shared, K1)
        assert cached(shared, K2) > 0
    finally:
        shared.close()


# -- images -------------------------------------------------------------------------------------------------------


def _png(width: int, height: int) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _spy_images(engine, monkeypatch) -> list:
    seen, real = [], engine.load_image

    def load_image(data):
        seen.append(len(data))
        return real(data)

    monkeypatch.setattr(engine, "load_image", load_image)
    return seen


def test_images_counted_and_prompt_measured_before_any_is_read(vsrv, monkeypatch):
    seen = _spy_images(vsrv.engine, monkeypatch)
    junk = "%%% not base64 %%%"
    parts = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + junk}}]
    r = chat(vsrv, {"messages": [{"role": "user", "content": parts * 13}]})
    assert r.status_code == 400 and "at most 12" in r.json()["error"]["message"]
    r = chat(vsrv, {"messages": [{"role": "user", "content": "x", "images": [junk] * 13}]}, path="/api/chat")
    assert r.status_code == 400 and "at most 12" in r.json()["error"]
    # 12 images of 16 tokens, with their markers, do not fit a context of 256
    r = chat(vsrv, {"messages": [{"role": "user", "content": parts * 12}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = chat(vsrv, {"prompt": "x", "images": [junk] * 12}, path="/api/generate")
    assert r.status_code == 400 and "context" in r.json()["error"]
    assert seen == []  # not one image was read


def test_images_read_one_at_a_time_until_a_bad_one(vsrv, monkeypatch):
    seen = _spy_images(vsrv.engine, monkeypatch)
    good = base64.b64encode((FIX / "images" / "a.png").read_bytes()).decode()
    bad = base64.b64encode(b"GIF89a but not really").decode()
    r = chat(vsrv, {"prompt": "x", "images": [good, bad, good, good]}, path="/api/generate")
    assert r.status_code == 400 and "images[1]" in r.json()["error"] and "0x" not in r.text  # no Pillow internals
    assert len(seen) == 2  # the first, then the bad one: the rest never read


def test_decompression_bombs_are_refused_from_their_header(vsrv):
    bomb = _png(10_000, 6_000)  # 60 MP in 58 KB of PNG
    assert len(bomb) < 100_000
    t = time.monotonic()
    r = chat(vsrv, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + bomb}}]}]})
    assert r.status_code == 400 and "50,000,000" in r.json()["error"]["message"]
    r = chat(vsrv, {"prompt": "x", "images": [bomb]}, path="/api/generate")
    assert r.status_code == 400 and "50,000,000" in r.json()["error"]
    assert time.monotonic() - t < 10  # never decoded (a 60 MP decode and resize takes seconds here)


def test_image_urls_are_refused_by_default(vsrv):
    for url in ("http://127.0.0.1:9/a.png", "https://example.com/a.png"):
        r = chat(vsrv, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]})
        assert r.status_code == 400 and "--allow-image-urls" in r.json()["error"]["message"]


# -- a full server -------------------------------------------------------------------------------------------------


def test_a_full_queue_is_a_503_with_retry_after(tiny):
    busy = serve(*tiny, parallel=1, max_queue=1)
    try:
        streams = []
        with httpx.Client(timeout=60) as c:
            for _ in range(2):  # one runs, one waits
                s = c.stream("POST", busy.url + "/v1/completions", json={"prompt": "go on", "max_tokens": 200, "stream": True})
                streams.append(s)
                s.__enter__()
            deadline = time.monotonic() + 30
            while busy.engine.active_count() < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            r = c.post(busy.url + "/v1/chat/completions", json={"messages": HI})
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "server_busy"
            r = c.post(busy.url + "/api/generate", json={"prompt": "x", "stream": False})
            assert r.status_code == 503 and isinstance(r.json()["error"], str)
            for s in streams:
                s.__exit__(None, None, None)
        deadline = time.monotonic() + 30
        while busy.engine.active_count() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert busy.engine.active_count() == 0 and ok(busy, {})
    finally:
        busy.close()


def test_a_flood_gets_answers_or_503s_and_the_server_goes_on(tiny):
    flood = serve(*tiny, parallel=2, max_queue=4)
    try:
        n, go = 40, threading.Barrier(40)
        got = [None] * n

        def one(i):
            go.wait()
            got[i] = chat(flood, {"messages": HI, "max_tokens": 40}, {})

        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        codes = [r.status_code for r in got]
        assert set(codes) <= {200, 503} and codes.count(503) >= 20, codes
        assert all(r.headers["retry-after"] == "1" for r in got if r.status_code == 503)
        want = generate(flood.model, flood.tok, HI, 40)
        assert all(r.json()["choices"][0]["message"]["content"] == want for r in got if r.status_code == 200)
        assert ok(flood, {})
    finally:
        flood.close()


def test_kept_caches_are_bounded_by_default(tiny):
    _, model, tok = tiny
    assert Engine(model, tok).pool.max_bytes == device_memory() // 8 > 0


# -- the command --------------------------------------------------------------------------------------------------


def test_serve_command_keys(tiny, monkeypatch):
    from click.testing import CliRunner

    from mlx_gemma_qat import cli
    from mlx_gemma_qat.server import app as app_module

    ran = {}
    monkeypatch.setattr(app_module, "run", lambda app, host, port: ran.update(app=app))
    folder = str(tiny[0])
    res = CliRunner().invoke(cli.main, ["serve", "-m", folder, "--api-key", ""])
    assert res.exit_code == 1 and "API key is empty" in res.output and not ran
    res = CliRunner().invoke(cli.main, ["serve", "-m", folder], env={"MLX_GEMMA_API_KEY": "first second"})
    assert res.exit_code == 0, res.output
    assert ran["app"].state.server.options.api_keys == ("first", "second")
    res = CliRunner().invoke(cli.main, ["serve", "-m", folder, "--allow-private-urls"])
    assert res.exit_code == 2 and "--allow-image-urls" in res.output
    for flags, private in ((["--allow-image-urls"], False), (["--allow-image-urls", "--allow-private-urls"], True)):
        assert CliRunner().invoke(cli.main, ["serve", "-m", folder, *flags]).exit_code == 0
        policy = ran["app"].state.server.options.fetch_policy
        assert policy == replace(SERVER_POLICY, allow_private=private)
