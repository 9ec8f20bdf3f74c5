"""The ceiling int8 speed-up of this CPU: one fp32 MatMul against each int8 GEMM ONNX Runtime's CPU provider has.

    python benchmarks/int8_kernels.py [--rounds 7] [--out benchmarks/results] [--tag int8-kernels]

A whole bundle can only be as much faster than fp32 as its int8 matmuls are: everything else
(attention, norms, softmax, the activations' quantization) runs in float either way. So the
best ratio of an int8 GEMM to the fp32 GEMM of the same shape, on this machine, bounds what any
int8 method can reach end to end. Shapes: the small checkpoints' text up-projection at text-32 x8
(362 tokens), their vision fc1 at image-448 x8 (6,272 patches), and the 8B text up-projection.
Kernels, each from a one-node graph with 2 intra-op threads, run in interleaved rounds:
DynamicQuantizeMatMul (per-tensor uint8 activations x int8 weights: the fastest path, used by the
dynamic method), MatMulInteger on pre-quantized uint8 x int8 and uint8 x uint8 inputs (the bare GEMM,
no activation quantization), and MatMulNBits with 8-bit weights at accuracy_level 4.
Writes <tag>.json and <tag>.md with the CPU's SIMD flags, since the ratio depends on them (AVX2 vs
AVX-512 VNNI).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

SHAPES = [(362, 768, 2048, "small text-32 x8, up-projection"),
          (6272, 512, 2048, "small image-448 x8, vision fc1"),
          (362, 4096, 12288, "8B text-32 x8, up-projection")]


def session(nodes: list[Any], inits: list[Any], inputs: list[Any], out_shape: list[int], threads: int) -> Any:
    graph = helper.make_graph(nodes, "k", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
                              inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def kernels(m: int, k: int, n: int, threads: int, rng: np.random.Generator) -> dict[str, tuple[Any, dict[str, Any]]]:
    """Each kernel of one shape: name -> (session, feeds)."""
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = (rng.standard_normal((k, n)) * 0.02).astype(np.float32)
    fx = helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])
    scale = np.abs(w).max(0) / 127
    wq = np.round(w / scale).astype(np.int8)
    out: dict[str, tuple[Any, dict[str, Any]]] = {}
    out["fp32 MatMul"] = (session([helper.make_node("MatMul", ["x", "w"], ["y"])], [numpy_helper.from_array(w, "w")],
                                  [fx], [m, n], threads), {"x": x})
    out["DynamicQuantizeMatMul u8 x s8"] = (session(
        [helper.make_node("DynamicQuantizeMatMul", ["x", "wq", "ws", "wz"], ["y"], domain="com.microsoft")],
        [numpy_helper.from_array(wq, "wq"), numpy_helper.from_array(scale.astype(np.float32), "ws"),
         numpy_helper.from_array(np.zeros(n, np.int8), "wz")], [fx], [m, n], threads), {"x": x})
    xq = np.clip(np.round(x / (np.abs(x).max() / 127)) + 128, 0, 255).astype(np.uint8)
    for wname, wdata in (("s8", wq), ("u8", (wq.astype(np.int16) + 128).astype(np.uint8))):
        zero = np.uint8(128) if wname == "u8" else np.int8(0)
        sess = session([helper.make_node("MatMulInteger", ["xq", "w", "xz", "wz"], ["yi"]),
                        helper.make_node("Cast", ["yi"], ["y"], to=TensorProto.FLOAT)],
                       [numpy_helper.from_array(wdata, "w"), numpy_helper.from_array(np.array(128, np.uint8), "xz"),
                        numpy_helper.from_array(np.array(zero), "wz")],
                       [helper.make_tensor_value_info("xq", TensorProto.UINT8, [m, k])], [m, n], threads)
        out[f"MatMulInteger u8 x {wname} (bare GEMM)"] = (sess, {"xq": xq})
    bs = 32
    blocks = w.T.reshape(n, k // bs, bs)
    sc = np.abs(blocks).max(-1) / 127
    qb = (np.round(blocks / sc[..., None]) + 128).clip(0, 255).astype(np.uint8)
    out["MatMulNBits 8-bit, accuracy_level 4"] = (session(
        [helper.make_node("MatMulNBits", ["x", "qb", "sc"], ["y"], domain="com.microsoft", K=k, N=n, bits=8,
                          block_size=bs, accuracy_level=4)],
        [numpy_helper.from_array(qb, "qb"), numpy_helper.from_array(sc.astype(np.float32).reshape(-1), "sc")],
        [fx], [m, n], threads), {"x": x})
    return out


def simd_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return sorted(f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx", "fma")))
    except OSError:
        pass
    return []


def main() -> int:
    from q3vl.bench.run import machine_info

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--tag", default="int8-kernels")
    a = p.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for m, k, n, what in SHAPES:
        ks = kernels(m, k, n, a.threads, rng)
        times: dict[str, list[float]] = {name: [] for name in ks}
        for sess, feeds in ks.values():
            sess.run(None, feeds)  # warm-up
        for _ in range(a.rounds):  # interleaved: a noisy neighbour slows every kernel of a round alike
            for name, (sess, feeds) in ks.items():
                t = time.perf_counter()
                sess.run(None, feeds)
                times[name].append(time.perf_counter() - t)
        base = statistics.median(times["fp32 MatMul"])
        for name, ts in times.items():
            med = statistics.median(ts)
            rows.append({"shape": what, "m": m, "k": k, "n": n, "kernel": name, "median_ms": med * 1e3,
                         "vs_fp32": base / med, "gflops": 2 * m * k * n / med / 1e9})
    data = {"machine": machine_info(), "simd": simd_flags(), "threads": a.threads, "rounds": a.rounds, "rows": rows}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"{a.tag}.json").write_text(json.dumps(data, indent=2) + "\n")
    mi = data["machine"]
    lines = [f"Machine: {mi['cpu']}, {mi['cores']} cores, SIMD flags: {' '.join(data['simd']) or 'unknown'}; "
             f"onnxruntime {mi['versions'].get('onnxruntime')}; {mi['date']}; {a.threads} threads, median of "
             f"{a.rounds} interleaved rounds", "",
             "| shape | [M x K] x [K x N] | kernel | median ms | vs fp32 MatMul | GFLOP/s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | [{r['m']} x {r['k']}] x [{r['k']} x {r['n']}] | {r['kernel']} | "
                     f"{r['median_ms']:.1f} | {r['vs_fp32']:.2f}x | {r['gflops']:.0f} |")
    best = max((r for r in rows if r["kernel"] != "fp32 MatMul"), key=lambda r: r["vs_fp32"])
    lines += ["", f"Best int8 kernel over fp32 on these shapes, this machine: {best['vs_fp32']:.2f}x "
                  f"({best['kernel']}, {best['shape']}). An int8 bundle runs everything but its projections "
                  "in float, so end to end it gains at most what its matmuls gain."]
    (a.out / f"{a.tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
