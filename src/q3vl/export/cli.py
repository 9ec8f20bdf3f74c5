"""`q3vl export` and `q3vl parity` (both need the export extra, which they check for first)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from q3vl.cli import command
from q3vl.tensorrt.cli import add_engine_args, build_from_args


def _export_args(p: argparse.ArgumentParser) -> None:
    from q3vl.export.recipe import TENSORRT, ExportRecipe
    from q3vl.options import add_flags

    p.add_argument("checkpoint", type=Path, help="Hugging Face checkpoint directory")
    p.add_argument("-o", "--output", type=Path, required=True, help="bundle directory to write")
    p.add_argument("--task", choices=["auto", "embedding", "reranker"], default="auto")
    groups = add_flags(p, ExportRecipe())  # graph x precision x weights (and --tensorrt)
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle directory")
    p.add_argument("--no-validate", action="store_true", help="skip the parity check (stamped in the manifest)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    trt = groups[TENSORRT]
    trt.description = "--tensorrt also builds engines, as `q3vl trt build` does"
    add_engine_args(trt, prefix="trt-")


def _check_export(a: argparse.Namespace) -> Any:
    """Everything an export can be refused for, before minutes of work; the recipe."""
    from q3vl.bundle import looks_like_bundle
    from q3vl.checks import require
    from q3vl.export.recipe import ExportRecipe
    from q3vl.export.weights import check_checkpoint
    from q3vl.options import from_args
    from q3vl.outputs import check_output

    require("export")
    check_checkpoint(a.checkpoint)
    recipe = from_args(a, ExportRecipe())  # every combination that cannot be built is refused here
    check_output(a.output, overwrite=a.overwrite, directory=True, replaceable=looks_like_bundle,
                 what="bundle directory")
    if recipe.tensorrt:
        from q3vl.tensorrt.build import require_tensorrt

        require_tensorrt()
    return recipe


@command("export", _export_args)
def _export(a: argparse.Namespace) -> int:
    """Export a checkpoint to a validated ONNX bundle (vision + text graphs, tokenizer, manifest)."""
    recipe = _check_export(a)
    from q3vl.export.exporter import export_bundle, summary

    out = export_bundle(a.checkpoint, a.output, task=a.task, recipe=recipe, overwrite=a.overwrite,
                        validate=not a.no_validate, progress=not a.no_progress)
    sys.stdout.write(summary(out) + "\n")
    return build_from_args(out, a, a.trt_precision) if recipe.tensorrt else 0


def _parity_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", type=Path, help="the checkpoint the bundle was exported from")
    p.add_argument("bundle", type=Path)
    p.add_argument("--inputs", type=Path, help="JSONL of items, as `q3vl embed` reads them (an optional id labels "
                                               "each row); default: the built-in set of 28 items")
    from q3vl.options import add_flags
    from q3vl.runtime.options import RuntimeOptions

    add_flags(p, RuntimeOptions(), only=PARITY_OPTIONS)  # the runtime side's; the reference has the wrapper's
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")


PARITY_OPTIONS = ("batch_size",)


@command("parity", _parity_args)
def _parity(a: argparse.Namespace) -> int:
    """Compare the runtime with the PyTorch reference item by item; exit 1 below tolerance."""
    from q3vl.bundle import Manifest
    from q3vl.checks import require
    from q3vl.export.weights import check_checkpoint
    from q3vl.options import from_args
    from q3vl.runtime.options import RuntimeOptions

    require("export", ["torch", "transformers", "torchvision", "qwen_vl_utils"])
    from_args(a, RuntimeOptions(), only=PARITY_OPTIONS)  # checked before any model loads
    check_checkpoint(a.checkpoint)
    manifest = Manifest.read(a.bundle)
    from q3vl.reference.parity import check_source, load_inputs, run

    records = load_inputs(a.inputs, None) if a.inputs else None  # every line checked before a model loads
    source = check_source(a.checkpoint, manifest)
    text, ok = run(a.checkpoint, a.bundle, records, batch_size=a.batch_size, progress=not a.no_progress,
                   source=source)
    sys.stdout.write(text + "\n")
    return 0 if ok else 1
