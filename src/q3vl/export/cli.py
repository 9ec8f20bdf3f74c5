"""`q3vl export` and `q3vl parity` (both need the export extra, which they check for first)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from q3vl.cli import command
from q3vl.errors import ConfigError
from q3vl.tensorrt.cli import add_engine_args, build_from_args


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", type=Path, help="Hugging Face checkpoint directory")
    p.add_argument("-o", "--output", type=Path, required=True, help="bundle directory to write")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--task", choices=["auto", "embedding", "reranker"], default="auto")
    p.add_argument("--graph", choices=["fused", "plain"], default=None,
                   help="fused: ORT contrib ops (fast; the default); plain: standard ops, traced (parity "
                        "baseline; the default with --tensorrt)")
    p.add_argument("--weights", choices=["int8", "int4"],
                   help="write quantized weights straight from the checkpoint (fused fp32 graphs): int8 = the "
                        "calibrated smoothing method of `q3vl quantize`, int4 = MatMulNBits; parity is checked "
                        "against transformers with the weight format's tolerance")
    p.add_argument("--block-size", type=int, default=32, help="int4 block size (with --weights int4)")
    p.add_argument("--int8-alpha", type=float, metavar="A",
                   help="with --weights int8: one smoothing strength in (0, 1) instead of trying 0.3-0.6 (each "
                        "strength tried runs a simulated copy of the model: a fixed one calibrates ~5x faster, "
                        "which matters for the 8B shape on a CPU)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle directory")
    p.add_argument("--no-validate", action="store_true", help="skip the parity check (stamped in the manifest)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    trt = p.add_argument_group("TensorRT", "--tensorrt also builds engines, as `q3vl trt build` does")
    trt.add_argument("--tensorrt", action="store_true", help="build TensorRT engines after the export")
    add_engine_args(trt, prefix="trt-")


def _check_export(a: argparse.Namespace, graph: str) -> None:
    """Everything an export can be refused for, before minutes of work."""
    from q3vl.bundle import looks_like_bundle
    from q3vl.checks import positive, require
    from q3vl.export.weights import check_checkpoint
    from q3vl.outputs import check_output

    require("export")
    check_checkpoint(a.checkpoint)
    if graph == "fused" and a.precision == "bf16":
        raise ConfigError("--precision bf16 needs --graph plain (fused graphs are built in fp32 or fp16)")
    if a.weights and (a.tensorrt or graph != "fused" or a.precision != "fp32"):
        raise ConfigError("--weights needs the fused fp32 graphs (no --tensorrt, --graph plain or --precision)")
    positive(block_size=a.block_size)
    if a.int8_alpha is not None:
        if a.weights != "int8":
            raise ConfigError("--int8-alpha is for --weights int8")
        from q3vl.export.quantize.int8 import plan_for_alpha

        plan_for_alpha(a.int8_alpha)
    if a.tensorrt and graph == "fused":
        raise ConfigError("--tensorrt needs --graph plain: TensorRT's ONNX parser does not know the fused graphs' "
                          "ONNX Runtime contrib ops")
    check_output(a.output, overwrite=a.overwrite, directory=True, replaceable=looks_like_bundle,
                 what="bundle directory")
    if a.tensorrt:
        from q3vl.tensorrt.build import require_tensorrt

        require_tensorrt()


@command("export", _export_args)
def _export(a: argparse.Namespace) -> int:
    """Export a checkpoint to a validated ONNX bundle (vision + text graphs, tokenizer, manifest)."""
    graph = a.graph or ("plain" if a.tensorrt else "fused")
    _check_export(a, graph)
    from q3vl.export.exporter import export_bundle, summary
    from q3vl.export.quantize.int8 import plan_for_alpha

    out = export_bundle(a.checkpoint, a.output, a.precision, a.task, graph=graph, overwrite=a.overwrite,
                        validate=not a.no_validate, progress=not a.no_progress, weights=a.weights,
                        block_size=a.block_size, int8_plan=plan_for_alpha(a.int8_alpha))
    sys.stdout.write(summary(out) + "\n")
    return build_from_args(out, a, a.trt_precision) if a.tensorrt else 0


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
