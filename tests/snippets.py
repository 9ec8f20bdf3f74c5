"""Extract the fenced code blocks of Markdown files and run them, in order, in one scratch directory.

The convention (docs/contributing.md): a `bash`/`sh` block runs with `bash -euo pipefail`, a
`python` block with this interpreter, each in its own process, all in the same directory, so a
block can use what an earlier block made. `text`, `json` and `jsonl` blocks are shown, not run. A
marker comment on the last non-blank line above a block changes that:

- `<!-- snippet: skip (reason) -->`: cannot run here (network, GPU, ...); the reason is required.
- `<!-- snippet: slow (reason) -->`: runs only under `pytest -m slow`; the reason is required.
- `<!-- snippet: output -->`: shows output or a file's content; not run.
- `<!-- snippet: background ready=URL timeout=S -->`: a long-running process (a server): started,
  waited for (URL answers 2xx, or S seconds pass with it still alive), stopped after the last block
  of its file (so each page starts its own server, and two pages may use the same port).

A block that runs must exit 0 and write no traceback and no carriage return (progress bars belong
to terminals, not logs).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
MARKER = re.compile(r"^\s*<!--\s*snippet:\s*(?P<kind>[a-z]+)\s*(?:\((?P<reason>[^)]*)\))?(?P<opts>[^>]*?)\s*-->\s*$")
RUNNERS = {"bash": "bash", "sh": "bash", "shell": "bash", "python": "python", "py": "python"}
SHOWN = {"text", "json", "jsonl"}  # displayed, never run, need no marker
KINDS = {"run", "skip", "slow", "output", "background"}
NEEDS_REASON = {"skip", "slow"}


@dataclass
class Block:
    """One fenced block and what its marker says to do with it."""

    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    kind: str = "run"
    reason: str = ""
    options: dict[str, str] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.path.name}:{self.line}"

    def problem(self) -> str | None:
        """Why this block breaks the convention, or None."""
        if self.kind not in KINDS:
            return f"{self.where}: unknown snippet marker {self.kind!r} (one of {sorted(KINDS - {'run'})})"
        if self.kind in NEEDS_REASON and not self.reason.strip():
            return f"{self.where}: `snippet: {self.kind}` needs a reason in parentheses"
        if self.kind in ("run", "slow", "background") and self.lang not in RUNNERS:
            if self.kind == "run" and self.lang in SHOWN:
                return None
            what = f"language {self.lang!r}" if self.lang else "no language"
            return (f"{self.where}: a block with {what} cannot run; tag it bash or python, use ```text for "
                    "non-code, or mark it (docs/contributing.md)")
        if self.kind == "background" and RUNNERS[self.lang] != "bash":
            return f"{self.where}: a background block must be bash"
        return None

    @property
    def runs(self) -> bool:
        return self.kind in ("run", "slow", "background") and self.lang in RUNNERS


def parse(path: Path) -> list[Block]:
    """Every fenced block of a Markdown file, with the marker on the last non-blank line above it."""
    blocks: list[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    open_fence: tuple[str, int, str, int] | None = None  # (fence, line, info, indent)
    body: list[str] = []
    for n, line in enumerate(lines, 1):
        m = FENCE.match(line)
        if open_fence is None:
            if m:
                open_fence = (m["fence"], n, m["info"].strip(), len(m["indent"]))
                body = []
            continue
        fence, start, info, indent = open_fence
        if m and m["fence"][0] == fence[0] and len(m["fence"]) >= len(fence) and not m["info"].strip():
            blocks.append(_block(path, lines, start, info, "\n".join(body) + "\n"))
            open_fence = None
        else:
            body.append(line[indent:] if line[:indent].strip() == "" else line)
    if open_fence is not None:
        raise ValueError(f"{path.name}:{open_fence[1]}: unclosed code fence")
    return blocks


def _block(path: Path, lines: list[str], start: int, info: str, code: str) -> Block:
    lang = info.split()[0].lower() if info else ""
    above = next((lines[k] for k in range(start - 2, -1, -1) if lines[k].strip()), "")
    marker = MARKER.match(above)
    if marker is None:
        return Block(path, start, lang, code)
    opts = dict(kv.split("=", 1) for kv in marker["opts"].split() if "=" in kv)
    return Block(path, start, lang, code, marker["kind"], (marker["reason"] or "").strip(), opts)


@dataclass
class Outcome:
    """What running the blocks did: counts by kind, and the failures."""

    ran: list[Block] = field(default_factory=list)
    skipped: list[Block] = field(default_factory=list)
    shown: list[Block] = field(default_factory=list)
    deferred: list[Block] = field(default_factory=list)  # slow blocks, not run this time
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    durations: dict[str, float] = field(default_factory=dict)  # where -> seconds, of the blocks that ran

    def summary(self) -> str:
        reasons = sorted({b.reason for b in self.skipped})
        slowest = sorted(self.durations.items(), key=lambda kv: -kv[1])[:3]
        return (f"docs snippets: {len(self.ran)} blocks run, {len(self.skipped)} skipped, {len(self.shown)} shown "
                f"(text/output), {len(self.deferred)} slow not run, in {self.seconds:.0f} s (slowest: "
                + ", ".join(f"{w} {s:.0f} s" for w, s in slowest) + "); skip reasons: " + "; ".join(reasons))


class Runner:
    """Runs blocks in order in `workdir` with the q3vl of this interpreter first on PATH."""

    def __init__(self, workdir: Path, env: dict[str, str] | None = None, timeout: float = 900) -> None:
        self.workdir, self.timeout = workdir, timeout
        bindir = str(Path(sys.executable).parent)
        self.env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
                    "MPLBACKEND": "Agg", "XDG_CACHE_HOME": str(workdir / ".cache"), **(env or {})}
        self.background: list[tuple[Block, subprocess.Popen[bytes]]] = []

    def _command(self, block: Block, n: int) -> list[str]:
        script = self.workdir / f".snippet-{n:03d}.{'sh' if RUNNERS[block.lang] == 'bash' else 'py'}"
        if RUNNERS[block.lang] == "bash":
            script.write_text("set -euo pipefail\n" + block.code)
            return ["bash", str(script)]
        script.write_text(block.code)
        return [sys.executable, str(script)]

    def run(self, block: Block, n: int) -> str | None:
        """Run one block; the failure message, or None."""
        if block.kind == "background":
            return self._start(block, n)
        try:
            proc = subprocess.run(self._command(block, n), cwd=self.workdir, env=self.env, capture_output=True,
                                  timeout=self.timeout)
        except subprocess.TimeoutExpired:
            return f"{block.where}: timed out after {self.timeout:.0f} s"
        out, err = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
        problems = []
        if proc.returncode != 0:
            problems.append(f"exit code {proc.returncode}")
        if "Traceback (most recent call last)" in err:
            problems.append("a traceback on stderr")
        if "\r" in out + err:
            problems.append("a carriage return in its output")
        if not problems:
            return None
        return (f"{block.where}: {', '.join(problems)}\n--- block ---\n{block.code}--- stderr (tail) ---\n"
                f"{err[-3000:]}--- stdout (tail) ---\n{out[-1500:]}")

    def _start(self, block: Block, n: int) -> str | None:
        log = open(self.workdir / f".snippet-{n:03d}.log", "wb")  # noqa: SIM115 (lives as long as the process)
        proc = subprocess.Popen(self._command(block, n), cwd=self.workdir, env=self.env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.background.append((block, proc))
        deadline = time.monotonic() + float(block.options.get("timeout", 60))
        url = block.options.get("ready")
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return f"{block.where}: background process exited early with code {proc.returncode}"
            if url:
                try:
                    with urllib.request.urlopen(url, timeout=2) as r:
                        if 200 <= r.status < 300:
                            return None
                except OSError:
                    pass
            time.sleep(0.5)
        if url:
            return f"{block.where}: {url} was not ready within {block.options.get('timeout', 60)} s"
        return None

    def stop(self) -> list[str]:
        """Stop the background processes (SIGTERM, then SIGKILL); a crash before the stop is a failure."""
        problems = []
        running, self.background = self.background, []
        for block, proc in running:
            if proc.poll() is not None:
                problems.append(f"{block.where}: background process died with code {proc.returncode}")
                continue
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        return problems


def run_all(paths: list[Path], workdir: Path, slow: bool, env: dict[str, str] | None = None) -> Outcome:
    """Run every block of `paths`, in order, in `workdir`; slow blocks only when `slow`."""
    outcome = Outcome()
    runner = Runner(workdir, env)
    started = time.monotonic()
    blocks = [b for p in paths for b in parse(p)]
    outcome.failures += [msg for b in blocks if (msg := b.problem())]
    try:
        for n, block in enumerate(blocks):
            if n and block.path != blocks[n - 1].path:  # a page's servers end with the page
                outcome.failures += runner.stop()
            if block.kind == "skip":
                outcome.skipped.append(block)
            elif not block.runs:
                outcome.shown.append(block)
            elif block.kind == "slow" and not slow:
                outcome.deferred.append(block)
            elif not outcome.failures:  # later blocks build on earlier ones: stop at the first failure
                t0 = time.monotonic()
                failure = runner.run(block, n)
                outcome.durations[block.where] = time.monotonic() - t0
                outcome.ran.append(block)
                if failure:
                    outcome.failures.append(failure)
    finally:
        outcome.failures += runner.stop()
        outcome.seconds = time.monotonic() - started
    return outcome
