"""`q3vl trt check` (static TensorRT op check) and `q3vl trt build` (engines into a bundle)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from q3vl.cli import command


def _check_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", help="bundles (directories or Hub repo ids) or .onnx files")


@command("trt check", _check_args)
def _check(a: argparse.Namespace) -> int:
    """Check a bundle's ops and data types against TensorRT 10's ONNX table; exit 1 on problems."""
    from q3vl.checks import bundle_source, require
    from q3vl.errors import ConfigError

    require("export", ["onnx"])
    a.paths = [bundle_source(p) for p in a.paths]
    files = [f for p in a.paths for f in (sorted(p.glob("*.onnx")) if p.is_dir() else [p])]
    missing = [str(p) for p in a.paths if not p.exists()]
    if missing or not files:
        raise ConfigError(f"no such bundle or .onnx file: {', '.join(missing)}" if missing
                          else f"no .onnx files in {', '.join(map(str, a.paths))}")
    from q3vl.tensorrt.support import check_graph

    reports = [check_graph(f) for f in files]
    for r in reports:
        sys.stdout.write(r.summary() + "\n")
    return 0 if all(r.ok for r in reports) else 1


def add_engine_args(p: argparse._ActionsContainer, prefix: str = "") -> None:
    """Engine precision and the limits its optimization profiles come from (shared with `q3vl export --tensorrt`)."""
    p.add_argument(f"--{prefix}precision", choices=["fp16", "bf16", "fp32"], default="fp16",
                   help="engine precision (TensorRT builder flag)")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--max-image-pixels", type=int, default=1_843_200)
    p.add_argument("--max-frames", type=int, default=64)
    p.add_argument("--max-images", type=int, default=8, help="vision blocks per vision-engine call")
    p.add_argument("--workspace-gb", type=float, default=8.0)


def build_from_args(bundle: Path, a: argparse.Namespace, precision: str) -> int:
    """Build the engines with the limits in `a` and print one line per engine."""
    from q3vl.tensorrt.build import build_engines
    from q3vl.tensorrt.profiles import Limits

    limits = Limits(max_batch=a.max_batch, max_tokens=a.max_tokens, max_image_pixels=a.max_image_pixels,
                    max_frames=a.max_frames, max_images=a.max_images)
    m = build_engines(bundle, limits, precision, a.workspace_gb)
    for graph, e in m.extra["tensorrt"]["engines"].items():
        sys.stdout.write(f"{graph}: {e['file']} ({e['precision']}, {e['seconds']} s)\n")
    return 0


def _build_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="a bundle exported with --graph plain")
    add_engine_args(p)


@command("trt build", _build_args)
def _build(a: argparse.Namespace) -> int:
    """Build TensorRT engines into a plain-graph bundle, with profiles from the given limits."""
    from q3vl.checks import positive, require
    from q3vl.errors import ConfigError
    from q3vl.hub.source import is_repo_id
    from q3vl.tensorrt.build import check_bundle_for_tensorrt, require_tensorrt

    positive(max_batch=a.max_batch, max_tokens=a.max_tokens, max_image_pixels=a.max_image_pixels,
             max_frames=a.max_frames, max_images=a.max_images, workspace_gb=a.workspace_gb)
    require("export", ["onnx"])  # the static op check reads the graphs
    if is_repo_id(a.bundle):
        raise ConfigError(f"trt build writes engines into the bundle directory, not into a Hub cache: download "
                          f"{a.bundle} into a folder (huggingface-cli download {a.bundle} --local-dir DIR) and "
                          "build there")
    a.bundle = Path(a.bundle)
    check_bundle_for_tensorrt(a.bundle)
    require_tensorrt()
    return build_from_args(a.bundle, a, a.precision)
