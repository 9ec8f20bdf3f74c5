"""A real `q3vl serve` subprocess on a free loopback port, for the server tests (not a test module)."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`q3vl serve ARGS --port <free>`, logging to a file; `stop()` sends SIGTERM and waits."""

    def __init__(self, args: list[str], log_dir: Path, env: dict[str, str] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        self.headers = headers or {}
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"serve-{self.port}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen([sys.executable, "-m", "q3vl", "serve", *args, "--port", str(self.port)],
                                     cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})})

    def wait_ready(self, timeout: float = 180.0) -> list[tuple[int, Any]]:
        """Poll /ready until 200; the (status, body) answers seen on the way (connection refused is not one)."""
        seen: list[tuple[int, Any]] = []
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                status, _, body = request(self.base, "GET", "/ready", headers=self.headers, timeout=5)
                seen.append((status, body))
                if status == 200:
                    return seen
            except OSError:
                pass
            time.sleep(0.01)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-5000:]


def request(base: str, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
            raw: bytes | None = None, timeout: float = 120.0) -> tuple[int, dict[str, str], Any]:
    """(status, headers, parsed JSON or text) for one request to the server; never raises on 4xx/5xx."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    hdrs = {"content-type": "application/json", **(headers or {})}
    req = urllib.request.Request(base + path, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, rh, payload = resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        status, rh, payload = e.code, dict(e.headers), e.read()
    try:
        return status, {k.lower(): v for k, v in rh.items()}, json.loads(payload)
    except ValueError:
        return status, {k.lower(): v for k, v in rh.items()}, payload.decode(errors="replace")


def data_uri(image: Any, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus text exposition (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            head, _, value = line.rpartition(" ")
            got = head[len(name):].strip("{}")
            if all(part in got.split(",") for part in want.split(",") if part):
                total += float(value)
    return total
