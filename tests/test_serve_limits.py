"""What a rejected body costs, strict numeric fields and `/ready` without the key, on a real `q3vl serve`.

A 100,000-element list is refused by its length (413 naming it) before any element is validated, an
object with more keys than fields is refused whole, and a schema error count stays small whatever
the body holds.
"""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tests.serve_server import Server, request

KEY = "limits-key"
AUTH = {"authorization": f"Bearer {KEY}"}
MAX_BODY = 1 << 20


@pytest.fixture(scope="module")
def server(tiny_embedding_bundle, tiny_reranker_bundle, tmp_path_factory):
    srv = Server(["--embedding", str(tiny_embedding_bundle), "--reranker", str(tiny_reranker_bundle),
                  "--api-key", KEY, "--max-client-batch-size", "8", "--max-request-bytes", str(MAX_BODY)],
                 tmp_path_factory.mktemp("limits-log"), headers=AUTH)
    srv.wait_ready()
    yield srv
    srv.stop()


# ---------------------------------------------------------------- probes and validation
def test_ready_answers_without_the_api_key(server):
    assert request(server.base, "GET", "/ready")[0] == 200
    assert request(server.base, "GET", "/v1/models")[0] == 401


NUMBERS = [("/v1/embeddings", {"input": "x"}, ["dimensions", "max_frames", "min_pixels", "max_pixels",
                                               "total_pixels"], ["fps"], ["normalize"]),
           ("/v2/embed", {"texts": ["x"]}, ["max_tokens", "output_dimension", "priority"], [], []),
           ("/v1/rerank", {"query": "q", "documents": ["d"]}, ["top_n", "max_tokens_per_doc", "priority"], [],
            ["return_documents"])]


def test_numeric_fields_are_strict(server):
    for path, base, ints, floats, bools in NUMBERS:
        cases = [(f, v) for f in ints for v in (True, "5", 2.0)] + [(f, v) for f in floats for v in (True, "2")]
        cases += [(f, v) for f in bools for v in (0, "false")]
        for name, value in cases:
            status, _, body = request(server.base, "POST", path, {**base, name: value}, headers=AUTH)
            assert status == 400 and body["error"]["param"] == name, (path, name, value, body)
    status, _, body = request(server.base, "POST", "/v1/embeddings", {"input": "x", "fps": 2, "dimensions": 4},
                              headers=AUTH)  # an integer is a fine float
    assert status == 200 and len(body["data"][0]["embedding"]) == 4, body


def test_rejected_bodies_are_refused_whole(server):
    invalid = b'{"query": "q", "documents": [' + b",".join([b"1"] * 100_000) + b"]}"  # 200 KB
    status, _, body = request(server.base, "POST", "/v1/rerank", raw=invalid, headers=AUTH)
    assert status == 413 and body["error"]["param"] == "documents" and "100000" in body["error"]["message"]
    keys = ('{"input": "x", ' + ",".join(f'"k{i}": 0' for i in range(20_000)) + "}").encode()  # over 1024 x 8 keys
    status, _, body = request(server.base, "POST", "/v1/embeddings", raw=keys, headers=AUTH)
    assert status == 400 and "20001 fields" in body["error"]["message"], body
    few = {"input": "x", **{f"k{i}": 0 for i in range(40)}}
    status, _, body = request(server.base, "POST", "/v1/embeddings", few, headers=AUTH)
    assert status == 400 and "41 fields" in body["error"]["message"] and "k0" in body["error"]["message"], body


def test_schema_errors_stay_few_whatever_the_body():
    from q3vl.serve.schemas import EmbeddingRequest, EmbedV2Request, RerankRequest

    bodies = [(RerankRequest, {"query": "q", "documents": [1] * 100_000}),
              (EmbeddingRequest, {"input": "x", **{f"k{i}": 0 for i in range(100_000)}}),
              (EmbedV2Request, {"inputs": [{"content": [{"type": "audio"}] * 256}] * 128}),
              (EmbedV2Request, {"inputs": [{"content": [{"type": "text", "text": 1}] * 256, "x": 1}] * 128})]
    for model, body in bodies:
        with pytest.raises(ValidationError) as e:
            model.model_validate(body)
        assert e.value.error_count() <= 4, (model.__name__, e.value.error_count(), e.value.errors()[:3])
