"""`q3vl embed` and `q3vl rerank`: the torch-free runtime from the command line.

Both read items through the one item adapter (`q3vl/preprocess/adapter.py`), check every option and the
output path before the model is loaded, and write their output beside the target first, so a
failed run leaves no half-written file.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from q3vl.cli import command
from q3vl.errors import InputError

if TYPE_CHECKING:  # imported where used: option checks run before numpy and the runtime load
    import numpy as np

    from q3vl.preprocess.adapter import Record

log = logging.getLogger(__name__)
EMBED_SUFFIXES = (".npy", ".jsonl")
CODES = ("float32", "float16", "int8", "uint8", "binary", "ubinary")


def common_args(p: argparse.ArgumentParser, on_error: bool = True) -> None:
    """Runtime options every command that runs a bundle takes: the `RuntimeOptions` flags, and how
    bad items and progress are reported.
    """
    from q3vl.options import add_flags
    from q3vl.runtime.options import RuntimeOptions

    add_flags(p, RuntimeOptions())
    if on_error:
        p.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                       help="skip: bad items get NaN results (null in .jsonl) and are reported on stderr")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")


def runtime_options(a: argparse.Namespace) -> Any:
    """The `RuntimeOptions` of parsed flags, checked (before anything loads)."""
    from q3vl.options import from_args
    from q3vl.runtime.options import RuntimeOptions

    return from_args(a, RuntimeOptions())


def _embed_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", type=Path, help="an embedding bundle (q3vl export)")
    p.add_argument("inputs", type=Path, help="JSONL, one item per line: text/image/video, its options (instruction, "
                                             "fps, max_frames, min/max/total_pixels) and an optional id; relative "
                                             "paths resolve against the file's directory")
    p.add_argument("-o", "--output", type=Path, required=True,
                   help=".npy (the matrix; ids, if any, in <stem>.ids.json) or .jsonl ({id, index, embedding, "
                        "tokens})")
    p.add_argument("--dim", type=int, help="Matryoshka dimension: keep the first DIM values and renormalise")
    p.add_argument("--quantize", choices=CODES, default="float32",
                   help="output precision (int8/uint8 need --calibration)")
    p.add_argument("--calibration", type=Path,
                   help="calibration file for int8/uint8, fitted at the same --dim (q3vl calibrate)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    common_args(p)


class _RuntimeSkips(logging.Filter):
    """Drops the runtime's own "skipping input N" lines: the command reports them by line and id."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("skipping ")


def run_items(model: Any, records: list[Record], a: argparse.Namespace, request: Any = None, **kw: Any) -> Any:
    """`model.process_details` over the records' items (or `request`, for a reranker): its `Details`
    (values, token counts); errors, raised or skipped, name the line and id of their item.
    """
    from q3vl.preprocess.adapter import locate

    runtime_log, quiet = logging.getLogger("q3vl.runtime.run"), _RuntimeSkips()  # where `Collector` logs skips
    runtime_log.addFilter(quiet)
    try:
        details = model.process_details([r.item for r in records] if request is None else request,
                                        on_error=a.on_error, progress=not a.no_progress, **kw)
    except InputError as e:
        raise locate(e, records) from None
    finally:
        runtime_log.removeFilter(quiet)
    for err in details.errors.values():
        log.warning("skipped %s", locate(err, records))
    return details


@command("embed", _embed_args)
def _embed(a: argparse.Namespace) -> int:
    """Embed the items of a JSONL file with an embedding bundle (.npy or .jsonl out)."""
    from q3vl.checks import bundle_for, check_calibration, check_dim
    from q3vl.outputs import check_output
    from q3vl.preprocess.adapter import read_items

    manifest = bundle_for(a.bundle, "embedding")
    width = check_dim(a.dim, manifest, a.bundle)
    check_calibration(a.calibration, a.quantize, width)
    check_output(a.output, suffixes=EMBED_SUFFIXES, overwrite=a.overwrite)
    options = runtime_options(a)
    records = read_items(a.inputs, "embed")
    import numpy as np

    from q3vl.runtime import Embedder

    with Embedder(a.bundle, options=options) as m:
        details = run_items(m, records, a, dim=a.dim)
    out = emb = details.values
    if a.quantize != "float32":
        from q3vl.codes import Calibration, quantize_embeddings

        calib = Calibration.load(a.calibration) if a.calibration else None
        out = quantize_embeddings(np.nan_to_num(emb), a.quantize, calibration=calib)
    failed = np.isnan(emb).any(axis=1)
    write_vectors(a.output, out, records, failed, a.overwrite, details.tokens)
    sys.stderr.write(f"embedded {int((~failed).sum())}/{len(records)} items -> {a.output} "
                     f"{tuple(out.shape)} {out.dtype}\n")
    return 0


def write_vectors(path: Path, arr: np.ndarray, records: list[Record], failed: np.ndarray, overwrite: bool,
                  tokens: np.ndarray | None = None) -> None:
    """`.npy` (plus `<stem>.ids.json` when the items have ids) or `.jsonl` rows `{id, index, embedding,
    tokens}` (embedding null and tokens 0 for a failed item), written beside the target and renamed
    into place.
    """
    import numpy as np

    from q3vl.outputs import staged_file
    from q3vl.preprocess.adapter import ids

    names = ids(records)
    if path.suffix == ".npy":
        if names is not None:
            with staged_file(path.with_name(path.stem + ".ids.json"), overwrite=True) as tmp:
                tmp.write_text(json.dumps(names) + "\n", encoding="utf-8")
        with staged_file(path, overwrite=overwrite) as tmp:
            np.save(tmp, arr)
        return
    with staged_file(path, overwrite=overwrite) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for i, (rec, row) in enumerate(zip(records, arr)):
            vec = None if failed[i] else row.tolist()
            used = {} if tokens is None else {"tokens": int(tokens[i])}
            f.write(json.dumps({"id": rec.id, "index": i, "embedding": vec, **used}) + "\n")


def _rerank_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", type=Path, help="a reranker bundle (q3vl export of a reranker checkpoint)")
    p.add_argument("query", type=Path, help="JSON file with the query: text/image/video and the request's "
                                            "options (instruction, fps, max_frames, min/max/total_pixels); "
                                            "relative paths resolve against its directory")
    p.add_argument("documents", type=Path, help="JSONL, one document per line: text/image/video and an "
                                                "optional id")
    p.add_argument("-o", "--output", type=Path, help="JSONL of {id, index, score, tokens} (default: stdout)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    common_args(p)


@command("rerank", _rerank_args)
def _rerank(a: argparse.Namespace) -> int:
    """Score the documents of a JSONL file against a query with a reranker bundle."""
    from q3vl.checks import bundle_for
    from q3vl.outputs import check_output, staged_file
    from q3vl.preprocess.adapter import read_items, read_query

    bundle_for(a.bundle, "reranker")
    if a.output is not None:
        check_output(a.output, suffixes=(".jsonl",), overwrite=a.overwrite)
    options = runtime_options(a)
    query, request_options = read_query(a.query)
    records = read_items(a.documents, "document")
    from q3vl.runtime import Reranker

    request = {"query": query, "documents": [r.item for r in records], **request_options}
    with Reranker(a.bundle, options=options) as m:
        details = run_items(m, records, a, request)
    lines = "".join(json.dumps({"id": r.id, "index": i, "score": None if s != s else s, "tokens": int(t)}) + "\n"
                    for i, (r, s, t) in enumerate(zip(records, details.values, details.tokens)))
    if a.output is None:
        sys.stdout.write(lines)
        return 0
    with staged_file(a.output, overwrite=a.overwrite) as tmp:
        tmp.write_text(lines, encoding="utf-8")
    return 0
