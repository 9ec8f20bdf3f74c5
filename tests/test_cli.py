"""The command line checks before it works, writes whole outputs or none, and speaks in CLI words."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from q3vl.cli import COMMANDS, GROUPS, _register_more, build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def q3vl(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None,
         timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "q3vl", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def one_error_line(r: subprocess.CompletedProcess[str]) -> str:
    """The run failed as a user mistake: exit 2, exactly one line on stderr, no traceback."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("q3vl: error: "), r.stderr
    return lines[0]


@pytest.fixture
def items(tmp_path: Path) -> Path:
    path = tmp_path / "items.jsonl"
    path.write_text("\n".join(json.dumps({"id": f"t{i}", "text": f"text {i}"}) for i in range(3)) + "\n")
    return path


def _no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make loading a model an error: checks must fail before any model loads."""
    from q3vl.runtime.base import BundleModel

    def refuse(*a: object, **k: object) -> None:
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(BundleModel, "__init__", refuse)


# ---------------------------------------------------------------- item 2: checks before work
def test_int8_without_calibration_fails_at_once_and_embeds_nothing(tiny_embedding_bundle, items, tmp_path):
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    r = q3vl("embed", str(tiny_embedding_bundle), str(items), "-o", str(tmp_path / "v.npy"), "--quantize", "int8")
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert "--quantize int8 needs --calibration FILE" in one_error_line(r)
    assert "embedding" not in r.stderr and not list(tmp_path.glob("*v*"))
    # CPU seconds, not wall: on a shared 2-core machine the wall clock measures the neighbours
    assert cpu < 1.0, (cpu, wall)


@pytest.mark.parametrize("case, message", [
    ("dim", "--dim 512 is out of range: {bundle} makes 64-dimensional embeddings (use 1..64)"),
    ("calibration-dim", "was fitted on 16-dimensional embeddings; this run makes 32-dimensional ones"),
    ("calibration-missing", "--calibration {tmp}/nope.json: no such file"),
    ("calibration-unused", "--calibration is only used with --quantize int8 or uint8"),
    ("extension", "output {tmp}/v.txt must end in .npy or .jsonl"),
    ("exists", "output {tmp}/old.npy already exists; pass --overwrite to replace it"),
    ("parent-is-a-file", "cannot create output {tmp}/old.npy/v.npy: {tmp}/old.npy is not a directory"),
    ("checkpoint", "is a model checkpoint, not a q3vl bundle: export it first with `q3vl export"),
    ("reranker-bundle", "is a reranker bundle, not an embedding bundle: use it with `q3vl rerank`"),
    ("batch-size", "--batch-size must be greater than 0, not 0"),
    ("bad-line", "{tmp}/items.jsonl line 2 (id 'b'): image must be a path, URL, data URI or PIL.Image, "
                 "an H x W x 3 uint8 array or encoded bytes, not int"),
])
def test_embed_refuses_before_loading_a_model(case, message, tiny_embedding_bundle, tiny_reranker_bundle,
                                              tiny_embedding, items, tmp_path, monkeypatch, capsys):
    import numpy as np

    from q3vl.codes import Calibration

    Calibration.fit(np.random.default_rng(0).normal(size=(8, 16))).save(tmp_path / "c16.json")
    (tmp_path / "old.npy").write_bytes(b"keep")
    bundle, out, extra = tiny_embedding_bundle, tmp_path / "v.npy", []
    extra = {"dim": ["--dim", "512"], "calibration-dim": ["--dim", "32", "--quantize", "int8", "--calibration",
                                                          str(tmp_path / "c16.json")],
             "calibration-missing": ["--quantize", "uint8", "--calibration", str(tmp_path / "nope.json")],
             "calibration-unused": ["--calibration", str(tmp_path / "c16.json")],
             "batch-size": ["--batch-size", "0"]}.get(case, [])
    out = {"extension": tmp_path / "v.txt", "exists": tmp_path / "old.npy",
           "parent-is-a-file": tmp_path / "old.npy" / "v.npy"}.get(case, out)
    bundle = {"checkpoint": tiny_embedding, "reranker-bundle": tiny_reranker_bundle}.get(case, bundle)
    if case == "bad-line":
        items.write_text('{"id": "a", "text": "fine"}\n{"id": "b", "image": 7}\n')
    _no_model(monkeypatch)
    assert main(["embed", str(bundle), str(items), "-o", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message.format(bundle=bundle, tmp=tmp_path) in err, err
    assert (tmp_path / "old.npy").read_bytes() == b"keep" and not (tmp_path / "v.npy").exists()


def test_index_rerank_calibrate_and_quantize_check_first(tiny_embedding_bundle, tiny_reranker_bundle, items,
                                                         tmp_path, monkeypatch, capsys):
    _no_model(monkeypatch)
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / "index.json").write_text("{}")
    (tmp_path / "q.json").write_text('{"text": "q", "images": []}')
    cases = [
        (["index", "build", str(tiny_embedding_bundle), str(items), "-o", str(tmp_path / "idx")],
         "index directory {tmp}/idx is not empty; pass --overwrite"),
        (["index", "build", str(tiny_embedding_bundle), str(items), "-o", str(tmp_path / "i2"), "--dim", "65"],
         "--dim 65 is out of range"),
        (["rerank", str(tiny_reranker_bundle), str(tmp_path / "q.json"), str(items)],
         "{tmp}/q.json: unknown keys ['images']"),
        (["rerank", str(tiny_embedding_bundle), str(tmp_path / "q.json"), str(items)],
         "is an embedding bundle, not a reranker bundle: use it with `q3vl embed`"),
        (["calibrate", str(items), "-o", str(tmp_path / "c.json")], "calibrate reads a .npy file"),
        (["quantize", str(tiny_embedding_bundle), "--weights", "int8", "-o", str(tmp_path / "idx")],
         "bundle directory {tmp}/idx is not empty; pass --overwrite"),
        (["quantize", str(tiny_embedding_bundle), "--weights", "int8", "-o", str(tmp_path / "idx"), "--overwrite"],
         "refusing to replace {tmp}/idx: it does not look like a q3vl bundle directory"),
        (["bench", "--quick", "--variants", "fp32,fp64"], "--variants: unknown ['fp64']"),
        (["bench", "--quick", "--workloads", "text-99"], "--workloads: unknown workload 'text-99'"),
        (["bench", "--quick", "--bundle", f"new={tmp_path}"], f"--bundle 'new={tmp_path}': expected LABEL=PATH"),
        (["bench", "--quick", "--reference-dtype", "fp32,fp8"], "--reference-dtype: unknown ['fp8']"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message.format(tmp=tmp_path) in err, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx", "items.jsonl", "q.json"]


# ---------------------------------------------------------------- item 2: whole outputs or none
def test_a_failed_quantize_or_export_leaves_no_output(tiny_embedding, tiny_embedding_bundle, tmp_path, monkeypatch):
    from q3vl.export import exporter
    from q3vl.export.quantize import weights

    def broken(*a: object, **k: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(weights, "compare_bundles", broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        weights.quantize_bundle(tiny_embedding_bundle, tmp_path / "q8", "int8", progress=False)
    monkeypatch.setattr(exporter, "_check_graphs", broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        exporter.export_bundle(tiny_embedding, tmp_path / "b", progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the outputs nor their hidden partials


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_killed_quantize_leaves_no_output_directory(sig, tiny_embedding_bundle, tmp_path):
    out = tmp_path / "q8"
    proc = subprocess.Popen([sys.executable, "-m", "q3vl", "quantize", str(tiny_embedding_bundle), "--weights",
                             "int8", "-o", str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".q8.partial-*")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert not out.exists()
    partials = list(tmp_path.glob(".q8.partial-*"))
    if sig == signal.SIGTERM:  # cleaned up on the way out, quietly
        assert proc.returncode == 128 + signal.SIGTERM and partials == [] and "Traceback" not in err
    else:  # nothing can run after SIGKILL: only the hidden partial is left, and the next run removes it
        from q3vl.outputs import remove_stale_partials

        assert partials
        remove_stale_partials(out)
        assert list(tmp_path.iterdir()) == []


def test_sigterm_during_an_import_is_delivered_after_it(tmp_path):
    """An exception raised inside a native extension's import can crash the interpreter (seen: SIGSEGV
    when SIGTERM landed while onnxruntime's module initialised), so the CLI waits for the import to end."""
    (tmp_path / "slow_module.py").write_text(
        "import os, signal, time\nos.kill(os.getpid(), signal.SIGTERM)\ntime.sleep(0.3)\nDONE = True\n")
    script = (
        "import signal, sys, time\n"
        "from q3vl.cli import Terminated, _on_sigterm\n"
        "signal.signal(signal.SIGTERM, _on_sigterm)\n"
        "try:\n"
        "    import slow_module\n"
        "    print('imported', slow_module.DONE, flush=True)\n"
        "    time.sleep(5)\n"
        "    print('not terminated')\n"
        "except Terminated as e:\n"
        "    print('terminated', e.code)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env)
    assert run.stdout.split() == ["imported", "True", "terminated", "143"], run.stderr


def test_a_wrapped_sigterm_is_still_a_quiet_termination():
    from q3vl.cli import Terminated, _terminated

    try:
        try:
            raise Terminated(143)
        except Terminated as inner:
            raise ImportError("initialization failed") from inner
    except ImportError as e:
        assert _terminated(e) is not None and _terminated(e).code == 143
    assert _terminated(ValueError("x")) is None


def test_staged_outputs_replace_only_when_complete(tmp_path):
    from q3vl.errors import OutputExistsError
    from q3vl.outputs import staged_dir, staged_file

    target = tmp_path / "out"
    with staged_dir(target) as tmp:
        (tmp / "a.txt").write_text("1")
    assert (target / "a.txt").read_text() == "1"
    with pytest.raises(KeyboardInterrupt), staged_dir(target, overwrite=True) as tmp:
        (tmp / "a.txt").write_text("2")
        raise KeyboardInterrupt
    assert (target / "a.txt").read_text() == "1" and [p.name for p in tmp_path.iterdir()] == ["out"]
    with staged_dir(target, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    with pytest.raises(OutputExistsError), staged_dir(target) as tmp:
        (tmp / "c.txt").write_text("4")
    with staged_file(tmp_path / "v.npy") as tmp:
        assert tmp.suffix == ".npy" and tmp.name.startswith(".v.partial-")
        tmp.write_bytes(b"x")
    assert (tmp_path / "v.npy").read_bytes() == b"x" and sorted(p.name for p in tmp_path.iterdir()) == ["out", "v.npy"]


# ---------------------------------------------------------------- item 7: polish
def test_version_and_one_line_help_for_every_command():
    from q3vl import __version__

    r = q3vl("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"q3vl {__version__}"
    text = q3vl("--help").stdout
    _register_more()  # every command, whichever tests ran before this one
    heads = {name.split()[0] for name in COMMANDS}
    assert set(GROUPS) <= heads and {"embed", "rerank", "parity", "export", "quantize", "bench"} <= heads
    for head in heads:
        assert f"    {head} " in text or f"    {head}\n" in text, head  # a long name wraps its help
    for name, (_, fn) in COMMANDS.items():
        assert fn.__doc__ and fn.__doc__.strip().splitlines()[0].endswith("."), name
    for group in GROUPS:
        sub = q3vl(group, "--help").stdout
        for name in (n for n in COMMANDS if n.startswith(group + " ")):
            assert name.split()[1] in sub
    embed_help = q3vl("embed", "--help").stdout
    assert "quantize calibrate" not in embed_help and "q3vl calibrate" in embed_help


def test_mistakes_are_one_line_in_cli_words_and_v_shows_the_traceback(tiny_embedding, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    r = q3vl("export", str(tiny_embedding), "-o", str(busy))
    line = one_error_line(r)
    assert "pass --overwrite to replace it" in line and "overwrite=True" not in line
    r = q3vl("export", str(tiny_embedding), "-o", str(tmp_path / "x"), "--precision", "bf16")
    assert "--precision bf16 needs --graph plain" in one_error_line(r)
    r = q3vl("export", str(tiny_embedding), "-o", str(busy), "-v")
    assert r.returncode == 2 and "Traceback (most recent call last)" in r.stderr and "OutputExistsError" in r.stderr
    assert (busy / "notes.txt").read_text() == "keep me"
    r = q3vl("embed")  # argparse's own usage error: exit 2 as well
    assert r.returncode == 2 and "the following arguments are required" in r.stderr


def test_cli_words_keep_only_the_flag():
    from q3vl.errors import cli_words, option

    plain = "graph='plain'"
    message = f"pass {option('overwrite=True', '--overwrite')} or export with {option(plain, '--graph plain')}"
    assert message == "pass overwrite=True (--overwrite) or export with graph='plain' (--graph plain)"
    assert cli_words(message) == "pass --overwrite or export with --graph plain"


def test_every_registered_command_builds():
    parser = build_parser()
    for name in COMMANDS:
        with pytest.raises(SystemExit) as e:
            parser.parse_args([*name.split(), "--help"])
        assert e.value.code == 0
