"""docs/cli.md's command reference is the parser the console script uses, so it cannot drift."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests import cli_reference


def test_the_cli_page_lists_every_command_as_its_parser_defines_it():
    assert cli_reference.current() == cli_reference.render(), (
        "docs/cli.md's command reference is stale: run `python -m tests.cli_reference` and commit docs/cli.md")


def test_the_page_names_every_option_that_q3vl_help_prints():
    """The parser rendered in-process is the one `q3vl COMMAND --help` prints (one command, as a subprocess)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("Q3VL_")}
    out = subprocess.run([sys.executable, "-m", "q3vl", "serve", "--help"], capture_output=True, text=True,
                         env={**env, "COLUMNS": "200"}, timeout=60, check=True).stdout
    printed = set(re.findall(r"(?<![\w-])(--?[a-z][a-z0-9-]*)", out)) - {"-h", "--help", "-v", "--verbose"}
    page = cli_reference.current().split("### `q3vl serve`", 1)[1].split("\n### ", 1)[0]
    listed = set(re.findall(r"`(--?[a-z][a-z0-9-]*)", page))
    assert printed and printed == listed, (printed - listed, listed - printed)
    commands = set(cli_reference.commands())
    assert {"q3vl serve", "q3vl embed", "q3vl index build", "q3vl trt check"} <= commands
    assert all(f"### `{name}`" in cli_reference.current() for name in commands)
