"""Load test of `q3vl serve` on loopback: throughput and p50/p99 latency at 1, 8 and 32 concurrent
clients, single-text and mixed-item requests, cross-request batching on vs off, against in-process
`Embedder.process()` of the same requests.

    python benchmarks/serve_load.py --shape small --variants fp32,int8      # makes bundles under --workdir
    python benchmarks/serve_load.py --bundle B --backend cuda --out R      # an existing bundle, on a GPU

"off" is the same server with `--max-batch-requests 1`: every request's items run as their own
micro-batches, so nothing of two requests shares a graph call. Each client is a thread with one
keep-alive connection sending its requests back to back; every level has a request count and a time
cap. Results go to benchmarks/results/serve-<shape>.{json,md} with the load average seen, since
this machine is shared.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from q3vl.bench.workloads import words  # noqa: E402
from q3vl.testing.inputs import gradient_image  # noqa: E402

LEVELS = (1, 8, 32)


# ---------------------------------------------------------------- workloads
def data_uri(image: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def workload(name: str, k: int) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    """Request k of a workload: (path, body, the runtime items it stands for)."""
    if name == "single-text":
        text = words(24, k)
        return "/v1/embeddings", {"input": text, "encoding_format": "base64"}, [{"text": text}]
    img = [gradient_image(160, 160, k), gradient_image(128, 192, k + 1)]
    texts = [words(16, k), words(120, k), words(8, k)]
    inputs = [{"content": [{"type": "text", "text": texts[0]}]},
              {"content": [{"type": "text", "text": texts[1]}]},
              {"content": [{"type": "image_url", "image_url": {"url": data_uri(img[0])}}]},
              {"content": [{"type": "text", "text": texts[2]},
                           {"type": "image_url", "image_url": {"url": data_uri(img[1])}}]}]
    items = [{"text": texts[0]}, {"text": texts[1]}, {"image": img[0]}, {"text": texts[2], "image": img[1]}]
    return "/v2/embed", {"inputs": inputs, "embedding_types": ["base64"], "input_type": "search_document"}, items


# ---------------------------------------------------------------- bundles
def q3vl(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "q3vl", *args], check=True, cwd=ROOT)


def bundles(workdir: Path, shape: str, variants: list[str]) -> dict[str, Path]:
    """The fp32 bundle (and its int8-weight version) of a random-weight checkpoint, made if missing."""
    ckpt, fp32 = workdir / f"{shape}-embedding", workdir / f"{shape}-embedding-fp32"
    if not fp32.exists():
        if not ckpt.exists():
            q3vl("testing", "make-checkpoint", str(ckpt), "--shape", shape, "--task", "embedding")
        q3vl("export", str(ckpt), "-o", str(fp32))
    out = {"fp32": fp32}
    if "int8" in variants:
        out["int8"] = workdir / f"{shape}-embedding-int8"
        if not out["int8"].exists():
            q3vl("quantize", str(fp32), "--weights", "int8", "-o", str(out["int8"]))
    return {v: out[v] for v in variants}


# ---------------------------------------------------------------- the server
class Server:
    """`q3vl serve` for one bundle on a free loopback port, ready when constructed."""

    def __init__(self, bundle: Path, extra: list[str], log: Path, backend: str = "cpu") -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log = open(log, "ab")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen([sys.executable, "-m", "q3vl", "serve", "--embedding", str(bundle),
                                      "--embedding-name", "bench", "--port", str(self.port),
                                      "--backend", backend, *extra],
                                     cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        end = time.monotonic() + 600
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {log}")
            try:
                if call(self.connect(), "GET", "/ready", None)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError("server not ready")

    def connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)
        self.log.close()


def call(conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
    conn.request(method, path, body=body, headers={"content-type": "application/json"})
    resp = conn.getresponse()
    return resp.status, resp.read()


def run_level(server: Server, bodies: list[tuple[str, bytes]], clients: int, per_client: int,
              cap_s: float) -> dict[str, Any]:
    """`clients` threads, each sending `per_client` requests back to back (stopping at `cap_s`)."""
    lat: list[float] = []
    errors: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client(c: int) -> None:
        conn = server.connect()
        barrier.wait()
        for r in range(per_client):
            if time.monotonic() > stop_at[0]:
                break
            path, body = bodies[(c * per_client + r) % len(bodies)]
            t0 = time.monotonic()
            status, _ = call(conn, "POST", path, body)
            took = time.monotonic() - t0
            with lock:
                (lat if status == 200 else errors).append(took if status == 200 else status)
        conn.close()

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    stop_at[0] = time.monotonic() + cap_s
    barrier.wait()
    start = time.monotonic()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    return {"clients": clients, "requests": len(lat), "errors": len(errors), "wall_s": round(wall, 3), "lat": lat}


def scrape(server: Server) -> dict[str, float]:
    """Sums and counts of the server's batch histograms (for mean batch size, requests, graph time)."""
    _, text = call(server.connect(), "GET", "/metrics", None)
    out: dict[str, float] = {}
    for line in text.decode().splitlines():
        for name in ("q3vl_batch_size", "q3vl_batch_requests", "q3vl_inference_duration_seconds"):
            for kind in ("_sum", "_count"):
                if line.startswith(name + kind + "{"):
                    out[name + kind] = out.get(name + kind, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def batching(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Mean items and requests per micro-batch, and mean graph time per micro-batch, between two scrapes."""
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    n = d.get("q3vl_batch_size_count", 0.0) or 1.0
    return {"batches": int(d.get("q3vl_batch_size_count", 0)),
            "items_per_batch": round(d["q3vl_batch_size_sum"] / n, 2),
            "requests_per_batch": round(d["q3vl_batch_requests_sum"] / n, 2),
            "graph_ms_per_batch": round(1000 * d["q3vl_inference_duration_seconds_sum"] / n, 2)}


def stats(lat: list[float]) -> dict[str, float]:
    ms = np.asarray(lat) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "mean_ms": round(float(ms.mean()), 2)}


def in_process(bundle: Path, name: str, n: int, backend: str = "cpu") -> list[float]:
    """`process()` of the same requests, one after another in this process: the latency baseline."""
    from q3vl.runtime import Embedder

    with Embedder(bundle, batch_size=32, max_batch_tokens=16384, backend=backend) as emb:
        reqs = [workload(name, k)[2] for k in range(n + 3)]
        for items in reqs[:3]:
            emb.process(items)
        lat = []
        for items in reqs[3:]:
            t0 = time.monotonic()
            emb.process(items)
            lat.append(time.monotonic() - t0)
    return lat


def pooled(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One level over all rounds: latencies pooled, req/s the median of the rounds', batch means averaged."""
    lat = [x for p in parts for x in p["lat"]]
    mean = {k: round(float(np.mean([p[k] for p in parts])), 2)
            for k in ("items_per_batch", "requests_per_batch", "graph_ms_per_batch")}
    return {"clients": parts[0]["clients"], "requests": len(lat), "errors": sum(p["errors"] for p in parts),
            **stats(lat), "rps": round(float(np.median([p["requests"] / p["wall_s"] for p in parts])), 2),
            "rps_rounds": [round(p["requests"] / p["wall_s"], 2) for p in parts], **mean}


# ---------------------------------------------------------------- the run
PLAN = {"single-text": {1: 40, 8: 20, 32: 10}, "mixed": {1: 12, 8: 4, 32: 3}}  # requests per client
MODES = {"on": [], "off": ["--max-batch-requests", "1"]}


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    out = {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
           "onnxruntime": __import__("onnxruntime").__version__}
    try:  # the GPU, where there is one (nvidia-smi); the report names it
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10).stdout.strip().splitlines()
        out["gpu"] = f", {gpu[0]}" if gpu else ""
    except (OSError, subprocess.TimeoutExpired):
        pass
    return out


def measure(args: argparse.Namespace, variant: str, bundle: Path, log: Path) -> tuple[list[dict], list[dict]]:
    """`args.rounds` rounds, on and off alternating first, so a load change on this shared machine hits both."""
    base: dict[str, list[float]] = {name: [] for name in args.workloads}
    raw: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for rnd in range(args.rounds):
        for name in args.workloads:
            base[name] += in_process(bundle, name, PLAN[name][1], args.backend)
        for mode in (list(MODES) if rnd % 2 == 0 else list(reversed(MODES))):
            server = Server(bundle, MODES[mode], log, args.backend)
            try:
                for name in args.workloads:
                    for clients, r in levels(args, server, name):
                        raw.setdefault((name, mode, clients), []).append(r)
                        print(f"round {rnd} {variant} {name} batching {mode} x{clients}: "
                              f"{ {k: v for k, v in r.items() if k != 'lat'} }", flush=True)
            finally:
                server.stop()
    baseline = [{"variant": variant, "workload": name, **stats(lat), "rps": round(len(lat) / sum(lat), 2)}
                for name, lat in base.items()]
    runs = [{"variant": variant, "workload": name, "mode": mode, **pooled(parts)}
            for (name, mode, _), parts in raw.items()]
    return baseline, runs


def levels(args: argparse.Namespace, server: Server, name: str) -> list[tuple[int, dict[str, Any]]]:
    """Every concurrency level of one workload against one server."""
    n = max(PLAN[name][c] * c for c in LEVELS)
    bodies = [(p, json.dumps({"model": "bench", **b}).encode()) for p, b, _ in (workload(name, k) for k in range(n))]
    run_level(server, bodies[:3], 1, 3, 60)  # warm the server's caches and connections
    out = []
    for clients in LEVELS:
        per = max(1, int(PLAN[name][clients] * args.scale))
        before = scrape(server)
        r = run_level(server, bodies, clients, per, args.cap_s)
        r.update(batching(before, scrape(server)))
        out.append((clients, r))
    return out


def report(result: dict[str, Any]) -> str:
    """The Markdown table: per variant and workload, on vs off at each level, and the baseline."""
    lines = [f"# q3vl serve load test ({result['shape']} shape, backend {result.get('backend', 'cpu')})", "",
             f"{result['machine']['cpu']}, {result['machine']['cores']} cores{result['machine'].get('gpu', '')}; "
             f"load average before "
             f"{result['load_before']}, after {result['load_after']} (shared machine); "
             f"onnxruntime {result['machine']['onnxruntime']}. Loopback HTTP, one keep-alive connection per "
             "client, requests back to back. `off` = `--max-batch-requests 1` (no cross-request batching). "
             f"{result['rounds']} rounds, on/off order alternating; req/s is the median of the rounds, "
             "latencies are pooled.", ""]
    for b in result["baseline"]:
        v, w = b["variant"], b["workload"]
        rows = {(r["mode"], r["clients"]): r for r in result["runs"] if r["variant"] == v and r["workload"] == w}
        lines += [f"## {v}, {w}", "", f"In-process `process()` of the same requests, one at a time: p50 "
                  f"{b['p50_ms']} ms, p99 {b['p99_ms']} ms ({b['rps']} req/s).", "",
                  "| clients | on req/s | on p50 ms | on p99 ms | off req/s | off p50 ms | off p99 ms | on/off req/s |"
                  " p50 vs in-process | items/batch on (off) | graph ms/batch on (off) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in LEVELS:
            on, off = rows.get(("on", c)), rows.get(("off", c))
            if not on or not off:
                continue
            lines.append(f"| {c} | {on['rps']} | {on['p50_ms']} | {on['p99_ms']} | {off['rps']} | {off['p50_ms']} | "
                         f"{off['p99_ms']} | {on['rps'] / off['rps']:.2f}x | {on['p50_ms'] / b['p50_ms']:.2f}x | "
                         f"{on['items_per_batch']} ({off['items_per_batch']}) | "
                         f"{on['graph_ms_per_batch']} ({off['graph_ms_per_batch']}) |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=["tiny", "small"], default="small")
    p.add_argument("--bundle", type=Path, help="load-test this embedding bundle (its directory name is the variant) "
                                               "instead of making --shape bundles")
    p.add_argument("--backend", default="cpu", help="the server's and the in-process baseline's backend (cuda ...)")
    p.add_argument("--workdir", type=Path, default=ROOT / "work" / "serve-bench")
    p.add_argument("--variants", default="fp32,int8", help="fp32 and/or int8 (weight-quantized) bundles")
    p.add_argument("--workloads", default="single-text,mixed")
    p.add_argument("--scale", type=float, default=1.0, help="multiply the requests per client")
    p.add_argument("--cap-s", type=float, default=120.0, help="time cap per level")
    p.add_argument("--rounds", type=int, default=2, help="rounds; on/off order alternates between them")
    p.add_argument("--out", type=Path, help="results prefix (default benchmarks/results/serve-<shape>)")
    args = p.parse_args()
    args.workloads = args.workloads.split(",")
    args.workdir.mkdir(parents=True, exist_ok=True)
    shape = args.bundle.name if args.bundle else args.shape
    out = args.out or ROOT / "benchmarks" / "results" / f"serve-{shape}"
    result: dict[str, Any] = {"shape": shape, "backend": args.backend, "machine": machine(),
                              "load_before": os.getloadavg(), "rounds": args.rounds, "baseline": [], "runs": []}
    chosen = {args.bundle.name: args.bundle} if args.bundle else bundles(args.workdir, args.shape,
                                                                          args.variants.split(","))
    for variant, bundle in chosen.items():
        base, runs = measure(args, variant, bundle, args.workdir / "serve.log")
        result["baseline"] += base
        result["runs"] += runs
    result["load_after"] = os.getloadavg()
    result["load_before"] = [round(x, 2) for x in result["load_before"]]
    result["load_after"] = [round(x, 2) for x in result["load_after"]]
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(result, indent=1))
    Path(f"{out}.md").write_text(report(result) + "\n")
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
