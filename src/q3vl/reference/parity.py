"""`q3vl parity`: the PyTorch reference and the torch-free runtime on the same inputs, item by item.

Embedding bundles: cosine of each item's vector to ReferenceEmbedder's. Reranker bundles: each
item is scored as a document against a text query (and a second query carrying an image), and
|score difference| to ReferenceReranker is reported. Both run fp32 on the CPU; the tolerance is the
bundle's precision's (q3vl.tolerances).

User inputs are read through the one item adapter (`q3vl/preprocess/adapter.py`), and both sides get the
same media: the runtime the item as written (relative paths resolved), the reference the same media
in a form the published wrapper can open (it prefixes every string with `file://`, so a `data:` URI
becomes a decoded PIL image and a `file://` URL a plain absolute path). The checkpoint's identity
hash is compared with the one the bundle recorded at export, so comparing a bundle with the wrong
checkpoint says so instead of reporting a mysterious cosine.
"""

from __future__ import annotations

import base64
import io
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from q3vl.bundle import Manifest
from q3vl.progress import Progress
from q3vl.tasks import task_for
from q3vl.tolerances import tolerance

log = logging.getLogger(__name__)
Inputs = list[tuple[str, dict[str, Any]]]


@dataclass
class ParityRow:
    """One item's comparison."""

    name: str
    value: float  # cosine (embedding) or |score diff| (reranker)
    ok: bool
    detail: str = ""


@dataclass(frozen=True)
class SourceCheck:
    """Whether the checkpoint is the one the bundle was exported from (by the identity hash)."""

    matches: bool | None  # None: the bundle records no hash
    line: str


def check_source(checkpoint: Path, manifest: Manifest) -> SourceCheck:
    """Compare `checkpoint`'s identity with the bundle's recorded source; warn when they differ.

    The content hash (weights sampled) is compared when the bundle records one; older bundles
    record only the header hash, which cannot tell two checkpoints of the same shape apart.
    """
    from q3vl.export.weights import checkpoint_identity

    recorded = manifest.source
    key = "content_sha256" if recorded.get("content_sha256") else "sha256"
    if not recorded.get(key):
        return SourceCheck(None, "checkpoint: the bundle records no source hash; cannot tell whether it is its source")
    actual = checkpoint_identity(checkpoint)[key]
    if actual == recorded[key]:
        weak = "" if key == "content_sha256" else "; header hash only: the bundle predates content hashes"
        return SourceCheck(True, f"checkpoint: the bundle's source ({key} {actual[:12]}{weak})")
    line = (f"checkpoint: NOT the bundle's source: {checkpoint} has {key} {actual[:12]}, the bundle was exported "
            f"from {recorded.get('path', '?')} ({key} {recorded[key][:12]}); differences below are expected")
    log.warning("%s", line)
    return SourceCheck(False, line)


def load_inputs(path: Path | None, workdir: Path | None) -> Inputs:
    """(label, item) pairs: the user's JSONL in the runtime's dialect (label: the id, else the line),
    or the built-in set, whose media are written under `workdir`.
    """
    if path is None:
        from q3vl.testing.inputs import default_inputs

        if workdir is None:
            raise ValueError("the built-in parity set needs a directory for its media")
        return default_inputs(workdir)
    from q3vl.preprocess.adapter import read_items

    return [(str(r.id) if r.id is not None else f"line {r.line}", r.item) for r in read_items(path, "embed")]


def for_reference(item: dict[str, Any]) -> dict[str, Any]:
    """The same item with its media in a form the published wrapper reads: `data:` URIs decoded to
    PIL images, `file://` URLs as plain paths (the wrapper prefixes `file://` to every string).
    """
    out = dict(item)
    for key in ("image", "video"):
        if key in out:
            out[key] = _plain(out[key])
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if not isinstance(value, str):
        return value
    if value.startswith("file://"):
        return value[len("file://"):]
    if value.startswith("data:image"):
        from PIL import Image

        image = Image.open(io.BytesIO(base64.b64decode(value.partition(",")[2])))
        image.load()
        return image
    return value


def compare(checkpoint: Path, bundle: Path, inputs: Inputs, batch_size: int = 8,
            progress: bool = False) -> list[ParityRow]:
    """Run both sides, `batch_size` items at a time; one row per item (and per query for reranker bundles)."""
    manifest = Manifest.read(bundle)
    task = task_for(manifest.task)
    tol = tolerance(manifest.precision)
    log.info("loading the bundle and the PyTorch reference (%s)", checkpoint)
    runtime, reference = task.runtime(bundle, batch_size=batch_size), task.reference(checkpoint)
    per_item = len(task.parity_requests([inputs[0][1]])) if inputs else 0
    by_label: dict[str, list[ParityRow]] = {}
    key = task.outputs[0]
    with Progress(len(inputs) * per_item, f"parity ({task.name})", enabled=progress) as bar:
        for start in range(0, len(inputs), batch_size):
            chunk = inputs[start:start + batch_size]
            ours = task.parity_requests([item for _, item in chunk])
            theirs = task.parity_requests([for_reference(item) for _, item in chunk])
            for (label, request), (_, ref_request) in zip(ours, theirs):
                got, ref = task.values(runtime, request), task.reference_values(reference, ref_request)
                figures = task.compare({key: got}, {key: ref})
                for (name, _), f, g, r in zip(chunk, figures, got, ref):
                    detail = f"score {float(g):.6f} ref {float(r):.6f}" if np.ndim(g) == 0 else ""
                    by_label.setdefault(label, []).append(
                        ParityRow(label + name, float(f), task.within(float(f), tol), detail))
                bar.update(len(chunk))
    return [row for rows in by_label.values() for row in rows]


def report(rows: list[ParityRow], task_name: str, source: SourceCheck | None = None) -> str:
    """A fixed-width table plus a one-line summary (after the checkpoint line, when checked)."""
    task = task_for(task_name)
    metric = task.metric_label
    width = max(len(r.name) for r in rows)
    lines = [source.line] if source is not None else []
    lines.append(f"{'item':{width}s}  {metric:>14s}  ok")
    lines += [f"{r.name:{width}s}  {r.value:14.8f}  {'yes' if r.ok else 'NO'}  {r.detail}".rstrip() for r in rows]
    worst = task.worst([r.value for r in rows])
    fails = sum(not r.ok for r in rows)
    summary = f"{len(rows)} items, worst {metric} {worst:.8f}, {fails} below tolerance"
    if source is not None and source.matches is False:
        summary += " (the checkpoint is NOT the bundle's source)"
    lines.append(summary)
    return "\n".join(lines)


def run(checkpoint: Path, bundle: Path, inputs: Inputs | None, *, batch_size: int = 8, progress: bool = False,
        source: SourceCheck | None = None) -> tuple[str, bool]:
    """(report text, all within tolerance) for `inputs` (None: the built-in set)."""
    with tempfile.TemporaryDirectory(prefix="q3vl-parity-") as tmp:
        items = inputs if inputs is not None else load_inputs(None, Path(tmp))
        rows = compare(checkpoint, bundle, items, batch_size, progress)
    return report(rows, Manifest.read(bundle).task, source), all(r.ok for r in rows)
