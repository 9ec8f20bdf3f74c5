"""`q3vl export` and `q3vl parity` (both need the export extra)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from q3vl.cli import command


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", type=Path, help="Hugging Face checkpoint directory")
    p.add_argument("-o", "--output", type=Path, required=True, help="bundle directory to write")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--task", choices=["auto", "embedding", "reranker"], default="auto")
    p.add_argument("--graph", choices=["fused", "plain"], default="fused",
                   help="fused: ORT contrib ops (fast); plain: standard ops, traced (parity baseline)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle directory")
    p.add_argument("--no-validate", action="store_true", help="skip the parity check (stamped in the manifest)")


@command("export", _export_args)
def _export(a: argparse.Namespace) -> int:
    """Export a checkpoint to a validated ONNX bundle."""
    from q3vl.export.exporter import export_bundle, summary

    try:
        out = export_bundle(a.checkpoint, a.output, a.precision, a.task, graph=a.graph, overwrite=a.overwrite,
                            validate=not a.no_validate)
    except FileExistsError as e:
        sys.stderr.write(f"q3vl: error: {e}\n")
        return 2
    sys.stdout.write(summary(out) + "\n")
    return 0


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
