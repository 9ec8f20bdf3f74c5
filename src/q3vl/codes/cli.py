"""`q3vl calibrate` and `q3vl index build|search`: embedding codes and the binary index.

Every command checks its options, inputs, output path and optional packages before it starts
(`q3vl.checks`, `q3vl.outputs.check_output`) and writes through a staging path, so a failure or a
kill never leaves a half-written bundle, calibration or index.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from q3vl.cli import command
from q3vl.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np


def _calibrate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("embeddings", type=Path, help=".npy float32 [N, D] sample (e.g. from q3vl embed)")
    p.add_argument("-o", "--output", type=Path, required=True, help="calibration .json")
    p.add_argument("--dim", type=int, help="Matryoshka dimension the codes will use")
    p.add_argument("--percentile", type=float, default=100.0, help="trim outliers: a value in (50, 100]")
    p.add_argument("--overwrite", action="store_true", help="replace an existing calibration file")


@command("calibrate", _calibrate_args)
def _calibrate(a: argparse.Namespace) -> int:
    """Fit int8/uint8 calibration ranges on a sample of embeddings (for --quantize int8/uint8)."""
    from q3vl.codes.embeddings import Calibration, truncate
    from q3vl.outputs import check_output, staged_file

    check_output(a.output, suffixes=(".json",), overwrite=a.overwrite)
    if not 50 < a.percentile <= 100:
        raise ConfigError(f"--percentile must be in (50, 100], not {a.percentile}")
    emb = _load_sample(a.embeddings)
    if a.dim is not None and not 1 <= a.dim <= emb.shape[1]:
        raise ConfigError(f"--dim {a.dim} is out of range: {a.embeddings} holds {emb.shape[1]}-dimensional "
                          f"embeddings (use 1..{emb.shape[1]})")
    calib = Calibration.fit(truncate(emb, a.dim) if a.dim else emb, a.percentile)
    with staged_file(a.output, overwrite=a.overwrite) as tmp:
        calib.save(tmp)
    sys.stdout.write(f"calibration for dim {calib.dim} from {len(emb)} vectors -> {a.output}\n")
    return 0


def _load_sample(path: Path) -> np.ndarray:
    """A float [N, D] sample without NaN rows (items that failed with --on-error skip)."""
    import numpy as np

    if path.suffix != ".npy":
        raise ConfigError(f"{path}: calibrate reads a .npy file of float32 embeddings (q3vl embed -o X.npy)")
    try:
        emb = np.load(path)
    except ValueError as e:
        raise ConfigError(f"{path} is not a readable .npy file: {e}") from None
    if emb.ndim != 2 or emb.dtype.kind != "f":
        raise ConfigError(f"{path} holds {emb.dtype} {emb.shape}; calibrate needs float embeddings [N, D]")
    emb = emb[~np.isnan(emb).any(axis=1)]
    if len(emb) < 2:
        raise ConfigError(f"{path} has fewer than 2 usable vectors; calibrate needs a sample")
    return emb


def _build_args(p: argparse.ArgumentParser) -> None:
    from q3vl.runtime.cli import common_args

    p.add_argument("bundle", type=Path, nargs="?", help="embedding bundle (not with --from-parquet)")
    p.add_argument("inputs", type=Path, nargs="?", help="JSONL of items to index (an optional 'id' key is kept)")
    p.add_argument("--from-parquet", type=Path, metavar="OUTPUT_DIR",
                   help="index the shards of `q3vl embed-dataset` instead (bundle, dim and calibration from its "
                        "manifest; rows with errors are left out)")
    p.add_argument("-o", "--output", type=Path, required=True, help="index directory")
    p.add_argument("--dim", type=int, help="Matryoshka dimension")
    p.add_argument("--rescore", choices=["int8", "float32", "none"], default="int8")
    p.add_argument("--overwrite", action="store_true", help="replace an existing index directory")
    common_args(p, on_error=False)  # the runtime's options (batch size, backend, pixel limits, ...)


@command("index build", _build_args)
def _index_build(a: argparse.Namespace) -> int:
    """Embed a JSONL file (or read embed-dataset shards) and build a binary index with rescoring vectors."""
    if a.from_parquet is not None:
        if a.bundle is not None or a.inputs is not None:
            raise ConfigError("--from-parquet takes the bundle from the shards' manifest: drop BUNDLE and INPUTS")
        return _index_from_parquet(a)
    if a.bundle is None or a.inputs is None:
        raise ConfigError("index build needs BUNDLE and INPUTS, or --from-parquet OUTPUT_DIR")
    from q3vl.checks import bundle_for, check_dim, require
    from q3vl.outputs import check_output, staged_dir
    from q3vl.preprocess.adapter import ids, read_items
    from q3vl.runtime.cli import run_items, runtime_options

    require("index")
    manifest = bundle_for(a.bundle, "embedding")
    check_dim(a.dim, manifest, a.bundle)
    check_output(a.output, overwrite=a.overwrite, directory=True, what="index directory",
                 replaceable=lambda p: (p / "index.json").is_file())
    a.on_error = "raise"
    options = runtime_options(a)
    records = read_items(a.inputs, "embed")
    from q3vl.codes.index import BinaryIndex
    from q3vl.runtime import Embedder

    with Embedder(a.bundle, options=options) as model:
        emb = run_items(model, records, a, dim=a.dim).values
    keys = ids(records) or list(range(len(records)))
    index = BinaryIndex.build(emb, rescore=a.rescore, meta={"bundle": str(a.bundle.resolve()), "ids": keys,
                                                            "matryoshka_dim": a.dim})
    with staged_dir(a.output, overwrite=a.overwrite) as tmp:
        index.save(tmp)
    sys.stdout.write(f"indexed {len(index)} items (dim {index.dim}, rescore {a.rescore}) -> {a.output}\n")
    return 0


CALIBRATION_SAMPLE = 50_000


def _index_from_parquet(a: argparse.Namespace) -> int:
    """Stream the shards into the index: vectors of good rows only, keyed by position, ids in the meta.

    int8 rescoring uses the calibration the job stored (`calibration.json`), else ranges fitted on the
    first `CALIBRATION_SAMPLE` vectors (held in memory until then), never per shard.
    """
    from q3vl.checks import require
    from q3vl.outputs import check_output

    require("index")
    require("ray", ["pyarrow"])
    check_output(a.output, overwrite=a.overwrite, directory=True, what="index directory",
                 replaceable=lambda p: (p / "index.json").is_file())
    import numpy as np

    from q3vl.codes.embeddings import Calibration
    from q3vl.codes.index import BinaryIndex
    from q3vl.outputs import staged_dir
    from q3vl.ray.store import read_manifest

    manifest = read_manifest(a.from_parquet)
    stored = a.from_parquet / "calibration.json"
    calib = Calibration.load(stored) if stored.exists() and a.rescore == "int8" and not a.dim else None
    index: BinaryIndex | None = None
    ids: list[str] = []
    held: list[np.ndarray] = []
    skipped: list[int] = []
    for shard_ids, emb in _shard_vectors(a.from_parquet, a.dim, skipped):
        ids += shard_ids
        if index is not None:
            index.add(emb)
            continue
        held.append(emb)
        if calib is not None or a.rescore != "int8" or sum(map(len, held)) >= CALIBRATION_SAMPLE:
            index, held = BinaryIndex.build(np.concatenate(held), rescore=a.rescore, calibration=calib), []
    if index is None and held:
        index = BinaryIndex.build(np.concatenate(held), rescore=a.rescore, calibration=calib)
    if index is None:
        raise ConfigError(f"{a.from_parquet} holds no embedded rows to index")
    index.meta.update({"bundle": manifest["bundle"]["path"], "ids": ids,
                       "matryoshka_dim": a.dim or manifest["options"]["dim"], "source": str(a.from_parquet.resolve())})
    with staged_dir(a.output, overwrite=a.overwrite) as tmp:
        index.save(tmp)
    sys.stdout.write(f"indexed {len(index)} rows of {a.from_parquet} ({sum(skipped)} rows with errors left out; "
                     f"dim {index.dim}, rescore {a.rescore}) -> {a.output}\n")
    return 0


def _shard_vectors(directory: Path, dim: int | None, skipped: list[int]) -> Iterator[tuple[list[str], np.ndarray]]:
    """(ids, float32 `[n, D]`) of each shard's rows that have an embedding; rows without one are
    counted into `skipped`.
    """
    import numpy as np

    from q3vl.codes.embeddings import truncate
    from q3vl.ray.store import iter_shards

    for table in iter_shards(directory, columns=["id", "embedding"]):
        good = table.filter(table.column("embedding").is_valid())
        skipped.append(table.num_rows - good.num_rows)
        if good.num_rows:
            flat = good.column("embedding").combine_chunks().flatten().to_numpy()
            emb = np.asarray(flat, np.float32).reshape(good.num_rows, -1)
            yield good.column("id").to_pylist(), truncate(emb, dim) if dim else emb


def _search_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("index", type=Path)
    p.add_argument("query", help="query text, or a .json file holding a query item (paths relative to it)")
    p.add_argument("-k", type=int, default=10, help="number of hits")
    p.add_argument("--rescore-multiplier", type=int, default=4)
    p.add_argument("--instruction", help="query instruction")
    p.add_argument("--exact", action="store_true", help="brute-force Hamming search instead of HNSW")


@command("index search", _search_args)
def _index_search(a: argparse.Namespace) -> int:
    """Search an index with a text or a JSON query item; prints one {id, score} line per hit."""
    from q3vl.checks import positive, require

    positive(k=a.k, rescore_multiplier=a.rescore_multiplier)
    if not (a.index / "index.json").is_file():
        raise ConfigError(f"{a.index} is not an index directory (q3vl index build makes one)")
    require("index")
    from q3vl.codes.embeddings import truncate
    from q3vl.codes.index import BinaryIndex
    from q3vl.preprocess.adapter import read_object
    from q3vl.preprocess.items import EMBED_KEYS
    from q3vl.runtime import Embedder

    index = BinaryIndex.load(a.index)
    path = Path(a.query)
    item = read_object(path, EMBED_KEYS) if path.suffix == ".json" and path.is_file() else {"text": a.query}
    if a.instruction:
        item["instruction"] = a.instruction
    with Embedder(index.meta["bundle"]) as model:
        q = model.process([item])
    q = truncate(q, index.dim) if index.meta.get("matryoshka_dim") else q
    keys, scores = index.search(q, a.k, a.rescore_multiplier, exact=a.exact)
    names = index.meta.get("ids")
    for key, score in zip(keys[0], scores[0]):
        if key >= 0:
            sys.stdout.write(json.dumps({"id": names[key] if names else int(key), "score": float(score)}) + "\n")
    return 0
