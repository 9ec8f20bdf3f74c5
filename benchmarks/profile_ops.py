"""Where a bundle's graph time goes: ONNX Runtime's per-op profile for one benchmark workload.

Runs the workload once through `q3vl.Embedder` to capture the exact feeds of each graph, then
replays them on a profiling session and prints, per graph, the time per op type, and the GEMM
rate the MatMul nodes reached (FLOPs from the shapes ORT records) next to this machine's GEMM
peak measured with numpy. When MatMul runs at the peak, the graph is compute-bound: fewer FLOPs
(int8 weights, a smaller image budget) are the only way to go faster on that CPU.

    python benchmarks/profile_ops.py BUNDLE [--workload image-448] [--batch 1] [--runs 4]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np


def gemm_peak(m: int = 784, k: int = 512, n: int = 2048, runs: int = 30) -> float:
    """fp32 GFLOP/s of one mid-sized matmul (numpy's BLAS): the machine's practical peak."""
    a = np.random.default_rng(0).random((m, k), dtype=np.float32)
    b = np.random.default_rng(1).random((k, n), dtype=np.float32)
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    for _ in range(runs):
        a @ b
    return 2 * m * k * n * runs / (time.perf_counter() - t) / 1e9


def matmul_flops(args: dict[str, Any]) -> float:
    """2*M*K*N of a MatMul node from the activation and output shapes ORT records in the profile
    (initializers, here the weights, are not listed among its inputs).
    """
    ins = [next(iter(s.values())) for s in args.get("input_type_shape", [])]
    outs = [next(iter(s.values())) for s in args.get("output_type_shape", [])]
    if not ins or not outs or not ins[0] or not outs[0]:
        return 0.0
    return 2.0 * float(np.prod(ins[0])) * outs[0][-1]


def profile(graph: Path, feeds: dict[str, np.ndarray], runs: int, threads: int) -> tuple[dict[str, float], float]:
    """(ms per run by op type, MatMul GFLOP per run) over `runs` runs after a warm-up."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(graph), so, providers=["CPUExecutionProvider"])
    sess.run(None, feeds)  # warm-up, not profiled
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "ort")
    sess = ort.InferenceSession(str(graph), so, providers=["CPUExecutionProvider"])
    for _ in range(runs + 1):
        sess.run(None, feeds)
    events = json.loads(Path(sess.end_profiling()).read_text())
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    nodes = nodes[len(nodes) // (runs + 1):]  # drop the first (allocation-heavy) run
    by_op: dict[str, float] = defaultdict(float)
    flops = 0.0
    for e in nodes:
        by_op[e["args"]["op_name"]] += e["dur"] / 1e3 / runs
        if e["args"]["op_name"] == "MatMul":
            flops += matmul_flops(e["args"]) / runs
    return dict(by_op), flops / 1e9


def main() -> None:
    import q3vl
    from q3vl.bench.workloads import make_items

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", type=Path)
    p.add_argument("--workload", default="image-448")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--runs", type=int, default=4)
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: physical cores)")
    a = p.parse_args()

    model = q3vl.Embedder(a.bundle)
    threads = a.threads or model.backend.sessions["text"].get_session_options().intra_op_num_threads
    feeds: dict[str, dict[str, np.ndarray]] = {}
    run = model.backend.run

    def capture(graph: str, f: Any) -> Any:
        feeds.setdefault(graph, dict(f))
        return run(graph, f)

    model.backend.run = capture  # type: ignore[method-assign]
    with tempfile.TemporaryDirectory() as media:
        model.process(make_items(a.workload, a.batch, Path(media)))
    peak = gemm_peak()
    print(f"{a.bundle.name}: {a.workload} x{a.batch}, {threads} threads; numpy fp32 GEMM peak {peak:.0f} GFLOP/s")
    for graph, f in feeds.items():
        by_op, gflop = profile(a.bundle / model.manifest.graphs[graph].file, f, a.runs, threads)
        total = sum(by_op.values())
        mm = by_op.get("MatMul", 0.0)
        rate = f", MatMul {gflop:.1f} GFLOP at {gflop / mm * 1e3:.0f} GFLOP/s" if mm else ""
        print(f"\n{graph}: {total:.1f} ms per run{rate}")
        for op, ms in sorted(by_op.items(), key=lambda kv: -kv[1])[:10]:
            print(f"  {op:34s} {ms:8.1f} ms {ms / total * 100:5.1f}%")


if __name__ == "__main__":
    main()
