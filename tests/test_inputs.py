"""One input dialect (q3vl/runtime/inputs.py) for embed, rerank, parity and index build; parity on it."""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from q3vl.errors import InputError
from q3vl.runtime.inputs import locate, parse_item, read_items, read_object, resolve_media
from tests.conftest import make_video, noise_image
from tests.test_cli import one_error_line, q3vl


def _jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def media(tmp_path: Path) -> Path:
    """A directory of media next to the JSONL files that name them relatively."""
    d = tmp_path / "data"
    (d / "frames").mkdir(parents=True)
    noise_image(64, 96, 1).save(d / "cat.png")
    for i in range(3):
        noise_image(40, 60, 10 + i).save(d / "frames" / f"{i}.png")
    make_video(d / "clip.mp4", frames=12)
    return d


def _data_uri(seed: int) -> str:
    buf = io.BytesIO()
    noise_image(48, 48, seed).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_relative_paths_resolve_against_the_file_not_the_cwd(media, tmp_path, monkeypatch):
    path = _jsonl(media / "items.jsonl", [
        {"id": "cat", "image": "cat.png"}, {"video": "clip.mp4", "fps": 2}, "",
        {"id": 7, "video": ["frames/0.png", "frames/1.png"]}, {"image": _data_uri(1)},
        {"image": "https://example.com/a.jpg"}, {"image": f"file://{media}/cat.png"}, {"text": "plain"}])
    monkeypatch.chdir(tmp_path)
    records = read_items(Path("data/items.jsonl"))
    assert [r.line for r in records] == [1, 2, 4, 5, 6, 7, 8]
    assert [r.id for r in records][:3] == ["cat", None, 7]
    assert records[0].item == {"image": str(media / "cat.png")}  # the id is not a runtime key
    assert records[1].item["video"] == str(media / "clip.mp4")
    assert records[2].item["video"] == [str(media / "frames/0.png"), str(media / "frames/1.png")]
    assert records[3].item["image"].startswith("data:image/png") and records[4].item["image"].startswith("https:")
    assert records[5].item["image"] == f"file://{media}/cat.png" and records[6].item == {"text": "plain"}
    assert records[0].where == "data/items.jsonl line 1 (id 'cat')" and records[1].where == "data/items.jsonl line 2"
    assert path.exists()


@pytest.mark.parametrize("rows, kind, message", [
    (['{"text": "a"}', '{"text": '], "embed", "line 2: invalid JSON"),
    ([{"id": "a", "text": "x"}, {"id": "a", "text": "y"}], "embed", "line 2 (id 'a'): the same id is on line 1"),
    ([{"name": "x", "text": "y"}], "embed", "line 1: unknown keys ['name']"),
    ([{"id": True, "text": "y"}], "embed", "line 1: id must be a string or an integer"),
    ([{"id": "d", "text": "y", "instruction": "z"}], "document", "line 1 (id 'd'): unknown keys ['instruction']"),
    ([{"id": "q", "text": 3}], "embed", "line 1 (id 'q'): text must be a str or a list of str, not int"),
    ([[1, 2]], "embed", "line 1: expected a JSON object, not list"),
    ([""], "embed", "holds no items"),
])
def test_bad_lines_name_the_line_and_the_id(tmp_path, rows, kind, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        read_items(_jsonl(tmp_path / "x.jsonl", rows), kind)


def test_runtime_errors_are_attributed_to_the_line_and_id(tmp_path):
    records = read_items(_jsonl(tmp_path / "x.jsonl", [{"text": "a"}, "", {"id": "b", "image": "no.jpg"}]))
    err = locate(InputError("image file not found: /x/no.jpg", 1), records)
    assert str(err) == f"{tmp_path}/x.jsonl line 3 (id 'b'): image file not found: /x/no.jpg" and err.index == 1
    assert locate(InputError("whole call", None), records).reason == "whole call"
    one = parse_item({"id": 3, "image": "a.png"}, base=tmp_path)
    assert one.item == {"image": str(tmp_path / "a.png")} and one.where == "item 0 (id 3)"
    assert resolve_media({"image": ["a.png", "/abs.png"], "text": "a.png"}, "/base") == {
        "image": ["/base/a.png", "/abs.png"], "text": "a.png"}
    (tmp_path / "q.json").write_text('{"text": "q", "image": "a.png", "instruction": "find"}')
    assert read_object(tmp_path / "q.json", ("text", "image", "instruction"))["image"] == str(tmp_path / "a.png")


def test_cli_outputs_carry_the_ids(tiny_embedding_bundle, tiny_reranker_bundle, media, tmp_path):
    items = _jsonl(media / "items.jsonl", [{"id": "cat", "image": "cat.png"}, {"text": "no id"},
                                           {"id": "clip", "video": "clip.mp4", "fps": 2}])
    r = q3vl("embed", str(tiny_embedding_bundle), str(items), "-o", str(tmp_path / "v.jsonl"), "--dim", "16",
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (tmp_path / "v.jsonl").read_text().splitlines()]
    expected = [("cat", 0, 16), (None, 1, 16), ("clip", 2, 16)]
    assert [(x["id"], x["index"], len(x["embedding"])) for x in rows] == expected
    r = q3vl("embed", str(tiny_embedding_bundle), str(items), "-o", str(tmp_path / "v.npy"), cwd=tmp_path)
    assert r.returncode == 0 and np.load(tmp_path / "v.npy").shape == (3, 64)
    assert json.loads((tmp_path / "v.ids.json").read_text()) == ["cat", 1, "clip"]
    (media / "q.json").write_text('{"text": "a cat", "image": "cat.png"}')
    docs = _jsonl(media / "docs.jsonl", [{"id": "d1", "text": "a kitten"}, {"id": "d2", "video": "clip.mp4"}])
    r = q3vl("rerank", str(tiny_reranker_bundle), str(media / "q.json"), str(docs), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert [json.loads(line)["id"] for line in r.stdout.splitlines()] == ["d1", "d2"]
    bad = _jsonl(media / "bad.jsonl", [{"text": "fine"}, {"id": "gone", "image": "missing.png"}])
    line = one_error_line(q3vl("embed", str(tiny_embedding_bundle), str(bad), "-o", str(tmp_path / "b.npy"),
                               cwd=tmp_path))
    assert line == f"q3vl: error: {bad} line 2 (id 'gone'): image file not found: {media}/missing.png"
    assert not (tmp_path / "b.npy").exists()
    r = q3vl("embed", str(tiny_embedding_bundle), str(bad), "-o", str(tmp_path / "b.jsonl"), "--on-error", "skip",
             cwd=tmp_path)
    assert r.returncode == 0 and "embedded 1/2 items" in r.stderr
    assert f"skipped {bad} line 2 (id 'gone'): image file not found: {media}/missing.png" in r.stderr
    assert "skipping input" not in r.stderr  # reported once, by line and id
    assert [json.loads(x)["embedding"] is None for x in (tmp_path / "b.jsonl").read_text().splitlines()] == [
        False, True]


# ---------------------------------------------------------------- parity on user inputs
def test_parity_reads_what_the_runtime_reads(tiny_embedding, tiny_embedding_bundle, media, tmp_path):
    """A relative video path, a frame list, a data URI and a file:// URL: both sides, same media."""
    items = _jsonl(media / "parity.jsonl", [
        {"id": "video", "video": "clip.mp4", "fps": 2}, {"id": "frames", "video": ["frames/0.png", "frames/1.png"]},
        {"id": "data-uri", "image": _data_uri(2)}, {"id": "file-url", "image": f"file://{media}/cat.png"},
        {"id": "frames-data", "video": [_data_uri(3), _data_uri(4)]}, {"text": "no id", "image": "cat.png"}])
    r = q3vl("parity", str(tiny_embedding), str(tiny_embedding_bundle), "--inputs", str(items), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("checkpoint: the bundle's source (content_sha256 ")
    assert [line.split()[0] for line in lines[2:-1]] == ["video", "frames", "data-uri", "file-url", "frames-data",
                                                         "line"]
    assert lines[-1] == "6 items, worst cosine 1.00000000, 0 below tolerance"
    assert "Traceback" not in r.stderr and "\r" not in r.stderr
    assert "parity (embedding): 6/6 items in" in r.stderr  # progress, as lines: stderr is not a terminal


def test_reranker_parity_on_the_same_inputs(tiny_reranker, tiny_reranker_bundle, media):
    from q3vl.reference.parity import compare, load_inputs

    items = _jsonl(media / "parity.jsonl", [{"id": "v", "video": "clip.mp4", "fps": 2},
                                            {"id": "d", "image": _data_uri(5)},
                                            {"id": "f", "image": f"file://{media}/cat.png"}])
    rows = compare(tiny_reranker, tiny_reranker_bundle, load_inputs(items, None), batch_size=2)
    assert [r.name for r in rows] == [f"{q} query / {n}" for q in ("text", "image") for n in "vdf"]
    assert all(r.ok for r in rows), [(r.name, r.value) for r in rows]


@pytest.mark.slow  # CI time; run with -m slow
def test_parity_says_when_the_checkpoint_is_not_the_bundles_source(tiny_embedding, tiny_embedding_bundle, tmp_path):
    from q3vl.bundle import Manifest
    from q3vl.reference.parity import check_source
    from q3vl.testing import make_checkpoint

    manifest = Manifest.read(tiny_embedding_bundle)
    assert check_source(tiny_embedding, manifest).matches is True
    copy = shutil.copytree(tiny_embedding, tmp_path / "copy")  # same files elsewhere: still the source
    assert check_source(copy, manifest).matches is True
    other = make_checkpoint(tmp_path / "other-embedding", shape="tiny", seed=5)
    found = check_source(other, manifest)
    assert found.matches is False and "NOT the bundle's source" in found.line
    assert manifest.source["content_sha256"][:12] in found.line
    # a bundle from before content hashes: the header hash still catches another shape or layout
    legacy = Manifest.read(tiny_embedding_bundle)
    del legacy.source["content_sha256"]
    assert "header hash only" in check_source(tiny_embedding, legacy).line
    items = _jsonl(tmp_path / "two.jsonl", [{"id": "a", "text": "hello"}, {"id": "b", "text": "world"}])
    r = q3vl("parity", str(other), str(tiny_embedding_bundle), "--inputs", str(items), cwd=tmp_path)
    assert r.returncode == 1  # below tolerance, as it must be with other weights ...
    assert r.stdout.splitlines()[0].startswith("checkpoint: NOT the bundle's source")  # ... and it says why
    assert r.stdout.splitlines()[-1].endswith("(the checkpoint is NOT the bundle's source)")
    warning = next(line for line in r.stderr.splitlines() if "NOT the bundle's source" in line)
    assert r.stderr.index(warning) < r.stderr.index("loading the bundle and the PyTorch reference")
