"""Image URLs over real HTTP: refused unless the server was started with --allow-image-urls; then public
addresses only (a loopback URL is refused before any connection) unless --allow-private-urls; every failure
gives the client the same generic line, so the server cannot be used to map a network; the reason goes to the
server's log. (The fetcher itself: tests/test_fetch.py.)"""

from __future__ import annotations

import base64
import socket
import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from served import serve

from mlx_gemma_qat.fetch import SERVER_POLICY
from mlx_gemma_qat.server.app import ServerOptions

PNG = (Path(__file__).parent / "fixtures" / "images" / "a.png").read_bytes()


class _Images(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802
        self.server.hits.append(self.path)
        if self.path == "/a.png":
            self.send_response(200)
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            self.wfile.write(PNG)
        else:
            self.send_error(404)


@pytest.fixture(scope="module")
def images():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    server.hits = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ask(srv, url: str):
    return httpx.post(f"{srv.url}/v1/chat/completions", timeout=60, json={"max_tokens": 4, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what"}]}]})


def test_urls_are_off_by_default_and_nothing_is_fetched(vlm, images):
    srv = serve(*vlm)
    try:
        images.hits.clear()
        r = _ask(srv, f"http://127.0.0.1:{images.server_port}/a.png")
        assert r.status_code == 400 and "--allow-image-urls" in r.json()["error"]["message"]
        assert images.hits == []
    finally:
        srv.close()


def test_private_addresses_refused_and_failures_look_alike(vlm, images, caplog):
    srv = serve(*vlm, options=ServerOptions(fetch_policy=SERVER_POLICY))
    try:
        images.hits.clear()
        caplog.set_level("WARNING")
        port = images.server_port
        answers = [_ask(srv, url) for url in (f"http://127.0.0.1:{port}/a.png", f"http://localhost:{port}/a.png",
                                              "http://169.254.169.254/latest/meta-data", "http://10.0.0.1/a.png",
                                              f"http://[::1]:{port}/a.png")]
        assert images.hits == []  # refused before connecting
        assert {r.status_code for r in answers} == {400}
        messages = {r.json()["error"]["message"] for r in answers}
        assert messages == {"'messages[0].content[0].image_url.url': the image URL could not be fetched"}
        assert any("loopback" in rec.getMessage() for rec in caplog.records)  # the reason, in the log
    finally:
        srv.close()


def test_with_private_urls_allowed_an_image_is_fetched_and_read(vlm, images):
    srv = serve(*vlm, options=ServerOptions(fetch_policy=replace(SERVER_POLICY, allow_private=True)))
    try:
        port = images.server_port
        inline = _ask(srv, "data:image/png;base64," + base64.b64encode(PNG).decode())
        fetched = _ask(srv, f"http://127.0.0.1:{port}/a.png")
        assert fetched.status_code == 200 and images.hits[-1] == "/a.png"
        assert fetched.json()["choices"][0]["message"] == inline.json()["choices"][0]["message"]
        failures = [_ask(srv, url) for url in (f"http://127.0.0.1:{port}/missing.png",
                                               f"http://127.0.0.1:{_closed_port()}/a.png", "ftp://127.0.0.1/a.png")]
        assert [r.status_code for r in failures] == [400, 400, 400]
        # a 404 and a closed port read the same: no port scanner
        assert failures[0].json()["error"]["message"] == failures[1].json()["error"]["message"]
        assert "refused" not in failures[1].text and str(port) not in failures[0].text
    finally:
        srv.close()
