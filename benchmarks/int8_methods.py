"""int8 methods (and int4 / fp16 weights) on random-weight checkpoints: accuracy vs fp32, and speed.

    python benchmarks/int8_methods.py --shape small --activations realistic [--workdir work]
        [--methods dynamic,nbits,...] [--repeats 3] [--rounds 2] [--tag TAG]

For each task (embedding, reranker): make or reuse the checkpoint and its fp32 bundle, write one
bundle per method with `quantize_bundle`, and read its parity against the fp32 bundle on the
export parity cases (worst embedding cosine, max |score difference|) from the bundle's manifest
(a bundle outside its tolerance is kept, marked failed, and still reported). Then time text-32 x8
and image-448 x8 for the fp32 embedding bundle and every method's in one run of the `q3vl bench`
harness (each system in its own process; rounds in alternating order, runs pooled). Writes
benchmarks/results/<tag>.json and <tag>.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

from q3vl.bench.run import machine_info, pool_rounds, run_system
from q3vl.bench.workloads import Workload
from q3vl.bundle import Manifest
from q3vl.errors import ParityError
from q3vl.export.quantize.int8 import Int8Plan

# method -> (weights, what it is)
METHODS = {
    "dynamic": ("int8", "ONNX Runtime dynamic quantization: one activation scale per call (the previous default)"),
    "nbits": ("int8", "MatMulNBits 8-bit weights, accuracy_level 4 (block-wise int8 activations)"),
    "token": ("int8", "per-token activations, 7-bit weights, no smoothing"),
    "smooth-tensor": ("int8", "calibrated smoothing + one activation scale per call (DynamicQuantizeMatMul)"),
    "smooth": ("int8", "calibrated smoothing + per-token activations + 7-bit weights, every projection int8"),
    "smooth+float": ("int8", "smoothing + per-token + spike-carrying projections float (the new default)"),
    "int4": ("int4", "MatMulNBits 4-bit, block 32, accuracy_level 4"),
    "fp16": ("fp16", "fp16 weights, fp32 norms/softmax/residual"),
}
WORKLOADS = [Workload("text-32", "embed", 8), Workload("image-448", "embed", 8)]


def checkpoint_and_fp32(workdir: Path, shape: str, activations: str, task: str) -> tuple[Path, Path]:
    from q3vl.export.exporter import export_bundle
    from q3vl.testing import make_checkpoint

    ckpt = workdir / f"{shape}-{activations}-{task}"
    if not (ckpt / "config.json").exists():
        make_checkpoint(ckpt, task=task, shape=shape, seed=0 if task == "embedding" else 1, activations=activations)
    fp32 = workdir / "bundles" / f"{shape}-{activations}-{task}-fp32"
    if not (fp32 / "q3vl.json").exists():
        export_bundle(ckpt, fp32, task=task, overwrite=True, progress=False)
    return ckpt, fp32


def make_bundle(fp32: Path, out: Path, method: str, plans: dict[str, Int8Plan]) -> Path:
    """One method's bundle (reused when present). Calibrations are shared where the settings allow."""
    from q3vl.export.quantize.weights import quantize_bundle

    if (out / "q3vl.json").exists():
        return out
    weights = METHODS[method][0]
    kw: dict[str, Any] = {}
    if method in ("dynamic", "nbits"):
        kw["method"] = method
    elif weights == "int8":
        kw["plan"] = _plan(fp32, method, plans)
    with contextlib.suppress(ParityError):  # kept, marked failed: its figures are reported like the others
        quantize_bundle(fp32, out, weights, overwrite=True, **kw)
    return out


def _plan(fp32: Path, method: str, plans: dict[str, Int8Plan]) -> Int8Plan:
    from q3vl.export.quantize.calibrate import calibrate

    settings = {"token": Int8Plan(alphas=None, max_error=None), "smooth-tensor": Int8Plan(activations="tensor",
                                                                                           max_error=None),
                "smooth": Int8Plan(max_error=None), "smooth+float": Int8Plan(max_error=None)}[method]
    key = f"{settings.activations}/{settings.alphas}"
    if key not in plans:
        m = Manifest.read(fp32)
        plans[key] = calibrate(m.source["path"], m.task, settings)
    plan = copy.deepcopy(plans[key])
    if method == "smooth+float":
        plan.max_error = Int8Plan().max_error
        for p in plan.projections.values():
            p.keep_float = p.error > plan.max_error
    return plan


def accuracy(bundle: Path) -> dict[str, Any]:
    m = Manifest.read(bundle)
    q = m.extra.get("quantization", {})
    size = m.files.get("text.onnx.data", {}).get("size", 0) + m.files.get("vision.onnx.data", {}).get("size", 0)
    return {"passed": m.parity.get("passed"), "embed_min_cos": m.parity.get("embed_min_cos"),
            "score_max_abs_diff": m.parity.get("score_max_abs_diff"), "cases": m.parity.get("cases"),
            "weights_mb": round(size / 1e6, 1),
            "float_projections": (q.get("int8_plan") or {}).get("float_projections")}


def speed(systems: dict[str, Path], repeats: int, rounds: int) -> dict[str, Any]:
    """Median ms per workload for each system, rounds in alternating order (as `q3vl bench`)."""
    import tempfile

    names = list(systems)
    parts: dict[str, list[Any]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory(prefix="q3vl-media-") as media:
        for r in range(rounds):
            for n in names[:: -1 if r % 2 else 1]:
                spec = {"name": n, "kind": "runtime", "task": "embedding", "bundle": str(systems[n]), "backend": "cpu",
                        "allow_unverified": True}  # a method outside its tolerance is still timed
                parts[n].append(run_system(spec, WORKLOADS, repeats, Path(media), 7200))
    return {n: pool_rounds(p) for n, p in parts.items()}


def markdown(data: dict[str, Any]) -> str:
    m = data["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; "
             + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + f"; {m['date']}",
             f"Checkpoints: shape {data['shape']}, activations {data['activations']}; speed: median of "
             f"{data['repeats']} x {data['rounds']} runs, end to end, same run as fp32.", "",
             "| method | weights | embedding worst cos | reranker max abs score diff | within tolerance "
             "| text-32 x8 | image-448 x8 | weights MB | float projections |",
             "|---|---|---|---|---|---|---|---|---|"]
    base = {w["workload"]: w["median_ms"] for w in data["speed"]["fp32"].get("workloads", [])}
    for method in ["fp32", *data["methods"]]:
        emb, rr = data["accuracy"]["embedding"].get(method, {}), data["accuracy"]["reranker"].get(method, {})
        cells = []
        for w in data["speed"].get(method, {}).get("workloads", []):
            cells.append(f"{w['median_ms']:.0f} ms ({base[w['workload']] / w['median_ms']:.2f}x)")
        cells += ["-"] * (2 - len(cells))
        ok = "-" if method == "fp32" else ("yes" if emb.get("passed") and rr.get("passed") else "no")
        cos = emb.get("embed_min_cos")
        diff = rr.get("score_max_abs_diff")
        fl = emb.get("float_projections")
        lines.append(f"| {method} | {METHODS.get(method, ('fp32',))[0]} | {'1' if cos is None else f'{cos:.4f}'} | "
                     f"{'0' if diff is None else f'{diff:.4f}'} | {ok} | {cells[0]} | {cells[1]} | "
                     f"{emb.get('weights_mb', '-')} | {len(fl) if fl is not None else '-'} |")
    lines += ["", *[f"- **{k}**: {v[1]}" for k, v in METHODS.items() if k in data["methods"]]]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="small")
    p.add_argument("--activations", choices=["default", "realistic"], default="realistic")
    p.add_argument("--workdir", type=Path, default=Path("work"))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--no-speed", action="store_true", help="accuracy only")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--tag")
    a = p.parse_args()
    methods = a.methods.split(",")
    started = time.perf_counter()
    acc: dict[str, dict[str, Any]] = {}
    bundles: dict[str, Path] = {}
    for task in ("embedding", "reranker"):
        _, fp32 = checkpoint_and_fp32(a.workdir, a.shape, a.activations, task)
        plans: dict[str, Int8Plan] = {}
        acc[task] = {}
        for method in methods:
            out = a.workdir / "bundles" / f"{a.shape}-{a.activations}-{task}-{method}"
            acc[task][method] = accuracy(make_bundle(fp32, out, method, plans))
            r = acc[task][method]
            sys.stderr.write(f"{task} {method}: {r['embed_min_cos'] or r['score_max_abs_diff']}\n")
            if task == "embedding":
                bundles[method] = out
        if task == "embedding":
            bundles = {"fp32": fp32, **bundles}
    data = {"machine": machine_info(), "shape": a.shape, "activations": a.activations, "methods": methods,
            "repeats": a.repeats, "rounds": a.rounds, "accuracy": acc,
            "speed": {} if a.no_speed else speed(bundles, a.repeats, a.rounds)}
    if a.no_speed:
        data["speed"] = {"fp32": {}}
    data["seconds"] = round(time.perf_counter() - started, 1)
    tag = a.tag or f"int8-methods-{a.shape}-{a.activations}"
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"{tag}.json").write_text(json.dumps(data, indent=1))
    (a.out / f"{tag}.md").write_text(markdown(data))
    sys.stdout.write(markdown(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
