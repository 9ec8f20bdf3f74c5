"""The runtime's public batch API (plan -> batches -> load -> run_batch) against process() and the reference."""

from __future__ import annotations

import random
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from q3vl.errors import InputError, QueryError
from q3vl.runtime import Details, Embedder, Loaded, Plan, Reranker
from q3vl.testing.inputs import gradient_image, write_video
from tests.conftest import noise_image


@pytest.fixture(scope="module")
def embedder(tiny_embedding_bundle):
    with Embedder(tiny_embedding_bundle) as model:
        yield model


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("batch-api")
    write_video(d / "clip.mp4", frames=16, width=160, height=96, fps=8)
    gradient_image(96, 128, seed=4).save(d / "photo.png")
    return d


def mixed_items(media: Path) -> list[dict]:
    return [
        {"text": "a short text"},
        {"text": "a longer text about retrieval and ranking " * 8},
        {"image": str(media / "photo.png")},
        {"text": "caption", "image": noise_image(64, 160, seed=2)},
        {"video": str(media / "clip.mp4"), "fps": 2},
        {"video": [gradient_image(64, 96, seed=i) for i in range(3)]},
        {"text": ["two", "texts"], "image": [noise_image(96, 96, 3), noise_image(64, 64, 4)]},
        {},
    ]


def test_any_grouping_of_micro_batches_equals_process(embedder, media):
    items = mixed_items(media)
    want = embedder.process(items)
    plans = embedder.plan(items)
    assert all(isinstance(p, Plan) for p in plans) and [p.index for p in plans] == list(range(len(items)))
    rng = random.Random(0)
    for trial in range(3):
        order = list(plans)
        rng.shuffle(order)
        got = np.full_like(want, np.nan)
        start = 0
        while start < len(order):  # random group sizes, in random order
            size = rng.randint(1, 4)
            loaded = embedder.load(order[start:start + size])
            assert all(isinstance(x, Loaded) for x in loaded)
            vecs = embedder.vectors(embedder.run_batch(loaded))
            for x, v in zip(loaded, vecs):
                got[x.plan.index] = v
            start += size
        assert np.abs(got - want).max() <= 1e-6, trial
    # the policy's own grouping, and Matryoshka on run_batch outputs
    batches = embedder.batches(plans)
    assert sorted(p.index for b in batches for p in b) == list(range(len(items)))
    small = embedder.process(items, dim=16)
    for batch in batches:
        out = embedder.vectors(embedder.run_batch(embedder.load(batch)), dim=16)
        assert np.abs(out - small[[p.index for p in batch]]).max() <= 1e-6


def test_token_counts_equal_the_reference_processor(embedder, ref_embedder, media):
    items = mixed_items(media)[:-1]  # the "NULL" item is compared in the next test
    details = embedder.process_details(items)
    assert isinstance(details, Details) and np.array_equal(details.values, embedder.process(items))
    pads = list(embedder.encoder.pad_ids)
    for i, item in enumerate(items):
        ref = ref_embedder.preprocess([item])
        ids = ref["input_ids"][0][ref["attention_mask"][0].bool()]
        assert details.tokens[i] == len(ids), (i, item)
        assert details.vision_tokens[i] == int(np.isin(ids.numpy(), pads).sum()), (i, item)
    assert details.total_tokens == int(details.tokens.sum()) and details.vision_tokens[0] == 0


def test_reranker_token_counts_and_shared_query(tiny_reranker_bundle, ref_reranker, media):
    rr = Reranker(tiny_reranker_bundle)
    query = {"text": "a photo", "image": str(media / "photo.png")}
    docs = [{"text": "a document"}, {"image": noise_image(64, 96)}, {"video": str(media / "clip.mp4")}]
    details = rr.process_details({"query": query, "documents": docs})
    for i, doc in enumerate(docs):
        conv = ref_reranker.format_pair(query, doc, None, None, None)
        assert details.tokens[i] == len(ref_reranker.tokenize_pair(conv)["input_ids"]), i
    assert details.values == rr.process({"query": query, "documents": docs})
    calls = []
    real = rr.encoder.load
    rr.encoder.load = lambda media_list: calls.append(len(media_list)) or real(media_list)
    try:
        plans = rr.plan({"query": query, "documents": docs})
        loaded = rr.load(plans)
    finally:
        del rr.encoder.load
    assert len({id(p.encoded.shared) for p in plans}) == 1 and plans[0].encoded.shared is not None
    assert sorted(calls) == [0, 1, 1, 1]  # the query's image once; then each document's media (none, 1, 1)
    assert np.allclose(rr.scores(rr.run_batch(loaded)), details.values, atol=1e-6)


def test_batch_api_returns_errors_instead_of_raising(embedder, media, tmp_path):
    noise_image(96, 96).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "broken.png").write_bytes(data[: len(data) // 2])  # a valid header: fails at decode, not plan
    items = [{"text": "ok"}, {"image": str(tmp_path / "missing.png")}, {"image": str(tmp_path / "broken.png")},
             {"text": 42}, {"image": noise_image(64, 64)}]
    plans = embedder.plan(items)
    assert [type(p).__name__ for p in plans] == ["Plan", "InputError", "Plan", "InputError", "Plan"]
    assert plans[1].index == 1 and plans[3].index == 3
    loaded = embedder.load([p for p in plans if isinstance(p, Plan)])
    bad = [x for x in loaded if isinstance(x, InputError)]
    assert len(bad) == 1 and bad[0].index == 2 and "corrupt image" in str(bad[0])
    out = embedder.run_batch([x for x in loaded if isinstance(x, Loaded)])
    assert out["sentence_embedding"].shape == (2, embedder.dim)
    details = embedder.process_details(items, on_error="skip")
    assert sorted(details.errors) == [1, 2, 3] and details.tokens[1] == 0 and details.tokens[0] > 0


def _bomb_png(path: Path, side: int = 30000) -> Path:
    """A 1-bit PNG of side x side zeros: ~110 KB on disk, over Pillow's decompression-bomb limit."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    comp = zlib.compressobj(9)
    row = b"\0" * (1 + (side + 7) // 8)
    body = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no str for you")

    __repr__ = __str__


def test_skip_mode_keeps_the_rest_whatever_raises(embedder, media, tmp_path, monkeypatch):
    bomb = _bomb_png(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 200_000
    (tmp_path / "notes.mp4").write_text("this is a text file, not a video\n" * 20)
    clip = (media / "clip.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(clip[:600])
    good = [{"text": "fine"}, {"image": noise_image(64, 64)}, {"text": "also fine", "image": str(media / "photo.png")}]
    clean = embedder.process(good)
    hostile = [{"image": str(bomb)}, {"text": "lone \ud83d surrogate"}, {"instruction": "bad \udfff", "text": "x"},
               {"video": str(tmp_path / "notes.mp4")}, {"video": str(tmp_path / "cut.mp4")},
               {"video": Unprintable()}, {"image": [Unprintable()]}, {"text": ["a", Unprintable()]}]
    for bad in hostile:
        items = [good[0], bad, good[1], good[2]]
        got = embedder.process(items, on_error="skip")
        assert np.isnan(got[1]).all(), bad
        assert np.abs(got[[0, 2, 3]] - clean).max() <= 1e-6, bad
        with pytest.raises(InputError) as err:
            embedder.process(items)
        assert err.value.index == 1 and str(err.value).startswith("input 1: ")

    # a decoder that raises an exception type nobody planned for is still that item's InputError
    import av

    real_open = av.open

    class OddContainer:
        """A real container whose decoder raises mid-stream, with an exception type nobody catches on purpose."""

        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def decode(self, *a, **kw):
            raise ZeroDivisionError("the decoder divided by zero")

        def demux(self, *a, **kw):  # seek-based sampling reads packets itself: the fault comes mid-stream there too
            for k, packet in enumerate(self.inner.demux(*a, **kw)):
                if k == 5:
                    raise ZeroDivisionError("the demuxer divided by zero")
                yield packet

    def odd_open(source, *a, **kw):  # the good items hold no video: every container opened is the odd one
        return OddContainer(real_open(source, *a, **kw))

    (tmp_path / "odd.mp4").write_bytes(clip)
    monkeypatch.setattr(av, "open", odd_open)
    got = embedder.process([good[0], {"video": str(tmp_path / "odd.mp4")}, good[1], good[2]], on_error="skip")
    assert np.isnan(got[1]).all() and np.abs(got[[0, 2, 3]] - clean).max() <= 1e-6


def test_bad_query_is_reported_as_the_query(tiny_reranker_bundle, tmp_path):
    rr = Reranker(tiny_reranker_bundle)
    docs = [{"text": "a"}, {"text": "b"}]
    for query in ({"image": str(tmp_path / "nope.png")}, {"text": "bad \ud800"}):
        for mode in ("raise", "skip"):
            with pytest.raises(QueryError, match="^query: "):
                rr.process({"query": query, "documents": docs}, on_error=mode)


def test_concurrent_batch_api_calls_are_identical(tiny_embedding_bundle, media):
    """8 threads x 50 mixed calls on one model through the batch API == one thread (issue 11)."""
    model = Embedder(tiny_embedding_bundle)
    pool_items = mixed_items(media)
    jobs = [[pool_items[(k + j) % len(pool_items)] for j in range(1 + k % 3)] for k in range(400)]

    def call(job: list[dict]) -> np.ndarray:
        plans = model.plan(job)
        out = np.full((len(job), model.dim), np.nan, np.float32)
        for batch in model.batches([p for p in plans if isinstance(p, Plan)]):
            loaded = [x for x in model.load(batch) if isinstance(x, Loaded)]
            for x, v in zip(loaded, model.vectors(model.run_batch(loaded))):
                out[x.plan.index] = v
        return out

    sequential = {}
    for job_id in {k % 24 for k in range(len(jobs))}:  # 24 distinct jobs, each run once alone
        sequential[job_id] = call(jobs[job_id])
    with ThreadPoolExecutor(8) as pool:
        threaded = list(pool.map(call, jobs))
    for k, got in enumerate(threaded):
        assert np.array_equal(got, sequential[k % 24]), k
    assert threading.active_count() < 40
    model.close()


def test_reranker_query_edge_cases_follow_the_wrapper(tiny_reranker_bundle, ref_reranker):
    rr = Reranker(tiny_reranker_bundle)
    docs = [{"text": "a document"}, {"text": "another"}]
    for request in ({"query": {"text": ("", "q")}, "documents": docs, "instruction": "Custom instruction"},
                    {"query": {"text": ("Tuple instruction", "q")}, "documents": docs, "instruction": "ignored"},
                    {"query": {"text": None}, "documents": docs}):
        got, want = rr.process(request), ref_reranker.process(request)
        assert len(got) == len(want) == 2 and np.abs(np.array(got) - np.array(want)).max() <= 1e-4, request
    assert rr.process({"query": {}, "documents": docs}) == [] == ref_reranker.process({"query": {}, "documents": docs})
