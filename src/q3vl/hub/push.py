"""`push_bundle`: a local bundle, checked, uploaded to a Hub model repo with its model card.

Refused before anything is uploaded: a bundle whose export-time parity check failed (always), one
never validated (unless `allow_unvalidated`: the card then says so), and one whose files do not match
their manifest (every file is hashed in full). The card is rendered again with the repo id, so its
how-to-load blocks name what a reader downloads. One commit holds `q3vl.json`, every file the
manifest lists and `README.md` (the client decides per file between a plain and an LFS/Xet upload).
"""

from __future__ import annotations

import logging
from pathlib import Path

from q3vl.bundle import MANIFEST, Manifest, verify_files
from q3vl.errors import BundleError, ConfigError, option
from q3vl.hub import client
from q3vl.hub.card import CARD, render
from q3vl.hub.client import Connection
from q3vl.hub.source import RepoRef, parse_source

log = logging.getLogger(__name__)


def check_pushable(bundle: Path, allow_unvalidated: bool = False) -> Manifest:
    """The bundle's manifest, if it may be published (module docstring); every file hashed."""
    manifest = Manifest.read(bundle)
    passed = manifest.parity.get("passed")
    if passed is False:
        raise BundleError(f"refusing to push {bundle}: its export-time parity check failed "
                          f"({manifest.parity.get('summary')}); export it again, or publish a bundle that passed")
    if passed is None and not allow_unvalidated:
        raise BundleError(f"refusing to push {bundle}: its parity was never measured "
                          f"({manifest.parity.get('summary')}); validate it, or pass "
                          f"{option('allow_unvalidated=True', '--allow-unvalidated')} (the card says so)")
    verify_files(bundle, manifest.files, full=True)
    return manifest


def target_repo(repo_id: str) -> RepoRef:
    """The repo to push to: `namespace/name[@branch]`, validated like any repo id."""
    ref = parse_source(repo_id) if "/" in repo_id else None
    if not isinstance(ref, RepoRef) or ref.pinned:
        raise ConfigError(f"push needs a Hub repo id namespace/name[@branch], not {repo_id!r}")
    return ref


def push_bundle(bundle: str | Path, repo_id: str, *, token: str | None = None, private: bool = False,
                allow_unvalidated: bool = False, message: str | None = None) -> str:
    """Upload `bundle` (a local directory) to `repo_id` (created if absent); returns the commit's URL."""
    bundle = Path(bundle)
    ref = target_repo(repo_id)
    manifest = check_pushable(bundle, allow_unvalidated)
    card = render(bundle, ref.repo_id).encode("utf-8")
    h, conn = client.hf(), Connection.from_env(token)
    api = h.HfApi(endpoint=conn.endpoint, token=conn.token)
    ops = [h.CommitOperationAdd(path_in_repo=n, path_or_fileobj=str(bundle / n)) for n in [MANIFEST, *manifest.files]]
    ops.append(h.CommitOperationAdd(path_in_repo=CARD, path_or_fileobj=card))
    try:
        api.create_repo(ref.repo_id, private=private, exist_ok=True)
        info = api.create_commit(ref.repo_id, ops, revision=ref.revision,
                                 commit_message=message or f"q3vl {manifest.task} bundle ({manifest.precision})")
    except Exception as e:
        raise client.translate(e, ref, conn) from e
    log.info("pushed %s to %s (%d files)", bundle, info.commit_url, len(ops))
    return str(info.commit_url)


__all__ = ["check_pushable", "push_bundle", "target_repo"]
