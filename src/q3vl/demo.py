"""`q3vl demo`: the README's end-to-end job.

Makes (or takes) an embedding and a reranker checkpoint, exports both to fp32 bundles (validated
against transformers), embeds and reranks sample inputs with the torch-free runtime, and prints
the parity summary against the PyTorch reference. With random weights (the default: nothing can be
downloaded here) the similarities and scores show the pipeline works, not retrieval quality.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def sample_inputs() -> list[tuple[str, dict[str, Any]]]:
    """(label, item): two texts, an image, an image with caption and instruction, a screenshot, a
    frame-list video (in memory); the labels name the rows and columns of the printed matrix.
    """
    from q3vl.testing.inputs import gradient_image, screenshot_image

    sunset = gradient_image(360, 480, seed=1)
    return [
        ("text: beach", {"text": "A woman playing with her dog on a beach at sunset."}),
        ("text: skyline", {"text": "City skyline view from a high-rise building at night."}),
        ("image: sunset", {"image": sunset}),
        ("image+caption", {"text": "A sunset gradient", "image": sunset,
                           "instruction": "Represent the image and caption"}),
        ("screenshot", {"image": screenshot_image(720, 1280)}),
        ("video: 6 frames", {"video": [gradient_image(120, 160, seed=i) for i in range(6)]}),
    ]


def matrix(labels: list[str], values: np.ndarray) -> str:
    """A square matrix with its rows and columns labelled (column headers are the row numbers)."""
    width = max(len(label) for label in labels)
    head = " " * (width + 6) + "".join(f"{f'[{j}]':>8s}" for j in range(len(labels)))
    rows = [f"[{i}] {label:{width}s}  " + "".join(f"{v:8.3f}" for v in row)
            for i, (label, row) in enumerate(zip(labels, values))]
    return "\n".join([head, *rows])


def _checkpoint(workdir: Path, shape: str, task: str, given: Path | None) -> Path:
    if given is not None:
        return given
    from q3vl.outputs import staged_dir
    from q3vl.testing import make_checkpoint

    path = workdir / f"{shape}-{task}"
    if not (path / "config.json").exists():
        log.info("making a random-weight %s %s checkpoint in %s", shape, task, path)
        with staged_dir(path, overwrite=True) as tmp:  # an interrupted demo leaves no half checkpoint
            make_checkpoint(tmp, task=task, shape=shape)
    return path


def _bundle(ckpt: Path, out: Path, task: str) -> Path:
    from q3vl.export.exporter import export_bundle, summary

    if not (out / "q3vl.json").exists():
        export_bundle(ckpt, out, "fp32", task, overwrite=True)
    sys.stdout.write(summary(out) + "\n")
    return out


def run_demo(workdir: Path, shape: str, checkpoint: Path | None, reranker_checkpoint: Path | None) -> int:
    """Run the demo; returns the process exit code (non-zero when parity fails)."""
    from q3vl import Embedder, Reranker
    from q3vl.reference.parity import compare, load_inputs, report

    emb_ckpt = _checkpoint(workdir, shape, "embedding", checkpoint)
    rr_ckpt = _checkpoint(workdir, shape, "reranker", reranker_checkpoint)
    if checkpoint is None or reranker_checkpoint is None:
        sys.stdout.write("NOTE: the generated checkpoints have RANDOM weights: similarities and scores below show "
                         "that the pipeline runs and matches PyTorch, not retrieval quality.\n")
    emb_bundle = _bundle(emb_ckpt, workdir / "bundles" / emb_ckpt.name, "embedding")
    rr_bundle = _bundle(rr_ckpt, workdir / "bundles" / rr_ckpt.name, "reranker")

    labels, inputs = zip(*sample_inputs())
    vectors = Embedder(emb_bundle).process(list(inputs))
    sys.stdout.write(f"\ntorch-free embeddings: {vectors.shape} {vectors.dtype}; cosine similarity of each "
                     "pair of inputs:\n" + matrix(list(labels), vectors @ vectors.T) + "\n")
    docs = [{k: v for k, v in item.items() if k != "instruction"} for item in inputs]
    query = "a sunset over the sea"
    scores = Reranker(rr_bundle).process({"query": {"text": query}, "documents": docs})
    width = max(len(label) for label in labels)
    sys.stdout.write(f"\nreranker scores (probability of 'yes') for the query {query!r}:\n"
                     + "".join(f"  {label:{width}s}  {s:.4f}\n" for label, s in zip(labels, scores)))

    ok = True
    with tempfile.TemporaryDirectory(prefix="q3vl-demo-") as tmp:
        items = load_inputs(None, Path(tmp))
        for ckpt, bundle, task in ((emb_ckpt, emb_bundle, "embedding"), (rr_ckpt, rr_bundle, "reranker")):
            rows = compare(ckpt, bundle, items, progress=True)
            ok &= all(r.ok for r in rows)
            sys.stdout.write(f"\nparity vs the PyTorch reference ({task}):\n"
                             + report(rows, task).splitlines()[-1] + "\n")
    sys.stdout.write(("PARITY OK" if ok else "PARITY FAILED") + "\n")
    return 0 if ok else 1
