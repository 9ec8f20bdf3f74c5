"""Progress: a bar on a terminal, plain lines (no carriage returns) in logs; the demo's labelled output."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from q3vl import progress as progress_mod
from q3vl.progress import Progress
from tests.test_cli import q3vl


@pytest.fixture
def lines(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="q3vl.progress")
    return caplog


def test_items_off_a_terminal_are_periodic_lines_with_an_eta(lines, monkeypatch):
    monkeypatch.setattr(progress_mod, "on_terminal", lambda: False)
    clock = iter(float(t) for t in range(0, 1000, 5))
    monkeypatch.setattr(progress_mod.time, "monotonic", lambda: next(clock))
    with Progress(40, "parity (embedding)", interval=10) as bar:
        for _ in range(4):
            bar.update(8)
    messages = [r.getMessage() for r in lines.records]  # the fake clock ticks 5 s per reading
    assert messages == ["parity (embedding): 16/40 items, 40%, 1.07 items/s, ETA 30 s",
                        "parity (embedding): 24/40 items, 60%, 0.80 items/s, ETA 23 s",
                        "parity (embedding): 32/40 items, 80%, 0.71 items/s, ETA 12 s",
                        "parity (embedding): 32/40 items in 55 s"]


def test_the_final_line_says_how_long_it_took(lines, monkeypatch):
    monkeypatch.setattr(progress_mod, "on_terminal", lambda: False)
    with Progress(3, "export", unit="step") as steps:
        for name in ("vision graph", "text graph", "validation"):
            steps.step(name)
            steps.update()
    messages = [r.getMessage() for r in lines.records]
    assert messages[:3] == ["export: step 1/3: vision graph", "export: step 2/3: text graph",
                            "export: step 3/3: validation"]
    assert messages[3].startswith("export: 3/3 steps in ")


def test_a_terminal_gets_a_bar_and_disabled_shows_nothing(lines, monkeypatch):
    monkeypatch.setattr(progress_mod, "on_terminal", lambda: True)
    with Progress(5, "embedding") as bar:
        bar.update(5)
        assert bar._bar is not None and bar._bar.n == 5
    with Progress(5, "embedding", enabled=False) as quiet:
        quiet.update(5)
        assert quiet._bar is None
    assert lines.records == []


def test_bar_forces_lines_or_a_bar_as_embed_dataset_asks(lines, monkeypatch):
    """`embed-dataset --no-progress` (bar=False) logs lines even on a terminal; bar=True draws one anywhere."""
    monkeypatch.setattr(progress_mod, "on_terminal", lambda: True)
    clock = iter(float(t) for t in range(0, 1000, 5))
    monkeypatch.setattr(progress_mod.time, "monotonic", lambda: next(clock))
    with Progress(30, "embed-dataset", unit="row", bar=False, interval=10) as rows:
        rows.update(10)
        rows.update(10)
        assert rows._bar is None
    assert [r.getMessage() for r in lines.records] == ["embed-dataset: 20/30 rows, 67%, 1.33 rows/s, ETA 10 s",
                                                       "embed-dataset: 20/30 rows in 25 s"]
    monkeypatch.setattr(progress_mod, "on_terminal", lambda: False)
    with Progress(3, "embed-dataset", unit="row", bar=True) as drawn:
        drawn.update(3)
        assert drawn._bar is not None and drawn._bar.n == 3


def test_eta_is_known_only_with_a_total(monkeypatch):
    clock = iter([0.0, 10.0, 10.0])
    monkeypatch.setattr(progress_mod.time, "monotonic", lambda: next(clock))
    bar = Progress(4, "x", enabled=False)
    bar.n = 1
    assert bar.eta() == pytest.approx(30.0)
    assert Progress(None, "y", enabled=False).eta() is None


def test_quantize_reports_its_steps_as_lines(tiny_embedding_bundle, tmp_path):
    r = q3vl("quantize", str(tiny_embedding_bundle), "--weights", "int8", "-o", str(tmp_path / "q8"))
    assert r.returncode == 0, r.stderr
    # int8's default method ("smooth") calibrates on the bundle's source checkpoint first: one more step
    assert "quantize int8: step 1/4: int8 calibration on " in r.stderr
    assert "quantize int8: step 2/4: vision graph to int8 weights" in r.stderr
    assert "quantize int8: step 4/4: parity against the fp32 bundle" in r.stderr
    assert "\r" not in r.stderr and "Traceback" not in r.stderr
    assert "parity: PASSED" in r.stdout and (tmp_path / "q8" / "q3vl.json").is_file()


def test_the_demo_labels_its_matrix():
    from q3vl.demo import matrix, sample_inputs

    labels = [label for label, _ in sample_inputs()]
    text = matrix(labels[:3], np.array([[1.0, 0.5, 0.25], [0.5, 1.0, 0.125], [0.25, 0.125, 1.0]]))
    head, *rows = text.splitlines()
    assert head.split() == ["[0]", "[1]", "[2]"]
    assert rows[0].startswith("[0] text: beach") and rows[0].split()[-3:] == ["1.000", "0.500", "0.250"]
    assert rows[2].startswith("[2] image: sunset")
