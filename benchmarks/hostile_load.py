"""Hostile load against `q3vl serve` on loopback: each scenario of issue 24 as a bounded load test.

Every scenario starts its own server (tiny bundles), runs attackers next to a probe client that
measures normal requests' latency, samples the server's RSS, prints its acceptance bar and
met/missed, and stops. Results go to benchmarks/results/hostile-load.{json,md} under a column
label, so the same script run on two checkouts gives a before/after table:

    q3vl demo --workdir work/hostile                    # the tiny bundles (once)
    PYTHONPATH=<old checkout>/src python benchmarks/hostile_load.py --bundles work/hostile/bundles --label before
    PYTHONPATH=src python benchmarks/hostile_load.py --bundles work/hostile/bundles --label after
    python benchmarks/hostile_load.py ... --only idle-connections,slowloris   # a subset

The server under test is the q3vl that PYTHONPATH selects (`q3vl serve` runs as `python -m q3vl`);
this script imports nothing from q3vl. The HTTP-layer limits are passed explicitly (at their
defaults) when that q3vl has the flags; the bars quote them. Needs about 7 GB of RAM free for the
"before" memory bursts; every client and server is on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_tools import (
    ROOT,
    AttackProcess,
    Looper,
    MediaServer,
    RawConnections,
    RssSampler,
    ServerProcess,
    StalledBodies,
    call,
    pct,
    run_loopers,
    status_counts,
    supports,
)

MB = 1024**2
# the HTTP-layer limits (q3vl serve's defaults), passed explicitly when the server has the flags
HTTP = {"--header-timeout": 10.0, "--keep-alive-timeout": 5.0, "--body-timeout": 30.0, "--body-min-rate": 1024,
        "--max-connections": 1024, "--max-pending-body-bytes": 256 * MB}
RATE_WINDOW = 5.0  # seconds over which --body-min-rate is measured
TEXT = json.dumps({"input": "a short probe sentence about a cat sitting on a mat"}).encode()


@dataclass
class Ctx:
    """What every scenario needs: bundles, a work directory, whether the server has the new flags."""

    bundles: Path
    work: Path
    label: str
    media_budget_mb: float
    new_flags: bool
    server_args: list[str] = field(default_factory=list)  # --server-arg: every server gets them
    logs: list[Path] = field(default_factory=list)

    def server(self, extra: list[str] | None = None, nofile: int | None = None) -> ServerProcess:
        limits = [x for k, v in HTTP.items() for x in (k, str(v))] if self.new_flags else []
        log = self.work / f"serve-{self.label}-{len(self.logs)}.log"
        self.logs.append(log)
        srv = ServerProcess(["--embedding", str(self.bundles / "tiny-embedding"), "--reranker",
                             str(self.bundles / "tiny-reranker"), *limits, *self.server_args, *(extra or [])], log,
                             nofile)
        srv.wait_ready(headers={"authorization": "Bearer k"} if extra and "--api-key" in extra else None)
        return srv

    def file(self, name: str, build: Callable[[], bytes]) -> bytes:
        path = self.work / name
        if not path.exists():
            path.write_bytes(build())
        return path.read_bytes()


# ---------------------------------------------------------------- inputs
def noise_png(width: int, height: int) -> bytes:
    """Incompressible pixels: a PNG about 3 bytes per pixel."""
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def flat_image(width: int, height: int, fmt: str, **save: Any) -> bytes:
    """A huge image that compresses to almost nothing (a few hundred KB)."""
    row = (np.arange(width, dtype=np.uint32) * 255 // max(1, width - 1)).astype(np.uint8)
    img = Image.fromarray(np.broadcast_to(row[None, :, None], (height, width, 3)).copy())
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def data_uri(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()


def image_body(url: str) -> bytes:
    return json.dumps({"inputs": [{"content": [{"type": "image_url", "image_url": {"url": url}}]}]}).encode()


def png_12k(ctx: Ctx) -> bytes:
    return ctx.file("png-12000.png", lambda: flat_image(12000, 12000, "PNG", compress_level=9))


# ---------------------------------------------------------------- helpers
def burst(port: int, bodies: list[bytes], path: str, timeout: float) -> tuple[list[int], float]:
    """Every body at once, one thread each: (statuses, seconds until the last answer)."""
    out: list[int] = [0] * len(bodies)

    def one(i: int) -> None:
        try:
            out[i] = call(port, "POST", path, bodies[i], timeout=timeout)[0]
        except OSError:
            out[i] = 0

    start = time.monotonic()
    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 10)
    return out, time.monotonic() - start


def counts(statuses: list[int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in statuses:
        out[str(s)] = out.get(str(s), 0) + 1
    return out


def settle(srv: ServerProcess, seconds: float = 2.0) -> float:
    """The server's idle RSS after a short quiet spell."""
    time.sleep(seconds)
    return srv.rss()


def memory_burst(ctx: Ctx, srv: ServerProcess, bodies: list[bytes], path: str) -> dict[str, Any]:
    """A burst's peak RSS growth, statuses, and how far RSS came back within 30 s after it."""
    idle = settle(srv)
    rss = RssSampler(srv.proc.pid)
    statuses, took = burst(srv.port, bodies, path, timeout=240)
    end = time.monotonic()
    time.sleep(30)
    rss.stop()
    peak = rss.peak() - idle
    back = rss.lowest(end, end + 30) - idle
    c = counts(statuses)
    met = (peak <= ctx.media_budget_mb + 500 and c.get("429", 0) > 0 and back <= 300
           and not any(k.startswith("5") or k == "0" for k in c))
    return {"figures": {"idle_rss_mb": round(idle), "peak_growth_mb": round(peak), "statuses": c,
                        "burst_s": round(took, 1), "lowest_growth_within_30s_after_mb": round(back)}, "met": met}


# ---------------------------------------------------------------- scenarios: memory and work
def url_burst(ctx: Ctx) -> dict[str, Any]:
    """16 concurrent requests, each naming 8 URLs of a 30 MB PNG on a loopback media server."""
    media = MediaServer({"big.png": ctx.file("noise-30mb.png", lambda: noise_png(3200, 3200))})
    srv = ctx.server(["--allow-private-urls"])
    try:
        body = lambda r: json.dumps({"inputs": [{"content": [{"type": "image_url", "image_url": {  # noqa: E731
            "url": f"{media.base}/file/big.png?r={r}&k={k}"}}]} for k in range(8)]}).encode()
        out = memory_burst(ctx, srv, [body(r) for r in range(16)], "/v2/embed")
        out["figures"]["media_gets"] = len(media.gets())
        return out
    finally:
        srv.stop()
        media.close()


def data_uri_burst(ctx: Ctx) -> dict[str, Any]:
    """32 concurrent requests, each a 16 MB body of four 3 MB data-URI PNGs (a string may hold 4 Mi characters)."""
    uri = data_uri(ctx.file("noise-3mb.png", lambda: noise_png(1000, 1000)))
    srv = ctx.server()
    try:
        return memory_burst(ctx, srv, [json.dumps({"images": [uri] * 4}).encode()] * 32, "/v2/embed")
    finally:
        srv.stop()


def big_webp(ctx: Ctx) -> dict[str, Any]:
    """One request with a 16383x10000 WEBP of a few hundred KB (under the 178-megapixel cap)."""
    webp = ctx.file("webp-16383x10000.webp", lambda: flat_image(16383, 10000, "WEBP", quality=10))
    srv = ctx.server()
    try:
        idle = settle(srv)
        rss = RssSampler(srv.proc.pid)
        t0 = time.monotonic()
        status, _ = call(srv.port, "POST", "/v2/embed", json.dumps({"images": [data_uri(webp, "webp")]}).encode(),
                         timeout=240)
        took = time.monotonic() - t0
        time.sleep(5)
        rss.stop()
        return {"figures": {"file_kb": len(webp) // 1024, "status": status, "seconds": round(took, 2),
                            "peak_growth_mb": round(rss.peak() - idle),
                            "growth_5s_after_mb": round(rss.samples[-1][1] - idle)}, "met": None}
    finally:
        srv.stop()


def heavy_png(ctx: Ctx) -> dict[str, Any]:
    """63 text clients for 20 s alone, then with 2 clients looping a 12000x12000 PNG."""
    png = image_body(data_uri(png_12k(ctx)))
    srv = ctx.server()
    try:
        alone = [Looper(srv.port, "POST", "/v1/embeddings", TEXT) for _ in range(63)]
        run_loopers(alone, 20)
        texts = [Looper(srv.port, "POST", "/v1/embeddings", TEXT) for _ in range(63)]
        heavy = [Looper(srv.port, "POST", "/v2/embed", png, timeout=120) for _ in range(2)]
        run_loopers(texts + heavy, 20)
    finally:
        srv.stop()
    a = pct([x for lp in alone for x in lp.latencies()])
    b = pct([x for lp in texts for x in lp.latencies()])
    p50, p99 = ratio(b, a, "p50_ms"), ratio(b, a, "p99_ms")
    png_statuses = counts([st for lp in heavy for _, _, st in lp.records])
    return {"figures": {"text_alone": a, "text_with_png": b, "rps_alone": round(a["n"] / 20, 1),
                        "rps_with_png": round(b["n"] / 20, 1), "p50_ratio": p50, "p99_ratio": p99,
                        "png_statuses": png_statuses},
            "met": p50 is not None and p99 is not None and p50 <= 3 and p99 <= 5}


def ratio(a: dict[str, Any], b: dict[str, Any], key: str) -> float | None:
    return round(a[key] / b[key], 2) if a.get(key) and b.get(key) else None


def probes(port: int) -> tuple[Looper, Looper]:
    return (Looper(port, "GET", "/health", pause=0.01, timeout=30),
            Looper(port, "POST", "/v1/embeddings", TEXT, pause=0.01, timeout=60))


def looping_attack(ctx: Ctx, body: bytes, path: str) -> dict[str, Any]:
    """Probes alone for 10 s, then next to 2 clients looping `body` for 20 s (in a process of their own)."""
    srv = ctx.server()
    try:
        base = probes(srv.port)
        run_loopers(list(base), 10)
        attack = AttackProcess(srv.port, "POST", path, body, 2, 21)
        under = probes(srv.port)
        run_loopers(list(under), 20)
        attack_statuses = attack.join()
    finally:
        srv.stop()
    health, text = pct(under[0].latencies()), pct(under[1].latencies())
    text_base = pct(base[1].latencies())
    p50 = ratio(text, text_base, "p50_ms")
    return {"figures": {"body_kb": len(body) // 1024, "health_alone": pct(base[0].latencies()),
                        "health_under_attack": health, "text_alone": text_base, "text_under_attack": text,
                        "text_p50_ratio": p50, "attack_statuses": attack_statuses},
            "met": health["p99_ms"] is not None and health["p99_ms"] <= 50 and p50 is not None and p50 <= 2}


def invalid_rerank(ctx: Ctx) -> dict[str, Any]:
    """2 clients looping a 200 KB rerank body whose 100,000 documents are all invalid (numbers)."""
    body = b'{"query": "q", "documents": [' + b",".join([b"1"] * 100_000) + b"]}"
    return looping_attack(ctx, body, "/v1/rerank")


def unknown_keys(ctx: Ctx) -> dict[str, Any]:
    """2 clients looping a 12 MB embeddings body with 1,000,000 unknown keys."""
    body = ('{"input": "x", ' + ",".join(f'"k{i}": 0' for i in range(1_000_000)) + "}").encode()
    return looping_attack(ctx, body, "/v1/embeddings")


# ---------------------------------------------------------------- scenarios: slow media and disconnects
def drip_urls(ctx: Ctx) -> dict[str, Any]:
    """45 requests with one drip-fed URL each next to a text probe; then a 3-URL request whose client
    leaves after 2 s: does the server fetch anything more than 1 s later?
    """
    media = MediaServer(drip_every=0.25)
    srv = ctx.server(["--allow-private-urls"])
    try:
        base = Looper(srv.port, "POST", "/v1/embeddings", TEXT, pause=0.01)
        run_loopers([base], 10)
        text = Looper(srv.port, "POST", "/v1/embeddings", TEXT, pause=0.01).start()
        bodies = [image_body(f"{media.base}/drip/one-{k}") for k in range(45)]
        holder: dict[str, Any] = {}
        t = threading.Thread(target=lambda: holder.update(r=burst(srv.port, bodies, "/v2/embed", 90)), daemon=True)
        t.start()
        time.sleep(25)
        text.stop()
        t.join(120)
        left = disconnect_check(srv.port, media)
    finally:
        srv.stop()
        media.close()
    a, b = pct(base.latencies()), pct(text.latencies())
    p99 = ratio(b, a, "p99_ms")
    ok = p99 is not None and p99 <= 2 and left["later_gets"] == 0 and (left["last_byte_after_s"] or 0) <= 1.25
    return {"figures": {"text_alone": a, "text_with_drips": b, "text_p99_ratio": p99,
                        "drip_statuses": counts(holder.get("r", ([], 0))[0]), **left}, "met": ok}


def disconnect_check(port: int, media: MediaServer) -> dict[str, Any]:
    """A request naming 3 drip URLs, its socket closed 2 s after sending; watch the media log 35 s."""
    import socket

    body = json.dumps({"inputs": [{"content": [{"type": "image_url", "image_url": {
        "url": f"{media.base}/drip/gone-{k}"}}]} for k in range(3)]}).encode()
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /v2/embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
              + str(len(body)).encode() + b"\r\n\r\n" + body)
    time.sleep(2)
    s.close()
    gone = time.monotonic()
    time.sleep(35)
    gets = [t - gone for t in media.gets("/drip/gone-")]
    last = [t - gone for p, t in media.last_byte.items() if p.startswith("/drip/gone-")]
    return {"gets_before_disconnect": sum(g <= 0 for g in gets), "later_gets": sum(g > 1 for g in gets),
            "later_get_s": [round(g, 1) for g in gets if g > 1],
            "last_byte_after_s": round(max(last), 2) if last else None}


# ---------------------------------------------------------------- scenarios: the HTTP layer
def raw_attack(ctx: Ctx, n: int, first: bytes, drip: Callable[[int], bytes] | None, every: float,
               window: float, bar_s: float, nofile: int | None = None) -> dict[str, Any]:
    """`n` raw connections against a server with probes running; met when the server closed every one
    within `bar_s` seconds (the configured timeout plus one second).
    """
    srv = ctx.server(nofile=nofile)
    try:
        health, text = probes(srv.port)
        health.start()
        text.start()
        raw = RawConnections(srv.port, n, first, drip, every, window)
        raw.join()
        health.stop()
        text.stop()
    finally:
        srv.stop()
    s = raw.summary()
    met = s["held_to_window_end"] == 0 and (s["closed_after_s_max"] or 0) <= bar_s
    return {"figures": {**s, "health": pct(health.latencies()), "text": pct(text.latencies()),
                        "text_errors": sum(st != 200 for _, _, st in text.records)}, "met": met}


def idle_connections(ctx: Ctx) -> dict[str, Any]:
    """500 connections that never send a byte."""
    return raw_attack(ctx, 500, b"", None, 1.0, HTTP["--header-timeout"] + 8, HTTP["--header-timeout"] + 1)


def slowloris(ctx: Ctx) -> dict[str, Any]:
    """50 connections sending a request head one byte per second, forever."""
    pad = b"X-Pad: y\r\n"
    return raw_attack(ctx, 50, b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\n", lambda k: pad[k % 10:k % 10 + 1], 1.0,
                      HTTP["--header-timeout"] + 8, HTTP["--header-timeout"] + 1)


BODY_HEAD = (b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")


def never_sent_body(ctx: Ctx) -> dict[str, Any]:
    """20 requests declaring a 20 MB body and sending none of it."""
    return raw_attack(ctx, 20, BODY_HEAD + b"Content-Length: 20000000\r\n\r\n", None, 1.0, 15, RATE_WINDOW + 1)


def endless_chunked(ctx: Ctx) -> dict[str, Any]:
    """20 chunked bodies sending 8 bytes every 0.5 s, never ending."""
    head = BODY_HEAD + b"Transfer-Encoding: chunked\r\n\r\n8\r\n{\"input\"\r\n"
    return raw_attack(ctx, 20, head, lambda k: b"8\r\n" + b"aaaaaaaa" + b"\r\n", 0.5, 15, RATE_WINDOW + 1)


def idle_fd_limit(ctx: Ctx) -> dict[str, Any]:
    """Server limited to 256 open files; 276 idle connections; can a normal client still get answers?"""
    srv = ctx.server(nofile=256)
    try:
        raw = RawConnections(srv.port, 276, b"", None, 1.0, 20)
        time.sleep(1)
        text = Looper(srv.port, "POST", "/v1/embeddings", TEXT, pause=0.05, timeout=5)
        run_loopers([text], 10)
        raw.join()
    finally:
        srv.stop()
    ok = [s for _, s, st in text.records if st == 200]
    return {"figures": {"text": pct(ok), "text_statuses": text.statuses(), **raw.summary()},
            "met": bool(text.records) and len(ok) == len(text.records)}


def stalled_bodies(ctx: Ctx) -> dict[str, Any]:
    """50 connections each sending 19 MB of a declared 20 MB body, then stalling; the client closes
    the ones still open after 45 s. Were the partial bodies bounded, closed in time, never parsed?
    """
    srv = ctx.server()
    try:
        idle = settle(srv)
        before = status_counts(srv.metrics())
        rss = RssSampler(srv.proc.pid)
        head = BODY_HEAD + b"Content-Length: 20000000\r\n\r\n" + b'{"input": "'
        stall = StalledBodies(srv.port, 50, head, 19_000_000 - 11, 45)
        stall.join()
        time.sleep(5)
        rss.stop()
        after = status_counts(srv.metrics())
    finally:
        srv.stop()
    new = {k: int(v - before.get(k, 0)) for k, v in after.items() if v - before.get(k, 0) > 0}
    s = stall.summary()
    late = [c - a for c, a in zip(stall.closed_at, stall.sent_all_at) if c is not None and a is not None]
    peak = rss.peak() - idle
    bound = HTTP["--max-pending-body-bytes"] / MB
    met = (s["held_to_window_end"] == 0 and all(x <= 2 * RATE_WINDOW + 1 for x in late) and peak <= bound + 128
           and not new.get("400") and not new.get("422"))
    return {"figures": {**s, "closed_after_stall_s_max": round(max(late), 2) if late else None,
                        "peak_growth_mb": round(peak), "new_responses_by_status": new}, "met": met}


# ---------------------------------------------------------------- scenarios: lifecycle
def sigterm(ctx: Ctx) -> dict[str, Any]:
    """SIGTERM with 8 text clients and 8 12000x12000-PNG clients in flight (--drain-timeout 10): the
    queued PNG work (several seconds each) outlasts the drain deadline.
    """
    png = image_body(data_uri(png_12k(ctx)))
    srv = ctx.server(["--drain-timeout", "10"])
    loopers = [Looper(srv.port, "POST", "/v1/embeddings", TEXT, timeout=60) for _ in range(8)]
    loopers += [Looper(srv.port, "POST", "/v2/embed", png, timeout=60) for _ in range(8)]
    for lp in loopers:
        lp.start()
    time.sleep(6)
    code, took = srv.stop(signal.SIGTERM, timeout=60)
    for lp in loopers:
        lp.stop()
    statuses = counts([st for lp in loopers for _, _, st in lp.records])
    tracebacks = srv.log_path.read_text(errors="replace").count("Traceback")
    return {"figures": {"exit_code": code, "exit_after_s": round(took, 1), "statuses": statuses,
                        "tracebacks_in_log": tracebacks},
            "met": took <= 15 and "500" not in statuses and tracebacks == 0}


def ready_without_header(ctx: Ctx) -> dict[str, Any]:
    """`--api-key k`: does a readiness probe without the header pass once the server is ready?"""
    srv = ctx.server(["--api-key", "k"])
    try:
        status = call(srv.port, "GET", "/ready")[0]
        health = call(srv.port, "GET", "/health")[0]
        models = call(srv.port, "GET", "/v1/models")[0]
    finally:
        srv.stop()
    return {"figures": {"ready_status": status, "health_status": health, "models_status_no_key": models},
            "met": status == 200 and models == 401}


SCENARIOS: dict[str, tuple[Callable[[Ctx], dict[str, Any]], str]] = {
    "url-burst": (url_burst, "peak RSS growth <= media budget + 500 MB, excess requests 429, RSS within 300 MB "
                             "of idle within 30 s after (part 2)"),
    "data-uri-burst": (data_uri_burst, "as url-burst, for 32 concurrent 16 MB data-URI requests (part 2)"),
    "big-webp": (big_webp, "figures only: a 345 KB-class 16383x10000 WEBP's cost (part 2 sizes the pixel budget)"),
    "heavy-png": (heavy_png, "text p50 <= 3x and p99 <= 5x the text-only run's (part 2)"),
    "invalid-rerank": (invalid_rerank, "/health p99 <= 50 ms and text p50 <= 2x baseline"),
    "unknown-keys": (unknown_keys, "/health p99 <= 50 ms and text p50 <= 2x baseline (the 12 MB body must not stall)"),
    "drip-urls": (drip_urls, "text p99 <= 2x baseline; no fetch more than 1 s after a client disconnects (part 2)"),
    "idle-connections": (idle_connections, "all 500 closed within --header-timeout (10 s) + 1 s"),
    "slowloris": (slowloris, "all closed within --header-timeout (10 s) + 1 s"),
    "never-sent-body": (never_sent_body, "all closed (408) within the 5 s --body-min-rate window + 1 s"),
    "endless-chunked": (endless_chunked, "all closed (408) within the 5 s --body-min-rate window + 1 s"),
    "idle-fd-limit": (idle_fd_limit, "with ulimit -n 256 and 276 idle sockets, every probe request gets a 200 "
                                     "within 5 s"),
    "stalled-bodies": (stalled_bodies, "peak RSS growth <= --max-pending-body-bytes (256 MB) + 128 MB, each closed "
                                       "within two 5 s --body-min-rate windows + 1 s of its stall, no partial body "
                                       "parsed (no 400/422)"),
    "sigterm": (sigterm, "exit within --drain-timeout (10 s) + 5 s, no 500, no traceback (part 2); 0 = refused "
                         "after the exit"),
    "ready-no-header": (ready_without_header, "a header-less /ready gets 200 when ready (other routes still 401)"),
}


# ---------------------------------------------------------------- the run and the report
def code_under_test() -> dict[str, Any]:
    """Where the q3vl that PYTHONPATH selects lives, and its commit."""
    out = subprocess.run([sys.executable, "-c", "import q3vl; print(q3vl.__file__)"], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    src = Path(out.stdout.strip()).parent
    head = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--", "."], capture_output=True,
                           text=True)
    return {"package": str(src), "commit": head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")}


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "ram_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3)}


def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and not all(x.isdigit() or x == "none" for x in v):  # status counts stay one cell
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def report(result: dict[str, Any]) -> str:
    labels = list(result["runs"])
    lines = ["# q3vl serve under hostile load", "",
             f"{result['machine']['cpu']}, {result['machine']['cores']} cores, {result['machine']['ram_gb']} GB, "
             "a machine shared with other work (figures are preliminary; loopback only, tiny bundles).", ""]
    for label in labels:
        run = result["runs"][label]
        extra = f", server flags `{' '.join(run['server_args'])}`" if run.get("server_args") else ""
        lines.append(f"- **{label}**: q3vl {run['code']['commit']}{extra}, {run['when']}, load average {run['load']}")
    for name, (_, bar) in SCENARIOS.items():
        cols = {lb: result["runs"][lb]["scenarios"].get(name) for lb in labels}
        if not any(cols.values()):
            continue
        lines += ["", f"## {name}", "", f"{SCENARIOS[name][0].__doc__.split(chr(10))[0]}", "", f"Bar: {bar}.", "",
                  "| figure | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
        keys = list(dict.fromkeys(k for c in cols.values() if c for k in flat(c["figures"])))
        for k in keys:
            lines.append(f"| {k} | " + " | ".join(cell(flat(c["figures"]).get(k)) if c else "" for c in cols.values())
                         + " |")
        lines.append("| **bar** | " + " | ".join(verdict(c) for c in cols.values()) + " |")
    return "\n".join(lines) + "\n"


def cell(v: Any) -> str:
    return "" if v is None else json.dumps(v) if isinstance(v, (dict, list)) else str(v)


def verdict(c: dict[str, Any] | None) -> str:
    if not c:
        return ""
    return {True: "met", False: "**missed**", None: "n/a"}[c["met"]]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundles", type=Path, required=True, help="directory with tiny-embedding and tiny-reranker")
    p.add_argument("--label", default="after", help="the results column (e.g. before, after)")
    p.add_argument("--only", help="comma-separated scenarios: " + ", ".join(SCENARIOS))
    p.add_argument("--workdir", type=Path, default=ROOT / "work" / "hostile-load")
    p.add_argument("--media-budget-mb", type=float, default=2048.0,
                   help="the server's in-flight media budget the memory bars use (part 2's flag)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "hostile-load")
    p.add_argument("--server-arg", action="append", default=[], metavar="FLAG",
                   help="one more `q3vl serve` argument for every server (repeatable), "
                        "e.g. --server-arg=--refusal-rate=0")
    args = p.parse_args()
    names = args.only.split(",") if args.only else list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenarios {unknown}; known: {list(SCENARIOS)}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(args.bundles.resolve(), args.workdir, args.label, args.media_budget_mb, supports("--header-timeout"),
              args.server_arg)
    path = Path(f"{args.out}.json")
    result = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    result["machine"] = machine()
    run = result["runs"].setdefault(args.label, {"scenarios": {}})
    run.update(code=code_under_test(), server_args=args.server_arg, when=time.strftime("%Y-%m-%d %H:%M"),
               load=[round(x, 2) for x in os.getloadavg()])
    for name in names:
        fn, bar = SCENARIOS[name]
        print(f"== {name}: {fn.__doc__.split(chr(10))[0]}\n   bar: {bar}", flush=True)
        t0 = time.monotonic()
        try:
            res = fn(ctx)
        except Exception as e:  # one broken scenario must not cost the others (the run holds a shared lock)
            res = {"figures": {"error": f"{type(e).__name__}: {e}"[:300]}, "met": False}
        res["seconds"] = round(time.monotonic() - t0, 1)
        run["scenarios"][name] = res
        print(f"   {json.dumps(res['figures'])}\n   -> {verdict(res).strip('*')} ({res['seconds']} s)", flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
        Path(f"{args.out}.md").write_text(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
