"""The ceiling int8 speed-up of this CPU: one fp32 MatMul, and PyTorch's bf16 matmul where the CPU has native
bf16, against each int8 GEMM ONNX Runtime's CPU provider has.

    python benchmarks/int8_kernels.py [--rounds 7] [--out benchmarks/results] [--tag int8-kernels]

A whole bundle can only be as much faster than fp32 as its int8 matmuls are: everything else
(attention, norms, softmax, the activations' quantization) runs in float either way. So the
best ratio of an int8 GEMM to the fp32 GEMM of the same shape, on this machine, bounds what any
int8 method can reach end to end; and its ratio to PyTorch's bfloat16 matmul (oneDNN; run only
where the CPU has native bf16: AVX512_BF16, AMX) bounds what an int8 bundle can reach against
the bf16 reference. Shapes: the small checkpoints' text up-projection at text-32 x8 (362 tokens),
their vision fc1 at image-448 x8 (6,272 patches), the 8B text up-projection, and the 2B shape's
gate|up projection at text-32 x1 (47 tokens) and x8 (368), and its vision fc1 at image-448 x1
(784 patches). Kernels, each from a one-node graph (or the per-token chain) with 2 intra-op
threads, run in interleaved rounds: DynamicQuantizeMatMul (per-tensor uint8 activations x int8
weights, the dynamic method), the smooth method's per-token projection as bundles write it
(row scales, QuantizeLinear, MatMulIntegerToFloat: what a projection costs end to end),
MatMulInteger on pre-quantized uint8 x int8 and uint8 x uint8 inputs (the bare GEMM, no activation
quantization), and MatMulNBits with 8-bit and 4-bit weights at accuracy_level 4 (block 32).
Writes <tag>.json and <tag>.md with the CPU's SIMD flags, since the ratios depend on them (AVX2 vs
AVX-512 VNNI, native bf16 or not).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

SHAPES = [(362, 768, 2048, "small text-32 x8, up-projection"),
          (6272, 512, 2048, "small image-448 x8, vision fc1"),
          (362, 4096, 12288, "8B text-32 x8, up-projection"),
          (47, 2048, 12288, "2B text-32 x1, gate|up projection"),
          (368, 2048, 12288, "2B text-32 x8, gate|up projection"),
          (784, 1024, 4096, "2B image-448 x1, vision fc1")]
BASE, BF16 = "fp32 MatMul", "torch bf16 linear"


def _options(threads: int) -> Any:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as q3vl's runtime runs its sessions
    return opts


def session(nodes: list[Any], inits: list[Any], inputs: list[Any], out_shape: list[int], threads: int) -> Any:
    graph = helper.make_graph(nodes, "k", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
                              inits)
    opsets = [helper.make_opsetid("", 23), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    return ort.InferenceSession(model.SerializeToString(), _options(threads), providers=["CPUExecutionProvider"])


def per_token(m: int, w: np.ndarray, threads: int) -> Any:
    """The smooth method's projection as bundles write it, by the exporter's own emitter."""
    from q3vl.export.onnx_writer import GraphWriter
    from q3vl.export.quantize.int8 import Int8Plan, Projection, emit_matmul

    plan = Int8Plan(alpha=None, max_error=None)
    plan.add(Projection("w", None, False, 0.0))
    with tempfile.TemporaryDirectory() as tmp:
        g = GraphWriter(Path(tmp) / "k.onnx", plan.transform)
        x = g.add_input("x", TensorProto.FLOAT, [m, w.shape[0]])
        g.add_output(emit_matmul(g, x, w, "w", plan), "y", TensorProto.FLOAT, [m, w.shape[1]])
        return ort.InferenceSession(str(g.save("k", opset=23)), _options(threads), providers=["CPUExecutionProvider"])


def nbits(m: int, w: np.ndarray, bits: int, threads: int, block: int = 32) -> Any:
    """MatMulNBits with symmetric block-wise weights, accuracy_level 4 (int8 activations per block)."""
    k, n = w.shape
    blocks = w.T.reshape(n, k // block, block)
    qmax = 2 ** (bits - 1) - 1
    sc = (np.abs(blocks).max(-1) / qmax).astype(np.float32)
    qb = (np.round(blocks / sc[..., None]) + 2 ** (bits - 1)).clip(0, 2**bits - 1).astype(np.uint8)
    if bits == 4:
        qb = (qb[..., 0::2] | (qb[..., 1::2] << 4)).astype(np.uint8)
    node = helper.make_node("MatMulNBits", ["x", "qb", "sc"], ["y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=4)
    return session([node], [numpy_helper.from_array(qb, "qb"), numpy_helper.from_array(sc.reshape(-1), "sc")],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])], [m, n], threads)


def torch_linear(x: np.ndarray, w: np.ndarray, threads: int) -> Callable[[], Any] | None:
    """PyTorch's bf16 linear (oneDNN), as the bf16 reference runs its projections; None without torch."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    xt = torch.from_numpy(x).to(torch.bfloat16)
    wt = torch.from_numpy(np.ascontiguousarray(w.T)).to(torch.bfloat16)

    def run() -> Any:
        with torch.inference_mode():
            return torch.nn.functional.linear(xt, wt)
    return run


def kernels(m: int, k: int, n: int, threads: int, rng: np.random.Generator, bf16: bool) -> dict[str, Callable[[], Any]]:
    """Each kernel of one shape: name -> a call running it once."""
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = (rng.standard_normal((k, n)) * 0.02).astype(np.float32)
    fx = helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])
    scale = np.abs(w).max(0) / 127
    wq = np.round(w / scale).astype(np.int8)
    sessions: dict[str, tuple[Any, dict[str, Any]]] = {}
    sessions[BASE] = (session([helper.make_node("MatMul", ["x", "w"], ["y"])], [numpy_helper.from_array(w, "w")],
                              [fx], [m, n], threads), {"x": x})
    sessions["DynamicQuantizeMatMul u8 x s8"] = (session(
        [helper.make_node("DynamicQuantizeMatMul", ["x", "wq", "ws", "wz"], ["y"], domain="com.microsoft")],
        [numpy_helper.from_array(wq, "wq"), numpy_helper.from_array(scale.astype(np.float32), "ws"),
         numpy_helper.from_array(np.zeros(n, np.int8), "wz")], [fx], [m, n], threads), {"x": x})
    sessions["smooth per-token projection (8 ops)"] = (per_token(m, w, threads), {"x": x})
    xq = np.clip(np.round(x / (np.abs(x).max() / 127)) + 128, 0, 255).astype(np.uint8)
    for wname, wdata in (("s8", wq), ("u8", (wq.astype(np.int16) + 128).astype(np.uint8))):
        zero = np.uint8(128) if wname == "u8" else np.int8(0)
        sess = session([helper.make_node("MatMulInteger", ["xq", "w", "xz", "wz"], ["yi"]),
                        helper.make_node("Cast", ["yi"], ["y"], to=TensorProto.FLOAT)],
                       [numpy_helper.from_array(wdata, "w"), numpy_helper.from_array(np.array(128, np.uint8), "xz"),
                        numpy_helper.from_array(np.array(zero), "wz")],
                       [helper.make_tensor_value_info("xq", TensorProto.UINT8, [m, k])], [m, n], threads)
        sessions[f"MatMulInteger u8 x {wname} (bare GEMM)"] = (sess, {"xq": xq})
    for bits in (8, 4):
        sessions[f"MatMulNBits {bits}-bit, accuracy_level 4"] = (nbits(m, w, bits, threads), {"x": x})
    out: dict[str, Callable[[], Any]] = {name: (lambda s=s, f=f: s.run(None, f)) for name, (s, f) in sessions.items()}
    fn = torch_linear(x, w, threads) if bf16 else None
    if fn is not None:
        out[BF16] = fn
    return out


def simd_flags() -> list[str]:
    from q3vl.bench.run import simd_flags as flags

    return flags()


def measure(a: argparse.Namespace, bf16: bool) -> list[dict[str, Any]]:
    """Every kernel of every shape, interleaved rounds, medians; ratios to fp32 MatMul and to bf16."""
    rng = np.random.default_rng(0)
    rows = []
    for m, k, n, what in SHAPES:
        ks = kernels(m, k, n, a.threads, rng, bf16)
        times: dict[str, list[float]] = {name: [] for name in ks}
        for run in ks.values():
            run()  # warm-up (twice: oneDNN builds its primitive on the first call)
            run()
        for _ in range(a.rounds):  # interleaved: a noisy neighbour slows every kernel of a round alike
            for name, run in ks.items():
                t = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t)
        med = {name: statistics.median(ts) for name, ts in times.items()}
        for name, t in med.items():
            rows.append({"shape": what, "m": m, "k": k, "n": n, "kernel": name, "median_ms": t * 1e3,
                         "vs_fp32": med[BASE] / t, "vs_bf16": med[BF16] / t if BF16 in med else None,
                         "gflops": 2 * m * k * n / t / 1e9})
        sys.stderr.write(f"{what}: done\n")
    return rows


def render(data: dict[str, Any]) -> str:
    mi = data["machine"]
    bf16 = ", ".join(mi.get("native_bf16") or []) or "none"
    lines = [f"Machine: {mi['cpu']}, {mi['cores']} cores, SIMD flags: {' '.join(data['simd']) or 'unknown'}; "
             f"native bf16: {bf16}; onnxruntime {mi['versions'].get('onnxruntime')}, torch "
             f"{mi['versions'].get('torch', '-')}; {mi['date']}; {data['threads']} threads, median of "
             f"{data['rounds']} interleaved rounds", "",
             "| shape | [M x K] x [K x N] | kernel | median ms | vs fp32 MatMul | vs torch bf16 | GOP/s |",
             "|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        vs_bf16 = f"{r['vs_bf16']:.2f}x" if r.get("vs_bf16") else "-"
        lines.append(f"| {r['shape']} | [{r['m']} x {r['k']}] x [{r['k']} x {r['n']}] | {r['kernel']} | "
                     f"{r['median_ms']:.1f} | {r['vs_fp32']:.2f}x | {vs_bf16} | {r['gflops']:.0f} |")
    int8 = [r for r in data["rows"] if r["kernel"] not in (BASE, BF16)]
    best = max(int8, key=lambda r: r["vs_fp32"])
    lines += ["", f"Best int8 kernel over fp32 on these shapes, this machine: {best['vs_fp32']:.2f}x "
                  f"({best['kernel']}, {best['shape']}). An int8 bundle runs everything but its projections "
                  "in float, so end to end it gains at most what its matmuls gain."]
    if any(r.get("vs_bf16") for r in int8):
        lines += ["", "Against PyTorch's bf16 linear (the bf16 reference's projections), per shape, the smooth "
                      "method's projection as bundles write it / the best int8 kernel:", ""]
        for shape in dict.fromkeys(r["shape"] for r in int8):
            mine = next(r for r in int8 if r["shape"] == shape and r["kernel"].startswith("smooth"))
            top = max((r for r in int8 if r["shape"] == shape), key=lambda r: r["vs_bf16"])
            lines.append(f"- {shape}: {mine['vs_bf16']:.2f}x / {top['vs_bf16']:.2f}x ({top['kernel']})")
    return "\n".join(lines) + "\n"


def main() -> int:
    from q3vl.bench.run import machine_info, native_bf16

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--tag", default="int8-kernels")
    a = p.parse_args()
    rows = measure(a, bf16=bool(native_bf16()))
    data = {"machine": machine_info(), "simd": simd_flags(), "threads": a.threads, "rounds": a.rounds, "rows": rows}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"{a.tag}.json").write_text(json.dumps(data, indent=2) + "\n")
    text = render(data)
    (a.out / f"{a.tag}.md").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
