"""The output directory of `q3vl embed-dataset`: Parquet shards written exactly once, and a manifest.

How a run killed at any point (driver or worker, SIGKILL included) and re-run ends with exactly one
row per input id:

- One writer. Workers only compute; the driver alone writes shards, so a retried Ray task (a worker
  died, its actor restarted) can never leave a second copy of its rows on disk.
- A shard is written to `_tmp-part-N.parquet`, fsynced, then renamed to `part-N.parquet` (atomic on
  POSIX): a `part-*` file is always complete. A run that dies mid-write leaves only a `_tmp-*` file,
  which the next run deletes.
- The shards are the truth, the manifest a summary: at start the ids of every `part-*` file are read
  (a shard renamed just before a kill, missing from the manifest, is adopted), and rows whose id is
  already written are skipped before they are embedded and again when written (an id that occurs
  twice in the input is written once).
- A lock file (`flock`, released by the kernel when its holder dies) keeps two runs off one directory.
- The manifest records the bundle's hash and every option that changes the numbers; a run with other
  ones is refused instead of mixing two kinds of vectors in one output.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

import q3vl
from q3vl.errors import ConfigError, InputError, OutputExistsError

log = logging.getLogger(__name__)
MANIFEST = "q3vl-dataset.json"
FORMAT = "q3vl-dataset/1"
LOCK = ".lock"
TMP = "_tmp-"
MAX_ERROR_SAMPLES = 20


class IdSet:
    """A set of string ids held as 16-byte digests: a sorted array plus a small set of recent ones.

    About 16 bytes per id (10 M ids: 160 MB), picklable, so it can travel to the workers that drop
    rows already written; 128-bit digests make a collision between distinct ids negligible.
    """

    def __init__(self, ids: Iterable[str] = ()) -> None:
        self._sorted = np.zeros(0, "S16")
        self._recent: set[bytes] = set()
        self.add(ids)

    @staticmethod
    def digest(i: str) -> bytes:
        return hashlib.blake2b(i.encode("utf-8", "surrogatepass"), digest_size=16).digest()

    def add(self, ids: Iterable[str]) -> None:
        self._recent.update(self.digest(i) for i in ids)
        if len(self._recent) > 262_144:
            self.compact()

    def compact(self) -> None:
        """Merge the recent digests into the sorted array."""
        if self._recent:
            self._sorted = np.union1d(self._sorted, np.array(sorted(self._recent), "S16"))
            self._recent.clear()

    def contains(self, ids: Iterable[str]) -> np.ndarray:
        """Whether each id is in the set: bool `[N]`."""
        d = [self.digest(i) for i in ids]
        out = np.array([x in self._recent for x in d], bool)
        if len(self._sorted) and d:
            q = np.array(d, "S16")
            pos = np.minimum(np.searchsorted(self._sorted, q), len(self._sorted) - 1)
            out |= self._sorted[pos] == q
        return out

    def __len__(self) -> int:
        return len(self._sorted) + len(self._recent)

    def __getstate__(self) -> dict[str, Any]:
        self.compact()
        return {"_sorted": self._sorted, "_recent": set()}


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (a bundle's manifest, a calibration): what a resumed run must match."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(TMP + path.name)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class OutputDir:
    """An output directory opened for one run: locked, checked against `settings`, cleaned, with the
    ids already written in `done`. Use as a context manager (the lock is released on exit).
    """

    def __init__(self, path: str | Path, settings: dict[str, Any]) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.path / LOCK, "a+")  # noqa: SIM115  # held for the run, closed in close()
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise ConfigError(f"another run is writing {self.path} (its lock file {LOCK} is held)") from None
        self.manifest = self._read_or_create(settings)
        self.done = IdSet()
        self.schema: Any = None
        self._recover()

    # ---------------------------------------------------------------- opening
    def _read_or_create(self, settings: dict[str, Any]) -> dict[str, Any]:
        path = self.path / MANIFEST
        if not path.exists():
            if any(self.path.glob("part-*.parquet")):
                raise OutputExistsError(f"{self.path} holds shards but no {MANIFEST}; use an empty output directory")
            return {"format": FORMAT, "q3vl_version": q3vl.__version__, **settings, "shards": [], "runs": []}
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise OutputExistsError(f"{path} is not a readable manifest ({e}); use another output directory") from e
        if manifest.get("format") != FORMAT:
            raise OutputExistsError(f"{path} is not a q3vl embed-dataset manifest")
        diffs = changed(manifest, settings)
        if diffs:
            raise OutputExistsError(f"{self.path} was written with other settings ({'; '.join(diffs)}); resume with "
                                    "the same bundle and options, or write to a new output directory")
        return manifest

    def _recover(self) -> None:
        """Delete partial files, adopt complete shards the manifest missed, and collect written ids."""
        import pyarrow.parquet as pq

        for tmp in self.path.glob(TMP + "*"):
            log.info("removing %s, left by an interrupted run", tmp.name)
            tmp.unlink()
        known = {s["file"]: s for s in self.manifest["shards"]}
        shards = []
        for f in sorted(self.path.glob("part-*.parquet")):
            try:
                table = pq.read_table(f, columns=["id", "error"])
                self.schema = self.schema or pq.read_schema(f)
            except Exception as e:  # not something this writer produced whole: set aside, recompute its rows
                log.warning("setting aside unreadable shard %s (%s)", f.name, e)
                f.rename(f.with_name(f.name + ".unreadable"))
                continue
            ids = table.column("id").to_pylist()
            if f.name not in known:
                log.info("adopting %s (%d rows), renamed before the manifest was updated", f.name, len(ids))
            shards.append(known.get(f.name) or _shard_entry(f.name, table))
            self.done.add(ids)
        lost = sorted(set(known) - {s["file"] for s in shards})
        if lost:
            log.warning("shards listed in the manifest are gone and will be recomputed: %s", lost)
        self.manifest["shards"] = shards
        self.save()

    # ---------------------------------------------------------------- writing
    def next_name(self) -> str:
        numbers = [int(s["file"][5:-8]) for s in self.manifest["shards"]]
        return f"part-{max(numbers, default=-1) + 1:06d}.parquet"

    def commit(self, table: Any) -> dict[str, Any]:
        """Write `table` as the next shard (temp file, fsync, atomic rename), then record it."""
        import pyarrow.parquet as pq

        table = self._conform(table)
        name = self.next_name()
        tmp = self.path / (TMP + name)
        pq.write_table(table, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.path / name)
        _fsync_dir(self.path)
        entry = _shard_entry(name, table)
        self.manifest["shards"].append(entry)
        self.done.add(table.column("id").to_pylist())
        self.save()
        return entry

    def _conform(self, table: Any) -> Any:
        """Every shard gets the first shard's schema, so the directory reads as one table."""
        if self.schema is None:
            self.schema = table.schema
            return table
        if table.schema.equals(self.schema):
            return table
        try:
            return table.select(self.schema.names).cast(self.schema)
        except Exception as e:
            raise InputError(f"rows with columns {table.schema} do not fit the shards already written "
                             f"({self.schema}): {e}") from e

    def save(self) -> None:
        shards = self.manifest["shards"]
        self.manifest["rows"] = sum(s["rows"] for s in shards)
        self.manifest["errors"] = sum(s["errors"] for s in shards)
        samples = [x for s in shards for x in s.get("error_samples", [])]
        self.manifest["error_samples"] = samples[:MAX_ERROR_SAMPLES]
        _write_atomic(self.path / MANIFEST, json.dumps(self.manifest, indent=1).encode())

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._lock.close()

    def __enter__(self) -> OutputDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _shard_entry(name: str, table: Any) -> dict[str, Any]:
    errors = [(i, e) for i, e in zip(table.column("id").to_pylist(), table.column("error").to_pylist()) if e]
    return {"file": name, "rows": table.num_rows, "errors": len(errors),
            "error_samples": [{"id": i, "error": e} for i, e in errors[:3]]}


def changed(manifest: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    """What differs between a manifest's settings and a run's: 'what: now X, was Y' per difference."""
    out = []
    for section in ("bundle", "input", "options"):
        old, new = manifest.get(section, {}), settings.get(section, {})
        for key in sorted(set(old) | set(new)):
            if key in ("path",) and section == "bundle":
                continue  # a moved bundle is the same bundle: its hash decides
            if old.get(key) != new.get(key):
                out.append(f"{section} {key}: now {new.get(key)!r}, was {old.get(key)!r}")
    return out


def record_run(out: OutputDir, run: dict[str, Any]) -> None:
    """Append or update this run's entry (keyed by `started`) in the manifest."""
    runs = out.manifest["runs"]
    for k, r in enumerate(runs):
        if r["started"] == run["started"]:
            runs[k] = run
            break
    else:
        runs.append(run)
    out.save()


def now() -> str:
    """Local time, ISO 8601, for run records."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of an embed-dataset output directory."""
    f = Path(path) / MANIFEST
    if not f.is_file():
        raise ConfigError(f"{path} is not an embed-dataset output directory (no {MANIFEST})")
    return json.loads(f.read_text())


def iter_shards(path: str | Path, columns: list[str] | None = None) -> Iterator[Any]:
    """Each complete shard of an output directory as a `pyarrow.Table` (partial `_tmp-*` files are
    never read).
    """
    import pyarrow.parquet as pq

    for f in sorted(Path(path).glob("part-*.parquet")):
        yield pq.read_table(f, columns=columns)
