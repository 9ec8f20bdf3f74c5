"""The newcomer acceptance check: a fresh clone, a new venv, then the README as a reader runs it.

    python benchmarks/newcomer_check.py --branch issue15-newcomer --out benchmarks/results/newcomer-check.md

1. `git clone` this repository's branch into a temporary directory (outside any source tree).
2. The README's from-source install there: `python3 -m venv .venv && . .venv/bin/activate &&
   pip install -q --no-compile -e '.[dev]'`, then its test command `python -m pytest` (unless --no-tests).
3. Every runnable block of the clone's README (bash and python; `slow` ones included, `skip` ones
   not), in order, in an empty work directory, with the clone's venv first on PATH and each block's
   stderr appended to one file, as a reader pasting them into a shell would. The install block is
   not run a second time (step 2 ran those exact commands).
4. The stderr file must hold no traceback and no carriage return; the report gives each block's
   wall time (that of `q3vl bench --quick` among them) and exit code.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sh(cmd: str, cwd: Path, log: Path, env: dict[str, str] | None = None) -> tuple[int, float]:
    """Run `cmd` with bash, stdout to the terminal's log file, stderr appended to `log`; (rc, seconds)."""
    started = time.perf_counter()
    with open(log, "ab") as err, open(log.with_suffix(".stdout"), "ab") as out:
        rc = subprocess.run(["bash", "-euo", "pipefail", "-c", cmd], cwd=cwd, stdout=out, stderr=err,
                            env=env).returncode
    return rc, time.perf_counter() - started


BACKGROUND: list[subprocess.Popen[bytes]] = []


def start_background(cmd: str, cwd: Path, log: Path, env: dict[str, str], options: dict[str, str]) -> tuple[int, float]:
    """Start a `background` block (a server) and wait until its `ready` URL answers; (rc, seconds)."""
    started = time.perf_counter()
    with open(log, "ab") as err, open(log.with_suffix(".stdout"), "ab") as out:
        proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", cmd], cwd=cwd, stdout=out, stderr=err, env=env,
                                start_new_session=True)
    BACKGROUND.append(proc)
    deadline = time.monotonic() + float(options.get("timeout", 60))
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(options.get("ready", ""), timeout=2) as r:
                if 200 <= r.status < 300:
                    return 0, time.perf_counter() - started
        except (OSError, ValueError):
            pass
        time.sleep(0.5)
    return proc.poll() or 1, time.perf_counter() - started


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--branch", default="issue15-newcomer")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "newcomer-check.md")
    p.add_argument("--no-tests", action="store_true", help="skip the README's test command")
    p.add_argument("--exclude", action="append", default=[],
                   help="do not run README blocks containing this text (e.g. when the disk is too small); reported")
    a = p.parse_args()
    base = Path(tempfile.mkdtemp(prefix="q3vl-newcomer-"))
    clone, work, log = base / "q3vl", base / "work", base / "stderr.log"
    work.mkdir()
    rows: list[tuple[str, int, float]] = []
    rc, s = sh(f"git clone -q -b {a.branch} {ROOT} {clone}", base, log)
    rows.append((f"git clone -b {a.branch} (this repository)", rc, s))
    install = "python3 -m venv .venv && . .venv/bin/activate && pip install -q --no-compile -e '.[dev]'"
    rows.append((install, *sh(install, clone, log)))
    venv_bin = clone / ".venv" / "bin"
    env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}", "VIRTUAL_ENV": str(clone / ".venv"),
           "MPLBACKEND": "Agg"}
    if not a.no_tests:
        rows.append(("python -m pytest (the README's test command)", *sh(". .venv/bin/activate && python -m pytest",
                                                                         clone, log)))
    sys.path.insert(0, str(clone))
    from tests.snippets import RUNNERS, parse

    excluded = []
    for block in parse(clone / "README.md"):
        if block.kind == "skip" or not block.runs or "git clone" in block.code:
            continue
        if any(x in block.code for x in a.exclude):
            excluded.append(f"README.md:{block.line}")
            continue
        script = work / f".block-{block.line}"
        if RUNNERS[block.lang] == "python":
            script.write_text(block.code)
            cmd = f"python {script}"
        else:
            script.write_text(block.code)
            cmd = f"bash -euo pipefail {script}"
        first = next(line for line in block.code.splitlines() if line.strip() and not line.startswith("#"))
        label = f"README.md:{block.line} ({block.lang}{', ' + block.kind if block.kind != 'run' else ''}): "
        if block.kind == "background":  # a server: started, waited for, stopped after the last block
            rows.append((label + f"`{first.strip()[:90]}`", *start_background(cmd, work, log, env, block.options)))
            continue
        rows.append((label + f"`{first.strip()[:90]}`", *sh(cmd, work, log, env)))
    for proc in BACKGROUND:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    text = log.read_bytes()
    tracebacks, returns = text.count(b"Traceback (most recent call last)"), text.count(b"\r")
    report = [f"# Newcomer check ({time.strftime('%Y-%m-%d %H:%M %Z')})", "",
              f"Fresh clone of branch `{a.branch}` into `{clone}`, new venv, the README's install and test "
              "commands, then every runnable README block in order in an empty work directory, stderr of "
              f"all of it appended to one file ({len(text)} bytes).", "",
              "| step | exit code | wall s |", "|---|---|---|"]
    report += [f"| {name} | {rc} | {s:.0f} |" for name, rc, s in rows]
    report += ["", f"- tracebacks in stderr: {tracebacks}", f"- carriage returns in stderr: {returns}",
               f"- non-zero exit codes: {sum(rc != 0 for _, rc, _ in rows)}",
               f"- README blocks not run (--exclude {a.exclude}): {', '.join(excluded) or 'none'}", ""]
    a.out.write_text("\n".join(report))
    print("\n".join(report))
    print(f"logs: {log} and {log.with_suffix('.stdout')}")
    return 0 if all(rc == 0 for _, rc, _ in rows) and not tracebacks and not returns else 1


if __name__ == "__main__":
    sys.exit(main())
