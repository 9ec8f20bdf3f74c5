"""q3vl.ray without a cluster: row mapping, row ids, the output directory's exactly-once bookkeeping and
the driver-side readers (every bad line kept as a row with its error)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from q3vl.errors import ConfigError, InputError, OutputExistsError  # noqa: E402
from q3vl.ray.rows import ColumnMap, column_values, content_id, item_of, resolve, row_id, table_rows  # noqa: E402
from q3vl.ray.sources import _csv_tables, jsonl_lines, list_media  # noqa: E402
from q3vl.ray.store import MANIFEST, IdSet, OutputDir, changed  # noqa: E402


def test_import_q3vl_and_q3vl_ray_do_not_import_ray():
    code = "import sys, q3vl, q3vl.ray, q3vl.ray.cli; from q3vl.ray import ColumnMap; assert 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_column_map_parse_and_validation():
    cmap = ColumnMap.parse(["image=path", "image=pixels", "text=caption", "fps="])
    assert cmap.image == ("path", "pixels") and cmap.text == ("caption",) and cmap.fps is None
    assert cmap.video == ("video",) and cmap.instruction == "instruction"
    with pytest.raises(ConfigError, match="KEY=COLUMN"):
        ColumnMap.parse(["images=x"])
    with pytest.raises(ConfigError):
        ColumnMap(text=("",))


def test_item_of_maps_every_value_kind(tmp_path):
    arr = np.zeros((4, 5, 3), np.uint8)
    row = {"text": "a", "image": "rel/x.png", "image_bytes": b"\x89PNG", "pixels": arr,
           "video": ["f0.png", "/abs/f1.png"], "instruction": "find it", "fps": "2.5", "max_frames": 4}
    cmap = ColumnMap(image=("image", "image_bytes", "pixels"))
    item = item_of(row, cmap, str(tmp_path))
    assert item["text"] == "a" and item["instruction"] == "find it" and item["fps"] == 2.5 and item["max_frames"] == 4
    assert item["image"][0] == str(tmp_path / "rel/x.png") and item["image"][1] == b"\x89PNG"
    assert item["image"][2] is arr
    assert item["video"] == [str(tmp_path / "f0.png"), "/abs/f1.png"]
    assert resolve("https://h/x.png", "/b") == "https://h/x.png"
    assert resolve("data:image/png;base64,AA", "/b") == "data:image/png;base64,AA"


@pytest.mark.parametrize("row, match", [
    ({}, "no text, image or video"),
    ({"text": 3}, "column 'text': text must be a str or a list of str, not int"),  # the item adapter's texts
    ({"text": "a", "fps": "fast"}, "column 'fps': 'fast' is not a number"),
    ({"text": "a", "fps": True}, "column 'fps': fps must be a finite number > 0, not True"),
    ({"image": 3.5}, "column 'image': image must be a path"),
    ({"video": []}, "column 'video': video must be a path/URL"),
    ({"text": "a", "instruction": ["x"]}, "column 'instruction': instruction must be a str"),
    ({"text": "a", "max_pixels": "1e3"}, "column 'max_pixels': max_pixels must be an integer >= 1"),
])
def test_item_of_bad_values_are_input_errors(row, match):
    with pytest.raises(InputError, match=match):
        item_of(row, ColumnMap())


def test_json_mode_and_its_errors():
    cmap = ColumnMap(json="json")
    assert item_of({"json": '{"text": "hi", "other": 1}'}, cmap) == {"text": "hi"}
    for line, match in (("{bad", "invalid JSON"), ("[1, 2]", "expected a JSON object, not list"),
                        (None, "JSON object per row")):
        with pytest.raises(InputError, match=match):
            item_of({"json": line}, cmap)
    # every item key of a line is honoured (as `q3vl embed` reads it), and a bad line names its number
    line = '{"image": "~/a.png", "max_pixels": 65536, "min_pixels": 1024, "total_pixels": 9, "fps": 2}'
    assert item_of({"json": line}, cmap, "/data") == {"image": str(Path.home() / "a.png"), "max_pixels": 65536,
                                                      "min_pixels": 1024, "total_pixels": 9, "fps": 2}
    with pytest.raises(InputError, match=r"^line 7: invalid JSON: Expecting property name"):
        item_of({"json": "{bad", "line": 7}, cmap)
    rid, err = row_id({"json": "{bad", "line": 7}, cmap, "id")
    assert err.startswith("line 7: invalid JSON") and rid == content_id({"json": "{bad", "line": 7}, cmap)


def test_nested_pixel_lists_become_arrays_and_ragged_ones_row_errors():
    good = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    ragged = [[[1, 2, 3]], [[1, 2, 3], [4, 5, 6]]]
    col = pa.array([good.tolist(), None, ragged], pa.list_(pa.list_(pa.list_(pa.uint8()))))
    values = column_values(col)
    assert values[0].dtype == np.uint8 and np.array_equal(values[0], good) and values[1] is None
    with pytest.raises(InputError, match="H x W x C"):
        item_of({"image": values[2]}, ColumnMap())


def test_table_rows_keeps_null_apart_from_nan():
    t = pa.table({"text": ["a", None], "fps": pa.array([float("nan"), None])})
    rows = table_rows(t, ["text", "fps", "missing"])
    assert rows[0]["text"] == "a" and np.isnan(rows[0]["fps"]) and rows[1] == {"text": None, "fps": None}
    with pytest.raises(InputError, match="fps must be a finite number > 0, not nan"):  # NaN: the row's error
        item_of(rows[0], ColumnMap())


def test_row_ids_are_stable_typed_and_bad_ids_fall_back_with_an_error():
    cmap = ColumnMap()
    a, b = {"text": "1"}, {"text": 1}
    assert content_id(a, cmap) == content_id(dict(a), cmap) and content_id(a, cmap) != content_id(b, cmap)
    assert content_id({"image": b"ab"}, cmap) != content_id({"image": "ab"}, cmap)
    square, tall = np.zeros((2, 2, 3), np.uint8), np.zeros((2, 3, 2), np.uint8)
    assert content_id({"image": square}, cmap) != content_id({"image": tall}, cmap)
    assert content_id(a, cmap, "line 3 broken") != content_id(a, cmap, "line 4 broken")
    assert row_id({"id": 7, "text": "x"}, cmap, "id") == ("7", "")
    for bad in (None, "", "x" * 600, 1.5, True):
        rid, err = row_id({"id": bad, "text": "x"}, cmap, "id")
        assert rid == content_id({"id": bad, "text": "x"}, cmap) and "id column 'id'" in err


def test_id_set_membership_survives_compaction_and_pickling():
    import pickle

    s = IdSet(f"id{i}" for i in range(1000))
    s.compact()
    s.add(["new", "\ud800surrogate"])
    assert s.contains(["id5", "new", "\ud800surrogate", "nope"]).tolist() == [True, True, True, False]
    t = pickle.loads(pickle.dumps(s))
    assert len(t) == 1002 and t.contains(["id999", "new", "id1000"]).tolist() == [True, True, False]


def _shard(ids, errors=None):
    return pa.table({"id": ids, "error": errors or [""] * len(ids)})


def test_output_dir_recovers_partial_and_orphan_shards_and_refuses_other_settings(tmp_path):
    settings = {"bundle": {"path": "/b", "sha256": "aa"}, "input": {"path": "/i", "format": "jsonl"},
                "options": {"dim": None}}
    with OutputDir(tmp_path, settings) as out:
        out.commit(_shard(["a", "b"], ["", "bad file"]))
        with pytest.raises(ConfigError, match="another run"):
            OutputDir(tmp_path, settings)
    # a kill after the rename but before the manifest update, and one in the middle of a write
    pq.write_table(_shard(["c"]), tmp_path / "part-000001.parquet")
    (tmp_path / "_tmp-part-000002.parquet").write_bytes(b"PAR1 partial")
    (tmp_path / "part-000009.parquet").write_bytes(b"garbage")
    with OutputDir(tmp_path, settings) as out:
        assert out.done.contains(["a", "b", "c", "d"]).tolist() == [True, True, True, False]
        assert not (tmp_path / "_tmp-part-000002.parquet").exists()
        assert (tmp_path / "part-000009.parquet.unreadable").exists()
        assert out.next_name() == "part-000002.parquet"
        manifest = json.loads((tmp_path / MANIFEST).read_text())
        assert manifest["rows"] == 3 and manifest["errors"] == 1 and manifest["error_samples"][0]["error"] == "bad file"
    moved = {**settings, "bundle": {"path": "/elsewhere", "sha256": "aa"}}
    OutputDir(tmp_path, moved).close()  # a moved bundle is the same bundle
    other = {**settings, "options": {"dim": 32}}
    assert changed(json.loads((tmp_path / MANIFEST).read_text()), other) == ["options dim: now 32, was None"]
    with pytest.raises(OutputExistsError, match="options dim: now 32, was None"):
        OutputDir(tmp_path, other)


def test_folder_listing_is_sorted_recursive_and_counts_other_files(tmp_path):
    (tmp_path / "b" / "c").mkdir(parents=True)
    for name in ("z.png", "b/a.JPG", "b/c/v.mp4", "b/c/readme.txt", "notes"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    files, skipped = list_media(tmp_path)
    assert files == [("b/a.JPG", "image"), ("b/c/v.mp4", "video"), ("dangling.png", "image"), ("z.png", "image")]
    assert skipped == 2


def test_jsonl_lines_keep_bad_lines_as_errors(tmp_path, monkeypatch):
    import q3vl.ray.sources as sources

    monkeypatch.setattr(sources, "MAX_LINE_BYTES", 64)
    p = tmp_path / "x.jsonl"
    p.write_bytes(b'{"text": "a"}\n\n{"text": "\xff\xfe"}\n' + b'{"text": "' + b"y" * 200 + b'"}\n{"text": "b"}')
    got = list(jsonl_lines(p))
    assert [(n, e.split(" is ")[0]) for n, _, e in got] == [(1, ""), (3, "line 3"), (4, "line 4"), (5, "")]
    assert "UTF-8" in got[1][2] and "longer than" in got[2][2] and got[3][1] == '{"text": "b"}'


def test_csv_rows_are_strings_and_malformed_rows_become_error_rows(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text('text,fps\n"multi\nline",2\nb,nan\nc,1,extra\n')
    tables, total, names = _csv_tables(p)
    rows = [r for t in tables for r in t.to_pylist()]
    assert total == 3 and names == ["text", "fps", "error"]
    assert rows[0] == {"text": "multi\nline", "fps": "2", "error": ""}
    assert rows[1]["fps"] == "nan"
    assert rows[2]["text"] is None and "3 fields, the header has 2" in rows[2]["error"]


def test_retry_args_follow_what_map_batches_takes(caplog):
    from q3vl.ray.job import TASK_RETRIES, retry_args

    def kwargs_form(fn, **ray_remote_args): ...  # Ray 2.60: only through **ray_remote_args
    def named_form(fn, max_restarts=None, max_task_retries=None): ...
    def neither(fn, num_cpus=None): ...

    want = {"max_restarts": -1, "max_task_retries": TASK_RETRIES}
    assert retry_args(kwargs_form) == want and retry_args(named_form) == want
    assert retry_args(neither) == {} and "without bound" in caplog.text
    import ray.data

    assert retry_args(ray.data.Dataset.map_batches) == want  # the installed Ray
