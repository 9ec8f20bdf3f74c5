"""The command-line reference of docs/cli.md, generated from the parser `q3vl --help` prints.

    python -m tests.cli_reference          # rewrite docs/cli.md's reference block after changing a command

Why generated: a hand-written option list drifts the first time a flag changes. The block between
the `cli-reference` markers of docs/cli.md is `render()` of `q3vl.cli.build_parser()`, the parser
the console script uses; tests/test_cli_reference.py fails when the two differ and names this
command. Rendered from the parser's actions (names, metavars, defaults, help), not from argparse's
formatted text, so the page is the same on every Python version and terminal width.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PAGE = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
BEGIN, END = "<!-- cli-reference:begin -->", "<!-- cli-reference:end -->"
_PLAIN_GROUPS = ("positional arguments", "options", "optional arguments")


@contextmanager
def _clean_env() -> Iterator[None]:
    """Defaults read from Q3VL_* variables (e.g. --api-key) are the user's, not the reference's."""
    saved = {k: os.environ.pop(k) for k in [k for k in os.environ if k.startswith("Q3VL_")]}
    try:
        yield
    finally:
        os.environ.update(saved)


def parser() -> argparse.ArgumentParser:
    """The console script's parser, with every command registered."""
    from q3vl import cli

    cli._register_more()
    with _clean_env():
        return cli.build_parser()


def _cell(text: str) -> str:
    """Text for a Markdown table cell: no pipes, tags or emphasis by accident."""
    for a, b in (("\\", "\\\\"), ("|", "\\|"), ("*", "\\*"), ("_", "\\_"), ("<", "&lt;"), (">", "&gt;")):
        text = text.replace(a, b)
    return " ".join(text.split())


def _metavar(action: argparse.Action) -> str:
    if action.nargs == 0:
        return ""
    if action.choices is not None:
        name = "{" + ",".join(str(c) for c in action.choices) + "}"
    elif isinstance(action.metavar, str):
        name = action.metavar
    else:
        name = action.dest if not action.option_strings else action.dest.upper()
    return {"?": f"[{name}]", "*": f"[{name} ...]", "+": f"{name} [{name} ...]"}.get(str(action.nargs), name)


def _name(action: argparse.Action) -> str:
    meta = _metavar(action)
    if not action.option_strings:
        return f"`{meta}`"
    names = [f"`{s}`" for s in action.option_strings]
    return ", ".join([*names[:-1], f"`{action.option_strings[-1]}{' ' + meta if meta else ''}`"])


def _default(action: argparse.Action) -> str:
    if action.required:
        return "required"
    if action.nargs == "?" and not action.option_strings:
        return "optional"
    d = action.default
    if d is None or d is argparse.SUPPRESS or action.nargs == 0 or d == [] or d == "":
        return ""
    return f"`{d}`"


def _help(action: argparse.Action) -> str:
    text = action.help or ""
    if "%(" in text:
        text = text % {**vars(action), "default": action.default}
    return _cell(text)


def _table(actions: list[argparse.Action]) -> list[str]:
    rows = ["| argument | default | what it does |", "|---|---|---|"]
    for a in actions:
        if isinstance(a, (argparse._HelpAction, argparse._VersionAction)) or a.dest == "verbose":
            continue
        rows.append(f"| {_name(a)} | {_default(a)} | {_help(a)} |")
    return rows if len(rows) > 2 else []


def _command(name: str, p: argparse.ArgumentParser) -> list[str]:
    out = [f"### `{name}`", "", _cell(p.description or ""), ""]
    plain = [a for g in p._action_groups if g.title in _PLAIN_GROUPS for a in g._group_actions]
    if rows := _table(plain):
        out += [*rows, ""]
    for group in p._action_groups:
        if group.title not in _PLAIN_GROUPS and (rows := _table(group._group_actions)):
            out += [f"*{_cell(group.title or '')}*", "", *rows, ""]
    return out


def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            return dict(sorted(a.choices.items()))
    return {}


def commands(p: argparse.ArgumentParser | None = None, prefix: str = "q3vl") -> dict[str, argparse.ArgumentParser]:
    """Every runnable command's parser by its full name (`q3vl index build`), groups expanded."""
    found: dict[str, argparse.ArgumentParser] = {}
    for name, sub in _subparsers(p or parser()).items():
        nested = commands(sub, f"{prefix} {name}")
        found.update(nested or {f"{prefix} {name}": sub})
    return found


def render() -> str:
    """The reference block: every command, its arguments, defaults and help, in name order."""
    out = ["Every command also takes `-v` / `--verbose` (debug logging, and the traceback of an error) and",
           "`-h` / `--help`; `q3vl --version` prints the version.", ""]
    for name, p in commands().items():
        out += _command(name, p)
    return "\n".join(out).rstrip() + "\n"


def current() -> str:
    """The block docs/cli.md holds now."""
    text = PAGE.read_text(encoding="utf-8")
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n") + "\n"


def write() -> None:
    text = PAGE.read_text(encoding="utf-8")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    PAGE.write_text(f"{head}{BEGIN}\n{render()}{END}{tail}", encoding="utf-8")


if __name__ == "__main__":
    write()
    sys.stdout.write(f"rewrote the reference block of {PAGE}\n")
