"""Where a model comes from: a local folder, or a Hugging Face Hub repo id `namespace/name[@revision]`.

The rule, as transformers' `from_pretrained` has it: **an existing local path wins**. A string that
names an existing file or folder is that path, even when it also reads as a repo id (`org/name`
beside a folder `org/name`). Otherwise a string of exactly the form `namespace/name[@revision]` is a
Hub repo id, validated here, before anything touches the network or the disk: names of ASCII
letters, digits, `-`, `_` and `.` (at most 96 characters, not starting or ending with `-`/`.`, no
`--` or `..`: the Hub's own rules), and a revision (branch, tag, `refs/pr/N` or commit sha) without
`..`, spaces, control characters or a leading `/`/`-`. Anything else (an absolute path, `./x`,
`a/b/c`, ...) is a local path that does not exist, which the caller reports in its own words.

No Hub id has one segment only here (`gpt2`-style legacy ids): a single word is a local folder name,
so a typo of a folder never becomes a network request.

Imports nothing beyond the standard library (the runtime calls it on every load).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from q3vl.errors import ConfigError

_NAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?")
_REVISION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./-]{0,199}")
COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class RepoRef:
    """A validated Hub repo id with an optional revision (None: the repo's default branch)."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id

    @property
    def pinned(self) -> bool:
        """Whether the revision is a full commit sha (immutable: a cached copy needs no network)."""
        return self.revision is not None and COMMIT.fullmatch(self.revision) is not None

    def at(self, sha: str) -> RepoRef:
        """The same repo pinned to commit `sha`."""
        return RepoRef(self.repo_id, sha)


def parse_source(source: str | os.PathLike[str]) -> Path | RepoRef:
    """A local path (existing, or path-shaped) or a validated `RepoRef`; raises `ConfigError` for a
    string shaped like a repo id that breaks the Hub's rules (one line naming the rule).
    """
    if not isinstance(source, str):
        return Path(source)  # a Path object is a path, whatever it spells
    if not source or os.path.lexists(source):
        return Path(source)
    repo, at, revision = source.partition("@")
    if not _repo_shaped(repo):
        return Path(source)
    _check_repo_id(source, repo)
    if at:
        _check_revision(source, revision)
    return RepoRef(repo, revision or None)


def check_source(value: object, name: str) -> str | Path | None:
    """A model-source option's value (None, a path, or a repo id string) checked: the options model's
    check for `str | Path` fields (`q3vl.options` leaves unions to their owner); a malformed repo id
    raises here, before anything starts.
    """
    if value is None or isinstance(value, Path):
        return value
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be a bundle directory or a Hub repo id, not {type(value).__name__}")
    parse_source(value)
    return value


def is_repo_id(source: str | os.PathLike[str]) -> bool:
    """Whether `source` resolves through the Hub (it does not exist locally and is a valid repo id)."""
    try:
        return isinstance(parse_source(source), RepoRef)
    except ConfigError:
        return False


def _repo_shaped(repo: str) -> bool:
    """One `/` between two non-empty parts that do not start like a path (`/x`, `./x`, `~/x`, `C:`)."""
    head, sep, tail = repo.partition("/")
    return bool(sep and head and tail and "/" not in tail and "\\" not in repo and head not in (".", "~")
                and not head.endswith(":"))


def _check_repo_id(source: str, repo: str) -> None:
    for part in repo.split("/"):
        if part == ".." or ".." in part or "--" in part:
            raise ConfigError(f"{source!r} is not a local path and not a valid Hub repo id: '..' and '--' are not "
                              "allowed in a repo id (namespace/name[@revision])")
        if not _NAME.fullmatch(part) or part.endswith((".", "-")):
            raise ConfigError(f"{source!r} is not a local path and not a valid Hub repo id: {part!r} must be 1-96 "
                              "ASCII letters, digits, '-', '_' or '.', not starting or ending with '-' or '.'")
    if repo.endswith(".git"):
        raise ConfigError(f"{source!r} is not a valid Hub repo id: it must not end in '.git'")


def _check_revision(source: str, revision: str) -> None:
    bad = (not _REVISION.fullmatch(revision) or ".." in revision or "//" in revision or revision.endswith("/")
           or revision.endswith(".lock"))
    if bad:
        raise ConfigError(f"{source!r}: the revision {revision!r} is not a branch, tag or commit name (letters, "
                          "digits, '_', '-', '.', '/'; no '..', '//', leading '-' or '/', spaces or control "
                          "characters)")


__all__ = ["COMMIT", "RepoRef", "check_source", "is_repo_id", "parse_source"]
