"""The GPU measurement of issue 7, prepared to run in one go on a lent H100/H200.

Makes the 2B-shape random-weight embedding checkpoint, exports an fp16 fused bundle, then runs the
PyTorch reference (bf16, sdpa, CUDA) and q3vl's ONNX Runtime CUDA backend (fp16, IO binding) on the
same workloads in the same run, and writes JSON + Markdown under $OUT (or benchmarks/results).

Usage on the GPU machine (once onnxruntime-gpu is installed there):
    python3 benchmarks/gpu_2b.py [--workdir /tmp/q3vl-gpu] [--quick]
Needs there: torch, transformers (present), qwen-vl-utils and PyAV for the reference's
preprocessing (carry their wheels), and this repository.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from q3vl.bench.run import benchmark
from q3vl.bench.workloads import Workload


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/q3vl-gpu"))
    p.add_argument("--quick", action="store_true", help="a first smoke pass: 1 repeat, 3 workloads")
    a = p.parse_args()
    from q3vl.export.exporter import export_bundle
    from q3vl.testing import make_checkpoint

    ckpt = a.workdir / "2b-embedding"
    if not (ckpt / "config.json").exists():
        make_checkpoint(ckpt, task="embedding", shape="2b")
    bundle = a.workdir / "bundles" / "2b-embedding-fp16"
    if not (bundle / "q3vl.json").exists():
        # validated on the CPU provider in fp16 (slow for 2B): the CUDA parity is what the run checks
        export_bundle(ckpt, bundle, "fp16", "embedding", overwrite=True, validate=False)
    workloads = [Workload("text-32", "embed", 1), Workload("image-448", "embed", 1), Workload("text-32", "embed", 32)]
    if not a.quick:
        workloads += [Workload("text-512", "embed", 32), Workload("image-448", "embed", 8),
                      Workload("image-1280x720", "embed", 8), Workload("mixed", "embed", 8)]
    systems = [
        {"name": "reference bf16 sdpa (cuda)", "kind": "reference", "task": "embedding", "checkpoint": str(ckpt),
         "dtype": "bfloat16", "device": "cuda"},
        {"name": "q3vl fp16 (ORT CUDA, IO binding)", "kind": "runtime", "task": "embedding", "bundle": str(bundle),
         "backend": "cuda", "batch_size": 32},
    ]
    out = Path(os.environ.get("OUT", "benchmarks/results"))
    benchmark(systems, workloads, 1 if a.quick else 10, out, "gpu-2b")


if __name__ == "__main__":
    main()
