"""The `q3vl` command line: one subcommand per job, each a thin shell over the Python API.

Conventions every command keeps (docs/contributing.md): options, paths and dependencies are checked
before any work starts; a user mistake is one line on stderr and exit code 2 (`-v` shows the
traceback); messages name flags, not keyword arguments; outputs are written beside their target and
renamed into place; progress goes to stderr as a bar on a terminal and as plain lines otherwise.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

from q3vl._version import __version__
from q3vl.errors import Q3VLError, cli_words

Command = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Command]] = {}
# one-line descriptions of the command groups (`q3vl testing ...`), shown by `q3vl --help`
GROUPS = {
    "testing": "Random-weight checkpoints and sample inputs, made offline (no downloads).",
    "index": "Binary vector indexes with rescoring: build one from a JSONL file, search it.",
    "trt": "TensorRT: check a bundle's ops against TensorRT's table, build engines.",
}
EXIT_USAGE, EXIT_INTERRUPTED = 2, 130


def command(name: str, setup: Callable[[argparse.ArgumentParser], None]) -> Callable[[Command], Command]:
    """Register `fn` as `q3vl NAME`, with `setup` adding its arguments; its docstring's first line is its help."""
    def wrap(fn: Command) -> Command:
        COMMANDS[name] = (setup, fn)
        return fn
    return wrap


# ---------------------------------------------------------------- demo (the README's main job)
def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", type=Path, default=Path("work"), help="where checkpoints and bundles go")
    p.add_argument("--shape", choices=["tiny", "small", "2b"], default="tiny")
    p.add_argument("--checkpoint", type=Path, help="use this embedding checkpoint instead of making one")
    p.add_argument("--reranker-checkpoint", type=Path, help="use this reranker checkpoint")


@command("demo", _demo_args)
def _demo(a: argparse.Namespace) -> int:
    """Make (or take) checkpoints, export, embed, rerank and check parity, end to end."""
    from q3vl.checks import require
    from q3vl.demo import run_demo

    require("export")
    return run_demo(a.workdir, a.shape, a.checkpoint, a.reranker_checkpoint)


def _help(fn: Command) -> str:
    return (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""


def build_parser() -> argparse.ArgumentParser:
    """The parser with every registered subcommand (multi-word names become nested subparsers)."""
    parser = argparse.ArgumentParser(prog="q3vl", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    parser.add_argument("--version", action="version", version=f"q3vl {__version__}")
    subs = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, (setup, fn) in sorted(COMMANDS.items()):
        head, _, tail = name.partition(" ")
        if tail:
            if head not in groups:
                group = subs.add_parser(head, help=GROUPS[head], description=GROUPS[head])
                groups[head] = group.add_subparsers(dest="subcommand", required=True, metavar="COMMAND")
            sub = groups[head].add_parser(tail, help=_help(fn), description=_help(fn))
        else:
            sub = subs.add_parser(head, help=_help(fn), description=_help(fn))
        # -v after the subcommand too; SUPPRESS keeps a `q3vl -v CMD` from being reset to False
        sub.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                         help="debug logging and tracebacks")
        setup(sub)
        sub.set_defaults(func=fn)
    return parser


def _quiet_third_parties(verbose: bool) -> None:
    """Keep other libraries' progress bars and chatter out of q3vl's output (kept with -v).

    Set before they are imported, and inherited by the processes q3vl starts (benchmark workers).
    """
    if not verbose:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' "Loading weights" bar
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class Terminated(SystemExit):
    """SIGTERM as an exception, so staged outputs are removed on the way out (`q3vl.outputs`)."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    if _importing(frame):  # an exception inside a native module's initialisation can crash the process
        _resend_soon(signum)
        return
    raise Terminated(128 + signum)


def _importing(frame: FrameType | None) -> bool:
    """Whether the interrupted code runs inside an import (onnxruntime's extension loads for seconds)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib._bootstrap"):
            return True
        frame = frame.f_back
    return False


def _resend_soon(signum: int, delay: float = 0.05) -> None:
    """Deliver the signal again shortly, until it lands outside an import."""
    import threading

    timer = threading.Timer(delay, os.kill, (os.getpid(), signum))
    timer.daemon = True
    timer.start()


def _terminated(e: BaseException) -> Terminated | None:
    """The `Terminated` an exception was raised from, if any (a library may wrap it, e.g. an ImportError)."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, Terminated):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `q3vl` console script."""
    _register_more()
    args = build_parser().parse_args(argv)
    verbose = bool(getattr(args, "verbose", False))
    _quiet_third_parties(verbose)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("q3vl").setLevel(logging.DEBUG if verbose else logging.INFO)
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if threading_main() else None
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        sys.stderr.write("q3vl: interrupted\n")
        return EXIT_INTERRUPTED
    except Exception as e:
        if (stop := _terminated(e)) is not None:  # SIGTERM wrapped by a library: still a quiet termination
            return int(stop.code)  # type: ignore[arg-type]
        if not isinstance(e, (Q3VLError, OSError)):
            raise
        if verbose:  # a user mistake or an unusable file: one line, no traceback
            traceback.print_exc()
        sys.stderr.write(f"q3vl: error: {_one_line(e)}\n")
        return EXIT_USAGE
    finally:
        if previous is not None:  # `main` called from Python (tests) leaves the caller's handler in place
            signal.signal(signal.SIGTERM, previous)


def threading_main() -> bool:
    """Signal handlers can only be installed from the main thread (tests call `main` from others)."""
    import threading

    return threading.current_thread() is threading.main_thread()


def _one_line(e: BaseException) -> str:
    """The error's message on one line, in the command line's words (OSError: "<strerror>: <path>")."""
    if isinstance(e, OSError) and not isinstance(e, Q3VLError) and e.filename is not None:
        return f"{e.strerror or type(e).__name__}: {e.filename}"
    return cli_words(" ".join(str(e).split()) or type(e).__name__)


def _register_more() -> None:
    """Import the modules whose commands live beside their implementation (all import light)."""
    import importlib

    for module in ("q3vl.testing.cli", "q3vl.export.cli", "q3vl.runtime.cli", "q3vl.export.quantize.cli",
                   "q3vl.codes.cli", "q3vl.bench.cli", "q3vl.tensorrt.cli", "q3vl.serve.cli", "q3vl.ray.cli"):
        importlib.import_module(module)


if __name__ == "__main__":  # run through the imported module so submodules register into one table
    from q3vl.cli import main as _main

    sys.exit(_main())
