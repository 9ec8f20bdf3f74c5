"""Loopback load-test parts for `benchmarks/hostile_load.py`: a `q3vl serve` process with its RSS
sampled, looping HTTP clients, a media server that serves large or drip-fed files and logs what it
sent, and raw-socket attackers that watch when the server closes them.

Everything talks to 127.0.0.1 only; every loop has a stop time.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import os
import resource
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> float:
    """Resident memory of a process (MB), 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


# ---------------------------------------------------------------- the server under test
class ServerProcess:
    """`q3vl serve ARGS` on a free loopback port (the q3vl on PYTHONPATH), with its log kept."""

    def __init__(self, args: list[str], log: Path, nofile: int | None = None) -> None:
        self.port = free_port()
        self.log_path = log
        self._log = open(log, "ab")  # noqa: SIM115 (closed in stop)

        def limit() -> None:  # runs in the child before exec
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.proc = subprocess.Popen([sys.executable, "-m", "q3vl", "serve", *args, "--port", str(self.port)],
                                     cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, preexec_fn=limit,
                                     env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})

    def wait_ready(self, headers: dict[str, str] | None = None, timeout: float = 300.0) -> float:
        """Seconds until /ready answered 200."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if call(self.port, "GET", "/ready", headers=headers, timeout=5)[0] == 200:
                    return time.monotonic() - start
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready after {timeout} s; see {self.log_path}")

    def rss(self) -> float:
        return rss_mb(self.proc.pid)

    def metrics(self) -> str:
        return call(self.port, "GET", "/metrics", timeout=30)[1].decode(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> tuple[int | None, float]:
        """(exit code, seconds to exit); killed after `timeout`."""
        start = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self._log.close()
        return self.proc.returncode, time.monotonic() - start


def supports(flag: str) -> bool:
    """Whether the q3vl on PYTHONPATH has a `q3vl serve` flag (the "before" code lacks the new ones)."""
    out = subprocess.run([sys.executable, "-m", "q3vl", "serve", "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    return flag in out.stdout


def status_counts(metrics: str) -> dict[str, float]:
    """Responses by status over every route, from the server's Prometheus text."""
    out: dict[str, float] = {}
    for line in metrics.splitlines():
        if line.startswith("q3vl_requests_total{"):
            status = line.split('status="')[1].split('"')[0]
            out[status] = out.get(status, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


class RssSampler:
    """Samples a process's RSS every `every` seconds on a thread: (monotonic time, MB)."""

    def __init__(self, pid: int, every: float = 0.1) -> None:
        self.pid, self.every = pid, every
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), rss_mb(self.pid)))
            self._stop.wait(self.every)

    def peak(self, since: float = 0.0, until: float = float("inf")) -> float:
        return max((mb for t, mb in self.samples if since <= t <= until), default=0.0)

    def lowest(self, since: float, until: float = float("inf")) -> float:
        return min((mb for t, mb in self.samples if since <= t <= until), default=float("inf"))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


# ---------------------------------------------------------------- HTTP clients
def call(port: int, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
         timeout: float = 60.0, conn: http.client.HTTPConnection | None = None) -> tuple[int, bytes]:
    """(status, body) of one request (a new connection unless `conn` is given)."""
    own = conn is None
    c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request(method, path, body=body, headers={"content-type": "application/json", **(headers or {})})
        resp = c.getresponse()
        return resp.status, resp.read()
    finally:
        if own:
            c.close()


class Looper:
    """A client thread sending one request over and over on a keep-alive connection until stopped.

    Records (start time, seconds, status); status 0 is a connection error or timeout (the
    connection is then reopened). `pause` seconds between requests.
    """

    def __init__(self, port: int, method: str, path: str, body: bytes | None = None, pause: float = 0.0,
                 timeout: float = 60.0, headers: dict[str, str] | None = None) -> None:
        self.port, self.method, self.path, self.body = port, method, path, body
        self.pause, self.timeout, self.headers = pause, timeout, headers
        self.records: list[tuple[float, float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Looper:
        self._thread.start()
        return self

    def _run(self) -> None:
        conn: http.client.HTTPConnection | None = None
        while not self._stop.is_set():
            conn = conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            t0 = time.monotonic()
            try:
                status, _ = call(self.port, self.method, self.path, self.body, self.headers, conn=conn)
            except (OSError, http.client.HTTPException):
                status = 0
                conn.close()
                conn = None
            self.records.append((t0, time.monotonic() - t0, status))
            if status in (0, 408, 413, 429, 503) and conn is not None:  # the server may have closed it
                conn.close()
                conn = None
            self._stop.wait(self.pause if status else max(self.pause, 0.1))  # no busy loop on a dead server
        if conn is not None:
            conn.close()

    def stop(self, join: float = 120.0) -> None:
        self._stop.set()
        self._thread.join(join)

    def latencies(self, status: int | None = 200, since: float = 0.0) -> list[float]:
        return [s for t, s, st in self.records if t >= since and (status is None or st == status)]

    def statuses(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for _, _, st in self.records:
            out[str(st)] = out.get(str(st), 0) + 1
        return out


def pct(values: list[float]) -> dict[str, float | int | None]:
    """n, p50, p99 and max in milliseconds."""
    if not values:
        return {"n": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    ms = np.asarray(values) * 1000
    return {"n": len(values), "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1), "max_ms": round(float(ms.max()), 1)}


def run_loopers(loopers: list[Looper], seconds: float) -> None:
    for lp in loopers:
        lp.start()
    time.sleep(seconds)
    for lp in loopers:
        lp._stop.set()
    for lp in loopers:
        lp.stop()


# ---------------------------------------------------------------- the media server
class MediaServer:
    """Serves `/file/<name>` from memory and `/drip/<k>` one byte per `drip_every` seconds (a
    `drip_length`-byte response that takes minutes). Logs (time, event, path): "get" when a request
    arrives, "done" when a file was sent, "closed" when the peer closed a drip, "last_byte" per drip.
    """

    def __init__(self, files: dict[str, bytes] | None = None, drip_every: float = 0.25,
                 drip_length: int = 1 << 20) -> None:
        self.files = files or {}
        self.events: list[tuple[float, str, str]] = []
        self.last_byte: dict[str, float] = {}
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                owner.events.append((time.monotonic(), "get", self.path))
                if self.path.startswith("/drip/"):
                    owner._drip(self, drip_every, drip_length)
                    return
                data = owner.files.get(self.path.split("?", 1)[0].rsplit("/", 1)[-1])
                if data is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                    owner.events.append((time.monotonic(), "done", self.path))
                except OSError:
                    owner.events.append((time.monotonic(), "closed", self.path))

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def _drip(self, h: http.server.BaseHTTPRequestHandler, every: float, length: int) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "image/png")
        h.send_header("Content-Length", str(length))
        h.end_headers()
        try:
            h.wfile.write(b"\x89PNG\r\n\x1a\n")  # a PNG signature, then the rest never quite arrives
            for _ in range(length):
                time.sleep(every)
                h.wfile.write(b"\0")
                h.wfile.flush()
                self.last_byte[h.path] = time.monotonic()
        except OSError:
            self.events.append((time.monotonic(), "closed", h.path))

    def gets(self, prefix: str = "") -> list[float]:
        return [t for t, kind, path in self.events if kind == "get" and path.startswith(prefix)]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# ---------------------------------------------------------------- raw-socket attackers
class RawConnections:
    """Raw connections driven by one selector thread: each gets `first` bytes at once, then `drip()`
    bytes every `every` seconds; the time the server closes each (EOF or reset, counted from that
    connection's own connect) is recorded, and the first bytes it answered (a 408 line, say). Stops
    `window` seconds after the last connect; then closes what is left.
    """

    def __init__(self, port: int, n: int, first: bytes = b"", drip: Callable[[int], bytes] | None = None,
                 every: float = 1.0, window: float = 30.0) -> None:
        self.socks: list[socket.socket] = []
        self.opened: list[float] = []
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            self.opened.append(time.monotonic())
            if first:
                s.sendall(first)
            s.setblocking(False)
            self.socks.append(s)
        self.start = time.monotonic()
        self.connect_s = self.start - self.opened[0] if self.opened else 0.0
        self.closed_at: list[float | None] = [None] * n
        self.answer: list[bytes] = [b""] * n
        self.drip, self.every, self.window = drip, every, window
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        for i, s in enumerate(self.socks):
            sel.register(s, selectors.EVENT_READ, i)
        tick, step = self.start + self.every, 0
        while time.monotonic() - self.start < self.window and any(c is None for c in self.closed_at):
            for key, _ in sel.select(timeout=max(0.0, min(0.05, tick - time.monotonic()))):
                self._read(sel, key.data)
            if self.drip is not None and time.monotonic() >= tick:
                tick, step = tick + self.every, step + 1
                for i, s in enumerate(self.socks):
                    if self.closed_at[i] is None:
                        try:
                            s.send(self.drip(step))
                        except OSError:
                            self._closed(sel, i)
        sel.close()
        for s in self.socks:
            s.close()

    def _read(self, sel: selectors.BaseSelector, i: int) -> None:
        try:
            data = self.socks[i].recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self.answer[i] = (self.answer[i] + data)[:200]
        else:
            self._closed(sel, i)

    def _closed(self, sel: selectors.BaseSelector, i: int) -> None:
        if self.closed_at[i] is None:
            self.closed_at[i] = time.monotonic() - self.opened[i]
            sel.unregister(self.socks[i])

    def join(self) -> None:
        self._thread.join(self.window + 30)

    def summary(self) -> dict[str, Any]:
        """How many the server closed within the window, and when (seconds after they connected)."""
        times = [t for t in self.closed_at if t is not None]
        codes: dict[str, int] = {}
        for a in self.answer:
            code = a.split(b" ", 2)[1].decode(errors="replace") if a.startswith(b"HTTP/") else "none"
            codes[code] = codes.get(code, 0) + 1
        return {"connections": len(self.socks), "connect_s": round(self.connect_s, 2), "closed_by_server": len(times),
                "held_to_window_end": len(self.socks) - len(times), "window_s": self.window,
                "closed_after_s_min": round(min(times), 2) if times else None,
                "closed_after_s_max": round(max(times), 2) if times else None, "answers": codes}


class StalledBodies:
    """`n` threads, each sending a request head that declares `declared` bytes, then `sent` of them as
    fast as the server reads, then nothing: when did the server close each, and what did it answer?
    Connections still open at `window` seconds are closed by the client (`closed_by_client_at`).
    """

    def __init__(self, port: int, n: int, head: bytes, sent: int, window: float) -> None:
        self.port, self.head, self.sent, self.window = port, head, sent, window
        self.start = time.monotonic()
        self.closed_at: list[float | None] = [None] * n
        self.sent_all_at: list[float | None] = [None] * n
        self.answer: list[bytes] = [b""] * n
        self.closed_by_client_at: float | None = None
        self._threads = [threading.Thread(target=self._one, args=(i,), daemon=True) for i in range(n)]
        for t in self._threads:
            t.start()

    def _one(self, i: int) -> None:
        end = self.start + self.window
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
            s.settimeout(max(0.1, end - time.monotonic()))
            try:
                s.sendall(self.head)
                chunk = b"x" * (1 << 20)
                left = self.sent
                while left > 0:
                    s.sendall(chunk[:left])
                    left -= min(left, len(chunk))
                self.sent_all_at[i] = time.monotonic() - self.start
                while time.monotonic() < end:
                    s.settimeout(max(0.05, end - time.monotonic()))
                    data = s.recv(65536)
                    if not data:
                        break
                    self.answer[i] = (self.answer[i] + data)[:200]
                else:
                    return
            except TimeoutError:
                return
            except OSError:
                with contextlib.suppress(OSError):  # the server answered and closed while we were sending
                    s.settimeout(0.5)
                    self.answer[i] = (self.answer[i] + s.recv(65536))[:200]
            self.closed_at[i] = time.monotonic() - self.start

    def join(self) -> None:
        for t in self._threads:
            t.join(self.window + 30)
        self.closed_by_client_at = time.monotonic()

    def summary(self) -> dict[str, Any]:
        times = [t for t in self.closed_at if t is not None]
        codes: dict[str, int] = {}
        for a in self.answer:
            code = a.split(b" ", 2)[1].decode(errors="replace") if a.startswith(b"HTTP/") else "none"
            codes[code] = codes.get(code, 0) + 1
        return {"connections": len(self.closed_at), "sent_all": sum(t is not None for t in self.sent_all_at),
                "closed_by_server": len(times), "held_to_window_end": len(self.closed_at) - len(times),
                "window_s": self.window, "closed_after_s_max": round(max(times), 2) if times else None,
                "answers": codes}


def _attack(port: int, method: str, path: str, body: bytes | None, n: int, seconds: float, out: Any) -> None:
    """Child process: `n` looping clients for `seconds`, then their status counts on `out`."""
    loopers = [Looper(port, method, path, body, timeout=60).start() for _ in range(n)]
    out.put("started")
    time.sleep(seconds)
    for lp in loopers:
        lp.stop()
    statuses: dict[str, int] = {}
    for lp in loopers:
        for k, v in lp.statuses().items():
            statuses[k] = statuses.get(k, 0) + v
    out.put(statuses)


class AttackProcess:
    """Looping attackers in a process of their own, so their client-side work shares no interpreter
    (no GIL) with the probe clients measuring the server.
    """

    def __init__(self, port: int, method: str, path: str, body: bytes | None, n: int, seconds: float) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.seconds = seconds
        self.out = ctx.Queue()
        self.proc = ctx.Process(target=_attack, args=(port, method, path, body, n, seconds, self.out), daemon=True)
        self.proc.start()
        assert self.out.get(timeout=120) == "started"

    def join(self) -> dict[str, int]:
        statuses: dict[str, int] = self.out.get(timeout=self.seconds + 180)
        self.proc.join(30)
        return statuses
