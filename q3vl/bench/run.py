"""`q3vl bench`: every system on the same workloads in one run; JSON + Markdown table + PNG plot.

Speed is compared as ratios against the PyTorch reference measured in the same run (machines are
shared and noisy, absolute numbers drift). Each system runs in its own process, one after the
other, so they never compete for cores.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from q3vl.bench.workloads import Workload

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
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "memory_gib": round(mem, 1),
            "python": platform.python_version(), "platform": platform.platform(), "versions": versions,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def run_system(system: dict[str, Any], workloads: list[Workload], repeats: int, media: Path,
               timeout: float) -> dict[str, Any]:
    """Spawn the worker for one system and return its results (or the error it died with)."""
    with tempfile.TemporaryDirectory(prefix="q3vl-bench-") as tmp:
        spec, out = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec.write_text(json.dumps({"system": system, "workloads": [asdict(w) for w in workloads],
                                    "repeats": repeats, "media": str(media)}))
        log.info("benchmarking %s on %d workloads", system["name"], len(workloads))
        proc = subprocess.run([sys.executable, "-m", "q3vl.bench.worker", str(spec), str(out)], timeout=timeout,
                              stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-5:]
            return {"system": system["name"], "error": " | ".join(tail)}
        return json.loads(out.read_text())


def benchmark(systems: list[dict[str, Any]], workloads: list[Workload], repeats: int, out_dir: Path,
              tag: str, timeout: float = 7200) -> dict[str, Any]:
    """Run everything and write `<tag>.json`, `<tag>.md` and `<tag>.png` under `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="q3vl-media-") as media:
        results = [run_system(s, [w for w in workloads if w.kind == ("rerank" if s["task"] == "reranker" else "embed")],
                              repeats, Path(media), timeout) for s in systems]
    data = {"machine": machine_info(), "repeats": repeats, "systems": systems, "results": results,
            "seconds": round(time.perf_counter() - started, 1)}
    out_dir.mkdir(parents=True, exist_ok=True)  # again: an hour-long run must not lose its figures to a rm
    (out_dir / f"{tag}.json").write_text(json.dumps(data, indent=1))
    from q3vl.bench.report import markdown, plot

    (out_dir / f"{tag}.md").write_text(markdown(data))
    plot(data, out_dir / f"{tag}.png")
    return data
