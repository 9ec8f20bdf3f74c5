"""`q3vl export` and `q3vl parity` (both need the export extra)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from q3vl.cli import command
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
    p.add_argument("--block-size", type=int, default=32, help="int4 block size")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle directory")
    p.add_argument("--no-validate", action="store_true", help="skip the parity check (stamped in the manifest)")
    trt = p.add_argument_group("TensorRT", "--tensorrt also builds engines, as `q3vl trt build` does")
    trt.add_argument("--tensorrt", action="store_true", help="build TensorRT engines after the export")
    add_engine_args(trt, prefix="trt-")


@command("export", _export_args)
def _export(a: argparse.Namespace) -> int:
    """Export a checkpoint to a validated ONNX bundle."""
    from q3vl.export.exporter import export_bundle, summary

    graph = a.graph or ("plain" if a.tensorrt else "fused")
    if a.weights and (a.tensorrt or graph != "fused" or a.precision != "fp32"):
        sys.stderr.write("q3vl: error: --weights needs the fused fp32 graphs (no --tensorrt, --graph plain or "
                         "--precision)\n")
        return 2
    if a.tensorrt:
        from q3vl.tensorrt.build import require_tensorrt

        if graph == "fused":
            sys.stderr.write("q3vl: error: --tensorrt needs --graph plain: TensorRT's ONNX parser does not know "
                             "the fused graphs' ONNX Runtime contrib ops\n")
            return 2
        require_tensorrt()  # before minutes of export, not after
    try:
        out = export_bundle(a.checkpoint, a.output, a.precision, a.task, graph=graph, overwrite=a.overwrite,
                            validate=not a.no_validate, weights=a.weights, block_size=a.block_size)
    except FileExistsError as e:
        sys.stderr.write(f"q3vl: error: {e}\n")
        return 2
    sys.stdout.write(summary(out) + "\n")
    return build_from_args(out, a, a.trt_precision) if a.tensorrt else 0


def _parity_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", type=Path, help="the checkpoint the bundle was exported from")
    p.add_argument("bundle", type=Path)
    p.add_argument("--inputs", type=Path, help="JSONL of items (optional 'name' key); default: built-in set")


@command("parity", _parity_args)
def _parity(a: argparse.Namespace) -> int:
    """Compare the runtime with the PyTorch reference item by item; non-zero exit below tolerance."""
    from q3vl.reference.parity import run

    text, ok = run(a.checkpoint, a.bundle, a.inputs)
    sys.stdout.write(text + "\n")
    return 0 if ok else 1
