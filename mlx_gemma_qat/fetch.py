"""Fetching a URL's bytes under a policy (the images that requests and ``--image`` name by URL).

``fetch(url, policy)`` is a small HTTP/1.1 GET client on the standard library that a URL from a stranger
cannot turn against the machine it runs on:

- http and https only, for the URL and for every redirect target (a relative one resolves against the
  URL that sent it); no credentials (``user:pass@``) in any of them. At most ``max_redirects`` redirects
  (301, 302, 303, 307, 308), each checked as the first URL is; always GET.
- The host is resolved here, and every address it resolves to must be global unless ``allow_private``:
  loopback, private, link-local (169.254.169.254, the cloud metadata address, included), unspecified,
  multicast, reserved, shared (100.64/10), unique-local and site-local IPv6 are refused, and so are IPv6
  forms that carry an IPv4 address (IPv4-mapped ``::ffff:a.b.c.d``, NAT64 ``64:ff9b::/96``, 6to4
  ``2002::/16``) when the IPv4 address is refused; IPv4-compatible ``::a.b.c.d`` (deprecated) and local
  NAT64 ``64:ff9b:1::/48`` always are. The socket then connects to an address that was checked, never
  to the name again, so a DNS answer that changes between the check and the connection (DNS rebinding)
  gains nothing. The request keeps the URL's Host header; https verifies the certificate against the
  URL's host name (which is also the SNI name) with ``ssl.create_default_context()``.
- ``deadline_s`` bounds the whole fetch: name resolution, connections, TLS handshakes, redirects and the
  body. Every socket operation gets the time left as its timeout and the deadline is checked after every
  read, so a server sending one byte at a time (body or headers) cannot outlast it. The standard library
  cannot time out ``getaddrinfo``: it runs in a daemon thread that is waited for with the time left; a
  lookup still hanging past the deadline is abandoned (its thread ends when the system resolver gives up).
- ``max_bytes`` caps the body: a Content-Length above it is refused before the body is read, and bytes
  are counted as they arrive (chunked or not), reading at most ``max_bytes + 1``. ``Accept-Encoding:
  identity`` is sent and nothing is decompressed. Any final status but 200 is an error.
- Proxies in the environment (``http_proxy``, ``https_proxy``...) are not used: the client opens its own
  sockets to the checked addresses (a proxy would resolve and connect on its own, past these checks).

Errors are ``FetchError``: its ``str()`` is one generic sentence whatever happened, safe to return to a
client (refused, unreachable, timed out and HTTP errors look alike, and no address is echoed), and its
``detail`` says what happened, for the server's log or a local user.
"""

from __future__ import annotations

import functools
import http.client
import io
import ipaddress
import re
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass

__all__ = ["CLI_POLICY", "SERVER_POLICY", "FetchError", "FetchPolicy", "fetch", "refusal_reason"]


@dataclass(frozen=True)
class FetchPolicy:
    """What one ``fetch`` may do: reach non-global addresses, take ``deadline_s`` seconds in all, read
    ``max_bytes`` of body and follow ``max_redirects`` redirects."""

    allow_private: bool
    deadline_s: float
    max_bytes: int
    max_redirects: int

    def __post_init__(self):
        if not self.deadline_s > 0:
            raise ValueError(f"deadline_s must be positive, not {self.deadline_s}")
        if self.max_bytes < 0 or self.max_redirects < 0:
            raise ValueError("max_bytes and max_redirects must be at least 0")


# The server fetches for remote clients: public addresses only, and little time and memory per image
# (20 MB: a 50 MP camera JPEG fits; a lossless image that large may not, and can be sent inline).
SERVER_POLICY = FetchPolicy(allow_private=False, deadline_s=10.0, max_bytes=20_000_000, max_redirects=3)
# ``--image URL`` fetches for the user at the keyboard: any address (a NAS, a local server), more patience.
CLI_POLICY = FetchPolicy(allow_private=True, deadline_s=60.0, max_bytes=100_000_000, max_redirects=5)


class FetchError(Exception):
    """A URL that could not be fetched. ``str()`` is the same for every cause (for clients); ``detail``
    says what went wrong (for logs and local users)."""

    MESSAGE = "the image URL could not be fetched"

    def __init__(self, detail: str):
        super().__init__(self.MESSAGE)
        self.detail = detail

    def __str__(self) -> str:
        return self.MESSAGE


_REDIRECTS = (301, 302, 303, 307, 308)
_CHUNK = 64 * 1024
_SHARED = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_V4_COMPATIBLE = ipaddress.ip_network("::/96")
_UNIQUE_LOCAL = ipaddress.ip_network("fc00::/7")
_METADATA = ipaddress.ip_address("169.254.169.254")
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")
_HOST = re.compile(r"[A-Za-z0-9._:%-]+")  # names, IPv4 and IPv6 literals (with a zone)


def refusal_reason(address) -> str | None:
    """None for a global address (one a server may fetch from), else what kind it is ("loopback",
    "private", "link-local"...). ``address`` is a string or an ``ipaddress`` address; IPv6 forms that
    carry an IPv4 address are judged by that address."""
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if ip.version == 6:
        if ip.scope_id:
            ip = ipaddress.IPv6Address(int(ip))
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return refusal_reason(embedded)
        if ip in _NAT64_LOCAL:
            return "local NAT64"
        if ip in _V4_COMPATIBLE and not (ip.is_unspecified or ip.is_loopback):
            return "IPv4-compatible (deprecated)"
        if ip in _UNIQUE_LOCAL:
            return "unique local"
        if ip.is_site_local:
            return "site-local"
    elif ip in _THIS_NETWORK:
        return "unspecified"
    elif ip in _SHARED:
        return "shared (carrier-grade NAT)"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip == _METADATA:
        return "link-local (cloud metadata)"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip.is_private:
        return "private"
    if ip.is_reserved:
        return "reserved"
    if not ip.is_global:
        return "not globally routable"
    return None


def fetch(url: str, policy: FetchPolicy) -> bytes:
    """The body of ``url`` (its 200 response, after redirects) under ``policy``; raises FetchError."""
    clock = _Deadline(policy.deadline_s)
    try:
        for hop in range(policy.max_redirects + 1):
            target = _Target.parse(url, first=hop == 0)
            status, location, body = _get(target, policy, clock)
            if status not in _REDIRECTS:
                if status != 200:
                    raise FetchError(f"HTTP status {status}")
                return body
            if location is None:
                raise FetchError(f"HTTP {status} redirect without a Location")
            try:
                url = urllib.parse.urljoin(url, location)
            except ValueError as e:
                raise FetchError(f"redirect: invalid URL ({e})") from None
        raise FetchError(f"more than {policy.max_redirects} redirects")
    except TimeoutError:
        raise FetchError(f"timed out after {policy.deadline_s:g} s") from None


class _Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        """The seconds left; TimeoutError when none are."""
        left = self.end - time.monotonic()
        if left <= 0:
            raise TimeoutError
        return left


@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str  # ASCII (IDNA), without brackets
    port: int
    host_header: str
    path: str  # the request target, percent-encoded

    @classmethod
    def parse(cls, url: str, first: bool) -> _Target:
        where = "" if first else "redirect: "
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port
        except ValueError as e:
            raise FetchError(f"{where}invalid URL ({e})") from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise FetchError(f"{'scheme' if first else 'redirect to'} {scheme or '(none)'}: refused "
                             "(http and https only)")
        if parts.username is not None or parts.password is not None:
            raise FetchError(f"{where}credentials in the URL: refused")
        try:
            host = (parts.hostname or "").encode("idna").decode("ascii")
        except UnicodeError:
            host = None
        if not host or not _HOST.fullmatch(host):
            raise FetchError(f"{where}no valid host name in the URL")
        default = 443 if scheme == "https" else 80
        port = default if port is None else port
        bracketed = f"[{host}]" if ":" in host else host
        host_header = bracketed if port == default else f"{bracketed}:{port}"
        path = urllib.parse.quote(parts.path or "/", safe="/%!$&'()*+,;=:@-._~")
        if parts.query:
            path += "?" + urllib.parse.quote(parts.query, safe="/?%!$&'()*+,;=:@-._~")
        return cls(scheme, host, port, host_header, path)


def _resolve(host: str, port: int, clock: _Deadline) -> list[tuple[int, tuple]]:
    """(family, sockaddr) for each address of ``host``; the lookup runs in a daemon thread so that the
    deadline bounds it (getaddrinfo takes no timeout)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:  # a literal: no lookup
        return [(socket.AF_INET, (host, port))] if ip.version == 4 else [(socket.AF_INET6, (host, port, 0, 0))]
    done, out = threading.Event(), {}

    def lookup():
        try:
            out["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as e:
            out["error"] = e
        finally:
            done.set()

    threading.Thread(target=lookup, name="fetch-dns", daemon=True).start()
    if not done.wait(clock.left()):
        raise TimeoutError
    if "error" in out:
        raise FetchError(f"could not resolve {host} ({out['error']})")
    seen, addrs = set(), []
    for family, _, _, _, sockaddr in out["infos"]:
        if family in (socket.AF_INET, socket.AF_INET6) and sockaddr not in seen:
            seen.add(sockaddr)
            addrs.append((family, sockaddr))
    if not addrs:
        raise FetchError(f"{host} has no IP address")
    return addrs


def _connect(family: int, sockaddr: tuple, timeout: float) -> socket.socket:
    """A TCP socket connected to exactly ``sockaddr`` (an address, never a name)."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(sockaddr)
    except BaseException:
        sock.close()
        raise
    return sock


@functools.lru_cache(maxsize=1)
def _tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()


class _DeadlineReader(io.RawIOBase):
    """A socket's reading side where every recv gets the time left as its timeout."""

    def __init__(self, sock: socket.socket, clock: _Deadline):
        self.sock, self.clock = sock, clock

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        self.sock.settimeout(self.clock.left())
        n = self.sock.recv_into(b)
        self.clock.left()  # a read that took the last of the time ends the fetch
        return n


class _Wire:
    """What http.client.HTTPResponse needs of a socket: makefile."""

    def __init__(self, sock: socket.socket, clock: _Deadline):
        self.sock, self.clock = sock, clock

    def makefile(self, mode: str):
        return io.BufferedReader(_DeadlineReader(self.sock, self.clock), _CHUNK)


def _open(target: _Target, policy: FetchPolicy, clock: _Deadline) -> socket.socket:
    addrs = _resolve(target.host, target.port, clock)
    if not policy.allow_private:
        for _, sockaddr in addrs:
            reason = refusal_reason(sockaddr[0])
            if reason is not None:
                of = "" if sockaddr[0] == target.host else f" (of {target.host})"
                raise FetchError(f"address {sockaddr[0]}{of} is {reason}: refused")
    errors = []
    for family, sockaddr in addrs:  # each checked above
        try:
            sock = _connect(family, sockaddr, clock.left())
            break
        except TimeoutError:
            raise
        except OSError as e:
            errors.append(e)
    else:
        e = errors[-1]
        raise FetchError("connection refused" if isinstance(e, ConnectionRefusedError)
                         else f"could not connect ({e.strerror or e})")
    if target.scheme == "https":
        try:
            sock.settimeout(clock.left())
            sock = _tls_context().wrap_socket(sock, server_hostname=target.host)
        except BaseException:
            sock.close()
            raise
    return sock


def _get(target: _Target, policy: FetchPolicy, clock: _Deadline) -> tuple[int, str | None, bytes]:
    """(status, Location, body) of one GET; the body is read only for a 200."""
    try:
        sock = _open(target, policy, clock)
    except ssl.SSLCertVerificationError as e:
        raise FetchError(f"TLS certificate not accepted ({e.verify_message})") from None
    except ssl.SSLError as e:
        raise FetchError(f"TLS failed ({e.reason or e})") from None
    except ConnectionRefusedError:
        raise FetchError("connection refused") from None
    except (FetchError, TimeoutError):
        raise
    except OSError as e:
        raise FetchError(f"could not connect ({e.strerror or e})") from None
    try:
        request = (f"GET {target.path} HTTP/1.1\r\nHost: {target.host_header}\r\n"
                   "User-Agent: mlx-gemma-qat\r\nAccept: image/*, */*;q=0.1\r\n"
                   "Accept-Encoding: identity\r\nConnection: close\r\n\r\n")
        sock.settimeout(clock.left())
        sock.sendall(request.encode("ascii"))
        response = http.client.HTTPResponse(_Wire(sock, clock), method="GET")
        response.begin()
        if response.status != 200:
            return response.status, response.getheader("Location"), b""
        if response.length is not None and response.length > policy.max_bytes:
            raise FetchError(f"Content-Length {response.length:,} is over {_size(policy.max_bytes)}")
        body, size = [], 0
        while size <= policy.max_bytes:
            chunk = response.read(min(_CHUNK, policy.max_bytes + 1 - size))
            if not chunk:
                return 200, None, b"".join(body)
            body.append(chunk)
            size += len(chunk)
        raise FetchError(f"body over {_size(policy.max_bytes)}")
    except (FetchError, TimeoutError):
        raise
    except ssl.SSLError as e:
        raise FetchError(f"TLS failed ({e.reason or e})") from None
    except http.client.HTTPException as e:
        raise FetchError(f"bad HTTP response ({type(e).__name__})") from None
    except OSError as e:
        raise FetchError(f"connection failed ({e.strerror or e})") from None
    finally:
        sock.close()


def _size(n: int) -> str:
    return f"{n // 1_000_000} MB" if n >= 1_000_000 and n % 1_000_000 == 0 else f"{n:,} bytes"
