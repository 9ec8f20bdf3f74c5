"""The `embed-dataset` output directory as a dataset (without Ray): pyarrow, pandas, and DuckDB and Polars
where installed, read every row once, with the job's files, a shard being written and a shard set aside
in the same folder; a directory of the older layout (manifest beside the shards) is moved into the new
one and resumed, or refused, unchanged, when its settings differ or an older run still holds its lock."""

from __future__ import annotations

import fcntl
import importlib.util
import json
from pathlib import Path

import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from q3vl.errors import ConfigError, OutputExistsError  # noqa: E402
from q3vl.ray import layout  # noqa: E402
from q3vl.ray.store import OutputDir, read_manifest  # noqa: E402

SETTINGS = {"bundle": {"path": "/b", "sha256": "aa"}, "input": {"path": "/i", "format": "jsonl"},
            "options": {"dim": None}}


def read_ids_every_way(out: Path) -> dict[str, list[str]]:
    """The `id` column of `out` as each installed reader reads the folder (sorted; a row read twice
    shows twice): pyarrow and pandas given the folder, DuckDB given the folder and globs, Polars given globs
    (a bare folder with files of several extensions is refused by Polars' design).
    """
    import pandas as pd
    import pyarrow.dataset as pads

    got = {"pyarrow.dataset(out)": pads.dataset(out, format="parquet").to_table(columns=["id"]).column("id"),
           "pyarrow.parquet.read_table(out)": pq.read_table(out, columns=["id"]).column("id"),
           "pandas.read_parquet(out)": pd.read_parquet(out, columns=["id"])["id"]}
    ids = {name: sorted(col.to_pylist() if hasattr(col, "to_pylist") else col.tolist()) for name, col in got.items()}
    globs = [str(out / "*.parquet"), str(out / "**" / "*.parquet"), str(out / "*")]
    if importlib.util.find_spec("duckdb") is not None:
        import duckdb

        with duckdb.connect() as db:
            for g in [str(out), *globs]:
                ids[f"duckdb read_parquet({g!r})"] = sorted(r[0] for r in db.execute(
                    "SELECT id FROM read_parquet(?)", [g]).fetchall())
    if importlib.util.find_spec("polars") is not None:
        import polars as pl

        for g in globs:
            ids[f"polars.scan_parquet({g!r})"] = sorted(pl.scan_parquet(g).select("id").collect()["id"].to_list())
    return ids


def _shard(ids: list[str]) -> pa.Table:
    return pa.table({"id": ids, "error": [""] * len(ids)})


def test_output_dir_reads_as_a_dataset_while_written_and_after(tmp_path):
    calib = tmp_path / "calibration-source.json"
    calib.write_text('{"ranges": [1, 2]}')
    out = tmp_path / "out"
    with OutputDir(out, SETTINGS) as d:
        d.keep_calibration(calib)
        d.commit(_shard(["a", "b"]))
        d.commit(_shard(["c"]))
        # a shard half written when the run is killed, and one set aside by an earlier run
        (out / layout.STAGING / "part-000002.parquet.tmp").write_bytes(b"PAR1 partial")
        pq.write_table(_shard(["x"]), out / "part-000007.parquet")
        layout.set_aside(out / "part-000007.parquet")
        assert sorted(p.name for p in out.iterdir()) == ["_q3vl", "part-000000.parquet", "part-000001.parquet"]
        for reader, ids in read_ids_every_way(out).items():
            assert ids == ["a", "b", "c"], reader
    with OutputDir(out, SETTINGS) as d:  # the next run deletes the partial shard
        assert not any((out / layout.STAGING).iterdir()) and d.next_name() == "part-000002.parquet"
    assert (out / layout.CALIBRATION).read_bytes() == calib.read_bytes()
    assert read_manifest(out)["format"] == layout.FORMAT and read_manifest(out)["rows"] == 3


def write_legacy(out: Path, settings: dict = SETTINGS) -> dict:
    """An output directory as q3vl wrote it before `_q3vl/`: two shards, a shard set aside, a partial
    shard, the manifest, calibration and lock file beside them. Returns the manifest.
    """
    out.mkdir()
    shards = []
    for k, ids in enumerate([["a", "b"], ["c"]]):
        pq.write_table(_shard(ids), out / f"part-{k:06d}.parquet")
        shards.append({"file": f"part-{k:06d}.parquet", "rows": len(ids), "errors": 0, "error_samples": []})
    (out / "part-000005.parquet.unreadable").write_bytes(b"garbage")
    (out / "_tmp-part-000002.parquet").write_bytes(b"PAR1 partial")
    (out / "calibration.json").write_text('{"ranges": [3]}')
    (out / ".lock").write_text("")
    manifest = {"format": "q3vl-dataset/1", "q3vl_version": "0.0.old", **settings, "shards": shards,
                "runs": [{"started": "2026-01-01T00:00:00+0000", "finished": None}], "rows": 3, "errors": 0,
                "error_samples": []}
    (out / "q3vl-dataset.json").write_text(json.dumps(manifest))
    return manifest


def test_older_layout_is_moved_into_the_new_one_and_resumed(tmp_path):
    out = tmp_path / "out"
    old = write_legacy(out)
    import pandas as pd

    with pytest.raises(pa.ArrowInvalid):  # why the layout changed
        pd.read_parquet(out)
    assert read_manifest(out)["rows"] == 3 and layout.calibration_path(out) == out / "calibration.json"
    with OutputDir(out, SETTINGS) as d:
        assert d.done.contains(["a", "b", "c", "d"]).tolist() == [True, True, True, False]
        d.commit(_shard(["d"]))
    assert sorted(p.name for p in out.iterdir()) == ["_q3vl", *(f"part-{k:06d}.parquet" for k in range(3))]
    manifest = json.loads((out / layout.MANIFEST).read_text())
    assert manifest["format"] == layout.FORMAT and manifest["runs"] == old["runs"] and manifest["rows"] == 4
    assert (out / layout.CALIBRATION).read_text() == '{"ranges": [3]}' == layout.calibration_path(out).read_text()
    assert (out / layout.SET_ASIDE / "part-000005.parquet.unreadable").read_bytes() == b"garbage"
    for reader, ids in read_ids_every_way(out).items():
        assert ids == ["a", "b", "c", "d"], reader


def test_a_move_killed_midway_is_finished_by_the_next_run(tmp_path):
    out = tmp_path / "out"
    old = write_legacy(out)
    # killed after the calibration moved and the new manifest was written, before the old one was removed
    (out / layout.META).mkdir()
    (out / "calibration.json").rename(out / layout.CALIBRATION)
    (out / layout.MANIFEST).write_text(json.dumps({**old, "format": layout.FORMAT}))
    with OutputDir(out, SETTINGS) as d:
        assert len(d.done) == 3 and d.next_name() == "part-000002.parquet"
    assert not (out / "q3vl-dataset.json").exists() and not (out / ".lock").exists()
    assert (out / layout.CALIBRATION).read_text() == '{"ranges": [3]}'
    assert json.loads((out / layout.MANIFEST).read_text())["rows"] == 3


def test_older_layout_is_refused_unchanged_with_other_settings_or_while_an_older_run_holds_it(tmp_path):
    out = tmp_path / "out"
    write_legacy(out)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(OutputExistsError, match="options dim: now 32, was None"):
        OutputDir(out, {**SETTINGS, "options": {"dim": 32}})
    with open(out / ".lock", "a+") as held:  # an older q3vl writing this directory
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ConfigError, match=r"another run is writing .*\.lock"):
            OutputDir(out, SETTINGS)
    assert sorted(p.name for p in out.iterdir() if p.name != layout.META) == before
    assert (out / "q3vl-dataset.json").exists() and (out / "calibration.json").exists()
    (out / "q3vl-dataset.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(OutputExistsError, match="not a q3vl embed-dataset manifest"):
        OutputDir(out, SETTINGS)


def test_index_build_reads_the_stored_calibration_in_either_layout(tmp_path, capsys):
    pytest.importorskip("usearch")
    import numpy as np

    from q3vl.cli import main
    from q3vl.codes.embeddings import Calibration

    rng = np.random.default_rng(0)
    emb = rng.standard_normal((12, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    calib = tmp_path / "calib.json"
    Calibration.fit(rng.standard_normal((32, 16))).save(calib)  # not what 12 vectors would fit: tells them apart
    new, old = tmp_path / "new", tmp_path / "old"
    with OutputDir(new, SETTINGS) as d:
        d.keep_calibration(calib)
        for k in (0, 6):
            d.commit(pa.table({"id": [f"r{k + i}" for i in range(6)], "error": [""] * 6,
                               "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb[k:k + 6].ravel()), 16)}))
    write_legacy(old)
    for k in range(2):  # the older layout's shards, with embeddings
        (old / f"part-{k:06d}.parquet").write_bytes((new / f"part-{k:06d}.parquet").read_bytes())
    (old / "calibration.json").write_bytes(calib.read_bytes())
    for out in (new, old):
        assert main(["index", "build", "--from-parquet", str(out), "-o", str(tmp_path / f"index-{out.name}")]) == 0
        printed = capsys.readouterr().out
        assert f"indexed 12 rows of {out}" in printed and "rescore int8" in printed
        kept = Calibration.load(tmp_path / f"index-{out.name}" / "calibration.json")
        assert np.array_equal(kept.ranges, Calibration.load(calib).ranges)
    assert (old / "q3vl-dataset.json").exists()  # read where it is: only a run moves an older folder
