"""32 concurrent clients with mixed text/image/video items against one real server: every result equals
the offline runtime's, batches held items of several requests, and a disconnected client's queued
items were dropped.
"""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from q3vl.runtime import Embedder, Reranker
from q3vl.testing.inputs import gradient_image, write_video
from tests.conftest import noise_image
from tests.serve_server import Server, data_uri, metric, request

CLIENTS = 32


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve-conc")
    write_video(d / "clip.mp4", frames=16, width=128, height=96, fps=8)
    gradient_image(64, 96, seed=1).save(d / "photo.png")
    return d


@pytest.fixture(scope="module")
def server(tiny_embedding_bundle, tiny_reranker_bundle, media, tmp_path_factory):
    srv = Server(["--embedding", str(tiny_embedding_bundle), "--reranker", str(tiny_reranker_bundle),
                  "--media-root", str(media), "--batch-size", "8"], tmp_path_factory.mktemp("serve-log"))
    srv.wait_ready()
    yield srv
    assert srv.stop() == 0, srv.log()


def client_request(k: int):
    """Client k's request body and the offline items it stands for (paths relative to the media root)."""
    img = noise_image(48 + 8 * (k % 4), 64, seed=k)
    parts = [[{"type": "text", "text": f"client {k} says hello"}],
             [{"type": "image_url", "image_url": {"url": data_uri(img)}}, {"type": "text", "text": f"img {k}"}],
             [{"type": "video_url", "video_url": {"url": "clip.mp4"}}],
             [{"type": "image_url", "image_url": {"url": "photo.png"}}]]
    chosen = [parts[(k + j) % 4] for j in range(1 + k % 3)]
    if k % 4 == 3:  # a quarter of the clients rerank
        body = {"query": f"query {k}", "documents": [f"doc {k}", {"content": chosen[0]}]}
        return "/v1/rerank", body
    return "/v2/embed", {"inputs": [{"content": c} for c in chosen], "input_type": "search_document"}


def offline_item(parts, media, images):
    item = {}
    for p in parts:
        if p["type"] == "text":
            item.setdefault("text", []).append(p["text"])
        elif p["type"] == "video_url":
            item["video"] = str(media / p["video_url"]["url"])
        else:
            url = p["image_url"]["url"]
            item.setdefault("image", []).append(images[url] if url.startswith("data:") else str(media / url))
    return item


def test_32_concurrent_clients_match_offline(server, media, tiny_embedding_bundle, tiny_reranker_bundle):
    before = request(server.base, "GET", "/metrics")[2]
    bodies = [client_request(k) for k in range(CLIENTS)]
    with ThreadPoolExecutor(CLIENTS) as pool:
        results = list(pool.map(lambda pb: request(server.base, "POST", *pb), bodies))
    assert all(status == 200 for status, _, _ in results), [r for r in results if r[0] != 200][:2]
    images = {}
    for k in range(CLIENTS):
        img = noise_image(48 + 8 * (k % 4), 64, seed=k)
        images[data_uri(img)] = img
    with Embedder(tiny_embedding_bundle) as emb, Reranker(tiny_reranker_bundle) as rr:
        for (path, body), (_, _, res) in zip(bodies, results):
            if path == "/v2/embed":
                want = emb.process_details([offline_item(i["content"], media, images) for i in body["inputs"]])
                got = np.asarray(res["embeddings"]["float"])
                assert res["meta"]["billed_units"]["input_tokens"] == want.total_tokens
            else:
                doc = body["documents"][1]["content"]
                want = rr.process_details({"query": {"text": body["query"]},
                                           "documents": [{"text": body["documents"][0]},
                                                         offline_item(doc, media, images)]})
                got = np.asarray(sorted(res["results"], key=lambda r: r["index"]), dtype=object)
                got = np.asarray([r["relevance_score"] for r in got])
            assert np.abs(got - np.asarray(want.values)).max() <= 1e-6
    after = request(server.base, "GET", "/metrics")[2]
    for model in ("embedding", "reranker"):
        batches = metric(after, "q3vl_batch_requests_count", model=model) - metric(
            before, "q3vl_batch_requests_count", model=model)
        alone = metric(after, "q3vl_batch_requests_bucket", model=model, le="1.0") - metric(
            before, "q3vl_batch_requests_bucket", model=model, le="1.0")
        assert batches > alone, (model, batches, alone)  # some micro-batch held more than one request


def test_disconnected_client_items_are_dropped(server):
    busy = {"input": [f"keep the model busy {i}" for i in range(120)], "encoding_format": "float"}
    victim = json.dumps({"input": [f"nobody will read this {i}" for i in range(120)]}).encode()
    before = metric(request(server.base, "GET", "/metrics")[2], "q3vl_failed_items_total", model="embedding",
                    reason="disconnected")
    with ThreadPoolExecutor(1) as pool:
        kept = pool.submit(request, server.base, "POST", "/v1/embeddings", busy)
        time.sleep(0.05)
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
            s.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      + f"Content-Length: {len(victim)}\r\n\r\n".encode() + victim)
            time.sleep(0.05)  # gone before (or just after) its items are queued: they must not run
        assert kept.result()[0] == 200
    end = time.monotonic() + 30
    while time.monotonic() < end:
        text = request(server.base, "GET", "/metrics")[2]
        dropped = metric(text, "q3vl_failed_items_total", model="embedding", reason="disconnected") - before
        if dropped > 0:
            break
        time.sleep(0.1)
    assert 0 < dropped <= 120
