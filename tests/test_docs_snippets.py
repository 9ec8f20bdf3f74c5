"""Every code block of README.md, docs/*.md and benchmarks/README.md runs as written (the convention:
docs/contributing.md).

The blocks run in order in one scratch directory, as a reader would paste them into one shell in
an empty directory: the README makes the models and sample files later blocks (and docs/) use.
Slow blocks run under `-m slow`, which runs everything from the start in a fresh directory.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hub_server import LoopbackHub, hub_env
from tests.snippets import Block, parse, run_all

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]


def test_every_block_follows_the_convention():
    blocks = [b for p in DOCS for b in parse(p)]
    assert len(blocks) > 20
    problems = [msg for b in blocks if (msg := b.problem())]
    assert problems == []


HUB_USER = "q3vl-docs"  # the docs' $HF_USER


@contextlib.contextmanager
def docs_hub(request: pytest.FixtureRequest, slow: bool) -> Iterator[LoopbackHub]:
    """The loopback Hub the Hub examples run against: the tiny checkpoints under the real ids and, as a
    previous `q3vl push` would have left it, the tiny embedding bundle under the docs' user."""
    from q3vl.hub.card import render

    with LoopbackHub() as hub:
        hub.add_folder("Qwen/Qwen3-VL-Embedding-2B", request.getfixturevalue("tiny_embedding"))
        if slow:
            hub.add_folder("Qwen/Qwen3-VL-Reranker-2B", request.getfixturevalue("tiny_reranker"))
        bundle, repo = request.getfixturevalue("tiny_embedding_bundle"), f"{HUB_USER}/qwen3-vl-embedding-2b-q3vl"
        hub.add_files(repo, {**{p.name: p.read_bytes() for p in bundle.iterdir() if p.is_file()},
                             "README.md": render(bundle, repo).encode()})
        yield hub


def _run(tmp_path: Path, capsys: pytest.CaptureFixture[str], slow: bool, request: pytest.FixtureRequest) -> None:
    with docs_hub(request, slow) as hub:
        env = hub_env(hub, tmp_path / ".hf", HF_USER=HUB_USER, HF_TOKEN="docs-token")
        outcome = run_all(DOCS, tmp_path, slow=slow, env={"Q3VL_REPO": str(ROOT), **env})
    with capsys.disabled():
        print("\n" + outcome.summary())
    assert outcome.failures == [], "\n\n".join(outcome.failures)
    assert outcome.ran, "no block ran"


def test_readme_and_docs_blocks_run(tmp_path, capsys, request):
    _run(tmp_path, capsys, slow=False, request=request)


@pytest.mark.slow
def test_readme_and_docs_blocks_run_with_the_slow_ones(tmp_path, capsys, request):
    _run(tmp_path, capsys, slow=True, request=request)


# ---------------------------------------------------------------- the runner itself
def _doc(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "doc.md"
    path.write_text(text)
    return path


def test_an_unmarked_failing_block_fails_and_stops_the_run(tmp_path):
    doc = _doc(tmp_path, "```bash\necho one > made.txt\n```\n\n```bash\nfalse\n```\n\n```bash\necho never\n```\n")
    outcome = run_all([doc], tmp_path, slow=False)
    assert (tmp_path / "made.txt").read_text() == "one\n"
    assert len(outcome.ran) == 2 and len(outcome.failures) == 1 and "doc.md:5: exit code 1" in outcome.failures[0]


def test_markers_skip_defer_and_show(tmp_path):
    doc = _doc(tmp_path, "<!-- snippet: skip (needs a GPU) -->\n```bash\nexit 3\n```\n"
                         "<!-- snippet: slow (takes an hour) -->\n```bash\nexit 4\n```\n"
                         "<!-- snippet: output -->\n```bash\n$ not a command\n```\n"
                         "```text\na diagram\n```\n"
                         "```python\nprint('ok')\n```\n")
    outcome = run_all([doc], tmp_path, slow=False)
    assert outcome.failures == []
    assert [len(outcome.ran), len(outcome.skipped), len(outcome.deferred), len(outcome.shown)] == [1, 1, 1, 2]
    assert "1 blocks run, 1 skipped" in outcome.summary() and "needs a GPU" in outcome.summary()


@pytest.mark.parametrize("text, message", [
    ("```\nls\n```\n", "no language"),
    ("```ruby\nputs 1\n```\n", "language 'ruby'"),
    ("<!-- snippet: skip -->\n```bash\nls\n```\n", "needs a reason"),
    ("<!-- snippet: maybe (x) -->\n```bash\nls\n```\n", "unknown snippet marker"),
])
def test_malformed_blocks_are_reported(tmp_path, text, message):
    problems = [b.problem() for b in parse(_doc(tmp_path, text))]
    assert any(p and message in p for p in problems), problems


def test_tracebacks_and_carriage_returns_fail_a_block(tmp_path):
    doc = _doc(tmp_path, "```python\nimport sys\nsys.stderr.write('50%\\r100%\\n')\n```\n"
                         "```python\nimport q3vl.errors\n```\n")
    outcome = run_all([doc], tmp_path, slow=False)
    assert len(outcome.failures) == 1 and "carriage return" in outcome.failures[0]
    doc = _doc(tmp_path, "```python\ntry:\n    1 / 0\nexcept ZeroDivisionError:\n    import traceback, sys\n"
                         "    traceback.print_exc()\n```\n")
    assert "traceback" in run_all([doc], tmp_path, slow=False).failures[0]


def test_background_blocks_are_started_waited_for_and_stopped(tmp_path):
    doc = _doc(tmp_path, "<!-- snippet: background timeout=1 -->\n```bash\necho $$ > pid.txt; exec sleep 617\n```\n"
                         "```bash\nkill -0 \"$(cat pid.txt)\"\n```\n")
    outcome = run_all([doc], tmp_path, slow=False)
    assert outcome.failures == []  # the second block found the server alive
    block: Block = outcome.ran[0]
    assert block.kind == "background"
    with pytest.raises(ProcessLookupError):  # and it was stopped after the last block
        os.kill(int((tmp_path / "pid.txt").read_text()), 0)


def test_a_pages_background_blocks_stop_when_the_next_page_starts(tmp_path):
    first = tmp_path / "a.md"
    first.write_text("<!-- snippet: background timeout=1 -->\n```bash\necho $$ > pid.txt; exec sleep 617\n```\n"
                     "```bash\nkill -0 \"$(cat pid.txt)\"\n```\n")
    second = tmp_path / "b.md"
    second.write_text("```bash\n! kill -0 \"$(cat pid.txt)\" 2>/dev/null\n```\n")
    outcome = run_all([first, second], tmp_path, slow=False)
    assert outcome.failures == [] and len(outcome.ran) == 3  # alive on its page, gone on the next
