"""A stand-in for the Hugging Face hub's HTTP API on localhost, enough for huggingface_hub's own client
(``list_repo_files``, ``hf_hub_download``): the repo tree, HEAD and GET of ``/resolve/`` with byte ranges, a gated
or forbidden repo, and a download whose connection drops halfway. Point the client at it with :func:`serve`."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    def __init__(self, repo: str, files: dict[str, bytes], *, refuse: int | None = None, drop: str | None = None):
        """``refuse``: 401 (a gated repo, as the hub says it) or 403 for every request; ``drop``: a file whose
        first GET sends half its bytes and closes the connection."""
        self.repo, self.files, self.refuse, self.drop = repo, files, refuse, drop
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_HEAD(self):
            self._answer(send_body=False)

        def do_GET(self):
            self._answer(send_body=True)

        def _answer(self, send_body: bool):
            rng = self.headers.get("Range")
            hub.requests.append((self.command, self.path, rng))
            if hub.refuse == 401:
                return self._reply(401, b'{"error":"Access to model is restricted."}', send_body,
                                   {"X-Error-Code": "GatedRepo", "Content-Type": "application/json"})
            if hub.refuse:
                return self._reply(hub.refuse, b'{"error":"Forbidden"}', send_body)
            path = self.path.split("?")[0]
            if path.startswith(f"/api/models/{hub.repo}/tree/main"):
                tree = [{"type": "file", "oid": hashlib.sha1(d).hexdigest(), "size": len(d), "path": n}
                        for n, d in hub.files.items()]
                return self._reply(200, json.dumps(tree).encode(), send_body, {"Content-Type": "application/json"})
            m = re.fullmatch(rf"/{re.escape(hub.repo)}/resolve/main/(.+)", path)
            if not m or m.group(1) not in hub.files:
                return self._reply(404, b"{}", send_body, {"X-Error-Code": "EntryNotFound"})
            name, data = m.group(1), hub.files[m.group(1)]
            headers = {"X-Repo-Commit": "a" * 40, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                       "Accept-Ranges": "bytes"}
            start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1)) if rng else 0
            if send_body and hub.drop == name:
                hub.drop = None
                self.send_response(200)
                for k, v in {**headers, "Content-Length": str(len(data))}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            if start:
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            self._reply(206 if start else 200, data[start:], send_body, headers)

        def _reply(self, code: int, data: bytes, send_body: bool, headers: dict | None = None):
            self.send_response(code)
            for k, v in {**(headers or {}), "Content-Length": str(len(data))}.items():
                self.send_header(k, v)
            self.end_headers()
            if send_body:
                self.wfile.write(data)

    return Handler


def serve(monkeypatch, hub: FakeHub, cache) -> None:
    """Send huggingface_hub (online) to ``hub``, downloading into the hub cache folder ``cache``."""
    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "ENDPOINT", hub.url)
    monkeypatch.setattr(c, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(c, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)  # the tiny files arrive in several chunks
