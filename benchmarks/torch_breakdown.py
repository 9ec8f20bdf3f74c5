"""Where PyTorch's bf16 reference spends an embedding call on CPU: GEMMs (linear/matmul), attention, the rest.

Paired with ONNX Runtime's per-node profile of the int8 bundle (`q3vl profile`, benchmarks/results/
profile-2b-int8-*.md) and the int8 kernel table (benchmarks/int8_kernels.py), it bounds what the
int8 bundle can gain over the bf16 reference on this CPU: however fast the rest gets, the GEMMs run
at most at the bare int8 kernel's speed-up over PyTorch's bf16 linear.

    python benchmarks/torch_breakdown.py --checkpoint work/bench/2b-realistic-embedding --workload image-448:1 \
        --out benchmarks/results/torch-bf16-breakdown-2b

Each workload runs once to warm up, then `--repeats` times under torch.profiler (CPU); ops are put
in categories by name (self CPU time, so nothing is counted twice).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

GEMM = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm", "aten::_convolution",
        "aten::mkldnn_convolution", "aten::convolution", "aten::conv3d", "aten::_mkldnn_", "mkldnn")
ATTENTION = ("scaled_dot_product", "flash_attention", "_efficient_attention", "aten::softmax", "aten::_softmax")


def category(name: str) -> str:
    if any(k in name for k in ATTENTION):
        return "attention"
    if any(name.startswith(k) or k in name for k in GEMM):
        return "GEMM"
    return "other"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--workload", action="append", required=True, help="NAME:BATCH, e.g. image-448:1 (repeatable)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from q3vl.bench.run import native_bf16
    from q3vl.bench.workloads import make_items
    from q3vl.reference import reference_for

    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    ref = reference_for("embedding")(str(a.checkpoint), dtype=a.dtype, device="cpu")
    rows = []
    for spec in a.workload:
        name, batch = spec.split(":")
        items = make_items(name, int(batch), a.out.parent)
        ref.process(items)
        walls = []
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(a.repeats):
                t = time.perf_counter()
                ref.process(items)
                walls.append(time.perf_counter() - t)
        by: dict[str, float] = {}
        top: dict[str, float] = {}
        for ev in prof.key_averages():
            ms = ev.self_cpu_time_total / 1000 / a.repeats
            by[category(ev.key)] = by.get(category(ev.key), 0.0) + ms
            top[ev.key] = ms
        total = sum(by.values())
        rows.append({"workload": spec, "wall_ms_profiled": round(1000 * sum(walls) / len(walls), 1),
                     "self_ms": {k: round(v, 1) for k, v in by.items()},
                     "share": {k: round(v / total, 4) for k, v in by.items()},
                     "top_ops": {k: round(v, 1) for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:12]}})
        print(json.dumps(rows[-1]), flush=True)
    flags = sorted({f for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
                    for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx", "fma"))})
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    meta = {"checkpoint": a.checkpoint.name, "dtype": a.dtype, "threads": threads, "cpu": cpu, "simd": flags,
            "native_bf16": native_bf16(), "torch": torch.__version__, "when": time.strftime("%Y-%m-%d %H:%M UTC")}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{a.out}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"PyTorch {a.dtype} reference, `{a.checkpoint.name}`; {cpu}, {threads} threads, SIMD flags: "
             f"{' '.join(flags)}; torch {torch.__version__}; {meta['when']}; self CPU time per call under "
             "torch.profiler (mean of the profiled calls)", "",
             "| workload | profiled wall ms | GEMM ms | attention ms | other ms | GEMM share |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        s = r["self_ms"]
        lines.append(f"| {r['workload']} | {r['wall_ms_profiled']} | {s.get('GEMM', 0)} | {s.get('attention', 0)} | "
                     f"{s.get('other', 0)} | {r['share'].get('GEMM', 0):.1%} |")
    Path(f"{a.out}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
