"""The exception types a q3vl user can act on.

Every error q3vl raises on purpose is a `Q3VLError`, so a service can tell "the caller sent a bad
item" (`InputError`, and its `LimitError`) from "the caller asked for something impossible"
(`ConfigError`, `OutputExistsError`) from "the deployment is broken" (`BundleError`,
`CheckpointError`, `BackendError`) from "the export does not reproduce the model" (`ParityError`).
Each message names the problem and, where there is one, the fix.

The classes also derive from the builtin a caller would have caught before q3vl had its own
(`ValueError`, `FileExistsError`, `RuntimeError`, ...), so existing `except` clauses keep working.
"""

from __future__ import annotations

import re
from typing import Any


class Q3VLError(Exception):
    """Base class of every error q3vl raises on purpose."""


class InputError(Q3VLError, ValueError):
    """One input item is unusable: unreadable image, missing file, bad type, too long, ...

    `index` is the item's position in the list passed to `process()` (None when the whole call
    is wrong, e.g. an empty list, or when the error is about a part shared by every item, such as
    a reranker's query). `reason` is the human-readable cause without the index prefix.
    """

    def __init__(self, reason: str, index: int | None = None) -> None:
        self.reason = reason
        self.index = index
        prefix = f"input {index}: " if index is not None else ""
        super().__init__(prefix + reason)

    def at(self, index: int) -> InputError:
        """The same error (same class) attributed to item `index` of the caller's list."""
        err = type(self)(self.reason, index)
        err.__cause__ = self.__cause__
        return err


class LimitError(InputError):
    """An item is over a configured limit or an engine's shape range; raised before any graph runs.

    The message names the limit and its value, so the caller can shrink the item or the operator
    can raise the limit (or rebuild TensorRT engines with a larger one).
    """


class QueryError(InputError):
    """A reranker query is unusable: every document's score depends on it, so the whole call fails,
    whatever `on_error` says, with a message that starts with "query:".
    """


class ConfigError(Q3VLError, ValueError):
    """An argument or option is invalid (bad value, unknown name, missing companion option)."""


class UnknownOptionError(ConfigError, TypeError):
    """A keyword argument or backend option q3vl does not know; the message lists the allowed ones."""


class OutputExistsError(Q3VLError, FileExistsError):
    """The output path of an export, quantization or build already exists (pass --overwrite)."""


class CheckpointError(Q3VLError, ValueError):
    """The checkpoint is not a Qwen3-VL checkpoint q3vl can export, or files are missing."""


class BundleError(Q3VLError, RuntimeError):
    """The bundle is corrupt, truncated, incomplete, inconsistent or from an incompatible format."""


class BackendError(Q3VLError, RuntimeError):
    """A backend failed while running a graph (device error, out of device memory, engine failure)."""


class BackendUnavailableError(BackendError):
    """The requested backend (CUDA, TensorRT, ...) or an optional package cannot be used here;
    the message says what to install.
    """


class ParityError(Q3VLError, AssertionError):
    """An exported graph does not reproduce the PyTorch reference within tolerance.

    `report` holds each compared output with its worst difference, so the failure is diagnosable.
    """

    def __init__(self, message: str, report: dict[str, Any] | None = None) -> None:
        self.report = report or {}
        super().__init__(message)


def option(api: str, flag: str) -> str:
    """How a message names an option: the Python API's words with the CLI flag in parentheses,
    e.g. `option("overwrite=True", "--overwrite")` -> "overwrite=True (--overwrite)".

    Why: the same error reaches Python callers and command-line users; `cli_words` keeps only the
    flag when the CLI prints it, so neither audience reads the other's vocabulary.
    """
    return f"{api} ({flag})"


_OPTION = re.compile(r"[A-Za-z_][\w.]*=(?:'[^']*'|\"[^\"]*\"|[\w.+-]+) \((-{1,2}[^()]*)\)")


def cli_words(message: str) -> str:
    """`message` for a command-line user: every `option(api, flag)` becomes just the flag."""
    return _OPTION.sub(r"\1", message)


class RequestError(InputError):
    """A field of an HTTP request to `q3vl serve` is unusable; `param` names it the way the API does
    (`input[3]`, `inputs[0].content[1].image_url.url`, `dimensions`), so a client can point at it.
    """

    def __init__(self, reason: str, param: str | None = None, index: int | None = None) -> None:
        self.param = param
        super().__init__(reason, index)

    def at(self, index: int) -> InputError:
        err = type(self)(self.reason, self.param, index)
        err.__cause__ = self.__cause__
        return err


class UnknownModelError(RequestError):
    """A request names a model the server does not serve (HTTP 404); the message lists the served ones."""


class RequestTooLargeError(RequestError, LimitError):
    """A request is over a server-wide size limit: items per request or body bytes (HTTP 413)."""


class AuthenticationError(Q3VLError, PermissionError):
    """A request lacks the server's API key, or sends a wrong one (HTTP 401)."""


class OverloadedError(Q3VLError, RuntimeError):
    """The server's queue is full (HTTP 429); `retry_after` is the estimated wait in whole seconds."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        self.retry_after = max(1, int(retry_after))
        super().__init__(message)


class UnavailableError(Q3VLError, RuntimeError):
    """The server cannot take requests now: still warming up, or draining before exit (HTTP 503)."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        self.retry_after = max(1, int(retry_after))
        super().__init__(message)


# The optional-dependency groups of pyproject.toml; `missing_extra` only names these (tested).
EXTRAS = ("export", "index", "serve", "ray", "bench", "langchain", "llamaindex", "lancedb", "chroma", "dev")


def missing_extra(package: str, extra: str | None) -> BackendUnavailableError:
    """The error raised when an optional dependency is absent: names the pip extra that provides it
    (or, for `extra=None`, a base dependency, the package itself).
    """
    if extra is None:
        return BackendUnavailableError(
            f"{package} is not installed; it is a dependency of q3vl itself: pip install {package}")
    if extra not in EXTRAS:
        raise ValueError(f"no extra named {extra!r}; extras are {EXTRAS}")
    return BackendUnavailableError(
        f"{package} is not installed; it comes with the '{extra}' extra: pip install 'q3vl[{extra}]'"
    )
