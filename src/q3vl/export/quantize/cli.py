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
    from q3vl.export.recipe import QuantizeRecipe
    from q3vl.options import add_flags

    p.add_argument("bundle", type=Path, help="an fp32 bundle")
    p.add_argument("-o", "--output", type=Path, required=True, help="the new bundle directory")
    add_flags(p, QuantizeRecipe())  # the weight format, the int8 method and its settings
    p.add_argument("--checkpoint", type=Path,
                   help="int8 smooth: the checkpoint to calibrate on (default: the bundle's recorded source)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")


@command("quantize", _quantize_args)
def _quantize(a: argparse.Namespace) -> int:
    """Write a weight-quantized copy of a bundle, with its parity measured and stored."""
    from q3vl.bundle import looks_like_bundle
    from q3vl.checks import require
    from q3vl.export.quantize.weights import check_quantizable, check_smooth, quantize_bundle
    from q3vl.export.recipe import QuantizeRecipe
    from q3vl.options import from_args
    from q3vl.outputs import check_output

    require("export", ["onnx"])
    recipe = from_args(a, QuantizeRecipe())  # every combination that cannot be built is refused here
    manifest = check_quantizable(a.bundle)
    if recipe.int8_method == "smooth":  # calibration runs the checkpoint's layers in torch
        check_smooth(a.bundle, manifest, a.checkpoint)
        require("export", ["torch", "safetensors"])
    elif a.checkpoint is not None:
        raise ConfigError("--checkpoint is for --weights int8 with --method smooth (the default), which calibrates "
                          "on it")
    check_output(a.output, overwrite=a.overwrite, directory=True, replaceable=looks_like_bundle,
                 what="bundle directory")
    from q3vl.export.exporter import summary

    out = quantize_bundle(a.bundle, a.output, recipe=recipe, overwrite=a.overwrite, progress=not a.no_progress,
                          checkpoint=a.checkpoint)
    sys.stdout.write(summary(out) + "\n")
    return 0
