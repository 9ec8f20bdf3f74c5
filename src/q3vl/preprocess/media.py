"""Where media may come from, how much of it and how fast: `MediaPolicy`, and the one place that opens it.

Every image, video file and video frame the runtime reads goes through `MediaAccess.source()`:
local paths and `file://` URIs (optionally confined to a root directory), http(s) URLs (fetched by
`fetch.py` under the policy, never by Pillow or FFmpeg), `data:` URIs and encoded bytes. A caller
that forwards untrusted requests (the HTTP server, a Ray job) passes `MediaPolicy.strict()`; the
Python API's default keeps today's local-file behaviour but refuses non-public network addresses.

Files are opened only while an item is probed or decoded, never held between the two, so a call
with thousands of images cannot run out of file descriptors.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import ipaddress
import math
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

from q3vl.errors import InputError

MIB = 1024**2
# Pillow's own decompression-bomb error threshold (2 x Image.MAX_IMAGE_PIXELS), stated here so a
# process that raised or disabled Pillow's global limit still gets one.
DEFAULT_MAX_IMAGE_PIXELS = 178_956_970
# Pillow plugins that decode common web/camera images in-process (JPEG includes MPO camera files).
# Left out on purpose: EPS/PS (Pillow runs Ghostscript on them), and the long tail of rare formats.
SAFE_IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF", "PPM", "ICO", "TGA")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
VIDEO_URL_NOTE = ("; a video URL is downloaded whole before it is decoded (no range reads), so its whole file counts: "
                  "send a shorter or smaller file, or a local path (for the server: under --media-root)")

T = TypeVar("T")


@dataclass(frozen=True)
class MediaPolicy:
    """What media an `Embedder`/`Reranker` may read, and how much time and memory one item may take.

    Sources: `allow_local` (plain paths; with `local_root`, only paths that stay inside that directory
    after resolving symlinks), `allow_file_uri` (`file://`), `allow_http` (http(s) URLs; with
    `allowed_hosts`, only those hosts, an entry starting with "." matching every subdomain),
    `allow_data_uri`. Network addresses: loopback, private, link-local, multicast, unspecified and
    reserved addresses are refused unless `allow_private_networks` or listed in `allowed_networks`
    (CIDR strings); the check runs on the resolved address of every redirect hop, and the connection
    goes to the address that was checked (no second DNS lookup to rebind). `max_redirects` hops.
    Limits: `max_item_bytes` per fetched/decoded item, `max_call_bytes` per call, `deadline` seconds
    for one media item's fetch and decode together, `max_image_pixels` per image or video frame,
    `max_video_frames` / `max_video_seconds` per video stream, `image_formats` (Pillow format names;
    None for every format Pillow can open).

    The default (`MediaPolicy()`) is the Python API's: local paths, `file://`, `data:` and public
    http(s) URLs; 64 MiB per item, 512 MiB per call, 60 s per item. `strict()` is for untrusted
    callers; `trusted()` also allows private networks (the behaviour before the policy existed).
    """

    allow_local: bool = True
    local_root: str | None = None
    allow_file_uri: bool = True
    allow_http: bool = True
    allowed_hosts: tuple[str, ...] | None = None
    allow_private_networks: bool = False
    allowed_networks: tuple[str, ...] = ()
    allow_data_uri: bool = True
    max_redirects: int = 5
    max_item_bytes: int = 64 * MIB
    max_call_bytes: int = 512 * MIB
    deadline: float = 60.0
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_video_frames: int = 216_000  # max_video_seconds at 60 fps: sampling cost follows the frames kept
    max_video_seconds: float = 3600.0
    image_formats: tuple[str, ...] | None = SAFE_IMAGE_FORMATS
    _networks: tuple[Any, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("allow_local", "allow_file_uri", "allow_http", "allow_private_networks", "allow_data_uri"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"MediaPolicy.{name} must be True or False")
        for name in ("max_redirects", "max_item_bytes", "max_call_bytes", "max_image_pixels", "max_video_frames"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "max_redirects" else 1):
                raise ValueError(f"MediaPolicy.{name} must be a positive integer, not {value!r}")
        for name in ("deadline", "max_video_seconds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"MediaPolicy.{name} must be a finite number of seconds > 0, not {value!r}")
        if self.local_root is not None:
            object.__setattr__(self, "local_root", os.path.realpath(os.fspath(self.local_root)))
        if self.allowed_hosts is not None:
            from q3vl.preprocess.fetch import normalize_host  # the transport's spelling of a host

            object.__setattr__(self, "allowed_hosts", tuple(normalize_host(h) for h in self.allowed_hosts))
        if self.image_formats is not None:
            object.__setattr__(self, "image_formats", tuple(f.upper() for f in self.image_formats))
        try:
            nets = tuple(ipaddress.ip_network(n, strict=False) for n in self.allowed_networks)
        except (TypeError, ValueError) as e:
            raise ValueError(f"MediaPolicy.allowed_networks must be CIDR strings like '10.0.0.0/8': {e}") from e
        object.__setattr__(self, "allowed_networks", tuple(str(n) for n in nets))
        object.__setattr__(self, "_networks", nets)

    @classmethod
    def strict(cls, **overrides: Any) -> MediaPolicy:
        """For requests from untrusted callers: no local files, public http(s) and `data:` only, 30 s."""
        return cls(**{"allow_local": False, "allow_file_uri": False, "deadline": 30.0, **overrides})

    @classmethod
    def trusted(cls, **overrides: Any) -> MediaPolicy:
        """For a caller that controls every input: the default plus private/loopback network addresses."""
        return cls(**{"allow_private_networks": True, **overrides})

    def host_allowed(self, host: str) -> bool:
        """Whether a URL's host passes `allowed_hosts` (exact, or a subdomain of a ".suffix" entry)."""
        if self.allowed_hosts is None:
            return True
        from q3vl.preprocess.fetch import normalize_host

        host = normalize_host(host)
        return any(host == h or (h.startswith(".") and host.endswith(h)) for h in self.allowed_hosts)

    def address_allowed(self, ip: str) -> bool:
        """Whether a resolved address may be connected to: public, or explicitly allowed. An IPv6
        address that carries an IPv4 one (mapped, 6to4, Teredo, NAT64) is judged by both; IPv6 ranges
        that never name a public host (`NEVER_PUBLIC_V6`) are refused whatever they embed.
        """
        addr = ipaddress.ip_address(ip)
        if self.allow_private_networks:
            return True
        both = (addr, *embedded_ipv4(addr))
        if any(a in net for a in both for net in self._networks if a.version == net.version):
            return True
        if isinstance(addr, ipaddress.IPv6Address) and any(addr in net for net in NEVER_PUBLIC_V6):
            return False
        return all(a.is_global and not a.is_multicast for a in both)


# IPv6 ranges refused even where Python's `is_global` says otherwise (it varies by Python version)
NEVER_PUBLIC_V6 = tuple(ipaddress.IPv6Network(n) for n in (
    "::/96",  # IPv4-compatible (deprecated, RFC 4291): ::127.0.0.1 is no public host
    "::ffff:0:0:0/96",  # IPv4-translated (RFC 2765)
    "64:ff9b:1::/48",  # local-use NAT64 (RFC 8215)
    "fec0::/10",  # site-local (deprecated, RFC 3879)
))
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052's well-known prefix: the IPv4 is the last 32 bits


def embedded_ipv4(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address stands for: mapped (::ffff:a.b.c.d), 6to4, Teredo (server
    and client), NAT64 (64:ff9b::a.b.c.d), and the low 32 bits of the IPv4-compatible and
    IPv4-translated forms (::a.b.c.d, ::ffff:0:a.b.c.d).
    """
    if not isinstance(addr, ipaddress.IPv6Address):
        return []
    out = [a for a in (addr.ipv4_mapped, addr.sixtofour) if a is not None]
    if addr.teredo is not None:
        out.extend(addr.teredo)
    if addr in NAT64 or addr in NEVER_PUBLIC_V6[0] or addr in NEVER_PUBLIC_V6[1]:
        out.append(ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF))
    return out


class Deadline:
    """One item's (or one call's) time budget: fetch, probe and decode all draw on the same clock.

    `cancel()` ends it early (the caller left): it is expired from then on, and every callback
    registered with `watch` (a fetch's socket abort) runs at once, so nothing keeps reading for a
    caller that is gone.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + max(seconds, 0.0)
        self.cancelled = False
        self._watchers: dict[int, Callable[[], None]] = {}
        self._lock = threading.Lock()

    def left(self) -> float:
        return self.end - time.monotonic()

    def cancel(self) -> None:
        """Expire now and run every watcher (each once)."""
        with self._lock:
            self.cancelled = True
            self.end = min(self.end, time.monotonic())
            watchers, self._watchers = list(self._watchers.values()), {}
        for fn in watchers:
            fn()

    def watch(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Run `fn` when the deadline is cancelled (at once if it already is); returns an un-register."""
        key = id(fn)

        def unwatch() -> None:
            with self._lock:
                self._watchers.pop(key, None)

        with self._lock:
            if not self.cancelled:
                self._watchers[key] = fn
                return unwatch
        fn()
        return unwatch

    def expired(self) -> bool:
        return self.left() <= 0

    def check(self, what: str) -> None:
        """Raise the item's `InputError` once the budget is spent."""
        if self.expired():
            raise InputError(f"{what} did not finish within the media deadline; send a smaller or faster "
                             "source, or raise MediaPolicy(deadline=...)")


class CallBudget:
    """Bytes brought in by one call, and the in-memory sources already made in it: a URL, data URI or
    bytes object used by several items (a reranker query, a repeated frame) is fetched, decoded and
    charged once per call.
    """

    def __init__(self, policy: MediaPolicy, deadline: Deadline | None = None) -> None:
        self.policy = policy
        self.deadline = deadline  # the whole call's, when it has one: every fetch also ends by it
        self.used = 0
        self.sources: dict[tuple[str, str | bytes], Source | InputError] = {}
        self._lock = threading.Lock()

    def cached(self, key: tuple[str, str | bytes], make: Callable[[], Source]) -> Source:
        """`make()` once per key in this call; a failure is remembered too (a stalled URL stalls once)."""
        found = self.sources.get(key)
        if found is None:
            try:
                found = make()
            except InputError as e:
                found = e
            self.sources[key] = found
        if isinstance(found, InputError):
            raise InputError(found.reason) from found
        return found

    def room(self) -> tuple[int, str]:
        """The most bytes the next item may bring in, and which limit that is."""
        left = max(0, self.policy.max_call_bytes - self.used)
        if left < self.policy.max_item_bytes:
            return left, "per-call limit (MediaPolicy.max_call_bytes); split the call"
        return self.policy.max_item_bytes, "per-item limit (MediaPolicy.max_item_bytes)"

    def charge(self, size: int, name: str) -> None:
        """Count `size` bytes against the item and call limits; over either is the item's error."""
        with self._lock:
            if size > self.policy.max_item_bytes:
                raise InputError(f"{name} is larger than the {self.policy.max_item_bytes}-byte per-item limit "
                                 "(MediaPolicy.max_item_bytes)")
            if self.used + size > self.policy.max_call_bytes:
                raise InputError(f"{name} would take this call's media over the {self.policy.max_call_bytes}-byte "
                                 "per-call limit (MediaPolicy.max_call_bytes); split the call")
            self.used += size


_CALL: ContextVar[CallBudget | None] = ContextVar("q3vl_media_call", default=None)


@contextlib.contextmanager
def media_call(policy: MediaPolicy, budget: CallBudget | None = None) -> Iterator[CallBudget]:
    """Everything planned inside shares one per-call byte budget and fetch cache: `budget` when given
    (a server's request, whose URLs it may already have fetched), else the enclosing call's when one
    with the same policy is open, else a new one.
    """
    outer = _CALL.get()
    if budget is None and outer is not None and outer.policy == policy:
        yield outer
        return
    token = _CALL.set(budget if budget is not None else CallBudget(policy))
    try:
        yield _CALL.get()  # type: ignore[misc]
    finally:
        _CALL.reset(token)


def per_call(fn: Callable[..., T], policy: MediaPolicy) -> Callable[..., T]:
    """`fn` (a per-item planner) wrapped so every item it plans shares one call's byte budget."""
    budget = CallBudget(policy)

    def run(*args: Any, **kwargs: Any) -> T:
        token = _CALL.set(budget)
        try:
            return fn(*args, **kwargs)
        finally:
            _CALL.reset(token)

    return run


@dataclass(frozen=True, eq=False)
class Source:
    """Encoded media that passed the policy: bytes in memory, or a local regular file reopened on use."""

    name: str  # for messages: the path as given, a URL without credentials or query, "data URI", ...
    path: str | None = None  # resolved local path
    data: bytes | None = None

    def open(self) -> IO[bytes]:
        """A binary file object; the caller closes it (use it in a `with`)."""
        if self.data is not None:
            import io

            return io.BytesIO(self.data)
        assert self.path is not None
        return _open_regular(self.path, self.name)


@dataclass(frozen=True)
class MediaAccess:
    """The policy, socket timeout and per-call budget that one planning step reads media under."""

    policy: MediaPolicy
    timeout: float = 10.0
    budget: CallBudget | None = None

    @classmethod
    def current(cls, policy: MediaPolicy, timeout: float) -> MediaAccess:
        """The access of the call being planned (see `per_call`), or a one-item budget outside any call."""
        budget = _CALL.get()
        return cls(policy, timeout, budget if budget is not None and budget.policy == policy else None)

    def calls_budget(self) -> CallBudget:
        return self.budget if self.budget is not None else CallBudget(self.policy)

    def source(self, ref: Any, kind: str, deadline: Deadline) -> Source:
        """Check `ref` (path, URL, data URI or encoded bytes) against the policy and make it readable."""
        budget = self.calls_budget()
        if budget.deadline is not None and budget.deadline.end < deadline.end:
            deadline = budget.deadline  # the call's deadline comes first (or was cancelled)
        if isinstance(ref, bytes):
            return budget.cached((kind, ref), lambda: self._bytes(ref, kind, budget))
        if isinstance(ref, (bytearray, memoryview)):
            return self._bytes(bytes(ref), kind, budget)
        ref = os.fspath(ref) if isinstance(ref, Path) else ref
        if not isinstance(ref, str):
            raise InputError(f"{kind} source must be a path, URL, data URI or bytes, not {type(ref).__name__}")
        scheme = _SCHEME.match(ref)
        name = scheme.group(1).lower() if scheme else ""
        if ref.startswith("data:"):
            return budget.cached((kind, ref), lambda: self._data(ref, kind, budget))
        if name in ("http", "https"):
            return budget.cached(("url", ref), lambda: self._fetch(ref, deadline, budget, kind))
        if name == "file":
            if not self.policy.allow_file_uri:
                raise InputError(f"file:// URIs are refused by the media policy ({ref}); send the {kind} as bytes "
                                 "or a data URI, or allow them with MediaPolicy(allow_file_uri=True)")
            return Source(ref[7:], path=self._local(ref[7:], kind))
        if scheme:
            raise InputError(f"unsupported URL scheme {name!r} in {kind} source {_short(ref)}; use http(s), "
                             "file:// or data:")
        if not self.policy.allow_local:
            raise InputError(f"local file access is refused by the media policy ({ref}); send the {kind} as "
                             "bytes or a data URI, or allow local files with MediaPolicy(allow_local=True)")
        return Source(ref, path=self._local(ref, kind))

    @staticmethod
    def _bytes(data: bytes, kind: str, budget: CallBudget) -> Source:
        budget.charge(len(data), f"encoded {kind}")
        return Source(f"encoded {kind} bytes", data=data)

    def _local(self, path: str, kind: str) -> str:
        """The resolved path if it stays inside `local_root`; nothing here tells a missing file apart."""
        real = os.path.realpath(path)
        root = self.policy.local_root
        if root is not None and os.path.commonpath([root, real]) != root:
            raise InputError(f"local file access is refused by the media policy ({path} is not inside the "
                             f"allowed media root); place the {kind} under the root or send it as bytes")
        with _open_regular(real, path, kind):
            pass  # exists and is a regular file: "not found" is only ever said about allowed paths
        return real

    def _data(self, uri: str, kind: str, budget: CallBudget) -> Source:
        if not self.policy.allow_data_uri:
            raise InputError(f"data: URIs are refused by the media policy; allow them with "
                             f"MediaPolicy(allow_data_uri=True) or send the {kind} another way")
        comma = uri.find(",", 0, 256)
        head = uri[:comma]
        if comma < 0 or not head.startswith(f"data:{kind}") or not head.endswith(";base64"):
            raise InputError(f"data URI must look like data:{kind}/<type>;base64,<payload>")
        if (len(uri) - comma - 1) // 4 * 3 > self.policy.max_item_bytes + 3:  # refused before copying anything
            raise InputError(f"{kind} data URI is larger than the {self.policy.max_item_bytes}-byte per-item "
                             "limit (MediaPolicy.max_item_bytes)")
        try:
            data = base64.b64decode(uri[comma + 1:], validate=True)
        except (binascii.Error, ValueError) as e:
            raise InputError(f"data URI has invalid base64: {e}") from e
        budget.charge(len(data), f"{kind} data URI")
        return Source("data URI", data=data)

    def _fetch(self, url: str, deadline: Deadline, budget: CallBudget, kind: str) -> Source:
        from q3vl.preprocess.fetch import display_url, fetch

        if not self.policy.allow_http:
            raise InputError(f"unreachable URL {display_url(url)}: http(s) URLs are refused by the media policy; "
                             "send the bytes instead, or allow them with MediaPolicy(allow_http=True)")
        cap, limit = budget.room()
        if kind == "video":
            limit += VIDEO_URL_NOTE
        data = fetch(url, self.policy, deadline, self.timeout, cap, limit)
        budget.charge(len(data), f"URL {display_url(url)}")
        return Source(display_url(url), data=data)


def _open_regular(path: str, name: str, kind: str = "media") -> IO[bytes]:
    """Open a regular file without following a final symlink and without blocking on a FIFO or device."""
    if os.path.realpath(path) != path:
        raise InputError(f"{kind} file {name} changed (a symlink appeared) after it was checked; retry")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except (FileNotFoundError, NotADirectoryError) as e:
        raise InputError(f"{kind} file not found: {name}") from e
    except OSError as e:
        raise InputError(f"cannot open {kind} file {name}: {e.strerror}") from e
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InputError(f"{kind} file {name} is not a regular file (a directory, device, pipe or socket)")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _short(text: str, n: int = 80) -> str:
    return text if len(text) <= n else text[:n] + "..."


@contextlib.contextmanager
def media_errors(name: str) -> Iterator[None]:
    """Any exception from a decoder, numpy or the OS while handling one item becomes that item's error."""
    try:
        yield
    except InputError:
        raise
    except Exception as e:  # Pillow, PyAV, numpy, zlib, struct, MemoryError, ...: all mean "this item"
        raise InputError(f"unreadable or corrupt {name}: {type(e).__name__}: {_short(str(e), 200)}") from e
