"""What q3vl keeps beside the Hub cache: proof that a downloaded snapshot was checked, file by file.

The client checks a download's size but not its content. q3vl hashes every file it downloads
against what the repo lists (sha256 for LFS files, the git blob id for the others) or, for bundles,
against the manifest's sha256, once; then records, in `<repo cache folder>/q3vl/<sha>.<kind>.json`,
each file's expected hash and the (size, mtime, inode) it was verified at. A later load of the same
commit (offline, or pinned to the sha, or on another Ray worker sharing the cache) trusts a file
whose stat still matches the record and hashes again any other. A file that does not match is
removed from the cache (blob and snapshot link) so the next run downloads it again.

Bundles are also materialised as `<repo cache folder>/q3vl/<sha>/`, hard links to the cache's blobs
(a copy where links are impossible): a bundle directory of plain files, which the bundle contract
requires (every file inside the bundle directory, symlinks included).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from q3vl.errors import HubError

log = logging.getLogger(__name__)
CHUNK = 1 << 22


def git_blob_sha1(path: Path) -> str:
    """The git object id of a file (what the Hub lists as a non-LFS file's `blobId`)."""
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's content."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def mismatch(path: Path, expected: dict[str, Any]) -> str | None:
    """Why `path` is not the file `expected` describes (size, sha256 or git_sha1), or None."""
    size = path.stat().st_size
    if size != expected["size"]:
        return f"is {size} bytes, the repo lists {expected['size']}"
    if expected.get("sha256"):
        got = file_sha256(path)
        return None if got == expected["sha256"] else f"has sha256 {got[:12]}..., expected {expected['sha256'][:12]}..."
    if expected.get("git_sha1"):
        got = git_blob_sha1(path)
        return None if got == expected["git_sha1"] else f"has git blob id {got[:12]}..., expected " \
                                                         f"{expected['git_sha1'][:12]}..."
    log.warning("%s: the repo lists no hash for it; only its size was checked", path.name)
    return None


def _stat(path: Path) -> list[int]:
    st = path.stat()  # follows the snapshot's symlink to the blob
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def record_path(storage: Path, sha: str, kind: str) -> Path:
    """Where the verification record of a `kind` ("checkpoint" / "bundle") snapshot at `sha` lives."""
    return storage / "q3vl" / f"{sha}.{kind}.json"


def read_record(storage: Path, sha: str, kind: str) -> dict[str, Any] | None:
    """The record of a verified snapshot, or None (absent, unreadable, or from another format)."""
    try:
        record = json.loads(record_path(storage, sha, kind).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("files"), dict) else None


def verify(snapshot: Path, files: dict[str, dict[str, Any]], where: str, record: dict[str, Any] | None = None,
           error: type[Exception] = HubError) -> dict[str, list[int]]:
    """Check each file of `snapshot` against `files` (name -> expected), hashing only those whose stat
    differs from `record`; a bad file is removed from the cache and named in `error`. Returns the stats.
    """
    known = (record or {}).get("stat", {})
    stats = {}
    for name, expected in files.items():
        path = snapshot / name
        if not path.exists():
            raise error(f"{where}: {name} is missing from the Hub cache ({snapshot}); run again with the Hub "
                        "reachable to download it")
        stat = _stat(path)
        if known.get(name) != stat:
            problem = mismatch(path, expected)
            if problem:
                _evict(path)
                raise error(f"{where}: the downloaded {name} {problem}: the content does not match what the repo "
                            "lists (corrupted or tampered with in transit); it was removed from the cache")
            stat = _stat(path)
        stats[name] = stat
    return stats


def write_record(storage: Path, sha: str, kind: str, files: dict[str, dict[str, Any]],
                 stats: dict[str, list[int]], extra: dict[str, Any] | None = None) -> None:
    """Record a verified snapshot (written beside, then renamed: readers never see half a record)."""
    path = record_path(storage, sha, kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps({"files": files, "stat": stats, **(extra or {})}, indent=1))
    os.replace(tmp, path)


def _evict(path: Path) -> None:
    """Remove a snapshot file and the blob it links to."""
    blob = path.resolve()
    for p in {path, blob}:
        p.unlink(missing_ok=True)


def materialise(snapshot: Path, names: list[str], target: Path) -> Path:
    """`target` holding `names` as plain files: hard links to the snapshot's blobs (copies where a link
    fails), built beside `target` and renamed into place, so `target` exists only complete (two
    processes racing: the first rename wins, the other uses it).
    """
    if target.is_dir():
        return target
    tmp = target.with_name(f".{target.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for name in names:
            dst = tmp / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            src = (snapshot / name).resolve()
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
        os.rename(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if target.is_dir():
            return target
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


__all__ = ["file_sha256", "git_blob_sha1", "materialise", "mismatch", "read_record", "record_path", "verify",
           "write_record"]
