"""One system (the PyTorch reference or a runtime bundle) over the workloads, in its own process.

A process per system keeps peak RSS and load time honest and stops one system's caches or thread
pools from slowing another. Usage (normally spawned by `q3vl bench`):
`python -m q3vl.bench.worker SPEC.json OUT.json` where SPEC holds the system and the workloads.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from q3vl.bench.workloads import Workload
from q3vl.tasks import task_for


class Timer:
    """Accumulates the wall time of every call of a wrapped function (graph-only time)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*a: Any, **kw: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.seconds += time.perf_counter() - t
        return timed


def _rss_mb() -> float:
    """Peak RSS of this process (VmHWM: unlike ru_maxrss, not inherited from the spawning parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _gpu_mb(system: dict[str, Any]) -> float | None:
    """Peak GPU memory: torch's allocator peak for the reference, nvidia-smi's figure for this process else."""
    if system.get("device", "cpu") == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 1e6
    if system.get("backend", "cpu") == "cpu":
        return None
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    used = [float(mb) for pid, mb in (line.split(",") for line in out.splitlines() if "," in line)
            if int(pid) == os.getpid()]
    return used[0] if used else None


def load_system(spec: dict[str, Any], timer: Timer) -> tuple[Any, Callable[[Any], int]]:
    """(object with .process, token counter) for a system spec, with the graph timer installed."""
    threads = int(spec.get("threads") or len(os.sched_getaffinity(0)))
    task = task_for(spec["task"])
    if spec["kind"] == "reference":
        import torch

        torch.set_num_threads(threads)
        # the reranker reference runs one pair per pass, as the published wrapper does
        ref = task.reference(spec["checkpoint"], dtype=spec.get("dtype", "float32"), device=spec.get("device", "cpu"))
        ref.model.forward = timer.wrap(ref.model.forward)
        return ref, lambda items: _reference_tokens(ref, items)
    options = {"threads": threads, **spec.get("backend_options", {})}  # e.g. io_binding, cuda_graph
    model = task.runtime(spec["bundle"], backend=spec.get("backend", "cpu"), batch_size=int(spec.get("batch_size", 8)),
                         backend_options=options, allow_unverified=bool(spec.get("allow_unverified")),
                         **({"max_batch_tokens": int(spec["max_batch_tokens"])} if "max_batch_tokens" in spec else {}))
    model.backend.run = timer.wrap(model.backend.run)
    model.backend.run_bound = timer.wrap(model.backend.run_bound)  # the IO-binding path (default on GPUs)
    return model, lambda items: _runtime_tokens(model, items)


def _reference_tokens(model: Any, items: Any) -> int:
    if isinstance(items, dict):
        convs = [model.format_pair(items["query"], d, None, None, None) for d in items["documents"]]
        return sum(len(model.tokenize_pair(c)["input_ids"]) for c in convs)
    return int(model.preprocess(items)["attention_mask"].sum())


def _runtime_tokens(model: Any, request: Any) -> int:
    """Text + vision tokens of a request, from the batch API's plans."""
    from q3vl.runtime.batch import Plan

    return sum(p.tokens for p in model.plan(request) if isinstance(p, Plan))


def run_workload(model: Any, timer: Timer, w: Workload, items: Any, tokens: int, repeats: int) -> dict[str, Any]:
    """Warm-up once, then `repeats` timed end-to-end calls."""
    model.process(items)
    latencies, graph = [], []
    for _ in range(repeats):
        timer.seconds = 0.0
        t = time.perf_counter()
        model.process(items)
        latencies.append(time.perf_counter() - t)
        graph.append(timer.seconds)
    n = len(items["documents"]) if isinstance(items, dict) else len(items)
    return summarize({"workload": w.name, "batch": w.batch, "items": n, "tokens": tokens}, latencies, graph)


def summarize(entry: dict[str, Any], latencies: list[float], graph: list[float]) -> dict[str, Any]:
    """A workload's figures from its timed runs (end to end and graph only, seconds)."""
    med = statistics.median(latencies)
    return {**entry, "runs_s": latencies, "graph_runs_s": graph, "median_ms": med * 1e3,
            "p95_ms": _p95(latencies) * 1e3, "graph_median_ms": statistics.median(graph) * 1e3,
            "items_per_s": entry["items"] / med, "tokens_per_s": entry["tokens"] / med}


def _p95(xs: list[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(0.95 * (len(s) - 1)))]


def main(spec_path: str, out_path: str) -> None:
    """Run the system described in SPEC and write its results to OUT."""
    spec = json.loads(Path(spec_path).read_text())
    timer = Timer()
    t = time.perf_counter()
    model, count = load_system(spec["system"], timer)
    result: dict[str, Any] = {"system": spec["system"]["name"], "load_s": time.perf_counter() - t,
                              "rss_after_load_mb": _rss_mb(), "workloads": []}
    sys.stderr.write(f"{result['system']}: loaded in {result['load_s']:.1f} s\n")
    media = Path(spec["media"])
    for wd in spec["workloads"]:
        w = Workload(**wd)
        items = w.items(media)
        result["workloads"].append(run_workload(model, timer, w, items, count(items), int(spec["repeats"])))
        sys.stderr.write(f"{result['system']}: {w.name} x{w.batch}: {result['workloads'][-1]['median_ms']:.1f} ms\n")
    result["peak_rss_mb"] = _rss_mb()
    gpu = _gpu_mb(spec["system"])
    if gpu is not None:
        result["gpu_memory_mb"] = gpu
    Path(out_path).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
