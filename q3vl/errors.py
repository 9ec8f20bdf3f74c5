"""The few exception types a q3vl user can act on.

Every error q3vl raises on purpose is one of these, so a service can tell "the caller sent a bad
item" (`InputError`) from "the deployment is broken" (`BundleError`, `BackendUnavailableError`)
from "the export does not reproduce the model" (`ParityError`).
"""

from __future__ import annotations

from typing import Any


class Q3VLError(Exception):
    """Base class of every error q3vl raises on purpose."""


class InputError(Q3VLError, ValueError):
    """One input item is unusable: unreadable image, missing file, bad type, too long, ...

    `index` is the item's position in the list passed to `process()` (None when the whole call
    is wrong, e.g. an empty list). `reason` is the human-readable cause without the index prefix.
    """

    def __init__(self, reason: str, index: int | None = None) -> None:
        self.reason = reason
        self.index = index
        prefix = f"input {index}: " if index is not None else ""
        super().__init__(prefix + reason)

    def at(self, index: int) -> InputError:
        """The same error attributed to item `index` of the caller's list."""
        err = type(self)(self.reason, index)
        err.__cause__ = self.__cause__
        return err


class CheckpointError(Q3VLError, ValueError):
    """The checkpoint is not a Qwen3-VL checkpoint q3vl can export, or files are missing."""


class BundleError(Q3VLError, RuntimeError):
    """The bundle is corrupt, truncated, incomplete or from an incompatible format version."""


class BackendUnavailableError(Q3VLError, RuntimeError):
    """The requested backend (CUDA, TensorRT, ...) cannot run here; says what to install."""


class ParityError(Q3VLError, AssertionError):
    """An exported graph does not reproduce the PyTorch reference within tolerance.

    `report` holds each compared output with its worst difference, so the failure is diagnosable.
    """

    def __init__(self, message: str, report: dict[str, Any] | None = None) -> None:
        self.report = report or {}
        super().__init__(message)


def missing_extra(package: str, extra: str) -> BackendUnavailableError:
    """The error raised when an optional dependency is absent: names the pip extra to install."""
    return BackendUnavailableError(
        f"{package} is not installed; it comes with the '{extra}' extra: pip install 'q3vl[{extra}]'"
    )
