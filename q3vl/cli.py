"""The `q3vl` command line: one subcommand per job, each a thin shell over the Python API."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from q3vl.errors import Q3VLError

Command = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Command]] = {}


def command(name: str, setup: Callable[[argparse.ArgumentParser], None]) -> Callable[[Command], Command]:
    """Register `fn` as `q3vl NAME`, with `setup` adding its arguments."""
    def wrap(fn: Command) -> Command:
        COMMANDS[name] = (setup, fn)
        return fn
    return wrap


# ---------------------------------------------------------------- testing make-checkpoint
def _make_checkpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", type=Path, help="output directory")
    p.add_argument("--task", choices=["embedding", "reranker"], default="embedding")
    p.add_argument("--shape", choices=["tiny", "small", "2b", "8b"], default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")


@command("testing make-checkpoint", _make_checkpoint_args)
def _make_checkpoint(a: argparse.Namespace) -> int:
    from q3vl.testing import make_checkpoint

    out = make_checkpoint(a.path, task=a.task, shape=a.shape, seed=a.seed, dtype=a.dtype)
    sys.stdout.write(f"random-weight {a.shape} {a.task} checkpoint written to {out}\n")
    return 0


# ---------------------------------------------------------------- demo (the README's main job)
def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", type=Path, default=Path("work"), help="where checkpoints and bundles go")
    p.add_argument("--shape", choices=["tiny", "small", "2b"], default="tiny")
    p.add_argument("--checkpoint", type=Path, help="use this embedding checkpoint instead of making one")
    p.add_argument("--reranker-checkpoint", type=Path, help="use this reranker checkpoint")


@command("demo", _demo_args)
def _demo(a: argparse.Namespace) -> int:
    from q3vl.demo import run_demo

    return run_demo(a.workdir, a.shape, a.checkpoint, a.reranker_checkpoint)


def build_parser() -> argparse.ArgumentParser:
    """The parser with every registered subcommand (multi-word names become nested subparsers)."""
    parser = argparse.ArgumentParser(prog="q3vl", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subs = parser.add_subparsers(dest="command", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, (setup, fn) in COMMANDS.items():
        head, _, tail = name.partition(" ")
        if tail:
            if head not in groups:
                groups[head] = subs.add_parser(head).add_subparsers(dest="subcommand", required=True)
            sub = groups[head].add_parser(tail, help=(fn.__doc__ or "").strip())
        else:
            sub = subs.add_parser(head, help=(fn.__doc__ or "").strip())
        setup(sub)
        sub.set_defaults(func=fn)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `q3vl` console script."""
    _register_more()
    args = build_parser().parse_args(argv)
    # other libraries (the ORT quantizer logs to the root logger) stay at WARNING; q3vl reports progress
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("q3vl").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        return int(args.func(args))
    except (Q3VLError, OSError) as e:  # a user mistake or an unusable file: one line, no traceback
        if args.verbose:
            traceback.print_exc()
        sys.stderr.write(f"q3vl: error: {_one_line(e)}\n")
        return 2


def _one_line(e: BaseException) -> str:
    """The error's message on one line (OSError: "<strerror>: <path>")."""
    if isinstance(e, OSError) and not isinstance(e, Q3VLError) and e.filename is not None:
        return f"{e.strerror or type(e).__name__}: {e.filename}"
    return " ".join(str(e).split()) or type(e).__name__


def _register_more() -> None:
    """Import the modules whose commands live beside their implementation."""
    import importlib

    for module in ("q3vl.export.cli", "q3vl.runtime.cli", "q3vl.quantization.cli", "q3vl.bench.cli",
                   "q3vl.tensorrt.cli", "q3vl.ray.cli"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise


if __name__ == "__main__":  # run through the imported module so submodules register into one table
    from q3vl.cli import main as _main

    sys.exit(_main())
