"""The one place q3vl talks to `huggingface_hub`: repo listing, file download, errors in q3vl's words.

Read at call time, so a process can change them between calls: `HF_ENDPOINT` (the Hub or a mirror),
`HF_HUB_OFFLINE` (cache only), `HF_HUB_ETAG_TIMEOUT` (seconds an API or metadata call may take,
default 10). The client itself reads `HF_TOKEN` (or the stored login), `HF_HOME` / `HF_HUB_CACHE`
(the cache) and `HF_HUB_DOWNLOAD_TIMEOUT` (a read during a transfer, default 10 s) when it is
first imported, as every Hugging Face library does.

What the client does on the wire (huggingface_hub 2.4; what the test suite's loopback Hub serves):
the listing is `GET /api/models/{repo}/revision/{rev}?blobs=true` (commit `sha`; `siblings` with
each file's size, git blob id and, for LFS files, sha256); a file is `HEAD /{repo}/resolve/{sha}/{path}`
(`X-Repo-Commit`, `ETag` or `X-Linked-Etag`, `Content-Length` or `X-Linked-Size`) then a `GET`,
which after a stalled or dropped transfer is retried up to five times with `Range: bytes=N-` from
the byte reached (each retry after a read timeout). A failed file leaves nothing partial behind; the
files already complete stay in the cache, so a later run downloads only the rest.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from q3vl.errors import BackendUnavailableError, HubError, missing_extra
from q3vl.hub.source import RepoRef

log = logging.getLogger(__name__)
MIN_VERSION = (2, 4)
DEFAULT_ENDPOINT = "https://huggingface.co"


def hf() -> Any:
    """The `huggingface_hub` module, at a version whose wire behaviour q3vl was tested against."""
    try:
        import huggingface_hub
    except ImportError as e:
        raise missing_extra("huggingface_hub", "hub") from e
    version = tuple(int(p) for p in huggingface_hub.__version__.split(".")[:2] if p.isdigit())
    if version < MIN_VERSION:
        raise BackendUnavailableError(f"huggingface_hub {huggingface_hub.__version__} is too old for Hub repo ids "
                                      f"(q3vl needs >= {'.'.join(map(str, MIN_VERSION))}): pip install 'q3vl[hub]'")
    return huggingface_hub


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


@dataclass(frozen=True)
class Connection:
    """Where and how to reach the Hub, read from the environment when a resolution starts."""

    endpoint: str = DEFAULT_ENDPOINT
    token: str | None = None  # None: the client's own (HF_TOKEN, then the stored login)
    offline: bool = False
    timeout: float = 10.0

    @classmethod
    def from_env(cls, token: str | None = None) -> Connection:
        timeout = os.environ.get("HF_HUB_ETAG_TIMEOUT", "")
        return cls(endpoint=(os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/"), token=token or None,
                   offline=_truthy(os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")),
                   timeout=float(timeout) if timeout.replace(".", "", 1).isdigit() else 10.0)


@dataclass(frozen=True)
class RemoteFile:
    """One file of a repo as its listing describes it."""

    size: int
    sha256: str | None = None  # LFS files: the content's sha256
    git_sha1: str | None = None  # every file: the git blob id (sha1 of "blob <size>\\0" + content)

    def expected(self) -> dict[str, Any]:
        return {"size": self.size, "sha256": self.sha256, "git_sha1": self.git_sha1}


@dataclass(frozen=True)
class Listing:
    """A repo at one commit: its files and its card's metadata."""

    ref: RepoRef  # as asked (revision may be a branch)
    sha: str
    files: dict[str, RemoteFile]
    card: dict[str, Any] = field(default_factory=dict)

    @property
    def pinned(self) -> RepoRef:
        return self.ref.at(self.sha)


def list_repo(ref: RepoRef, conn: Connection) -> Listing:
    """The repo's commit sha and file list (sizes and hashes), in one API call."""
    api = hf().HfApi(endpoint=conn.endpoint, token=conn.token)
    try:
        info = api.model_info(ref.repo_id, revision=ref.revision, files_metadata=True, timeout=conn.timeout)
    except Exception as e:
        raise translate(e, ref, conn) from e
    if not info.sha:
        raise HubError(f"the Hub at {conn.endpoint} gave no commit sha for {ref}")
    files = {}
    for s in info.siblings or []:
        if s.size is None or s.size < 0:
            raise HubError(f"the Hub at {conn.endpoint} lists {s.rfilename} of {ref} without a size")
        files[s.rfilename] = RemoteFile(int(s.size), s.lfs.sha256 if s.lfs else None, s.blob_id)
    card = dict(info.card_data.to_dict()) if getattr(info, "card_data", None) else {}
    return Listing(ref, info.sha, files, card)


def storage(repo_id: str) -> Path:
    """The repo's folder in the Hub cache (`HF_HUB_CACHE`, default `HF_HOME/hub`)."""
    hf()
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")


def cached_sha(ref: RepoRef) -> str | None:
    """The commit a revision points to in the cache (a pinned ref is its own), or None."""
    if ref.pinned:
        return ref.revision
    head = storage(ref.repo_id) / "refs" / (ref.revision or "main")
    return head.read_text().strip() if head.is_file() else None


def download(pinned: RepoRef, name: str, conn: Connection, bar: Callable[..., Any] | None = None,
             revision: str | None = None) -> Path:
    """One file of a pinned ref into the cache (a no-op when it is there); its snapshot path.

    `revision`: ask for the file at this branch instead (the cache then records where the branch
    points); the caller checks that it landed in `pinned`'s commit.
    """
    try:
        path = hf().hf_hub_download(pinned.repo_id, name, revision=revision or pinned.revision,
                                    endpoint=conn.endpoint, token=conn.token, etag_timeout=conn.timeout,
                                    tqdm_class=bar)
    except Exception as e:
        raise translate(e, pinned, conn, name) from e
    return Path(path)


def translate(e: Exception, ref: RepoRef, conn: Connection, name: str | None = None) -> Exception:
    """A client or transport exception as a one-line `HubError` saying what happened and what to do."""
    from huggingface_hub import errors as he

    where = f"{ref}{f' file {name}' if name else ''}"
    if isinstance(e, he.RevisionNotFoundError):
        return HubError(f"{ref.repo_id} has no revision {ref.revision!r} on {conn.endpoint}")
    if isinstance(e, he.GatedRepoError):
        return HubError(f"{ref.repo_id} is gated on {conn.endpoint}: accept its conditions on its page, then pass a "
                        "token with access (HF_TOKEN or --token)")
    if isinstance(e, he.RepositoryNotFoundError):
        return HubError(f"{ref.repo_id} was not found on {conn.endpoint} (a private repo needs a token with access: "
                        "HF_TOKEN or --token)")
    if isinstance(e, he.RemoteEntryNotFoundError):
        return HubError(f"{where} does not exist on {conn.endpoint}")
    if isinstance(e, he.HfHubHTTPError):
        status = e.response.status_code if e.response is not None else "?"
        return HubError(f"the Hub at {conn.endpoint} answered HTTP {status} for {where}")
    if isinstance(e, (he.OfflineModeIsEnabled, he.LocalEntryNotFoundError)):
        return HubError(f"{where} is not in the Hub cache and the Hub may not be asked (HF_HUB_OFFLINE=1)")
    if _transport(e):
        return HubError(f"the Hub at {conn.endpoint} did not answer for {where} ({type(e).__name__}: "
                        f"{_first_line(e)}); the files already complete stay in the cache: run again to "
                        "download the rest")
    return e


def _transport(e: Exception) -> bool:
    """A network failure: refused, reset, timed out, or a transfer that ended short (the client's OSError)."""
    import httpx2

    return isinstance(e, (httpx2.TransportError, ConnectionError, TimeoutError)) or (
        type(e) is OSError and "Consistency check failed" in str(e))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else "no message"


__all__ = ["Connection", "Listing", "RemoteFile", "cached_sha", "download", "hf", "list_repo", "storage",
           "translate"]
