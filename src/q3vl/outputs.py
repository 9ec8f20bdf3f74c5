"""Outputs that are whole or absent: checked before any work, written beside the target, renamed into place.

Why: an export, a quantization or an embedding run can take hours, and two things used to go wrong
at its end: an output path that could not be written (a bad extension, a read-only directory, an
existing bundle) failed only after the work was done, and a failure or a kill half-way left a
half-written directory that looked like a bundle. So commands call `check_output` before they start,
and write through `staged_dir` / `staged_file`: the data goes to a hidden `.NAME.partial-PID` beside
the target (same filesystem, so the final rename is atomic), which is renamed to the target only
when everything succeeded and removed on any exception, Ctrl-C or SIGTERM (the CLI turns SIGTERM
into an exception). A SIGKILL cannot be cleaned up after: it leaves only the hidden partial, never
the target, and the next run for the same target removes partials whose process is gone.

Torch-free.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from q3vl.errors import ConfigError, OutputExistsError, option

PARTIAL = ".partial-"


def check_output(path: str | Path, *, suffixes: tuple[str, ...] = (), overwrite: bool = False,
                 directory: bool = False, replaceable: Callable[[Path], bool] | None = None,
                 what: str = "output") -> Path:
    """Fail now, not after hours of work, when `path` cannot become this command's output.

    Checks the extension (`suffixes`, e.g. (".npy", ".jsonl")), that an existing target is only
    replaced with `overwrite` (an empty directory counts as absent) and only when `replaceable(path)`
    says it is this kind of output, that a file is not where a directory goes (and vice versa), and
    that the nearest existing parent is a writable directory. Returns the path.
    """
    path = Path(path)
    if suffixes and path.suffix not in suffixes:
        raise ConfigError(f"{what} {path} must end in {' or '.join(suffixes)}")
    if path.exists() or path.is_symlink():
        if directory and not path.is_dir():
            raise ConfigError(f"{what} {path} is a file; a directory goes there")
        if not directory and path.is_dir():
            raise ConfigError(f"{what} {path} is a directory; give a file name")
        empty_dir = path.is_dir() and not any(path.iterdir())
        if not empty_dir:
            if not overwrite:
                state = "is not empty" if path.is_dir() else "already exists"
                raise OutputExistsError(f"{what} {path} {state}; pass {option('overwrite=True', '--overwrite')} "
                                        "to replace it")
            if replaceable is not None and not replaceable(path):
                raise OutputExistsError(f"refusing to replace {path}: it does not look like a q3vl {what}")
    parent = _existing_parent(path)
    if not parent.is_dir():
        raise ConfigError(f"cannot create {what} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot create {what} {path}: {parent} is not writable")
    return path


def _existing_parent(path: Path) -> Path:
    parent = path.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return parent


def partial_name(target: Path) -> Path:
    """The hidden sibling this process writes `target` into (suffix kept: numpy appends `.npy` otherwise)."""
    return target.with_name(f".{target.stem}{PARTIAL}{os.getpid()}{target.suffix}")


def remove_stale_partials(target: Path) -> None:
    """Remove partials of `target` left by processes that no longer run (a SIGKILL, a power cut)."""
    if not target.parent.is_dir():
        return
    for p in target.parent.glob(f".{target.stem}{PARTIAL}*"):
        pid = p.name[len(f".{target.stem}{PARTIAL}"):].removesuffix(target.suffix)
        if pid.isdigit() and not _alive(int(pid)):
            _remove(p)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _commit(partial: Path, target: Path, overwrite: bool) -> None:
    """Move the finished partial onto `target`; an old target (with `overwrite`) is removed only after."""
    if target.is_dir() and not target.is_symlink() and not any(target.iterdir()):
        target.rmdir()
    if not (target.exists() or target.is_symlink()):
        partial.rename(target)
        return
    if not overwrite:  # appeared while we worked
        _remove(partial)
        raise OutputExistsError(f"{target} appeared while it was being written; nothing was replaced")
    old = target.with_name(f".{target.stem}.old-{os.getpid()}{target.suffix}")
    target.rename(old)
    partial.rename(target)
    _remove(old)


@contextlib.contextmanager
def staged_dir(target: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """A fresh directory to write `target` into; it becomes `target` when the block succeeds and is
    removed when the block raises (including KeyboardInterrupt / SystemExit).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(target)
    partial = partial_name(target)
    _remove(partial)
    partial.mkdir()
    try:
        yield partial
    except BaseException:
        _remove(partial)
        raise
    _commit(partial, target, overwrite)


@contextlib.contextmanager
def staged_file(target: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """A path to write one file `target` into, renamed onto `target` when the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(target)
    partial = partial_name(target)
    try:
        yield partial
    except BaseException:
        _remove(partial)
        raise
    if not partial.exists():
        raise ConfigError(f"nothing was written for {target}")
    if target.exists() and not target.is_dir() and overwrite:
        os.replace(partial, target)  # atomic for a file
    else:
        _commit(partial, target, overwrite)


__all__ = ["check_output", "remove_stale_partials", "staged_dir", "staged_file"]
