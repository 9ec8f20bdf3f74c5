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
    tol = tolerance(manifest.graphs["text"]["precision"])
    items = [item for _, item in inputs]
    if manifest.task == "embedding":
        from q3vl.reference import ReferenceEmbedder
        from q3vl.runtime import Embedder

        got = Embedder(bundle, batch_size=batch_size).process(items)
        ref_model = ReferenceEmbedder(checkpoint)
        ref = np.concatenate([ref_model.process([it]).numpy() for it in items])  # one item per pass: no padding
        got, ref = got.astype(np.float64), ref.astype(np.float64)
        cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
        return [ParityRow(name, float(c), bool(c >= tol.embed_cos)) for (name, _), c in zip(inputs, cos)]
    from q3vl.reference import ReferenceReranker
    from q3vl.runtime import Reranker
    from q3vl.testing.inputs import gradient_image

    rows = []
    reranker, reference = Reranker(bundle, batch_size=batch_size), ReferenceReranker(checkpoint)
    for qname, query in (("text query", {"text": "a red box moving over a gradient"}),
                         ("image query", {"text": "like this", "image": gradient_image(128, 128, 3)})):
        docs = [{k: v for k, v in it.items() if k in ("text", "image", "video")} for it in items]
        got = np.array(reranker.process({"query": query, "documents": docs}))
        ref = np.array(reference.process({"query": query, "documents": docs}))
        for (name, _), g, r in zip(inputs, got, ref):
            diff = abs(float(g) - float(r))
            rows.append(ParityRow(f"{qname} / {name}", diff, diff <= tol.score_abs, f"score {g:.6f} ref {r:.6f}"))
    return rows


def report(rows: list[ParityRow], task: str) -> str:
    """A fixed-width table plus a one-line summary."""
    metric = "cosine" if task == "embedding" else "|score diff|"
    width = max(len(r.name) for r in rows)
    lines = [f"{'item':{width}s}  {metric:>14s}  ok"]
    lines += [f"{r.name:{width}s}  {r.value:14.8f}  {'yes' if r.ok else 'NO'}  {r.detail}".rstrip() for r in rows]
    worst = min(r.value for r in rows) if task == "embedding" else max(r.value for r in rows)
    fails = sum(not r.ok for r in rows)
    lines.append(f"{len(rows)} items, worst {metric} {worst:.8f}, {fails} below tolerance")
    return "\n".join(lines)


def run(checkpoint: Path, bundle: Path, inputs_file: Path | None) -> tuple[str, bool]:
    """(report text, all within tolerance)."""
    with tempfile.TemporaryDirectory(prefix="q3vl-parity-") as tmp:
        rows = compare(checkpoint, bundle, load_inputs(inputs_file, Path(tmp)))
    return report(rows, Manifest.read(bundle).task), all(r.ok for r in rows)
