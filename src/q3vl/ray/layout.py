"""Where each file of an `embed-dataset` output directory lives, and moving an older directory into it.

The directory is a dataset that Parquet readers take as is: the shards `part-NNNNNN.parquet` sit at the
top, and everything else the job keeps (manifest, calibration, lock, shards being written, shards set
aside) is in the `_q3vl/` folder under names that do not end in `.parquet`. So:

- pyarrow (`pyarrow.dataset.dataset(out)`, `pq.read_table(out)`) and pandas (`pd.read_parquet(out)`)
  skip `_q3vl/` (paths starting with `_` or `.` are ignored by default);
- DuckDB reads the folder, `out/*.parquet`, `out/**/*.parquet` and `out/*` (its directory read and
  `*` match files ending in `.parquet`, or the top level's files only);
- Polars reads `out/*.parquet`, `out/**/*.parquet` and `out/*`; given the bare folder it refuses any
  folder that holds files of more than one extension (by design), so pass a glob.

Layout 1 (q3vl before this layout) kept `q3vl-dataset.json`, `calibration.json`, `.lock` and
`_tmp-*` files beside the shards, where `pd.read_parquet(out)` failed on the JSON manifest.
`migrate_legacy` moves such a directory into this layout when a run resumes it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

META = "_q3vl"  # the job's own files: ignored by pyarrow/pandas, matched by no `*.parquet` glob
MANIFEST = f"{META}/manifest.json"
CALIBRATION = f"{META}/calibration.json"  # what `index build --from-parquet` rescales int8 with
LOCK = f"{META}/lock"
STAGING = f"{META}/staging"  # a shard being written: `part-N.parquet.tmp`, renamed to the top when complete
SET_ASIDE = f"{META}/set-aside"  # shards that could not be read: `part-N.parquet.unreadable`
SHARDS = "part-*.parquet"
FORMAT = "q3vl-dataset/2"

LEGACY_FORMAT = "q3vl-dataset/1"
LEGACY_MANIFEST = "q3vl-dataset.json"
LEGACY_CALIBRATION = "calibration.json"
LEGACY_LOCK = ".lock"
LEGACY_TMP = "_tmp-"


def write_atomic(path: Path, data: bytes) -> None:
    """`data` into `path` through a `.tmp` file beside it: fsync, rename, fsync the folder."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(d: Path) -> None:
    """Make a rename in `d` durable (a crash right after it cannot bring the old name back)."""
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def manifest_path(out: Path) -> Path | None:
    """The manifest of `out` in either layout (this one first), or None."""
    for name in (MANIFEST, LEGACY_MANIFEST):
        if (out / name).is_file():
            return out / name
    return None


def calibration_path(out: Path) -> Path | None:
    """The calibration a run stored in `out`, in either layout, or None."""
    for name in (CALIBRATION, LEGACY_CALIBRATION):
        if (out / name).is_file():
            return out / name
    return None


def set_aside(shard: Path) -> Path:
    """Move an unreadable shard out of the shard glob (kept for inspection, its rows recomputed)."""
    return _move(shard, shard.parent / SET_ASIDE / (shard.name + ".unreadable"))


def _move(src: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, target)
    return target


def remove_partial(out: Path) -> None:
    """Delete what an interrupted run was writing: staged shards and temp files of this layout, and
    `_tmp-*` files an older q3vl left beside the shards.
    """
    partial = [*(out / STAGING).glob("*"), *(out / META).glob("*.tmp"), *out.glob(LEGACY_TMP + "*")]
    for f in partial:
        if f.is_file():
            log.info("removing %s, left by an interrupted run", f.relative_to(out))
            f.unlink()


def migrate_legacy(out: Path, manifest: dict[str, Any]) -> None:
    """Move a layout-1 directory (its manifest already read and accepted, its locks held) into this layout.

    Each step can be repeated: the old manifest is removed last, so a run killed midway finds it and
    moves again. The calibration moves by rename; the manifest is written whole at its new place
    (atomically) before the old one goes, so the directory always holds a complete manifest.
    """
    remove_partial(out)
    for shard in out.glob("part-*.parquet.unreadable"):  # set aside by layout 1, beside the shards
        _move(shard, out / SET_ASIDE / shard.name)
    if (out / LEGACY_CALIBRATION).is_file():
        _move(out / LEGACY_CALIBRATION, out / CALIBRATION)
    manifest["format"] = FORMAT
    write_atomic(out / MANIFEST, json.dumps(manifest, indent=1).encode())
    (out / LEGACY_MANIFEST).unlink()
    fsync_dir(out)
    log.info("moved %s's manifest and calibration into %s/ (layout %s): the folder now reads as a Parquet dataset",
             out, META, FORMAT)

