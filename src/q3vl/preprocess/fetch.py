"""http(s) fetching under a `MediaPolicy`: checked addresses, pinned connections, one deadline, byte caps.

urllib follows redirects on its own, resolves a host again when it connects (a DNS answer can
change between the check and the connection), and bounds each socket read but not the whole
transfer (a server sending one byte every two seconds keeps a 10 s-timeout fetch alive forever).
Here each hop is resolved once, every resolved address is checked, the connection goes to a
checked address (the Host header and TLS name stay the URL's host), redirects are followed by hand
with the same checks, and a watchdog shuts the socket when the item's deadline passes.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urljoin, urlsplit

from q3vl.errors import InputError

log = logging.getLogger(__name__)


class FetchPolicy(Protocol):
    """What a fetch reads of a `q3vl.preprocess.media.MediaPolicy` (media.py uses this module, not the reverse)."""

    @property
    def max_redirects(self) -> int: ...

    def host_allowed(self, host: str) -> bool: ...

    def address_allowed(self, ip: str) -> bool: ...


class FetchDeadline(Protocol):
    """What a fetch reads of `q3vl.preprocess.media.Deadline`: the item's time left, and whether its
    request was cancelled (`watch` runs a callback when it is: an open connection is aborted at once).
    """

    cancelled: bool

    def watch(self, fn: Callable[[], None]) -> Callable[[], None]: ...

    def left(self) -> float: ...

    def expired(self) -> bool: ...

    def check(self, what: str) -> None: ...


def normalize_host(host: str) -> str:
    """Lower-case ASCII (IDNA) form without a trailing dot, so look-alike spellings compare equal."""
    dot = "." if host.startswith(".") else ""  # an allowlist entry ".example.com" matches subdomains
    try:
        return dot + host.strip(".").encode("idna").decode("ascii").lower()
    except UnicodeError as e:
        raise InputError(f"invalid host name {host!r}: {e}") from e


REDIRECTS = (301, 302, 303, 307, 308)
CHUNK = 64 * 1024
HEADERS = {"Accept": "*/*", "Accept-Encoding": "identity", "User-Agent": "q3vl", "Connection": "close"}
REFUSED_ADDRESS = ("refused by the media policy (the host is not a public address: loopback, private, link-local, "
                   "multicast or reserved); allow it with MediaPolicy(allow_private_networks=True) or "
                   "MediaPolicy(allowed_networks=[...])")


def display_url(url: str) -> str:
    """The URL without credentials, query or fragment (signed URLs must not end up in logs)."""
    try:
        p = urlsplit(url)
        host = p.hostname or ""
        port = f":{p.port}" if p.port else ""
    except ValueError:
        return url.split("?", 1)[0][:100]
    host = f"[{host}]" if ":" in host else host
    path = p.path if len(p.path) <= 80 else p.path[:80] + "..."
    return f"{p.scheme}://{host}{port}{path}" + ("?..." if p.query else "")


@dataclass(frozen=True)
class _Target:
    url: str
    https: bool
    host: str
    port: int
    path: str


def _target(url: str, policy: FetchPolicy, name: str) -> _Target:
    """Parse one hop and apply the scheme and host rules (no network yet)."""
    try:
        p = urlsplit(url)
        port = p.port
    except ValueError as e:
        raise InputError(f"unreachable URL {name}: malformed URL ({e})") from e
    if p.scheme not in ("http", "https") or not p.hostname:
        raise InputError(f"unreachable URL {name}: only http(s) URLs with a host can be fetched "
                         f"(a hop went to {p.scheme or 'no'} scheme)")
    if not policy.host_allowed(p.hostname):
        raise InputError(f"unreachable URL {name}: refused by the media policy (host not in allowed_hosts)")
    path = (p.path or "/") + (f"?{p.query}" if p.query else "")
    return _Target(url, p.scheme == "https", normalize_host(p.hostname), port or (443 if p.scheme == "https" else 80),
                   path)


def _lookup(host: str, port: int) -> list[str]:
    """The host's addresses (a seam for tests that simulate DNS answers)."""
    return [str(ai[4][0]) for ai in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


def _resolve(t: _Target, deadline: FetchDeadline, timeout: float, name: str) -> list[str]:
    """Resolve once, bounded by the deadline (getaddrinfo itself has no timeout)."""
    try:
        return [str(ipaddress.ip_address(t.host))]
    except ValueError:
        pass
    out: dict[str, Any] = {}

    def work() -> None:
        try:
            out["ips"] = _lookup(t.host, t.port)
        except (OSError, UnicodeError) as e:
            out["error"] = e

    worker = threading.Thread(target=work, name="q3vl-dns", daemon=True)
    worker.start()
    worker.join(max(0.0, min(deadline.left(), timeout)))
    if worker.is_alive():
        raise InputError(f"unreachable URL {name}: the host name lookup timed out")
    if "error" in out or not out.get("ips"):
        raise InputError(f"unreachable URL {name}: the host name does not resolve")
    return list(dict.fromkeys(out["ips"]))


class _Pinned(http.client.HTTPConnection):
    """An HTTP connection to an already-checked address; Host stays the URL's host.

    `raw` keeps the socket: http.client drops `sock` once a response owns the connection, and the
    watchdog must still be able to shut it.
    """

    def __init__(self, host: str, port: int, ip: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.ip = ip
        self.aborted = False
        self.raw: socket.socket | None = None

    def _tcp(self) -> socket.socket:
        return socket.create_connection((self.ip, self.port), self.timeout)

    def connect(self) -> None:
        self.sock = self.raw = self._tcp()

    def abort(self) -> None:
        """Called by the deadline watchdog: wake any blocked read by shutting the socket."""
        self.aborted = True
        if self.raw is not None:
            with contextlib.suppress(OSError):
                socket.socket.shutdown(self.raw, socket.SHUT_RDWR)

    def close(self) -> None:
        super().close()
        if self.raw is not None:
            self.raw.close()


class _PinnedTLS(_Pinned):
    """HTTPS to a checked address; the certificate is verified against the URL's host name."""

    context = ssl.create_default_context()

    def connect(self) -> None:
        self.sock = self.raw = self.context.wrap_socket(self._tcp(), server_hostname=self.host)


def fetch(url: str, policy: FetchPolicy, deadline: FetchDeadline, timeout: float, cap: int,
          limit: str = "per-item limit (MediaPolicy.max_item_bytes)") -> bytes:
    """The body of `url` (at most `cap` bytes, `limit` naming where the cap comes from) under `policy`,
    within `deadline`; every failure is an `InputError`.
    """
    name = display_url(url)
    current = url
    for _ in range(policy.max_redirects + 1):
        t = _target(current, policy, name)
        ips = _resolve(t, deadline, timeout, name)
        allowed = [ip for ip in ips if policy.address_allowed(ip)]
        if not allowed:
            log.debug("media policy refused %s: %s resolves to %s", name, t.host, ips)
            raise InputError(f"unreachable URL {name}: {REFUSED_ADDRESS}")
        status, location, body = _get(t, allowed, deadline, timeout, (cap, limit), name)
        if status in REDIRECTS:
            if not location:
                raise InputError(f"unreachable URL {name}: HTTP {status} without a Location")
            current = urljoin(current, location)
            continue
        if status != 200:
            raise InputError(f"unreachable URL {name}: HTTP {status}")
        return body
    raise InputError(f"unreachable URL {name}: more than {policy.max_redirects} redirects "
                     "(MediaPolicy.max_redirects)")


def _get(t: _Target, ips: list[str], deadline: FetchDeadline, timeout: float, cap: tuple[int, str], name: str
         ) -> tuple[int, str | None, bytes]:
    """One GET to the first checked address that accepts; (status, Location, body)."""
    err: Exception | None = None
    for ip in ips:
        deadline.check(f"fetching {name}")
        conn = (_PinnedTLS if t.https else _Pinned)(t.host, t.port, ip, max(0.01, min(timeout, deadline.left())))
        watchdog = threading.Timer(max(0.0, deadline.left()), conn.abort)
        watchdog.daemon = True
        watchdog.start()
        unwatch = deadline.watch(conn.abort)  # a cancelled deadline (the caller left) aborts at once
        try:
            return _exchange(conn, t, deadline, cap, name)
        except InputError:
            raise
        except (OSError, http.client.HTTPException, ValueError) as e:
            if deadline.cancelled:
                raise InputError(f"fetching {name} was cancelled (its request ended)") from e
            if conn.aborted or deadline.expired():
                raise InputError(f"fetching {name} did not finish within the media deadline; send a smaller "
                                 "or faster source, or raise MediaPolicy(deadline=...)") from e
            err = e
        finally:
            unwatch()
            watchdog.cancel()
            conn.close()
    raise InputError(f"unreachable URL {name}: {_reason(err)}") from err


def _exchange(conn: _Pinned, t: _Target, deadline: FetchDeadline, cap_limit: tuple[int, str], name: str
              ) -> tuple[int, str | None, bytes]:
    cap, limit = cap_limit
    conn.request("GET", t.path, headers=HEADERS)
    resp = conn.getresponse()
    if resp.status in REDIRECTS:
        return resp.status, resp.getheader("Location"), b""
    if resp.status != 200:
        return resp.status, None, b""
    length = resp.getheader("Content-Length")
    if length is not None and length.strip().isdigit() and int(length) > cap:
        raise InputError(f"URL {name} is larger than the byte limit: {length} bytes > {cap}, the {limit}")
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = resp.read1(CHUNK)
        if conn.aborted or deadline.expired():
            raise TimeoutError("deadline")
        if not chunk:
            return 200, None, b"".join(chunks)
        total += len(chunk)
        if total > cap:
            raise InputError(f"URL {name} is larger than the byte limit: over {cap} bytes, the {limit}")
        chunks.append(chunk)


def _reason(e: Exception | None) -> str:
    if isinstance(e, (TimeoutError, socket.timeout)):
        return "timed out"
    if isinstance(e, ssl.SSLError):
        return f"TLS error ({e.reason or e})"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    return f"{type(e).__name__}: {e}" if e is not None else "no address"
