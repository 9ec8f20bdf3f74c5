"""Progress of long jobs: a tqdm bar on a terminal, plain periodic log lines everywhere else.

Why: an export, a parity run or a benchmark can take minutes, and a command that prints nothing for
minutes looks hung; but a progress bar redraws itself with carriage returns, which turns a CI log or
a redirected stderr into one unreadable line. So every q3vl loop that can take more than a few
seconds reports through `Progress`, which draws a bar only when stderr is a terminal (or a notebook)
and otherwise logs a line on the `q3vl.progress` logger at most every `interval` seconds, with the
count, the rate and an ETA when the total is known. Step-wise jobs (export: vision graph, text graph,
validation) log every step as it starts, since each step can take minutes.

Torch-free; tqdm is a base dependency.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

log = logging.getLogger("q3vl.progress")
INTERVAL = 10.0  # seconds between two log lines of the same job


def on_terminal() -> bool:
    """Whether a redrawn bar is readable here: stderr is a TTY, or we run inside a Jupyter kernel."""
    return sys.stderr.isatty() or "ipykernel" in sys.modules


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Progress:
    """Counts work done towards `total` (None: unknown) in `unit`s, labelled `desc`.

    `enabled`: False shows nothing; True shows a bar on a terminal and log lines elsewhere (`bar`
    True/False forces one or the other, as `embed-dataset --no-progress` asks for log lines). Use as a
    context manager, or call `close()`, so the last line (count and elapsed time) is written.
    """

    def __init__(self, total: int | None, desc: str, unit: str = "item", *, enabled: bool = True,
                 interval: float = INTERVAL, bar: bool | None = None) -> None:
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.n = 0
        self.enabled = enabled
        self._started = self._logged = time.monotonic()
        self._bar: Any = None
        self._closed = False
        if enabled and (on_terminal() if bar is None else bar):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit)

    # ------------------------------------------------------------------ updates
    def update(self, n: int = 1) -> None:
        """`n` more units are done."""
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled and self.n != self.total and time.monotonic() - self._logged >= self.interval:
            self._line()  # the last update is reported by close(), with the elapsed time

    def step(self, name: str) -> None:
        """Start the next step, `name` (logged at once in line mode: one step can take minutes)."""
        if self._bar is not None:
            self._bar.set_description(f"{self.desc}: {name}")
        elif self.enabled:
            self._logged = time.monotonic()
            total = f"/{self.total}" if self.total is not None else ""
            log.info("%s: step %d%s: %s", self.desc, self.n + 1, total, name)

    def close(self) -> None:
        """Finish: close the bar, or log the final count and the elapsed time."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            log.info("%s: %s in %s", self.desc, self._count(), _duration(time.monotonic() - self._started))

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ line mode
    def _count(self) -> str:
        total = f"/{self.total}" if self.total is not None else ""
        return f"{self.n}{total} {self.unit}{'' if self.n == 1 and not total else 's'}"

    def eta(self) -> float | None:
        """Seconds left at the mean rate so far, or None when it cannot be known yet."""
        if self.total is None or self.n <= 0:
            return None
        elapsed = time.monotonic() - self._started
        return elapsed / self.n * max(self.total - self.n, 0)

    def _line(self) -> None:
        self._logged = time.monotonic()
        elapsed = self._logged - self._started
        parts = [f"{self.desc}: {self._count()}"]
        if self.total:
            parts.append(f"{100 * self.n / self.total:.0f}%")
        if self.n and elapsed > 0:
            parts.append(f"{self.n / elapsed:.2f} {self.unit}s/s")
        eta = self.eta()
        if eta is not None and self.n < (self.total or 0):
            parts.append(f"ETA {_duration(eta)}")
        log.info(", ".join(parts))


__all__ = ["Progress", "on_terminal"]
