"""A bundle source (a local folder or a Hub repo id) -> a local bundle directory.

Every front end calls `resolve_bundle` (Embedder/Reranker, `q3vl serve`, `q3vl embed-dataset` and its
Ray workers, every command that takes a bundle). A local path is returned as it is, without importing
`huggingface_hub`. A repo id is listed (commit sha, files): a repo without `q3vl.json` is not a
bundle and is refused naming what it is; the manifest is fetched and read (a newer bundle format is
refused), every file it names must be listed at the size it records, then each is downloaded once into
the Hub cache, hashed against the manifest's sha256 and materialised as plain files (hard links) in
`<repo cache folder>/q3vl/<sha>/`, which is the directory returned.

`locate_bundle` also returns the source pinned to its commit (`org/name@<sha>`): what a Ray driver
hands its workers, so each resolves the very same commit from the shared cache with no network call.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from q3vl.bundle import MANIFEST, Manifest
from q3vl.errors import BundleError, HubError
from q3vl.hub import cache, client, preflight
from q3vl.hub.client import Connection, Listing
from q3vl.hub.progress import DownloadBar
from q3vl.hub.source import RepoRef, parse_source
from q3vl.spec import read_json

log = logging.getLogger(__name__)
KIND = "bundle"


@dataclass(frozen=True)
class Located:
    """A resolved bundle: its local directory and the source that names exactly it."""

    path: Path
    source: str  # the local path, or `org/name@<sha>`
    repo: RepoRef | None = None


def resolve_bundle(source: str | Path, *, token: str | None = None, progress: bool = True) -> Path:
    """The local bundle directory for `source` (a path: unchanged; a repo id: downloaded and verified)."""
    return locate_bundle(source, token=token, progress=progress).path


def locate_bundle(source: str | Path, *, token: str | None = None, progress: bool = True) -> Located:
    """The bundle directory for `source` and the source naming exactly it (module docstring)."""
    where = parse_source(source)
    if isinstance(where, Path):
        return Located(where, str(where))
    conn = Connection.from_env(token)
    hit = _from_cache(where, conn)
    if hit is None:
        try:
            listing = client.list_repo(where, conn)
        except HubError:
            hit = _from_cache(where, conn, offline_fallback=True)
            if hit is None:
                raise
            log.warning("the Hub is unreachable: using the cached bundle %s", hit.source)
        else:
            hit = _download(listing, conn, progress)
    log.info("bundle %s: %s", where, hit.path)
    return hit


def _target(ref: RepoRef, sha: str) -> Path:
    return client.storage(ref.repo_id) / "q3vl" / sha


def _from_cache(ref: RepoRef, conn: Connection, offline_fallback: bool = False) -> Located | None:
    if not (ref.pinned or conn.offline or offline_fallback):
        return None
    sha = client.cached_sha(ref)
    record = cache.read_record(client.storage(ref.repo_id), sha, KIND) if sha else None
    if record is None or not _target(ref, sha).is_dir():  # type: ignore[arg-type]
        if conn.offline:
            raise HubError(f"{ref} is not in the Hub cache as a complete, verified bundle, and the Hub may not be "
                           "asked (HF_HUB_OFFLINE=1): run once with the Hub reachable")
        return None
    target = _target(ref, sha)  # type: ignore[arg-type]
    cache.verify(target, record["files"], str(ref), record, BundleError)
    return Located(target, str(ref.at(sha)), ref)  # type: ignore[arg-type]


def _download(listing: Listing, conn: Connection, progress: bool) -> Located:
    name, pinned = str(listing.ref), listing.pinned
    if MANIFEST not in listing.files:
        raise BundleError(f"{name} is not a q3vl bundle: it has no {MANIFEST}{_what_it_is(listing)}")
    path = client.download(pinned, MANIFEST, conn, revision=listing.ref.revision)
    snapshot = path.parent
    if snapshot.name != listing.sha:
        raise HubError(f"{name} moved to another commit while downloading: run again")
    manifest = Manifest.from_dict(read_json(path, BundleError))  # a newer format: refused, naming it
    files = _expected(listing, manifest)
    store = client.storage(listing.ref.repo_id)
    missing = sum(f["size"] for n, f in files.items() if not (snapshot / n).exists())
    preflight.check_download(name, missing, store.parent)
    with DownloadBar(missing, f"download {name}", progress) as bar:
        for n in files:
            if n != MANIFEST:
                client.download(pinned, n, conn, bar.tqdm_class(n))
    cache.verify(snapshot, files, name, None, BundleError)
    target = cache.materialise(snapshot, list(files), _target(listing.ref, listing.sha))
    stats = cache.verify(target, files, name, None, BundleError)  # links share the verified blobs' inodes
    cache.write_record(store, listing.sha, KIND, files, stats)
    return Located(target, str(pinned), listing.ref)


def _expected(listing: Listing, manifest: Manifest) -> dict[str, dict[str, Any]]:
    """Every file the manifest names, with its size and sha256; each must be listed at that size."""
    files: dict[str, dict[str, Any]] = {MANIFEST: listing.files[MANIFEST].expected()}
    outside = [n for n in manifest.files if n.startswith("/") or ".." in n.split("/")]
    if outside:  # named first: a hostile manifest, whatever else it lacks
        raise BundleError(f"{listing.ref}: the manifest names the file {outside[0]!r}: bundle paths must be relative")
    for n, meta in manifest.files.items():
        if not isinstance(meta, dict) or not isinstance(meta.get("size"), int) or not isinstance(meta.get("sha256"),
                                                                                                 str):
            raise BundleError(f"{listing.ref}: manifest field files.{n} must hold an integer size and a sha256")
        remote = listing.files.get(n)
        if remote is None:
            raise BundleError(f"{listing.ref}: the manifest names {n}, which the repo does not have")
        if remote.size != meta["size"]:
            raise BundleError(f"{listing.ref}: the repo lists {n} at {remote.size} bytes, the manifest says "
                              f"{meta['size']}: the repo's files are not the bundle's")
        files[n] = {"size": meta["size"], "sha256": meta["sha256"], "git_sha1": None}
    for g in manifest.graphs.values():
        if g.file not in files:
            raise BundleError(f"{listing.ref}: the manifest's graph {g.file} is not among its files")
    return files


def _what_it_is(listing: Listing) -> str:
    names = set(listing.files)
    if "config.json" in names and any(n.endswith(".safetensors") for n in names):
        return f" (it is a model checkpoint: export it with `q3vl export {listing.ref} -o BUNDLE_DIR`)"
    onnx = sorted(n for n in names if n.endswith(".onnx"))
    if onnx:
        return f" (it holds ONNX files {onnx[:3]} but no q3vl manifest: it was not exported by q3vl)"
    return f" (its files: {sorted(names)[:5]})"


__all__ = ["Located", "locate_bundle", "resolve_bundle"]
