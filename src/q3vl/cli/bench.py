"""`q3vl bench`: make or reuse checkpoints and bundles for a shape, then benchmark them all."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from q3vl.cli import command
from q3vl.errors import ConfigError

log = logging.getLogger(__name__)
VARIANTS = ("fp32", "fp16", "int8", "int4", "fp32-plain", "fp16-plain")


def default_workdir() -> Path:
    """Where generated checkpoints and bundles are cached between runs: outside any source tree."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "q3vl" / "bench"


def _args(p: argparse.ArgumentParser) -> None:
    from q3vl.options import add_flags
    from q3vl.runtime.options import RuntimeOptions

    p.add_argument("--shape", choices=["tiny", "small", "2b", "8b"],
                   help="model shape (default: small; tiny with --quick)")
    p.add_argument("--activations", choices=["default", "realistic"], default="default",
                   help="checkpoints with plain Gaussian weights, or with the activation outliers of trained "
                        "models (q3vl.testing.outliers): what weight-quantized bundles are judged on")
    p.add_argument("--workdir", type=Path, default=None,
                   help="checkpoints and bundles are made (once) and reused here (default: ~/.cache/q3vl/bench)")
    p.add_argument("--variants", help=f"runtime bundles to include, from {VARIANTS} (default: fp32,fp16,int8; "
                                      "fp32 with --quick)")
    p.add_argument("--tasks", default="embedding,reranker")
    p.add_argument("--bundle", action="append", default=[], metavar="LABEL=PATH",
                   help="also benchmark this bundle (a directory or a Hub repo id) as system 'q3vl LABEL' "
                        "(repeatable; e.g. an int8 bundle "
                        "before and after a change, in the same interleaved run); --variants none: only these")
    add_flags(p, RuntimeOptions(), only=("backend",))  # the runtime variants' backend
    p.add_argument("--device", default="cpu", help="device of the PyTorch reference (cpu, cuda)")
    p.add_argument("--reference-dtype", default="auto",
                   help="the PyTorch reference's dtypes, a list from float32 (fp32), bfloat16 (bf16), float16 "
                        "(fp16); auto (default): float32, plus bfloat16 where the CPU has native bf16 "
                        "(AVX512_BF16, AMX, Arm bf16; the baseline users pick there); --quick: float32")
    p.add_argument("--int8-alpha", type=float, metavar="A",
                   help="int8 bundles made here: one smoothing strength instead of trying 0.3-0.6 (for the 2b/8b "
                        "shapes; calibrates ~5x faster)")
    p.add_argument("--no-validate", action="store_true",
                   help="bundles made here skip the export-time parity check against transformers (the 2b/8b "
                        "shapes' float32 model needs 13/35 GB); stamped in their manifests")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per workload per round")
    p.add_argument("--rounds", type=int, default=2,
                   help="run every system this many times, alternating the order, and pool the runs (noise)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: tiny shape, fp32 bundles, 4 workloads, 1 repeat, 1 round (under 2 minutes)")
    p.add_argument("--workloads", help="only these workloads, e.g. 'text-32:8,image-448:8' (name[:batch])")
    p.add_argument("--out", type=Path, help="write <tag>.json/.md/.png here (default: print the table only)")
    p.add_argument("--tag", help="file stem for the results (default: cpu-<shape> / quick-<shape>)")


def _stem(shape: str, task: str, activations: str = "default") -> str:
    """The name of the checkpoint directory (and the prefix of its bundles) under the work directory."""
    return f"{shape}-{task}" if activations == "default" else f"{shape}-{activations}-{task}"


def ensure_bundle(workdir: Path, shape: str, task: str, variant: str, activations: str = "default",
                  int8_alpha: float | None = None, validate: bool = True) -> Path:
    """The bundle for (shape, task, variant), exporting or quantizing it if it is not there yet.

    int8 with a fixed smoothing strength (`int8_alpha`), or without validation, is exported straight
    from the checkpoint (the same graphs `q3vl quantize` writes from the fp32 bundle, in a third of
    the memory: what the 2b/8b shapes need); otherwise from the fp32 bundle, its parity measured
    against it.
    """
    from q3vl.export.exporter import export_bundle
    from q3vl.outputs import staged_dir
    from q3vl.tasks import TASKS
    from q3vl.testing import make_checkpoint

    stem = _stem(shape, task, activations)
    ckpt = workdir / stem
    if not (ckpt / "config.json").exists():
        log.info("making a random-weight %s %s checkpoint (%s activations) in %s", shape, task, activations, ckpt)
        with staged_dir(ckpt, overwrite=True) as tmp:
            make_checkpoint(tmp, task=task, shape=shape, seed=list(TASKS).index(task),  # embedding 0, reranker 1
                            activations=activations)
    out = workdir / "bundles" / f"{stem}-{variant}"
    if _reusable(out, variant):
        return out
    log.info("making the %s %s bundle %s", task, variant, out)
    if variant.endswith("-plain"):
        return export_bundle(ckpt, out, variant.removesuffix("-plain"), task, graph="plain", overwrite=True,
                             validate=validate)
    if variant in ("fp32", "fp16"):
        return export_bundle(ckpt, out, variant, task, overwrite=True, validate=validate)
    from q3vl.errors import ParityError
    from q3vl.export.quantize.weights import quantize_bundle

    try:
        if variant == "int8" and (int8_alpha is not None or not validate):
            from q3vl.export.quantize.int8 import plan_for_alpha

            return export_bundle(ckpt, out, "fp32", task, overwrite=True, validate=validate, weights="int8",
                                 int8_plan=plan_for_alpha(int8_alpha))
        fp32 = ensure_bundle(workdir, shape, task, "fp32", activations, int8_alpha, validate)
        return quantize_bundle(fp32, out, variant, overwrite=True)
    except ParityError as e:  # kept, marked failed: still timed (`systems` says so in its name)
        log.warning("the %s %s bundle is outside its tolerance (%s); benchmarking it anyway", task, variant, e)
        return out


def _reusable(out: Path, variant: str) -> bool:
    """Whether a cached bundle can be reused: it exists and, for int8, was made by the current default
    method ("smooth"; an int8 bundle cached before it, made by "dynamic", is made again).
    """
    if not (out / "q3vl.json").exists():
        return False
    if variant != "int8":
        return True
    from q3vl.bundle import Manifest

    return bool(Manifest.read(out).extra.get("quantization", {}).get("method") == "smooth")


def _passed(bundle: Path) -> bool:
    from q3vl.bundle import Manifest

    return Manifest.read(bundle).parity.get("passed") is not False


def systems(a: argparse.Namespace) -> list[dict[str, Any]]:
    """The reference and each runtime variant, per task."""
    out = []
    for task in a.tasks.split(","):
        ensure_bundle(a.workdir, a.shape, task, "fp32", a.activations, a.int8_alpha, not a.no_validate)
        for dtype in a.reference_dtype.split(","):
            out.append({"name": f"reference {dtype} ({task})", "kind": "reference", "task": task,
                        "checkpoint": str(a.workdir / _stem(a.shape, task, a.activations)), "dtype": dtype,
                        "device": a.device})
        for variant in [v for v in a.variants.split(",") if v != "none"]:
            bundle = ensure_bundle(a.workdir, a.shape, task, variant, a.activations, a.int8_alpha, not a.no_validate)
            ok = _passed(bundle)
            out.append({"name": f"q3vl {variant} ({task}{'' if ok else ', outside its tolerance'})", "kind": "runtime",
                        "task": task, "bundle": str(bundle), "backend": a.backend, "allow_unverified": not ok})
        out += [{"name": f"q3vl {label} ({task})", "kind": "runtime", "task": task, "bundle": str(path),
                 "backend": a.backend, "allow_unverified": True}
                for label, path in a.bundle if _task_of(path) == task]
    return out


def _task_of(bundle: Path) -> str:
    from q3vl.bundle import Manifest

    return Manifest.read(bundle).task


def select(workloads: list[Any], spec: str | None) -> list[Any]:
    """Filter the standard matrix by 'name[:batch],...'; unknown names are a ConfigError."""
    if not spec:
        return workloads
    from q3vl.bench.workloads import EMBED_NAMES, Workload

    out = []
    for part in spec.split(","):
        name, _, batch = part.partition(":")
        if batch and not (batch.isdigit() and int(batch) > 0):
            raise ConfigError(f"--workloads {part!r}: the batch after ':' must be a positive integer")
        hits = [w for w in workloads if w.name == name and (not batch or w.batch == int(batch))]
        if not hits:
            kinds = {**dict.fromkeys(EMBED_NAMES, "embed"), **{w.name: w.kind for w in workloads}}
            if name in kinds:  # outside the standard matrix (text-16, text-128) or at another batch
                hits = [Workload(name, kinds[name], int(batch or 1))]
        if not hits:
            known = sorted({w.name for w in workloads} | set(EMBED_NAMES))
            raise ConfigError(f"--workloads: unknown workload {part!r}; known: {known}")
        out += hits
    return out


def _labelled(value: str) -> tuple[str, Path]:
    """LABEL=PATH of --bundle: the label names the system, the path must be a bundle (or a Hub repo id of one,
    downloaded and verified here, before any benchmark starts).
    """
    from q3vl.bundle import MANIFEST
    from q3vl.checks import bundle_source

    label, sep, path = value.partition("=")
    local = bundle_source(path) if sep and label.strip() and path else None
    if local is None or not (local / MANIFEST).is_file():
        raise ConfigError(f"--bundle {value!r}: expected LABEL=PATH with PATH a q3vl bundle directory (or a Hub "
                          "repo id ORG/NAME[@REVISION] of one)")
    return label.strip(), local


def _listed(value: str, known: Any, flag: str) -> list[str]:
    """A comma-separated option whose every entry must be known."""
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in names if v not in known]
    if unknown or not names:
        raise ConfigError(f"{flag}: unknown {unknown or value!r}; choose from {', '.join(known)}")
    return names


DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
               "float16": "float16", "fp16": "float16"}


def reference_dtypes(value: str, device: str = "cpu", quick: bool = False) -> list[str]:
    """The reference's dtypes from --reference-dtype: a list (aliases fp32/bf16/fp16), or "auto":
    float32, plus bfloat16 on a CPU with native bf16 (not with --quick, a smoke test).

    An explicit bfloat16 on a CPU without native bf16 still runs (emulated: slow), with a warning.
    """
    from q3vl.bench.run import native_bf16

    if value.strip() == "auto":
        fast = device == "cpu" and not quick and bool(native_bf16())
        log.info("bench: reference in float32%s (native bf16 flags: %s)", " and bfloat16" if fast else "",
                 ", ".join(native_bf16()) or "none")
        return ["float32", "bfloat16"] if fast else ["float32"]
    names = _listed(value, DTYPE_NAMES, "--reference-dtype")
    dtypes = list(dict.fromkeys(DTYPE_NAMES[n] for n in names))
    if "bfloat16" in dtypes and device == "cpu" and not native_bf16():
        log.warning("bench: this CPU has no native bf16 (no avx512_bf16/amx_bf16/bf16 flag): the bfloat16 "
                    "reference runs emulated, slower than float32")
    return dtypes


def resolve_options(a: argparse.Namespace) -> None:
    """Fill the --quick defaults and check every option before anything is made or run."""
    from q3vl.checks import positive, require

    require("export")  # first: a base install gets the one missing-extra line, before any other output
    a.shape = a.shape or ("tiny" if a.quick else "small")
    a.backend = a.backend or "cpu"
    a.variants = ",".join(_listed(a.variants or ("fp32" if a.quick else "fp32,fp16,int8"), (*VARIANTS, "none"),
                                  "--variants"))
    a.bundle = [_labelled(b) for b in a.bundle]
    from q3vl.tasks import TASKS

    a.tasks = ",".join(_listed(a.tasks, list(TASKS), "--tasks"))
    a.workdir = a.workdir or default_workdir()
    positive(repeats=a.repeats, rounds=a.rounds)
    a.reference_dtype = ",".join(reference_dtypes(a.reference_dtype, a.device, a.quick))
    if a.int8_alpha is not None:
        from q3vl.export.quantize.int8 import plan_for_alpha

        plan_for_alpha(a.int8_alpha)  # checks the range
    if a.out is not None:
        from q3vl.outputs import check_output

        check_output(a.out, overwrite=True, directory=True, what="results directory")


@command("bench", _args)
def _bench(a: argparse.Namespace) -> int:
    """Benchmark the PyTorch reference and q3vl bundles on the same workloads (--quick: a smoke test)."""
    resolve_options(a)
    from q3vl.bench.run import benchmark
    from q3vl.bench.workloads import standard

    workloads = select(standard(a.quick), a.workloads)
    tag = a.tag or f"{'quick' if a.quick else a.backend}-{a.shape}" + ("" if a.activations == "default" else
                                                                       f"-{a.activations}")
    log.info("bench: work directory %s (checkpoints and bundles are reused from here)", a.workdir)
    with tempfile.TemporaryDirectory(prefix="q3vl-bench-results-") as scratch:
        out = a.out or Path(scratch)
        data = benchmark(systems(a), workloads, 1 if a.quick else a.repeats, out, tag,
                         rounds=1 if a.quick else a.rounds)
        sys.stdout.write((out / f"{tag}.md").read_text())
    if a.out is not None:
        log.info("bench: results in %s", ", ".join(str(a.out / f"{tag}{ext}") for ext in (".json", ".md", ".png")))
    failed = [r["system"] for r in data["results"] if "error" in r]
    if failed:
        sys.stderr.write(f"q3vl bench: these systems failed: {failed}\n")
    return 1 if failed else 0
