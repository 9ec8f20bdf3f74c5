"""Where a bundle's graph time goes: ONNX Runtime's per-node profile for benchmark workloads.

Runs each workload once through the bundle's runtime (`q3vl.Embedder`) to capture the exact feeds
of each graph, then replays them on a profiling session and reports, per graph, the time per op
type, the time per category (int8 GEMM, float GEMM, attention, norms and activations, the
activations' quantization and the int32 products' dequantization, data movement, other), and the
GEMM rate the float MatMul nodes reached next to this machine's fp32 GEMM peak measured with
numpy. When MatMul runs at the peak the graph is compute-bound: fewer FLOPs (int8 weights, a
smaller image budget) are the only way to go faster on that CPU.

    python benchmarks/profile_ops.py BUNDLE [--workloads text-32:1,image-448:1,text-32:8] [--runs 4]
                                            [--out benchmarks/results --tag profile-2b-int8]

Categories are read from the graph itself (`categories`): an op is "quantize" or "dequantize" by
where it sits around a MatMulInteger, not by its type alone (a Mul can be SwiGLU's or a
dequantization's).
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

INT8_GEMM = {"MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulNBits", "QGemm",
             "QLinearMatMul"}
FLOAT_GEMM = {"MatMul", "Gemm", "FusedMatMul"}
ATTENTION = {"GroupQueryAttention", "MultiHeadAttention", "Attention", "RotaryEmbedding", "Softmax"}
NORM_ACT = {"RMSNormalization", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization",
            "LayerNormalization", "SkipLayerNormalization", "Sigmoid", "FastGelu", "Gelu", "BiasGelu", "QuickGelu",
            "Tanh", "Erf"}
QUANT = {"Abs", "ReduceMax", "ReduceMin", "Round", "Div", "QuantizeLinear", "DynamicQuantizeLinear", "Neg"}
MOVE = {"Split", "Reshape", "Transpose", "Gather", "GatherElements", "Concat", "Slice", "Where", "Expand",
        "Flatten", "Squeeze", "Unsqueeze", "Identity", "Shape", "MemcpyToHost", "MemcpyFromHost"}
CATEGORIES = ("int8 GEMM", "float GEMM", "attention", "norms/activations", "quantize", "dequantize",
              "data movement", "elementwise", "other")


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


def categories(graph: Path) -> dict[str, str]:
    """Node name -> category, from the graph's structure (weights not loaded).

    quantize: the ops between a projection's float input and its MatMulInteger (scale, divide,
    round, cast), including the per-row scale; dequantize: the Cast and Muls after the int32
    product. Everything else by op type.
    """
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    nodes = list(model.graph.node)
    producer = {o: n for n in nodes for o in n.output}
    consumers: dict[str, list[Any]] = defaultdict(list)
    for n in nodes:
        for i in n.input:
            consumers[i].append(n)
    cat: dict[str, str] = {}
    for n in nodes:
        if n.op_type in INT8_GEMM:
            cat[n.name] = "int8 GEMM"
            _mark_quantize(n, producer, cat)
            _mark_dequantize(n, consumers, cat)
    for n in nodes:
        if n.name in cat:
            continue
        op = n.op_type
        cat[n.name] = ("float GEMM" if op in FLOAT_GEMM else "attention" if op in ATTENTION else
                       "norms/activations" if op in NORM_ACT else "quantize" if op in QUANT else
                       "data movement" if op in MOVE else "elementwise" if op in {"Mul", "Add", "Sub", "Cast", "Max"}
                       else "other")
    return cat


def _mark_quantize(gemm: Any, producer: dict[str, Any], cat: dict[str, str]) -> None:
    """The activation's quantization: producers of the GEMM's A input (and of its per-row scale), back
    to the first op that reads the float activation (an Abs/ReduceMax/QuantizeLinear chain).
    """
    stack = [i for i in gemm.input[:1]] + ([gemm.input[2]] if gemm.op_type == "MatMulIntegerToFloat" else [])
    seen: set[str] = set()
    while stack:
        node = producer.get(stack.pop())
        if node is None or node.name in seen or node.op_type not in QUANT | {"Cast", "Add", "Mul", "Max", "Expand",
                                                                                 "Shape"}:
            continue
        seen.add(node.name)
        cat[node.name] = "quantize"
        stack += [node.input[i] for i in range(len(node.input)) if i > 0 or node.op_type not in {"Abs", "Div",
                                                                                             "QuantizeLinear",
                                                                                             "ReduceMax",
                                                                                             "ReduceMin"}]


def _mark_dequantize(gemm: Any, consumers: dict[str, list[Any]], cat: dict[str, str]) -> None:
    """The int32 product's Cast and the scale Muls that follow it (at most three ops)."""
    out = gemm.output[0]
    for _ in range(3):
        nxt = [c for c in consumers.get(out, []) if c.op_type in {"Cast", "Mul"}]
        if len(nxt) != 1:
            return
        cat[nxt[0].name] = "dequantize"
        out = nxt[0].output[0]


def profile(graph: Path, feeds: dict[str, np.ndarray], runs: int, threads: int) -> dict[str, Any]:
    """Per-run ms by op type and by category, and the float MatMul GFLOP per run, over `runs` runs
    after a warm-up session run.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "ort")
    sess = ort.InferenceSession(str(graph), so, providers=["CPUExecutionProvider"])
    walls = []
    for _ in range(runs + 1):
        t = time.perf_counter()
        sess.run(None, feeds)
        walls.append(time.perf_counter() - t)
    events = json.loads(Path(sess.end_profiling()).read_text())
    del sess
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    nodes = nodes[len(nodes) // (runs + 1):]  # drop the first (allocation-heavy) run
    cats = categories(graph)
    by_op: dict[str, float] = defaultdict(float)
    by_cat: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    flops = 0.0
    for e in nodes:
        op, name = e["args"]["op_name"], e["name"].removesuffix("_kernel_time")
        ms = e["dur"] / 1e3 / runs
        by_op[op] += ms
        by_cat[cats.get(name, _fallback(op))] += ms
        count[op] += 1
        if op == "MatMul":
            flops += matmul_flops(e["args"]) / runs
    return {"wall_ms": float(np.median(walls[1:])) * 1e3, "by_op": dict(by_op), "by_category": dict(by_cat),
            "nodes_per_run": {k: v // runs for k, v in count.items()}, "matmul_gflop": flops / 1e9}


def _fallback(op: str) -> str:
    """Category of a node the saved graph does not have (one ONNX Runtime made while optimizing)."""
    if op in INT8_GEMM:
        return "int8 GEMM"
    if op in FLOAT_GEMM:
        return "float GEMM"
    return "attention" if op in ATTENTION else "norms/activations" if op in NORM_ACT else "other"


def capture(bundle: Path, workload: str, batch: int) -> tuple[Any, dict[str, dict[str, np.ndarray]]]:
    """(runtime, feeds per graph) of one workload run through the bundle's runtime."""
    from q3vl.bench.workloads import make_items
    from q3vl.bundle import Manifest
    from q3vl.tasks import task_for

    model = task_for(Manifest.read(bundle).task).runtime(bundle, allow_unverified=True)
    feeds: dict[str, dict[str, np.ndarray]] = {}
    run = model.backend.run

    def keep(graph: str, f: Any) -> Any:
        feeds.setdefault(graph, dict(f))
        return run(graph, f)

    model.backend.run = keep
    with tempfile.TemporaryDirectory() as media:
        model.process(make_items(workload, batch, Path(media)))
    return model, feeds


def render(data: dict[str, Any]) -> str:
    m = data["machine"]
    lines = [f"`{data['bundle']}`; {m['cpu']}, {m['cores']} cores, SIMD flags: {' '.join(data['simd'])}; "
             f"onnxruntime {m['versions'].get('onnxruntime')}; {m['date']}; {data['threads']} threads, "
             f"{data['runs']} profiled runs per graph; numpy fp32 GEMM peak {data['gemm_peak']:.0f} GFLOP/s", ""]
    for w in data["workloads"]:
        for graph, r in w["graphs"].items():
            total = sum(r["by_op"].values())
            mm = r["by_op"].get("MatMul", 0.0)
            rate = f"; float MatMul {r['matmul_gflop']:.1f} GFLOP at {r['matmul_gflop'] / mm * 1e3:.0f} GFLOP/s" \
                if mm and r["matmul_gflop"] else ""
            lines += [f"### {w['workload']} x{w['batch']}: {graph} graph, {total:.1f} ms of kernels per run "
                      f"({r['wall_ms']:.1f} ms wall){rate}", "",
                      "| category | ms | share |", "|---|---|---|"]
            cats = r["by_category"]
            lines += [f"| {c} | {cats[c]:.1f} | {cats[c] / total * 100:.1f}% |" for c in CATEGORIES if cats.get(c)]
            lines += ["", "| op | nodes | ms | share |", "|---|---|---|---|"]
            lines += [f"| {op} | {r['nodes_per_run'].get(op, 0)} | {ms:.1f} | {ms / total * 100:.1f}% |"
                      for op, ms in sorted(r["by_op"].items(), key=lambda kv: -kv[1])[:14]]
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from int8_kernels import simd_flags

    from q3vl.bench.run import machine_info

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", type=Path)
    p.add_argument("--workloads", default="image-448:1", help="name:batch,... (q3vl bench workload names)")
    p.add_argument("--runs", type=int, default=4)
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: the cores this process may use)")
    p.add_argument("--out", type=Path, help="write <tag>.json and <tag>.md here (default: print only)")
    p.add_argument("--tag", default="profile")
    a = p.parse_args()
    import os

    threads = a.threads or len(os.sched_getaffinity(0))
    data: dict[str, Any] = {"bundle": a.bundle.name, "machine": machine_info(), "simd": simd_flags(),
                            "threads": threads, "runs": a.runs, "gemm_peak": gemm_peak(), "workloads": []}
    for spec in a.workloads.split(","):
        name, _, batch = spec.partition(":")
        model, feeds = capture(a.bundle, name, int(batch or 1))
        files = {g: a.bundle / model.manifest.graphs[g].file for g in feeds}
        model.close()
        del model
        graphs = {g: profile(files[g], f, a.runs, threads) for g, f in feeds.items()}
        data["workloads"].append({"workload": name, "batch": int(batch or 1), "graphs": graphs})
    text = render(data)
    if a.out is not None:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / f"{a.tag}.json").write_text(json.dumps(data, indent=1) + "\n")
        (a.out / f"{a.tag}.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
