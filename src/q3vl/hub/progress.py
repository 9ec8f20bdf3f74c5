"""Download progress through q3vl's `Progress` (a bar on a terminal, a line every 10 s in a log).

The client reports each file's bytes to a `tqdm_class` it is given; `DownloadBar.tqdm_class(name)`
is a minimal stand-in that forwards them (including the negative update the client makes when a
server ignores a `Range` request and the file restarts) to one bar for the whole download, in megabytes.
"""

from __future__ import annotations

import logging
from typing import Any

from q3vl.progress import Progress

log = logging.getLogger(__name__)
MB = 1_000_000


class DownloadBar:
    """One progress report for several files' bytes."""

    def __init__(self, total_bytes: int, desc: str, enabled: bool = True) -> None:
        self.bytes = 0
        self.progress = Progress(max(1, -(-total_bytes // MB)), desc, unit="megabyte",
                                 enabled=enabled and total_bytes > 0)

    def add(self, n: int) -> None:
        before = self.bytes // MB
        self.bytes = max(0, self.bytes + n)
        if self.bytes // MB > before:
            self.progress.update(self.bytes // MB - before)

    def tqdm_class(self, name: str) -> type:
        """A class the client instantiates per file (with tqdm's keyword arguments) and updates."""
        outer = self
        log.debug("downloading %s", name)

        class FileBar:
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                initial = kwargs.get("initial") or 0
                if initial:
                    outer.add(int(initial))

            def __enter__(self) -> FileBar:
                return self

            def __exit__(self, *exc: object) -> None:
                pass

            def update(self, n: float | None = 1) -> None:
                outer.add(int(n or 0))

            def close(self) -> None:
                pass

            def set_postfix_str(self, *args: Any, **kwargs: Any) -> None:
                pass

        return FileBar

    def __enter__(self) -> DownloadBar:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        left = (self.progress.total or 0) - self.progress.n
        if exc_type is None and left > 0:  # the last partial megabyte
            self.progress.update(left)
        self.progress.close()


__all__ = ["DownloadBar"]
