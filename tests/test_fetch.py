"""fetch(url, policy): schemes, credentials, address checks before any connection, DNS rebinding, redirects
re-checked, one deadline (DNS, headers, body), the byte cap, a generic error, TLS; and open_image's URLs.

Everything runs against servers on 127.0.0.1. Two seams stand in for the network: ``socket.getaddrinfo``
(made-up names answer chosen addresses; real names pass through) and ``fetch._connect`` (records the address
each connection goes to, and can send one made up "public" address to the local server instead)."""

from __future__ import annotations

import io
import socket
import ssl
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest

import mlx_gemma_qat.fetch as fetch_mod
from mlx_gemma_qat.fetch import CLI_POLICY, SERVER_POLICY, FetchError, FetchPolicy, fetch, refusal_reason
from mlx_gemma_qat.image import ImageError, open_image

LOCAL = FetchPolicy(allow_private=True, deadline_s=2.0, max_bytes=100_000, max_redirects=3)
STRICT = replace(LOCAL, allow_private=False)
PUBLIC = "8.8.8.8"  # what the made-up names resolve to; _connect sends it to the local server


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (5, 3), (200, 30, 10)).save(buf, format="PNG")
    return buf.getvalue()


PNG = _png()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 0.5  # a client that sends no request line (a TLS hello) is dropped soon

    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802
        self.server.requests.append(SimpleNamespace(path=self.path, headers=self.headers))
        p = self.path
        port = self.server.server_address[1]
        if p == "/img.png":
            return self._send(PNG, "image/png")
        if p.startswith("/chain/"):  # /chain/N: N redirects to the image, through each code and Location form
            n = int(p.rsplit("/", 1)[1])
            if n == 0:
                return self._send(PNG, "image/png")
            loc = [f"/chain/{n - 1}", f"{n - 1}", f"http://{self.headers['Host']}/chain/{n - 1}"][n % 3]
            return self._redirect([301, 302, 303, 307, 308][n % 5], loc)
        if p.startswith("/loop/"):
            return self._redirect(302, f"/loop/{int(p.rsplit('/', 1)[1]) + 1}")
        if p == "/to-file":
            return self._redirect(302, "file:///etc/passwd")
        if p == "/to-ftp":
            return self._redirect(301, f"ftp://127.0.0.1:{port}/img.png")
        if p.startswith("/to-invalid/"):
            return self._redirect(302, {"ipv6": "http://[::1/x", "port": "http://h:99999/", "host": "https:///x"}[p[12:]])
        if p == "/to-loopback":
            return self._redirect(302, f"http://127.0.0.1:{port}/img.png")
        if p == "/to-localhost":
            return self._redirect(307, f"http://localhost:{port}/img.png")
        if p == "/drip":  # a body one byte every 0.2 s
            return self._drip(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", b"x" * 1000)
        if p == "/drip-headers":  # headers one byte every 0.2 s
            return self._drip(b"HTTP/1.1 200 OK\r\nX-Slow: ", b"y" * 1000)
        if p == "/stall":  # headers, then nothing
            self._head(200, {"Content-Length": "10"})
            time.sleep(3)
            return
        if p == "/huge":
            self._head(200, {"Content-Length": str(10**9)})
            return self._flood(lambda b: b)
        if p == "/huge-nolen":
            self._head(200, {"Connection": "close"})
            return self._flood(lambda b: b)
        if p == "/huge-chunked":
            self._head(200, {"Transfer-Encoding": "chunked"})
            return self._flood(lambda b: b"%x\r\n%s\r\n" % (len(b), b))
        if p.startswith("/exact/"):
            return self._send(b"z" * int(p.rsplit("/", 1)[1]), "application/octet-stream")
        if p.startswith("/exact-chunked/"):
            n = int(p.rsplit("/", 1)[1])
            self._head(200, {"Transfer-Encoding": "chunked"})
            for i in range(0, n, 7000):
                part = b"z" * min(7000, n - i)
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
            return
        self.send_error(404)

    def _head(self, status, headers):
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()

    def _send(self, body, ctype):
        self._head(200, {"Content-Type": ctype, "Content-Length": str(len(body))})
        self.wfile.write(body)

    def _redirect(self, code, location):
        self._head(code, {"Location": location, "Content-Length": "0"})

    def _drip(self, head, tail):
        self.close_connection = True
        try:
            self.wfile.write(head)
            for i in range(len(tail)):
                self.wfile.write(tail[i:i + 1])
                self.wfile.flush()
                time.sleep(0.2)
        except OSError:
            pass

    def _flood(self, frame):  # 64 KB blocks until the client hangs up (or 5 s)
        self.close_connection = True
        block, end = b"\0" * 65536, time.monotonic() + 5
        try:
            while time.monotonic() < end:
                self.wfile.write(frame(block))
        except OSError:
            pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, tls: ssl.SSLContext | None = None):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.connections, self.requests = 0, []
        if tls is not None:
            self.socket = tls.wrap_socket(self.socket, server_side=True)

    def process_request(self, request, client_address):
        self.connections += 1  # every accepted connection, whether or not a request follows
        super().process_request(request, client_address)

    @property
    def port(self) -> int:
        return self.server_address[1]


def _run(srv: _Server):
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    t.start()
    return srv


def _stop(srv: _Server):
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def server():
    srv = _run(_Server())
    yield srv
    _stop(srv)


@pytest.fixture
def dns(monkeypatch):
    """Made-up names: ``dns.answers[name]`` is a list of answers, one per lookup (the last repeats), each a
    list of addresses or a callable; ``dns.calls`` lists the lookups of made-up names."""
    answers, calls, real = {}, [], socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kw):
        if host not in answers:
            return real(host, port, *args, **kw)
        calls.append(host)
        seq = answers[host]
        answer = seq.pop(0) if len(seq) > 1 else seq[0]
        if callable(answer):
            answer = answer()
        return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", (a, port, 0, 0)) if ":" in a
                else (socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in answer]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return SimpleNamespace(answers=answers, calls=calls)


@pytest.fixture
def connects(monkeypatch):
    """``connects.log``: the address of every connection fetch opens; ``connects.reroute[addr] = sockaddr``
    sends connections to ``addr`` to ``sockaddr`` instead."""
    log, reroute, real = [], {}, fetch_mod._connect

    def spy(family, sockaddr, timeout):
        log.append(sockaddr[0])
        if sockaddr[0] in reroute:
            family, sockaddr = socket.AF_INET, reroute[sockaddr[0]]
        return real(family, sockaddr, timeout)

    monkeypatch.setattr(fetch_mod, "_connect", spy)
    return SimpleNamespace(log=log, reroute=reroute)


def _error(url, policy) -> tuple[FetchError, float]:
    t0 = time.monotonic()
    with pytest.raises(FetchError) as e:
        fetch(url, policy)
    return e.value, time.monotonic() - t0


# --- plain fetches ---------------------------------------------------------------------------------------

def test_fetches_from_loopback_when_private_is_allowed(server, connects):
    assert fetch(f"http://127.0.0.1:{server.port}/img.png", LOCAL) == PNG
    assert connects.log == ["127.0.0.1"]
    (req,) = server.requests
    assert req.path == "/img.png"
    assert req.headers["Host"] == f"127.0.0.1:{server.port}"
    assert req.headers["Accept-Encoding"] == "identity"


def test_a_name_with_several_addresses_falls_back_to_the_next(server, dns, connects):
    dns.answers["two.test"] = [["127.0.0.2", "127.0.0.1"]]  # the server listens on 127.0.0.1 only
    assert fetch(f"http://two.test:{server.port}/img.png", LOCAL) == PNG
    assert connects.log == ["127.0.0.2", "127.0.0.1"]
    assert server.requests[0].headers["Host"] == f"two.test:{server.port}"


def test_proxies_in_the_environment_are_not_used(server, monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.setenv(var, f"http://127.0.0.1:{_closed_port()}")
    assert fetch(f"http://127.0.0.1:{server.port}/img.png", LOCAL) == PNG
    assert server.requests[0].path == "/img.png"  # origin form: the request came straight here


def test_404_is_an_error(server):
    e, _ = _error(f"http://127.0.0.1:{server.port}/missing", LOCAL)
    assert e.detail == "HTTP status 404"


def test_policies():
    assert SERVER_POLICY == FetchPolicy(allow_private=False, deadline_s=10.0, max_bytes=20_000_000, max_redirects=3)
    assert CLI_POLICY == FetchPolicy(allow_private=True, deadline_s=60.0, max_bytes=100_000_000, max_redirects=5)
    with pytest.raises(ValueError):
        FetchPolicy(allow_private=False, deadline_s=0, max_bytes=1, max_redirects=0)


# --- schemes and credentials -----------------------------------------------------------------------------

@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/x", "gopher://127.0.0.1:70/", "//127.0.0.1/x",
                                 "data:image/png;base64,AAAA"])
def test_only_http_and_https(url, connects):
    e, _ = _error(url, LOCAL)
    assert "refused (http and https only)" in e.detail
    assert connects.log == []


@pytest.mark.parametrize("path,scheme", [("/to-file", "file"), ("/to-ftp", "ftp")])
def test_redirects_to_other_schemes_are_refused(server, path, scheme):
    e, _ = _error(f"http://127.0.0.1:{server.port}{path}", LOCAL)
    assert e.detail == f"redirect to {scheme}: refused (http and https only)"
    assert server.connections == 1


@pytest.mark.parametrize("kind", ["ipv6", "port", "host"])
def test_redirects_to_invalid_urls_are_errors(server, kind):
    e, _ = _error(f"http://127.0.0.1:{server.port}/to-invalid/{kind}", LOCAL)
    assert e.detail.startswith("redirect: ")


@pytest.mark.parametrize("auth", ["user:pass@", "user@", ":pass@"])
def test_credentials_in_urls_are_refused(server, auth, connects):
    e, _ = _error(f"http://{auth}127.0.0.1:{server.port}/img.png", LOCAL)
    assert e.detail == "credentials in the URL: refused"
    assert connects.log == [] and server.connections == 0


# --- addresses -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", "10.0.0.1", "169.254.169.254", "0.0.0.0",
                                  "[::ffff:127.0.0.1]", "100.64.0.1", "[fc00::1]", "127.1", "[::]"])
def test_non_global_addresses_are_refused_before_connecting(server, connects, host):
    e, _ = _error(f"http://{host}:{server.port}/img.png", STRICT)
    assert e.detail.startswith("address ") and e.detail.endswith(": refused")
    assert connects.log == [] and server.connections == 0


ANY = "any reason"  # where Python versions name the kind differently (private, reserved...)


@pytest.mark.parametrize("address,reason", [
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("10.0.0.1", "private"), ("172.16.0.1", "private"),
    ("192.168.1.1", "private"), ("169.254.169.254", "link-local (cloud metadata)"), ("169.254.1.1", "link-local"),
    ("fe80::1", "link-local"), ("fe80::1%1", "link-local"), ("0.0.0.0", "unspecified"), ("0.1.2.3", "unspecified"),
    ("::", "unspecified"), ("224.0.0.1", "multicast"), ("ff02::1", "multicast"), ("240.0.0.1", ANY),
    ("255.255.255.255", ANY), ("100.64.0.1", "shared (carrier-grade NAT)"), ("192.0.2.1", ANY),
    ("198.18.0.1", ANY), ("::ffff:127.0.0.1", "loopback"), ("::ffff:10.0.0.1", "private"),
    ("::7f00:1", "IPv4-compatible (deprecated)"), ("::808:808", "IPv4-compatible (deprecated)"),
    ("64:ff9b::7f00:1", "loopback"), ("64:ff9b::a9fe:a9fe", "link-local (cloud metadata)"),
    ("64:ff9b:1::808:808", "local NAT64"), ("2002:7f00:1::", "loopback"), ("2002:a00:1::1", "private"),
    ("fc00::1", "unique local"), ("fd00:ec2::254", "unique local"), ("fec0::1", "site-local"),
    ("2001:db8::1", ANY), ("2001::1", ANY),
])
def test_refusal_reason(address, reason):
    got = refusal_reason(address)
    assert got is not None and (reason is ANY or got == reason)


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2001:4860:4860::8888", "2606:4700:4700::1111",
                                     "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1"])
def test_global_addresses_are_accepted(address):
    assert refusal_reason(address) is None


def test_any_non_global_address_of_a_name_refuses_it(dns, connects):
    dns.answers["mixed.test"] = [[PUBLIC, "10.1.2.3"]]
    e, _ = _error("http://mixed.test/img.png", STRICT)
    assert e.detail == "address 10.1.2.3 (of mixed.test) is private: refused"
    assert connects.log == []


def test_dns_rebinding_connects_only_to_the_checked_address(server, dns, connects):
    dns.answers["rebind.test"] = [[PUBLIC], ["127.0.0.1"]]  # public when checked, loopback if asked again
    connects.reroute[PUBLIC] = ("127.0.0.1", server.port)  # stands in for the public host
    assert fetch(f"http://rebind.test:{server.port}/img.png", STRICT) == PNG
    assert dns.calls == ["rebind.test"]  # resolved once
    assert connects.log == [PUBLIC]  # and connected to that answer, not to a second one
    assert server.requests[0].headers["Host"] == f"rebind.test:{server.port}"


def test_redirects_are_rechecked(server, dns, connects):
    dns.answers["public.test"] = [[PUBLIC]]
    connects.reroute[PUBLIC] = ("127.0.0.1", server.port)
    base = f"http://public.test:{server.port}"
    assert fetch(f"{base}/chain/3", STRICT) == PNG  # the first hop and same-host redirects are allowed
    assert connects.log == [PUBLIC] * 4
    for path, named in [("/to-loopback", "address 127.0.0.1 is loopback: refused"),
                        ("/to-localhost", "(of localhost) is loopback: refused")]:
        connects.log.clear()
        before = server.connections
        e, _ = _error(base + path, STRICT)
        assert e.detail.endswith(named)
        assert connects.log == [PUBLIC] and server.connections == before + 1  # the second hop never connected


# --- redirects -------------------------------------------------------------------------------------------

def test_redirect_chains_are_followed_up_to_the_limit(server):
    assert fetch(f"http://127.0.0.1:{server.port}/chain/3", LOCAL) == PNG
    assert [r.path for r in server.requests] == ["/chain/3", "/chain/2", "/chain/1", "/chain/0"]
    server.connections = 0
    e, _ = _error(f"http://127.0.0.1:{server.port}/chain/4", LOCAL)
    assert e.detail == "more than 3 redirects"
    assert server.connections == 4
    e, _ = _error(f"http://127.0.0.1:{server.port}/loop/0", replace(LOCAL, max_redirects=0))
    assert e.detail == "more than 0 redirects"


# --- the deadline ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("path,deadline", [("/drip", 1.0), ("/drip-headers", 0.5), ("/stall", 0.5)])
def test_a_slow_drip_ends_at_the_deadline(server, path, deadline):
    """One byte every 0.2 s keeps every recv short: only a deadline over the whole fetch ends it (and a
    server that stalls outright, only a recv timeout of the time left)."""
    e, elapsed = _error(f"http://127.0.0.1:{server.port}{path}", replace(LOCAL, deadline_s=deadline))
    assert e.detail == f"timed out after {deadline:g} s"
    assert deadline - 0.05 < elapsed < deadline + 0.4


def test_a_hanging_dns_lookup_ends_at_the_deadline(dns):
    release = threading.Event()
    dns.answers["hang.test"] = [lambda: release.wait(10) and [PUBLIC]]
    try:
        e, elapsed = _error("http://hang.test/img.png", replace(STRICT, deadline_s=0.5))
    finally:
        release.set()
    assert e.detail == "timed out after 0.5 s"
    assert elapsed < 0.9


def test_https_to_a_plain_http_port_fails_within_the_deadline(server):
    e, elapsed = _error(f"https://127.0.0.1:{server.port}/img.png", replace(LOCAL, deadline_s=1.0))
    assert elapsed < 1.4
    assert "TLS" in e.detail or "timed out" in e.detail or "connection" in e.detail


# --- the byte cap ----------------------------------------------------------------------------------------

def test_a_content_length_over_the_cap_is_refused_before_reading(server):
    e, elapsed = _error(f"http://127.0.0.1:{server.port}/huge", LOCAL)
    assert e.detail == "Content-Length 1,000,000,000 is over 100,000 bytes"
    assert elapsed < 1


@pytest.mark.parametrize("path", ["/huge-nolen", "/huge-chunked"])
def test_bodies_without_a_length_are_counted(server, path):
    e, elapsed = _error(f"http://127.0.0.1:{server.port}{path}", LOCAL)
    assert e.detail == "body over 100,000 bytes"  # not read to the end: that would time out
    assert elapsed < 1


@pytest.mark.parametrize("kind", ["exact", "exact-chunked"])
def test_the_cap_is_inclusive(server, kind):
    assert fetch(f"http://127.0.0.1:{server.port}/{kind}/100000", LOCAL) == b"z" * 100_000
    e, _ = _error(f"http://127.0.0.1:{server.port}/{kind}/100001", LOCAL)
    assert "over 100,000 bytes" in e.detail


# --- what a client sees ----------------------------------------------------------------------------------

def test_the_message_is_the_same_whatever_happened(server):
    causes = {
        "refused": _error(f"http://127.0.0.1:{server.port}/img.png", STRICT)[0],
        "timeout": _error(f"http://127.0.0.1:{server.port}/drip", replace(LOCAL, deadline_s=0.5))[0],
        "connection refused": _error(f"http://127.0.0.1:{_closed_port()}/img.png", LOCAL)[0],
        "404": _error(f"http://127.0.0.1:{server.port}/missing", LOCAL)[0],
    }
    assert {str(e) for e in causes.values()} == {"the image URL could not be fetched"}
    assert {repr(e.args) for e in causes.values()} == {"('the image URL could not be fetched',)"}
    details = {k: e.detail for k, e in causes.items()}
    assert "loopback" in details["refused"] and "timed out" in details["timeout"]
    assert details["connection refused"] == "connection refused" and "404" in details["404"]


# --- TLS -------------------------------------------------------------------------------------------------

def _self_signed(tmp_path):
    """(cert, key) files for a certificate of ``localhost`` (the cryptography package: in the test extra, so
    the same on every platform; macOS's LibreSSL command differs from OpenSSL's)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    k = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    c = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(k.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
         .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
         .sign(k, hashes.SHA256()))
    cert.write_bytes(c.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    return cert, key


def test_https_verifies_the_certificate_against_the_host_name(tmp_path, monkeypatch, dns, connects):
    cert, key = _self_signed(tmp_path)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))  # what _tls_context does, trusting this cert
    srv = _run(_Server(tls=server_ctx))
    try:
        e, _ = _error(f"https://localhost:{srv.port}/img.png", LOCAL)  # the default context does not trust it
        assert e.detail.startswith("TLS certificate not accepted")
        monkeypatch.setattr(fetch_mod, "_tls_context", lambda: client_ctx)
        assert fetch(f"https://localhost:{srv.port}/img.png", LOCAL) == PNG
        assert srv.requests[-1].headers["Host"] == f"localhost:{srv.port}"
        e, _ = _error(f"https://127.0.0.1:{srv.port}/img.png", LOCAL)  # the certificate names localhost only
        assert e.detail.startswith("TLS certificate not accepted")
        dns.answers["rebind.test"] = [[PUBLIC]]
        connects.reroute[PUBLIC] = ("127.0.0.1", srv.port)
        e, _ = _error(f"https://rebind.test:{srv.port}/img.png", STRICT)  # verified against the URL's name
        assert e.detail.startswith("TLS certificate not accepted") and connects.log[-1] == PUBLIC
    finally:
        _stop(srv)


# --- open_image ------------------------------------------------------------------------------------------

def test_open_image_fetches_urls_for_the_local_user(server):
    img = open_image(f"http://127.0.0.1:{server.port}/img.png")  # loopback: the CLI's policy allows it
    assert img.size == (5, 3) and img.getpixel((0, 0)) == (200, 30, 10)
    with pytest.raises(ImageError, match=r"/missing: could not download \(HTTP status 404\)"):
        open_image(f"http://127.0.0.1:{server.port}/missing")
    with pytest.raises(ImageError, match=r"could not download \(redirect to file: refused"):
        open_image(f"http://127.0.0.1:{server.port}/to-file")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
