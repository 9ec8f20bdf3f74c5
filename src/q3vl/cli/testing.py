"""`q3vl testing make-checkpoint` and `q3vl testing sample-inputs`: what a newcomer tries q3vl on."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from q3vl.cli import command


def _make_checkpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", type=Path, help="output directory")
    p.add_argument("--task", choices=["embedding", "reranker"], default="embedding")
    p.add_argument("--shape", choices=["tiny", "small", "2b", "8b"], default="tiny",
                   help="tiny: seconds, for tests and examples; small: 217M, CPU benchmarks; 2b/8b: the real shapes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--activations", choices=["default", "realistic"], default="default",
                   help="realistic: plant the activation outliers of trained Qwen models (q3vl.testing.outliers)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint directory")


@command("testing make-checkpoint", _make_checkpoint_args)
def _make_checkpoint(a: argparse.Namespace) -> int:
    """Write a random-weight checkpoint with the published Qwen3-VL layout (offline)."""
    from q3vl.checks import require
    from q3vl.outputs import check_output, staged_dir

    require("export")
    check_output(a.path, overwrite=a.overwrite, directory=True, what="checkpoint directory",
                 replaceable=lambda p: (p / "config.json").is_file())
    from q3vl.testing import make_checkpoint

    with staged_dir(a.path, overwrite=a.overwrite) as tmp:
        make_checkpoint(tmp, task=a.task, shape=a.shape, seed=a.seed, dtype=a.dtype, activations=a.activations)
    sys.stdout.write(f"random-weight {a.shape} {a.task} checkpoint ({a.activations} activations) written to {a.path}\n")
    return 0


def _samples_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", type=Path, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing directory of samples")


@command("testing sample-inputs", _samples_args)
def _sample_inputs(a: argparse.Namespace) -> int:
    """Write sample images, a video, frames and the JSONL/JSON files the README's examples read."""
    from q3vl.outputs import check_output, staged_dir
    from q3vl.testing.samples import write_samples

    check_output(a.path, overwrite=a.overwrite, directory=True, what="samples directory",
                 replaceable=lambda p: (p / "items.jsonl").is_file())
    with staged_dir(a.path, overwrite=a.overwrite) as tmp:
        names = sorted(write_samples(tmp))
    sys.stdout.write(f"sample inputs written to {a.path}: {', '.join(names)}\n")
    return 0
