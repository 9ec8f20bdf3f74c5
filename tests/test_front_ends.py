"""One item, one vector, through every front end (issue 20): the same JSONL file through
`Embedder.process`, `q3vl embed`, a real `q3vl serve` process (OpenAI `input`, vLLM `messages` and
Cohere `inputs`) and `q3vl embed-dataset` on a local Ray; the same documents through
`Reranker.process`, `q3vl rerank`, `/v1/rerank` and `RerankBatch`. Every good item gives the same
vector (cosine >= 0.999999) or score and the same token count; the bad item the same error text.

`Embedder.process_details` is the oracle. The HTTP APIs have no way to send a video as a list of
frames (a `video_url` is one file), so the frame-list item is the one item they do not carry; every
other item goes through every form that can express it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from q3vl.testing.inputs import gradient_image, write_video
from tests.serve_server import ROOT, Server, request

FRAMES = [f"frames/f{i}.png" for i in range(4)]
ITEMS = [
    {"id": "text", "text": "a red bicycle leaning on a wall"},
    {"id": "text-instruction", "text": "a red bicycle", "instruction": "Find the product photo"},
    {"id": "texts", "text": ["first caption", "second caption"]},
    {"id": "image", "image": "small.png"},
    {"id": "big-budget", "image": "big.png", "max_pixels": 65536},  # the 800x600 PNG embed-dataset ignored
    {"id": "big", "image": "big.png"},
    {"id": "grown", "image": "small.png", "min_pixels": 32768, "max_pixels": 65536},
    {"id": "video", "video": "clip.mp4", "fps": 4, "max_frames": 6},
    {"id": "video-default", "video": "clip.mp4"},
    {"id": "frames", "video": FRAMES, "total_pixels": 60000},
    {"id": "mixed", "text": "a bicycle", "image": "wide.png"},
    {"id": "mixed-options", "text": "caption", "image": "wide.png", "instruction": "Match the photo",
     "max_pixels": 40000},
    {"id": "missing", "image": "missing.png"},
]
QUERY = {"text": "a red bicycle", "image": "small.png", "instruction": "Find the matching picture",
         "max_pixels": 65536, "fps": 2, "max_frames": 4}
DOCS = [
    {"id": "d-text", "text": "a bicycle"},
    {"id": "d-texts", "text": ["one part", "another part"]},
    {"id": "d-image", "image": "small.png"},
    {"id": "d-big", "image": "big.png"},
    {"id": "d-wide", "image": "wide.png"},
    {"id": "d-video", "video": "clip.mp4"},
    {"id": "d-frames", "video": FRAMES},
    {"id": "d-mixed", "text": "caption", "image": "wide.png"},
    {"id": "d-mixed-big", "text": "a bike", "image": "big.png"},
    {"id": "d-long", "text": "word " * 60},
    {"id": "d-other", "text": "an unrelated sentence about soup"},
    {"id": "d-missing", "image": "missing.png"},
]
NOT_OVER_HTTP = {"frames", "d-frames"}  # a frame-list video has no HTTP form


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("front-ends").resolve()  # the server resolves paths with realpath
    gradient_image(600, 800, seed=1).save(d / "big.png")  # 800x600
    gradient_image(48, 64, seed=2).save(d / "small.png")
    gradient_image(90, 240, seed=3).save(d / "wide.png")
    write_video(d / "clip.mp4", frames=24, width=160, height=96, fps=8)
    (d / "frames").mkdir()
    for i in range(4):
        gradient_image(80, 112, seed=10 + i).save(d / f"frames/f{i}.png")
    (d / "items.jsonl").write_text("".join(json.dumps(it) + "\n" for it in ITEMS))
    (d / "docs.jsonl").write_text("".join(json.dumps(it) + "\n" for it in DOCS))
    (d / "query.json").write_text(json.dumps(QUERY))
    return d


def absolute(item: dict, base: Path) -> dict:
    """`item` as a Python caller writes it: media paths joined to the corpus directory, no id."""
    out = {k: v for k, v in item.items() if k != "id"}
    for key in ("image", "video"):
        if key in out:
            out[key] = [str(base / v) for v in out[key]] if isinstance(out[key], list) else str(base / out[key])
    return out


@pytest.fixture(scope="module")
def oracle(tiny_embedding_bundle, tiny_reranker_bundle, corpus):
    """Embedder/Reranker.process_details: vectors, scores, token counts and error texts by id."""
    from q3vl.runtime import Embedder, Reranker

    with Embedder(tiny_embedding_bundle) as emb:
        e = emb.process_details([absolute(it, corpus) for it in ITEMS], on_error="skip")
    options = {k: v for k, v in QUERY.items() if k not in ("text", "image")}
    with Reranker(tiny_reranker_bundle) as rr:
        r = rr.process_details({"query": absolute({"text": QUERY["text"], "image": QUERY["image"]}, corpus),
                                "documents": [absolute(d, corpus) for d in DOCS], **options}, on_error="skip")
    emb_out = {it["id"]: (e.values[k], int(e.tokens[k]), e.errors[k].reason if k in e.errors else None)
               for k, it in enumerate(ITEMS)}
    rr_out = {d["id"]: (r.values[k], int(r.tokens[k]), r.errors[k].reason if k in r.errors else None)
              for k, d in enumerate(DOCS)}
    return emb_out, rr_out


def test_the_oracle_is_not_vacuous(oracle, corpus):
    emb, rr = oracle
    assert [i for i, (_, _, err) in emb.items() if err] == ["missing"]
    assert [i for i, (_, _, err) in rr.items() if err] == ["d-missing"]
    assert emb["missing"][2] == f"image file not found: {corpus / 'missing.png'}"
    # per-item options change the result: max_pixels shrinks the 800x600 PNG, min_pixels grows a small one
    assert emb["big-budget"][1] < emb["big"][1] and emb["grown"][1] > emb["image"][1]
    assert emb["video"][1] > emb["video-default"][1] and emb["text-instruction"][1] != emb["text"][1]


def same(got: dict, want: dict, names: list[str] | None = None) -> None:
    """Vectors (or scores), token counts and error texts equal the oracle's, item by item."""
    for name in names or list(got):
        g, w = got[name], want[name]
        assert g[2] == w[2], (name, g[2], w[2])
        if w[2] is not None:
            continue
        assert g[1] == w[1], (name, "tokens", g[1], w[1])
        a, b = np.asarray(g[0], np.float64), np.asarray(w[0], np.float64)
        if a.ndim:
            cos = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
            assert cos >= 0.999999 and np.abs(a - b).max() <= 1e-5, (name, cos)
        else:
            assert abs(float(a) - float(b)) <= 1e-5, (name, float(a), float(b))


def q3vl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "q3vl", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)


def skipped(stderr: str, name: str) -> str | None:
    """The error a command reported for item `name` (its 'skipped ... (id NAME): reason' line)."""
    for line in stderr.splitlines():
        if f"(id {name!r}): " in line and "skipped" in line:
            return line.split(f"(id {name!r}): ", 1)[1]
    return None


def test_q3vl_embed_and_rerank_equal_process(tiny_embedding_bundle, tiny_reranker_bundle, corpus, oracle, tmp_path):
    r = q3vl("embed", str(tiny_embedding_bundle), str(corpus / "items.jsonl"), "-o", str(tmp_path / "e.jsonl"),
             "--on-error", "skip", "--no-progress")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in (tmp_path / "e.jsonl").read_text().splitlines()]
    same({row["id"]: (row["embedding"], row["tokens"], skipped(r.stderr, row["id"])) for row in rows}, oracle[0])
    r = q3vl("rerank", str(tiny_reranker_bundle), str(corpus / "query.json"), str(corpus / "docs.jsonl"),
             "-o", str(tmp_path / "r.jsonl"), "--on-error", "skip", "--no-progress")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    same({row["id"]: (row["score"], row["tokens"], skipped(r.stderr, row["id"])) for row in rows}, oracle[1])


# ---------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def server(tiny_embedding_bundle, tiny_reranker_bundle, corpus, tmp_path_factory):
    srv = Server(["--embedding", str(tiny_embedding_bundle), "--reranker", str(tiny_reranker_bundle),
                  "--media-root", str(corpus)], tmp_path_factory.mktemp("front-ends-log"))
    srv.wait_ready()
    yield srv
    assert srv.stop() == 0, srv.log()


def parts(item: dict) -> list[dict]:
    """An item's content as OpenAI/vLLM/Cohere content parts (paths relative to the media root)."""
    out = []
    for t in [item["text"]] if isinstance(item.get("text"), str) else item.get("text", []):
        out.append({"type": "text", "text": t})
    for x in [item["image"]] if isinstance(item.get("image"), str) else item.get("image", []):
        out.append({"type": "image_url", "image_url": {"url": x}})
    if "video" in item:
        out.append({"type": "video_url", "video_url": {"url": item["video"]}})
    return out


def options(item: dict) -> dict:
    return {k: v for k, v in item.items() if k not in ("id", "text", "image", "video")}


def answer(status: int, body: dict, vector: object, tokens: int) -> tuple:
    if status == 400:
        return None, 0, body["error"]["message"]
    assert status == 200, body
    return vector, tokens, None


def test_server_openai_vllm_and_cohere_forms_equal_process(server, oracle):
    by_form: dict[str, dict] = {"openai": {}, "vllm": {}, "cohere": {}}
    for item in ITEMS:
        name = item["id"]
        if name in NOT_OVER_HTTP:
            continue
        if isinstance(item.get("text"), str) and set(item) <= {"id", "text", "instruction"}:
            s, _, b = request(server.base, "POST", "/v1/embeddings", {"input": [item["text"]], **options(item)})
            by_form["openai"][name] = answer(s, b, b.get("data", [{}])[0].get("embedding"),
                                             b.get("usage", {}).get("prompt_tokens"))
        system = [{"role": "system", "content": item["instruction"]}] if "instruction" in item else []
        vllm_options = {k: v for k, v in options(item).items() if k != "instruction"}
        s, _, b = request(server.base, "POST", "/v1/embeddings",
                          {"messages": [*system, {"role": "user", "content": parts(item)}], **vllm_options})
        by_form["vllm"][name] = answer(s, b, b.get("data", [{}])[0].get("embedding"),
                                       b.get("usage", {}).get("prompt_tokens"))
        s, _, b = request(server.base, "POST", "/v2/embed",
                          {"inputs": [{"content": parts(item), **options(item)}], "embedding_types": ["float"]})
        by_form["cohere"][name] = answer(s, b, b.get("embeddings", {}).get("float", [None])[0],
                                         b.get("meta", {}).get("billed_units", {}).get("input_tokens"))
    assert sorted(by_form["openai"]) == ["text", "text-instruction"]
    assert len(by_form["vllm"]) == len(by_form["cohere"]) == len(ITEMS) - 1
    for got in by_form.values():
        same(got, oracle[0])


def test_server_rerank_equals_process(server, oracle):
    query = {"content": parts(QUERY)}
    got = {}
    for doc in DOCS:
        if doc["id"] in NOT_OVER_HTTP:
            continue
        d = doc["text"] if set(doc) == {"id", "text"} and isinstance(doc["text"], str) else {"content": parts(doc)}
        s, _, b = request(server.base, "POST", "/v1/rerank", {"query": query, "documents": [d], **options(QUERY)})
        got[doc["id"]] = answer(s, b, b.get("results", [{}])[0].get("relevance_score"),
                                b.get("usage", {}).get("prompt_tokens"))
    assert len(got) == len(DOCS) - 1
    same(got, oracle[1])


# ---------------------------------------------------------------- dataset front ends
def rerank_table(corpus: Path):
    """The documents as dataset rows, each with the query's columns (the `RerankBatch` defaults)."""
    pa = pytest.importorskip("pyarrow")
    n = len(DOCS)
    texts = [None if "text" not in d else [d["text"]] if isinstance(d["text"], str) else d["text"] for d in DOCS]
    return pa.table({
        "id": [d["id"] for d in DOCS],
        "query": [QUERY["text"]] * n, "query_image": [QUERY["image"]] * n,
        "instruction": [QUERY["instruction"]] * n, "max_pixels": [QUERY["max_pixels"]] * n,
        "fps": [float(QUERY["fps"])] * n, "max_frames": [QUERY["max_frames"]] * n,
        "text": pa.array(texts, pa.list_(pa.string())),
        "image": [d.get("image") for d in DOCS],
        "video": [d["video"] if isinstance(d.get("video"), str) else None for d in DOCS],
        "frames": pa.array([d["video"] if isinstance(d.get("video"), list) else None for d in DOCS],
                           pa.list_(pa.string()))})


def rerank_rows(rows: list[dict]) -> dict:
    return {r["id"]: (r["score"], r["tokens"], r["error"] or None) for r in rows}


def test_rerank_batch_equals_process(tiny_reranker_bundle, corpus, oracle):
    """`RerankBatch` as a `map_batches` actor calls it, on the documents as dataset rows."""
    pytest.importorskip("pyarrow")
    from q3vl.ray import ColumnMap, RerankBatch

    stage = RerankBatch(str(tiny_reranker_bundle), base_dir=str(corpus),
                        document=ColumnMap.content_only(video=("video", "frames")))
    same(rerank_rows(stage(rerank_table(corpus)).to_pylist()), oracle[1])


@pytest.mark.ray
def test_embed_dataset_and_rerank_batch_on_ray_equal_process(tiny_embedding_bundle, tiny_reranker_bundle, corpus,
                                                             oracle, tmp_path):
    ray = pytest.importorskip("ray")
    from q3vl.ray import ColumnMap, RerankBatch
    from q3vl.ray.store import iter_shards

    r = q3vl("embed-dataset", str(corpus / "items.jsonl"), "-o", str(tmp_path / "out"), "--bundle",
             str(tiny_embedding_bundle), "--num-cpus", "2", "--no-progress")
    assert r.returncode == 0, r.stderr
    rows = [row for t in iter_shards(tmp_path / "out") for row in t.to_pylist()]
    assert sorted(row["id"] for row in rows) == sorted(it["id"] for it in ITEMS)
    same({row["id"]: (row["embedding"], row["tokens"], row["error"] or None) for row in rows}, oracle[0])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ds = ray.data.from_arrow(rerank_table(corpus)).map_batches(
            RerankBatch, fn_constructor_args=(str(tiny_reranker_bundle),),
            fn_constructor_kwargs={"base_dir": str(corpus),
                                   "document": ColumnMap.content_only(video=("video", "frames"))},
            batch_size=len(DOCS), batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=1))
        same(rerank_rows(ds.to_pandas().to_dict("records")), oracle[1])
    finally:
        ray.shutdown()
