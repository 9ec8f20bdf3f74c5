"""`q3vl bench`: make or reuse checkpoints and bundles for a shape, then benchmark them all."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from q3vl.cli import command
from q3vl.tasks import TASKS

# weight-quantized rerankers are measured in the quantization report, not in the speed table
NOT_BENCHMARKED = {("reranker", "int8"), ("reranker", "int4")}

log = logging.getLogger(__name__)
VARIANTS = ("fp32", "fp16", "int8", "int4", "fp32-plain", "fp16-plain")


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", choices=["tiny", "small", "2b", "8b"], default="small")
    p.add_argument("--workdir", type=Path, default=Path("work"), help="checkpoints and bundles live here")
    p.add_argument("--variants", default="fp32,fp16,int8", help=f"runtime bundles to include, from {VARIANTS}")
    p.add_argument("--tasks", default="embedding,reranker")
    p.add_argument("--backend", default="cpu")
    p.add_argument("--device", default="cpu", help="device of the PyTorch reference (cpu, cuda)")
    p.add_argument("--reference-dtype", default="float32", help="float32 | bfloat16 | float16")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per workload per round")
    p.add_argument("--rounds", type=int, default=2,
                   help="run every system this many times, alternating the order, and pool the runs (noise)")
    p.add_argument("--quick", action="store_true", help="smoke-test subset (CI)")
    p.add_argument("--workloads", help="only these workloads, e.g. 'text-32:8,image-448:8' (name[:batch])")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--tag", help="file stem for the results (default: cpu-<shape> / quick-<shape>)")


def ensure_bundle(workdir: Path, shape: str, task: str, variant: str) -> Path:
    """The bundle for (shape, task, variant), exporting or quantizing it if it is not there yet."""
    from q3vl.export.exporter import export_bundle
    from q3vl.testing import make_checkpoint

    ckpt = workdir / f"{shape}-{task}"
    if not (ckpt / "config.json").exists():
        make_checkpoint(ckpt, task=task, shape=shape, seed=list(TASKS).index(task))  # embedding 0, reranker 1
    out = workdir / "bundles" / f"{shape}-{task}-{variant}"
    if (out / "q3vl.json").exists():
        return out
    if variant.endswith("-plain"):
        return export_bundle(ckpt, out, variant.removesuffix("-plain"), task, graph="plain", overwrite=True)
    if variant in ("fp32", "fp16"):
        return export_bundle(ckpt, out, variant, task, overwrite=True)
    from q3vl.quantization.weights import quantize_bundle

    return quantize_bundle(ensure_bundle(workdir, shape, task, "fp32"), out, variant, overwrite=True)


def systems(a: argparse.Namespace) -> list[dict[str, Any]]:
    """The reference and each runtime variant, per task."""
    out = []
    for task in a.tasks.split(","):
        ensure_bundle(a.workdir, a.shape, task, "fp32")
        out.append({"name": f"reference {a.reference_dtype} ({task})", "kind": "reference", "task": task,
                    "checkpoint": str(a.workdir / f"{a.shape}-{task}"), "dtype": a.reference_dtype,
                    "device": a.device})
        for variant in a.variants.split(","):
            if (task, variant) in NOT_BENCHMARKED:
                continue
            bundle = ensure_bundle(a.workdir, a.shape, task, variant)
            out.append({"name": f"q3vl {variant} ({task})", "kind": "runtime", "task": task, "bundle": str(bundle),
                        "backend": a.backend})
    return out


def select(workloads: list[Any], spec: str | None) -> list[Any]:
    """Filter the standard matrix by 'name[:batch],...'; unknown names are an error."""
    if not spec:
        return workloads
    from q3vl.bench.workloads import Workload

    out = []
    for part in spec.split(","):
        name, _, batch = part.partition(":")
        hits = [w for w in workloads if w.name == name and (not batch or w.batch == int(batch))]
        if not hits and batch:
            kinds = {w.name: w.kind for w in workloads}
            if name in kinds:
                hits = [Workload(name, kinds[name], int(batch))]
        if not hits:
            raise ValueError(f"unknown workload {part!r}; known: {sorted({w.name for w in workloads})}")
        out += hits
    return out


@command("bench", _args)
def _bench(a: argparse.Namespace) -> int:
    """Benchmark the reference and q3vl bundles on the standard workloads."""
    from q3vl.bench.run import benchmark
    from q3vl.bench.workloads import standard

    tag = a.tag or f"{'quick' if a.quick else a.backend}-{a.shape}"
    data = benchmark(systems(a), select(standard(a.quick), a.workloads), 1 if a.quick else a.repeats, a.out, tag,
                     rounds=1 if a.quick else a.rounds)
    failed = [r["system"] for r in data["results"] if "error" in r]
    sys.stdout.write((a.out / f"{tag}.md").read_text())
    if failed:
        sys.stderr.write(f"q3vl bench: these systems failed: {failed}\n")
    return 1 if failed else 0
