"""`q3vl push`: publish a bundle on the Hugging Face Hub with its model card (the `hub` extra)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from q3vl.cli import command


def _push_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", type=Path, help="a local bundle directory (q3vl export)")
    p.add_argument("repo_id", help="the Hub model repo ORG/NAME[@BRANCH] (created if absent)")
    p.add_argument("--token", help="a Hub token with write access (default: $HF_TOKEN or the stored login)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--allow-unvalidated", action="store_true",
                   help="publish a bundle exported with --no-validate (its card says parity was not measured)")
    p.add_argument("--message", help="the commit message")


@command("push", _push_args)
def _push(a: argparse.Namespace) -> int:
    """Upload a bundle to a Hub model repo with its model card (refused if its parity check failed)."""
    from q3vl.checks import require
    from q3vl.hub.push import check_pushable, push_bundle, target_repo

    target_repo(a.repo_id)
    require("hub")
    check_pushable(a.bundle, a.allow_unvalidated)
    url = push_bundle(a.bundle, a.repo_id, token=a.token, private=a.private, allow_unvalidated=a.allow_unvalidated,
                      message=a.message)
    sys.stdout.write(f"pushed {a.bundle} to {url}\n")
    return 0
