"""`q3vl embed` and `q3vl rerank`: the torch-free runtime from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from q3vl.cli import command
from q3vl.errors import InputError


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """One JSON object per non-empty line; a bad line is an InputError naming its number."""
    items = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{n}: invalid JSON: {e}") from e
    if not items:
        raise InputError(f"{path} holds no items")
    return items


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--backend", default="cpu", help="cpu | cuda | tensorrt-ep | tensorrt")
    p.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                   help="skip: bad items get NaN results and are reported on stderr")
    p.add_argument("--no-progress", action="store_true")


def _embed_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", type=Path)
    p.add_argument("inputs", type=Path, help="JSONL, one item per line ({'text': ..., 'image': ...})")
    p.add_argument("-o", "--output", type=Path, required=True, help=".npy (float32 [N, D]) or .jsonl")
    p.add_argument("--dim", type=int, help="Matryoshka dimension (truncate + renormalise)")
    p.add_argument("--quantize", choices=["float32", "float16", "int8", "uint8", "binary", "ubinary"],
                   default="float32", help="output precision (int8/uint8 need --calibration)")
    p.add_argument("--calibration", type=Path, help="calibration file for int8/uint8 (q3vl quantize calibrate)")
    _common(p)


@command("embed", _embed_args)
def _embed(a: argparse.Namespace) -> int:
    """Embed the items of a JSONL file with a bundle."""
    from q3vl.runtime import Embedder

    items = read_jsonl(a.inputs)
    emb = Embedder(a.bundle, batch_size=a.batch_size, backend=a.backend).process(
        items, dim=a.dim, on_error=a.on_error, progress=not a.no_progress)
    out = emb
    if a.quantize != "float32":
        from q3vl.quantization import Calibration, quantize_embeddings

        calib = Calibration.load(a.calibration) if a.calibration else None
        out = quantize_embeddings(emb, a.quantize, calibration=calib)
    _write(a.output, out)
    bad = int(np.isnan(emb).any(axis=1).sum())
    sys.stderr.write(f"embedded {len(items) - bad}/{len(items)} items -> {a.output} {out.shape} {out.dtype}\n")
    return 0


def _write(path: Path, arr: np.ndarray) -> None:
    if path.suffix == ".npy":
        np.save(path, arr)
    elif path.suffix == ".jsonl":
        with open(path, "w", encoding="utf-8") as f:
            for i, row in enumerate(arr):
                vec = None if np.isnan(row.astype(np.float64)).any() else row.tolist()
                f.write(json.dumps({"index": i, "embedding": vec}) + "\n")
    else:
        raise InputError(f"output must end in .npy or .jsonl, not {path.suffix!r}")


def _rerank_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", type=Path)
    p.add_argument("query", type=Path, help="JSON file with the query dict (and optional 'instruction')")
    p.add_argument("documents", type=Path, help="JSONL, one document per line")
    p.add_argument("-o", "--output", type=Path, help="JSONL of scores (default: print)")
    _common(p)


@command("rerank", _rerank_args)
def _rerank(a: argparse.Namespace) -> int:
    """Score the documents of a JSONL file against a query with a reranker bundle."""
    from q3vl.runtime import Reranker

    query = json.loads(Path(a.query).read_text(encoding="utf-8"))
    instruction = query.pop("instruction", None) if isinstance(query, dict) else None
    docs = read_jsonl(a.documents)
    request = {"query": query, "documents": docs, **({"instruction": instruction} if instruction else {})}
    scores = Reranker(a.bundle, batch_size=a.batch_size, backend=a.backend).process(
        request, on_error=a.on_error, progress=not a.no_progress)
    lines = [json.dumps({"index": i, "score": None if s != s else s}) for i, s in enumerate(scores)]
    if a.output:
        a.output.write_text("\n".join(lines) + "\n")
    else:
        sys.stdout.write("\n".join(lines) + "\n")
    return 0
