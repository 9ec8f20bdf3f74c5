"""`q3vl quantize`: a weight-quantized copy of an fp32 bundle (int8 smooth/dynamic/nbits, int4, fp16).

The command checks its options, the bundle, the output path and the optional packages before it
starts (`q3vl.checks`, `q3vl.outputs.check_output`) and writes through a staging path, so a failure or
a kill never leaves a half-written bundle.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from q3vl.cli import command
from q3vl.errors import ConfigError


def _quantize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="an fp32 bundle, or a Hub repo id ORG/NAME[@REVISION] of one")
    p.add_argument("--weights", choices=["int8", "int4", "fp16"], required=True)
    p.add_argument("-o", "--output", type=Path, required=True, help="the new bundle directory")
    p.add_argument("--block-size", type=int, default=32, help="int4 (and int8 nbits) block size")
    p.add_argument("--method", choices=["smooth", "dynamic", "nbits"],
                   help="int8 only: smooth (default: calibrated smoothing, per-token activations, spiking "
                        "projections kept float), dynamic (ONNX Runtime dynamic quantization, the previous "
                        "default), nbits (MatMulNBits 8-bit, accuracy level 4)")
    p.add_argument("--checkpoint", type=Path,
                   help="int8 smooth: the checkpoint to calibrate on (default: the bundle's recorded source)")
    p.add_argument("--int8-alpha", type=float, metavar="A",
                   help="int8 smooth: one smoothing strength in (0, 1) instead of trying 0.3-0.6 (calibrates "
                        "~5x faster)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")


@command("quantize", _quantize_args)
def _quantize(a: argparse.Namespace) -> int:
    """Write a weight-quantized copy of a bundle, with its parity measured and stored."""
    from q3vl.bundle import looks_like_bundle
    from q3vl.checks import bundle_source, positive, require
    from q3vl.export.quantize.weights import check_method, check_quantizable, check_smooth, quantize_bundle
    from q3vl.outputs import check_output

    require("export", ["onnx"])
    positive(block_size=a.block_size)
    method = check_method(a.weights, a.method)
    if a.int8_alpha is not None and method != "smooth":
        raise ConfigError("--int8-alpha is for --weights int8 with --method smooth (the default)")
    from q3vl.export.quantize.int8 import plan_for_alpha

    plan = plan_for_alpha(a.int8_alpha)
    a.bundle = bundle_source(a.bundle)
    manifest = check_quantizable(a.bundle)
    if method == "smooth":  # calibration runs the checkpoint's layers in torch
        check_smooth(a.bundle, manifest, a.checkpoint)
        require("export", ["torch", "safetensors"])
    elif a.checkpoint is not None:
        raise ConfigError("--checkpoint is for --weights int8 with --method smooth (the default), which calibrates "
                          "on it")
    check_output(a.output, overwrite=a.overwrite, directory=True, replaceable=looks_like_bundle,
                 what="bundle directory")
    from q3vl.export.exporter import summary

    out = quantize_bundle(a.bundle, a.output, a.weights, block_size=a.block_size, overwrite=a.overwrite,
                          progress=not a.no_progress, method=method, checkpoint=a.checkpoint, plan=plan)
    sys.stdout.write(summary(out) + "\n")
    return 0
