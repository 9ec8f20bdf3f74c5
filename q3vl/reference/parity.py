"""`q3vl parity`: the PyTorch reference and the torch-free runtime on the same inputs, item by item.

Embedding bundles: cosine of each item's vector to ReferenceEmbedder's. Reranker bundles: each
item is scored as a document against a text query (and a second query carrying an image), and
|score difference| to ReferenceReranker is reported. Both run fp32 on the CPU; the tolerance is the
bundle's precision's (q3vl.tolerances).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from q3vl.bundle import Manifest
from q3vl.tasks import task_for
from q3vl.tolerances import tolerance


@dataclass
class ParityRow:
    """One item's comparison."""

    name: str
    value: float  # cosine (embedding) or |score diff| (reranker)
    ok: bool
    detail: str = ""


def load_inputs(path: Path | None, workdir: Path) -> list[tuple[str, dict[str, Any]]]:
    """The user's JSONL (one item per line, optional "name") or the built-in set."""
    from q3vl.testing.inputs import default_inputs

    if path is None:
        return default_inputs(workdir)
    rows = []
    for k, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines()):
        if line.strip():
            item = json.loads(line)
            rows.append((str(item.pop("name", f"item {k}")), item))
    return rows


def compare(checkpoint: Path, bundle: Path, inputs: list[tuple[str, dict[str, Any]]],
            batch_size: int = 8) -> list[ParityRow]:
    """Run both sides; one row per item (and per query for reranker bundles)."""
    manifest = Manifest.read(bundle)
    task = task_for(manifest.task)
    tol = tolerance(manifest.precision)
    runtime, reference = task.runtime(bundle, batch_size=batch_size), task.reference(checkpoint)
    rows = []
    for label, request in task.parity_requests([item for _, item in inputs]):
        got, ref = task.values(runtime, request), task.reference_values(reference, request)
        key = task.outputs[0]
        figures = task.compare({key: got}, {key: ref})
        for (name, _), f, g, r in zip(inputs, figures, got, ref):
            detail = f"score {float(g):.6f} ref {float(r):.6f}" if np.ndim(g) == 0 else ""
            rows.append(ParityRow(label + name, float(f), task.within(float(f), tol), detail))
    return rows


def report(rows: list[ParityRow], task_name: str) -> str:
    """A fixed-width table plus a one-line summary."""
    task = task_for(task_name)
    metric = task.metric_label
    width = max(len(r.name) for r in rows)
    lines = [f"{'item':{width}s}  {metric:>14s}  ok"]
    lines += [f"{r.name:{width}s}  {r.value:14.8f}  {'yes' if r.ok else 'NO'}  {r.detail}".rstrip() for r in rows]
    worst = task.worst([r.value for r in rows])
    fails = sum(not r.ok for r in rows)
    lines.append(f"{len(rows)} items, worst {metric} {worst:.8f}, {fails} below tolerance")
    return "\n".join(lines)


def run(checkpoint: Path, bundle: Path, inputs_file: Path | None) -> tuple[str, bool]:
    """(report text, all within tolerance)."""
    with tempfile.TemporaryDirectory(prefix="q3vl-parity-") as tmp:
        rows = compare(checkpoint, bundle, load_inputs(inputs_file, Path(tmp)))
    return report(rows, Manifest.read(bundle).task), all(r.ok for r in rows)
