"""`q3vl bench`: every system on the same workloads in one run; JSON + Markdown table + PNG plot.

Speed is compared as ratios against the PyTorch reference measured in the same run (machines are
shared and noisy, absolute numbers drift). Each system runs in its own process, one after the
other, so they never compete for cores. With `rounds` > 1 the whole sequence runs again, in reverse
order every other round, and each system's runs are pooled: a slow minute on a shared machine then
lands on several systems instead of skewing one system's ratio.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from q3vl.bench.workloads import Workload
from q3vl.progress import Progress
from q3vl.tasks import task_for

log = logging.getLogger(__name__)


def machine_info() -> dict[str, Any]:
    """CPU, cores, memory and library versions, stored beside the figures."""
    import importlib.metadata as md

    cpu = platform.processor()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    versions = {}
    for pkg in ("q3vl", "onnxruntime", "onnxruntime-gpu", "torch", "transformers", "numpy"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    flags = simd_flags()
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "memory_gib": round(mem, 1),
            "python": platform.python_version(), "platform": platform.platform(), "versions": versions,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "simd": flags, "native_bf16": native_bf16(flags)}


def cpu_flags() -> set[str]:
    """The CPU's feature flags (x86 `flags`, Arm `Features` in /proc/cpuinfo; empty where unreadable)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    return set()


def simd_flags(flags: set[str] | None = None) -> list[str]:
    """The flags speed depends on: x86 AVX/AVX-512/AMX/FMA, Arm bf16/i8mm/dot-product/SVE."""
    flags = cpu_flags() if flags is None else flags
    return sorted(f for f in flags if f.startswith(("avx", "amx", "fma")) or f in ARM_SIMD)


ARM_SIMD = {"asimd", "asimddp", "bf16", "i8mm", "sve", "sve2", "svebf16", "svei8mm"}
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # bf16 dot products in hardware (x86 AVX-512/AMX, Arm)


def native_bf16(simd: list[str] | None = None) -> list[str]:
    """The flags that give this CPU native bf16 matrix arithmetic (empty: none, so PyTorch's bf16
    runs emulated and is no faster than float32; a bf16 reference is then not the fast baseline).
    """
    have = set(simd_flags() if simd is None else simd)
    return [f for f in BF16_FLAGS if f in have]


def run_system(system: dict[str, Any], workloads: list[Workload], repeats: int, media: Path,
               timeout: float) -> dict[str, Any]:
    """Spawn the worker for one system and return its results (or the error it died with).

    The worker's stderr (one line per workload) is logged as it comes, so a long run shows where it is.
    """
    with tempfile.TemporaryDirectory(prefix="q3vl-bench-") as tmp:
        spec, out = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec.write_text(json.dumps({"system": system, "workloads": [asdict(w) for w in workloads],
                                    "repeats": repeats, "media": str(media)}))
        log.info("benchmarking %s on %d workloads", system["name"], len(workloads))
        proc = subprocess.Popen([sys.executable, "-m", "q3vl.bench.worker", str(spec), str(out)],
                                stderr=subprocess.PIPE, text=True)
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            proc.kill()

        timer = threading.Timer(timeout, expire)
        timer.start()
        tail: collections.deque[str] = collections.deque(maxlen=5)
        try:
            assert proc.stderr is not None
            for raw in proc.stderr:
                line = raw.rstrip("\n").split("\r")[-1].strip()  # a stray bar's redraws: keep the last
                if line:
                    tail.append(line)
                    log.info("  %s", line)
            returncode = proc.wait()
        finally:
            timer.cancel()
        if returncode != 0:
            reason = f"timed out after {timeout:.0f} s" if expired.is_set() else f"exit code {returncode}"
            return {"system": system["name"], "error": " | ".join([*tail, reason])}
        return json.loads(out.read_text())


def pool_rounds(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One system's results from several rounds: runs pooled per workload, the figures recomputed."""
    from q3vl.bench.worker import summarize

    failed = [p for p in parts if "error" in p]
    if failed or len(parts) == 1:
        return failed[0] if failed else parts[0]
    pooled = {**parts[0], "load_s": statistics.median(p["load_s"] for p in parts),
              "rss_after_load_mb": max(p["rss_after_load_mb"] for p in parts),
              "peak_rss_mb": max(p["peak_rss_mb"] for p in parts), "rounds": len(parts), "workloads": []}
    if any("gpu_memory_mb" in p for p in parts):
        pooled["gpu_memory_mb"] = max(p.get("gpu_memory_mb", 0) for p in parts)
    for i, first in enumerate(parts[0]["workloads"]):
        same = [p["workloads"][i] for p in parts]
        entry = {k: first[k] for k in ("workload", "batch", "items", "tokens")}
        pooled["workloads"].append(summarize(entry, [t for w in same for t in w["runs_s"]],
                                             [t for w in same for t in w["graph_runs_s"]]))
    return pooled


def benchmark(systems: list[dict[str, Any]], workloads: list[Workload], repeats: int, out_dir: Path,
              tag: str, timeout: float = 7200, rounds: int = 1) -> dict[str, Any]:
    """Run everything (`rounds` times, alternating the order) and write `<tag>.json`, `<tag>.md` and
    `<tag>.png` under `out_dir`.
    """
    if rounds < 1:
        raise ValueError("rounds must be >= 1")
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    parts: list[list[dict[str, Any]]] = [[] for _ in systems]
    with tempfile.TemporaryDirectory(prefix="q3vl-media-") as media, \
            Progress(len(systems) * rounds, "bench", unit="system", interval=0) as bar:
        for r in range(rounds):
            if rounds > 1:
                log.info("round %d/%d", r + 1, rounds)
            for i in list(range(len(systems)))[:: -1 if r % 2 else 1]:
                s = systems[i]
                kind = task_for(s["task"]).verb
                parts[i].append(run_system(s, [w for w in workloads if w.kind == kind], repeats, Path(media), timeout))
                bar.update()
    results = [pool_rounds(p) for p in parts]
    data = {"machine": machine_info(), "repeats": repeats, "rounds": rounds, "systems": systems, "results": results,
            "seconds": round(time.perf_counter() - started, 1)}
    out_dir.mkdir(parents=True, exist_ok=True)  # again: an hour-long run must not lose its figures to a rm
    (out_dir / f"{tag}.json").write_text(json.dumps(data, indent=1))
    from q3vl.bench.report import markdown, plot

    (out_dir / f"{tag}.md").write_text(markdown(data))
    plot(data, out_dir / f"{tag}.png")
    return data
