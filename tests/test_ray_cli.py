"""`q3vl embed-dataset` end to end in subprocesses that join this module's Ray cluster (`--address`): a
SIGKILLed run re-run gives exactly the input's ids once each, equal to an uninterrupted run; a folder
with nested subfolders and unreadable files goes through `index build --from-parquet` and `index search`."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("pyarrow")

from q3vl.ray import embed_corpus  # noqa: E402
from q3vl.ray.store import iter_shards, read_manifest  # noqa: E402
from q3vl.testing.inputs import gradient_image, write_video  # noqa: E402

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def address():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        if started:
            ray.shutdown()


def q3vl(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "q3vl", *args], capture_output=True, text=True, timeout=timeout)


def read_output(out: Path) -> dict[str, dict]:
    rows: dict[str, dict] = {}
    for t in iter_shards(out):
        for r in t.to_pylist():
            assert r["id"] not in rows, f"id {r['id']} written twice"
            rows[r["id"]] = r
    return rows


def test_kill_and_resume_gives_each_input_id_once(address, tiny_embedding_bundle, tmp_path):
    n = 900
    lines = [json.dumps({"id": f"r{i}", "text": f"row {i} " + "word " * (i % 23)}) for i in range(n)]
    lines[17] = json.dumps({"id": "r17", "image": "missing.png"})  # a bad row is written once too
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    args = ["embed-dataset", str(src), "-o", str(tmp_path / "out"), "--bundle", str(tiny_embedding_bundle),
            "--address", address, "--rows-per-call", "8", "--rows-per-shard", "24", "--batch-size", "4",
            "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "q3vl", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while len(list((tmp_path / "out").glob("part-*.parquet"))) < 3 and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be killed: give it more rows"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    killed = read_manifest(tmp_path / "out")
    assert killed["runs"][-1]["finished"] is None and 0 < killed["rows"] < n
    done = q3vl(*args)
    assert done.returncode == 0, done.stderr
    manifest = read_manifest(tmp_path / "out")
    assert manifest["runs"][-1]["already_written"] >= killed["rows"] and manifest["rows"] == n
    got = read_output(tmp_path / "out")
    assert sorted(got) == sorted(f"r{i}" for i in range(n))
    embed_corpus(src, tmp_path / "whole", tiny_embedding_bundle, rows_per_call=32, progress=False)
    whole = read_output(tmp_path / "whole")
    assert sorted(whole) == sorted(got)
    good = [i for i in got if i != "r17"]
    a = np.array([got[i]["embedding"] for i in good])
    b = np.array([whole[i]["embedding"] for i in good])
    assert np.abs(a - b).max() <= 1e-6
    assert got["r17"]["embedding"] is None and got["r17"]["error"] == whole["r17"]["error"] != ""
    assert [got[i]["tokens"] for i in good] == [whole[i]["tokens"] for i in good]


@pytest.mark.slow  # CI time; run with -m slow
def test_other_options_into_an_existing_output_are_refused(address, tiny_embedding_bundle, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "a"}\n{"text": "b"}\n')
    embed_corpus(src, tmp_path / "out", tiny_embedding_bundle, dim=32, progress=False)
    again = q3vl("embed-dataset", str(src), "-o", str(tmp_path / "out"), "--bundle", str(tiny_embedding_bundle),
                 "--address", address, "--dim", "16")
    assert again.returncode == 2
    assert "options dim: now 16, was 32" in again.stderr and "new output directory" in again.stderr
    same = q3vl("embed-dataset", str(src), "-o", str(tmp_path / "out"), "--bundle", str(tiny_embedding_bundle),
                "--address", address, "--dim", "32")
    assert same.returncode == 0, same.stderr
    assert "0 rows" in same.stdout and "holds 2 rows" in same.stdout


def make_folder(root: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Nested media plus unreadable files: (good relative paths -> kind, bad relative paths -> error hint)."""
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "z").mkdir()
    good = {}
    for k, rel in enumerate(["top.png", "a/one.jpg", "a/b/two.png", "a/b/c/three.webp", "z/four.bmp"]):
        gradient_image(40 + 8 * k, 56 + 4 * k, seed=20 + k).save(root / rel)
        good[rel] = "image"
    write_video(root / "a" / "clip.mp4", frames=10, width=64, height=48, fps=5)
    good["a/clip.mp4"] = "video"
    (root / "a" / "b" / "truncated.png").write_bytes((root / "top.png").read_bytes()[:60])
    (root / "empty.jpg").write_bytes(b"")
    (root / "z" / "text.png").write_text("this is not an image")
    (root / "a" / "broken-link.png").symlink_to(root / "nowhere.png")
    (root / "z" / "bad.mp4").write_bytes(b"\x00" * 100)
    os.mkfifo(root / "z" / "pipe.png")  # reading it would block forever: refused by the media policy
    (root / "README.txt").write_text("not media: skipped")
    bad = {"a/b/truncated.png": "truncated.png", "empty.jpg": "empty.jpg", "z/text.png": "text.png",
           "a/broken-link.png": "broken-link.png", "z/bad.mp4": "bad.mp4", "z/pipe.png": "pipe.png"}
    return good, bad


def test_folder_end_to_end_then_index_finds_a_known_item_first(address, tiny_embedding_bundle, tmp_path):
    good, bad = make_folder(tmp_path / "corpus")
    run = q3vl("embed-dataset", str(tmp_path / "corpus"), "-o", str(tmp_path / "out"), "--bundle",
               str(tiny_embedding_bundle), "--address", address, "--workers", "2", "--rows-per-call", "2",
               "--decode-workers", "1", "--no-progress")
    assert run.returncode == 0, run.stderr
    got = read_output(tmp_path / "out")
    assert set(got) == set(good) | set(bad)
    for rel in good:
        assert got[rel]["error"] == "" and len(got[rel]["embedding"]) == 64 and got[rel]["path"] == rel
    for rel, name in bad.items():
        assert got[rel]["embedding"] is None and got[rel]["tokens"] == 0, rel
        assert name in got[rel]["error"], (rel, got[rel]["error"])
    assert str(tmp_path / "corpus" / "a" / "broken-link.png") in got["a/broken-link.png"]["error"]  # resolved path
    manifest = read_manifest(tmp_path / "out")
    assert manifest["runs"][-1]["skipped_files"] == 1 and manifest["errors"] == len(bad)
    built = q3vl("index", "build", "--from-parquet", str(tmp_path / "out"), "-o", str(tmp_path / "index"),
                 "--rescore", "float32")
    assert built.returncode == 0, built.stderr
    assert f"indexed {len(good)} rows" in built.stdout and f"{len(bad)} rows with errors left out" in built.stdout
    for rel in ("a/b/two.png", "a/clip.mp4"):
        kind = good[rel]
        query = tmp_path / "query.json"
        query.write_text(json.dumps({kind: str(tmp_path / "corpus" / rel)}))
        hits = q3vl("index", "search", str(tmp_path / "index"), str(query), "-k", "3", "--exact")
        assert hits.returncode == 0, hits.stderr
        first = json.loads(hits.stdout.splitlines()[0])
        assert first["id"] == rel and first["score"] > 0.999


def test_output_reads_as_one_dataset_and_an_older_layout_resumes(address, tiny_embedding_bundle, tmp_path):
    """Every reader gets every row once from the folder `embed-dataset` wrote; a folder of the older
    layout (manifest and calibration beside the shards) is resumed on a grown input, and `index build`
    still rescales with the calibration the job stored.
    """
    import shutil

    from q3vl.codes.embeddings import Calibration
    from q3vl.ray import layout
    from tests.test_ray_layout import read_ids_every_way

    calib = tmp_path / "calib.json"
    Calibration.fit(np.random.default_rng(0).standard_normal((64, 64))).save(calib)
    lines = [json.dumps({"id": f"r{i}", "text": f"row {i} " + "word " * (i % 7)}) for i in range(30)]
    lines[7] = json.dumps({"id": "r7", "image": "missing.png"})
    src, out = tmp_path / "in.jsonl", tmp_path / "out"
    src.write_text("\n".join(lines[:20]) + "\n")
    args = ["embed-dataset", str(src), "-o", str(out), "--bundle", str(tiny_embedding_bundle), "--address", address,
            "--codes", "int8", "--calibration", str(calib), "--rows-per-call", "4", "--rows-per-shard", "6",
            "--no-progress"]
    first = q3vl(*args)
    assert first.returncode == 0, first.stderr
    # as an older q3vl left it: manifest, calibration and lock file beside the shards
    manifest = json.loads((out / layout.MANIFEST).read_text())
    (out / "q3vl-dataset.json").write_text(json.dumps({**manifest, "format": "q3vl-dataset/1"}))
    (out / layout.CALIBRATION).rename(out / "calibration.json")
    shutil.rmtree(out / layout.META)
    (out / ".lock").write_text("")
    src.write_text("\n".join(lines) + "\n")  # the corpus grew
    again = q3vl(*args)
    assert again.returncode == 0, again.stderr
    assert "holds 30 rows" in again.stdout
    shards = sorted(p.name for p in out.glob("part-*.parquet"))
    assert len(shards) >= 4 and sorted(p.name for p in out.iterdir()) == ["_q3vl", *shards]
    readers = read_ids_every_way(out)
    for reader, ids in readers.items():
        assert ids == sorted(f"r{i}" for i in range(30)), reader
    logging.getLogger(__name__).info("read every row once with: %s", ", ".join(readers))
    manifest = read_manifest(out)
    assert manifest["format"] == layout.FORMAT and manifest["rows"] == 30 and len(manifest["runs"]) == 2
    built = q3vl("index", "build", "--from-parquet", str(out), "-o", str(tmp_path / "index"))
    assert built.returncode == 0, built.stderr
    assert "indexed 29 rows" in built.stdout and "rescore int8" in built.stdout
    kept = Calibration.load(tmp_path / "index" / "calibration.json")
    assert np.array_equal(kept.ranges, Calibration.load(calib).ranges)
