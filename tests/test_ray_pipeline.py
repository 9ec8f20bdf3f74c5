"""q3vl.ray on a real local Ray (one session for the module): every good row equals `Embedder.process` /
`Reranker.process` of the same item, codes equal `quantize_embeddings`, bad rows carry their error and
nothing else is lost; a killed worker changes nothing in the output."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from q3vl.codes import Calibration, quantize_embeddings  # noqa: E402
from q3vl.ray import ColumnMap, EmbedBatch, RerankBatch, embed_corpus  # noqa: E402
from q3vl.ray.store import iter_shards, read_manifest  # noqa: E402
from q3vl.runtime import Embedder, Reranker  # noqa: E402
from q3vl.testing.inputs import gradient_image, write_video  # noqa: E402

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_session():
    if ray.is_initialized():
        yield
        return
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Media files, some referenced by relative paths from the Parquet file's directory."""
    d = tmp_path_factory.mktemp("ray-corpus")
    (d / "media").mkdir()
    for i in range(3):
        gradient_image(48 + 16 * i, 64, seed=i).save(d / "media" / f"img{i}.png")
        gradient_image(48, 64, seed=10 + i).save(d / "media" / f"frame{i}.png")
    write_video(d / "media" / "clip.mp4", frames=12, width=96, height=64, fps=6)
    (d / "media" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    return d


def pixels(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def mixed_rows(d: Path) -> list[tuple[dict, dict | None]]:
    """(Parquet row, the `Embedder.process` item it must equal, or None for a bad row). Bytes and
    array images must equal the same image read from its file.
    """
    m = d / "media"
    frames = [m / f"frame{i}.png" for i in (0, 2, 1)]
    good = [
        ({"id": "text", "text": "a plain caption"}, {"text": "a plain caption"}),
        ({"id": "text-instr", "text": "find me", "instruction": "Retrieve the photo."},
         {"text": "find me", "instruction": "Retrieve the photo."}),
        ({"id": "img-abs", "image": str(m / "img0.png")}, {"image": str(m / "img0.png")}),
        ({"id": "img-rel", "image": "media/img1.png", "text": "with text"},
         {"image": str(m / "img1.png"), "text": "with text"}),
        ({"id": "video", "video": "media/clip.mp4", "fps": 2.0, "max_frames": 4},
         {"video": str(m / "clip.mp4"), "fps": 2.0, "max_frames": 4}),
        ({"id": "frames", "frames": ["media/frame0.png", "media/frame2.png", "media/frame1.png"]},
         {"video": [str(f) for f in frames]}),
        ({"id": "img-bytes", "image_bytes": (m / "img2.png").read_bytes(), "text": "bytes"},
         {"image": str(m / "img2.png"), "text": "bytes"}),
        ({"id": "img-array", "pixels": pixels(m / "img1.png").tolist()}, {"image": str(m / "img1.png")}),
        ({"id": "frames-bytes", "frame_bytes": [f.read_bytes() for f in frames]}, {"video": [str(f) for f in frames]}),
    ]
    bad = [
        ({"id": "missing", "image": "media/nope.png"}, "media/nope.png"),
        ({"id": "broken", "image": "media/broken.png"}, "broken.png"),
        ({"id": "empty"}, "no text, image or video"),
        ({"id": "bad-video", "video": "media/img0.png"}, ""),  # an image as a video: any error will do
        ({"id": "zero-fps", "text": "x", "video": "media/clip.mp4", "fps": -1.0}, "fps"),
        ({"id": "huge", "text": "x" * ((1 << 20) + 10)}, "characters"),
        ({"id": "nan-fps", "video": "media/clip.mp4", "fps": float("nan")}, "fps"),
        ({"id": "internal-url", "image": "http://127.0.0.1:9/x.png"}, "refused by the media policy"),
        ({"id": "bad-bytes", "image_bytes": b"\x00not an image"}, "image"),
        ({"id": "ragged", "pixels": [[[1, 2, 3]], [[1, 2, 3], [4, 5, 6]]]}, "H x W x C"),
    ]
    return good + [(row, None) for row, _ in bad], dict((r["id"], msg) for r, msg in bad)


def write_mixed_parquet(d: Path) -> tuple[Path, dict[str, dict], dict[str, str]]:
    rows, bad = mixed_rows(d)
    cols = ["id", "text", "instruction", "image", "image_bytes", "pixels", "video", "frames", "frame_bytes", "fps",
            "max_frames"]
    types = {"frames": pa.list_(pa.string()), "fps": pa.float64(), "max_frames": pa.int64(), "image_bytes": pa.binary(),
             "pixels": pa.list_(pa.list_(pa.list_(pa.uint8()))), "frame_bytes": pa.list_(pa.binary())}
    table = pa.table({c: pa.array([r.get(c) for r, _ in rows], types.get(c, pa.string())) for c in cols})
    path = d / "mixed.parquet"
    pq.write_table(table, path)
    return path, {r["id"]: item for r, item in rows if item is not None}, bad


def read_output(out: Path) -> dict[str, dict]:
    rows = {}
    for t in iter_shards(out):
        for r in t.to_pylist():
            assert r["id"] not in rows, f"id {r['id']} written twice"
            rows[r["id"]] = r
    return rows


def test_mixed_parquet_rows_equal_process_and_codes_equal_quantize(ray_session, tiny_embedding_bundle, corpus,
                                                                   tmp_path):
    path, items, bad = write_mixed_parquet(corpus)
    ids = list(items)
    with Embedder(tiny_embedding_bundle) as emb:
        want = emb.process([items[i] for i in ids], dim=32)
    calib = tmp_path / "calibration.json"
    Calibration.fit(want).save(calib)
    cmap = ColumnMap.parse(["video=video", "video=frames", "video=frame_bytes", "image=image", "image=image_bytes",
                            "image=pixels"])
    run = embed_corpus(path, tmp_path / "out", tiny_embedding_bundle, columns=cmap, dim=32,
                       codes=["int8", "binary"], calibration=calib, workers=2, rows_per_call=3, rows_per_shard=4,
                       batch_size=2, progress=False)
    got = read_output(tmp_path / "out")
    assert set(got) == set(items) | set(bad)  # nothing lost, nothing added
    assert run["rows"] == len(got) and run["errors"] == len(bad) and run["shards"] >= 2
    emb_out = np.array([got[i]["embedding"] for i in ids], np.float32)
    assert np.abs(emb_out - want).max() <= 1e-6
    calibration = Calibration.load(calib)
    for precision in ("int8", "binary"):
        codes = np.array([got[i][f"embedding_{precision}"] for i in ids])
        assert np.array_equal(codes, quantize_embeddings(emb_out, precision, calibration))
    for i in ids:
        assert got[i]["error"] == "" and got[i]["tokens"] > 0
    for i, msg in bad.items():
        assert got[i]["embedding"] is None and got[i]["embedding_int8"] is None and got[i]["tokens"] == 0
        assert got[i]["error"] and msg in got[i]["error"], (i, got[i]["error"])
    assert str(corpus / "media" / "nope.png") in got["missing"]["error"]  # the resolved path
    assert "image_bytes" not in got["text"] and "pixels" not in got["text"]  # media bytes stay in the input
    manifest = read_manifest(tmp_path / "out")
    assert manifest["rows"] == len(got) and manifest["errors"] == len(bad)
    assert (tmp_path / "out" / "_q3vl" / "calibration.json").read_text() == calib.read_text()


def test_ray_tensor_images_equal_the_files(ray_session, tiny_embedding_bundle, corpus):
    """Arrays from an upstream Ray stage (a Ray tensor column, as `read_images` makes) through
    `embed_stage`: each equals `Embedder.process` of the image's file."""
    from q3vl.ray.job import embed_stage

    files = [corpus / "media" / f"frame{i}.png" for i in range(3)]  # one size: a fixed-shape tensor column
    ds = ray.data.from_items([{"name": f.name, "image": pixels(f)} for f in files])
    got = embed_stage(ds, tiny_embedding_bundle, rows_per_call=2, dim=16).to_pandas()
    with Embedder(tiny_embedding_bundle) as emb:
        want = emb.process([{"image": str(f)} for f in files], dim=16)
    by = {r["name"]: np.asarray(r["embedding"], np.float32) for _, r in got.iterrows()}
    assert np.abs(np.stack([by[f.name] for f in files]) - want).max() <= 1e-6
    assert (got["error"] == "").all() and list(got.columns[:2]) == ["name", "image"]


def test_decode_stage_then_embed_equals_the_files(tiny_embedding_bundle, corpus, tmp_path):
    """`DecodeImages` (CPU stage) -> `EmbedBatch`: the pixels arrive at their final size and every
    embedding equals `Embedder.process` of the file; a decode failure is that row's error."""
    from PIL import Image

    from q3vl.ray.decode import DecodeImages

    big = tmp_path / "big.png"
    gradient_image(300, 420, seed=7).save(big)  # over max_pixels: the decode stage really resizes
    limits = {"min_pixels": 1024, "max_pixels": 128 * 128}
    batch = pa.table({"image": pa.array([str(big), "media/img0.png", None, "media/nope.png", None], pa.string()),
                      "image_bytes": pa.array([None, None, (corpus / "media/img2.png").read_bytes(), None, None]),
                      "text": [None, "caption", None, None, "only text"]})
    cmap = ColumnMap(image=("image", "image_bytes"))
    decoded = DecodeImages(tiny_embedding_bundle, columns=cmap, base_dir=str(corpus), **limits)(batch)
    h, w = decoded.column("_q3vl_shape_image").to_pylist()[0][:2]
    assert h * w <= 128 * 128 and (h, w) != Image.open(big).size[::-1]
    assert "nope.png" in decoded.column("error").to_pylist()[3]
    out = EmbedBatch(tiny_embedding_bundle, columns=cmap, base_dir=str(corpus), **limits)(decoded)
    assert not [c for c in out.column_names if c.startswith("_q3vl")]
    got = out.column("embedding").to_pylist()
    with Embedder(tiny_embedding_bundle, **limits) as emb:
        want = emb.process([{"image": str(big)}, {"image": str(corpus / "media/img0.png"), "text": "caption"},
                            {"image": str(corpus / "media/img2.png")}, {"text": "only text"}])
    assert np.abs(np.array([got[0], got[1], got[2], got[4]]) - want).max() <= 1e-6
    assert got[3] is None and "nope.png" in out.column("error").to_pylist()[3]


def test_embed_batch_alone_keeps_columns_and_prior_errors(tiny_embedding_bundle, corpus):
    """The callable outside Ray (as a map_batches actor calls it): input columns pass through, an
    earlier stage's `error` is kept and that row is not run."""
    stage = EmbedBatch(tiny_embedding_bundle, base_dir=str(corpus))
    batch = pa.table({"text": ["one", "two", None], "extra": [1, 2, 3], "error": ["", "decode failed", ""]})
    out = stage(batch)
    assert out.column_names == ["text", "extra", "embedding", "tokens", "error"]
    assert out.column("extra").to_pylist() == [1, 2, 3]
    assert out.column("error").to_pylist()[:2] == ["", "decode failed"]
    assert "no text, image or video" in out.column("error").to_pylist()[2]
    with Embedder(tiny_embedding_bundle) as emb:
        want = emb.process([{"text": "one"}])
    assert np.abs(np.array(out.column("embedding").to_pylist()[0]) - want[0]).max() <= 1e-6
    assert out.column("embedding").to_pylist()[1:] == [None, None]


def test_rerank_batch_on_ray_equals_process(ray_session, tiny_reranker_bundle, corpus):
    img = str(corpus / "media" / "img0.png")
    rows = [
        {"query": "a dog", "text": "a puppy on grass", "image": None},
        {"query": "a dog", "text": None, "image": "media/img1.png"},
        {"query": "a cat", "text": "kitten", "image": None},
        {"query": "a dog", "text": None, "image": "media/nope.png"},  # a bad document
        {"query": "a cat", "text": "tabby", "image": img},
        {"query": None, "text": "no query", "image": None},  # a bad query
    ]
    ds = ray.data.from_items(rows).map_batches(
        RerankBatch, fn_constructor_args=(str(tiny_reranker_bundle),),
        fn_constructor_kwargs={"base_dir": str(corpus), "batch_size": 2}, batch_size=6, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=1))
    got = ds.to_pandas().to_dict("records")
    assert len(got) == len(rows)
    by = {(r["query"], r["text"], r["image"]): r for r in got}
    with Reranker(tiny_reranker_bundle) as rr:
        dog = rr.process({"query": {"text": "a dog"},
                          "documents": [{"text": "a puppy on grass"}, {"image": str(corpus / "media/img1.png")}]})
        cat = rr.process({"query": {"text": "a cat"},
                          "documents": [{"text": "kitten"}, {"text": "tabby", "image": img}]})
    pairs = [(("a dog", "a puppy on grass", None), dog[0]), (("a dog", None, "media/img1.png"), dog[1]),
             (("a cat", "kitten", None), cat[0]), (("a cat", "tabby", img), cat[1])]
    for key, score in pairs:
        assert abs(by[key]["score"] - score) <= 1e-5 and by[key]["error"] == "" and by[key]["tokens"] > 0
    assert "nope.png" in by[("a dog", None, "media/nope.png")]["error"]
    assert "no text, image or video" in by[(None, "no query", None)]["error"]
    bad_score = by[(None, "no query", None)]["score"]
    assert bad_score is None or np.isnan(bad_score)  # null (pandas may show it as NaN)


def _descendants(root: int) -> list[int]:
    """Processes below `root` (this test's own Ray processes), from /proc."""
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parent[int(d)] = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
    out, frontier = [], [root]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier]
        out += kids
        frontier = kids
    return out


def _kill_embed_actor_after_first_shard(out: Path, killed: list[int], stop: threading.Event) -> None:
    while not stop.is_set() and not list(out.glob("part-*.parquet")):
        time.sleep(0.05)
    for pid in _descendants(os.getpid()):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"EmbedBatch" in title:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            return


def test_a_killed_worker_changes_nothing(ray_session, tiny_embedding_bundle, tmp_path):
    lines = [f'{{"id": "r{i}", "text": "row {i} {"word " * (i % 7)}"}}' for i in range(240)]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    killed: list[int] = []
    stop = threading.Event()
    watcher = threading.Thread(target=_kill_embed_actor_after_first_shard, args=(tmp_path / "out", killed, stop))
    watcher.start()
    try:
        embed_corpus(tmp_path / "in.jsonl", tmp_path / "out", tiny_embedding_bundle, rows_per_call=8,
                     rows_per_shard=16, batch_size=4, progress=False)
    finally:
        stop.set()
        watcher.join()
    assert killed, "the embedding actor was not found to kill"
    got = read_output(tmp_path / "out")
    assert sorted(got) == sorted(f"r{i}" for i in range(240))
    with Embedder(tiny_embedding_bundle) as emb:
        want = emb.process([{"text": f"row {i} {'word ' * (i % 7)}"} for i in range(240)])
    assert np.abs(np.array([got[f"r{i}"]["embedding"] for i in range(240)]) - want).max() <= 1e-6


def test_rerank_batch_query_that_fails_to_load_fails_only_its_rows(tiny_reranker_bundle, tmp_path):
    """A query image whose header reads but whose pixels do not: its rows carry the query's error,
    the other query's rows sharing the micro-batch are scored as `process()` scores them.
    """
    import io

    from PIL import Image

    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    (tmp_path / "broken.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) * 2 // 3])
    table = pa.table({"query": ["q1", "a dog", "q1", "a dog"], "query_image": ["broken.png", None, "broken.png", None],
                      "text": ["a", "a puppy", "b", "tax forms"]})
    out = RerankBatch(str(tiny_reranker_bundle), base_dir=str(tmp_path), batch_size=4)(table).to_pylist()
    with Reranker(tiny_reranker_bundle) as rr:
        want = rr.process({"query": {"text": "a dog"}, "documents": [{"text": "a puppy"}, {"text": "tax forms"}]})
    for i in (0, 2):
        assert out[i]["score"] is None and out[i]["error"].startswith("query:"), out[i]
    for i, w in ((1, want[0]), (3, want[1])):
        assert out[i]["error"] == "" and abs(out[i]["score"] - w) <= 1e-5, out[i]
