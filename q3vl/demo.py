"""`q3vl demo`: the README's end-to-end job on sample inputs.

Makes (or takes) a checkpoint, embeds a few sample inputs with the PyTorch reference and prints
their similarity matrix. Weights are random unless `--checkpoint` points at real ones, so the
numbers show the pipeline works, not retrieval quality.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def sample_inputs() -> list[dict[str, Any]]:
    """A text, an image, a text+image pair and an instruction, built in memory (no downloads)."""
    from PIL import Image

    yy, xx = np.mgrid[0:360, 0:480]
    sunset = Image.fromarray(np.stack([255 - yy * 255 // 360, xx * 200 // 480, yy * 128 // 360], -1).astype(np.uint8))
    return [
        {"text": "A woman playing with her dog on a beach at sunset."},
        {"text": "City skyline view from a high-rise building at night."},
        {"image": sunset},
        {"text": "A sunset gradient", "image": sunset, "instruction": "Represent the image and caption"},
    ]


def _checkpoint(workdir: Path, shape: str, task: str, given: Path | None) -> Path:
    if given is not None:
        return given
    from q3vl.testing import make_checkpoint

    path = workdir / f"{shape}-{task}"
    if not (path / "config.json").exists():
        log.info("making a random-weight %s %s checkpoint in %s", shape, task, path)
        make_checkpoint(path, task=task, shape=shape)
    return path


def run_demo(workdir: Path, shape: str, checkpoint: Path | None, reranker_checkpoint: Path | None) -> int:
    """Run the demo; returns the process exit code."""
    from q3vl.reference import ReferenceEmbedder

    ckpt = _checkpoint(workdir, shape, "embedding", checkpoint)
    if checkpoint is None:
        sys.stdout.write(f"NOTE: {ckpt} has RANDOM weights: similarities below are not meaningful.\n")
    inputs = sample_inputs()
    emb = ReferenceEmbedder(ckpt).process(inputs).numpy()
    sys.stdout.write(f"reference embeddings: shape {emb.shape}, norms {np.linalg.norm(emb, axis=1).round(4)}\n")
    sys.stdout.write("cosine similarity matrix:\n" + np.array2string(emb @ emb.T, precision=3) + "\n")
    return 0
