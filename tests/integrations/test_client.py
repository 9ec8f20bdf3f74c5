"""The remote client every integration shares: request splitting, errors named by the caller's index,
authentication, and the bounded retry of a full or warming-up server.
"""

from __future__ import annotations

import http.server
import json
import threading

import numpy as np
import pytest

from q3vl.errors import AuthenticationError, BackendError, ConfigError, InputError, UnavailableError
from q3vl.integrations.client import Client
from q3vl.integrations.models import embedding_model
from q3vl.testing.inputs import gradient_image
from tests.integrations.conftest import API_KEY, close


def test_requests_are_split_and_an_error_names_the_callers_index(server, offline, media):
    items = [{"text": f"text {i}"} for i in range(5)] + [{"image": str(media / "photo.png")}]
    client = Client(server.base + "/v1", API_KEY, "emb", batch_size=2, max_request_bytes=4096)
    close(client.embed(items), offline[0].process(items))  # 2 + 2 + 1 + the image alone (over 4 KiB)
    bad = [*items[:4], {"image": str(media / "bad.png")}, items[5]]
    with pytest.raises(InputError, match=r"^input 4: .*corrupt image .*inputs\[0\].*data: URIs of .*bad\.png") as e:
        client.embed(bad)
    assert e.value.index == 4
    with pytest.raises(InputError, match=r"^input 1: a video given as a list of frames cannot be sent"):
        client.embed([{"text": "ok"}, {"video": [gradient_image(32, 32), gradient_image(32, 32, seed=1)]}])
    reranker = Client(server.base, API_KEY, "rr", batch_size=2)
    docs = [{"text": f"doc {i}"} for i in range(5)]
    close(reranker.rerank({"text": "a cat"}, docs), offline[1].process({"query": {"text": "a cat"}, "documents": docs}))


def test_keys_urls_and_unreachable_servers(server, tiny_embedding_bundle):
    with pytest.raises(AuthenticationError, match="invalid API key.*set Q3VL_API_KEY"):
        Client(server.base, "wrong").embed([{"text": "x"}])
    with pytest.raises(AuthenticationError, match="missing API key"):
        Client(server.base, "").embed([{"text": "x"}])
    assert "wrong" not in repr(Client(server.base, "wrong"))
    with pytest.raises(ConfigError, match="url must be an http"):
        Client("ftp://example.org")
    with pytest.raises(ConfigError, match="exactly one of bundle="):
        embedding_model(tiny_embedding_bundle, server.base)
    with pytest.raises(ConfigError, match="refused the request: .*model"):
        Client(server.base, API_KEY, "no-such-model").embed([{"text": "x"}])
    dead = Client(f"http://127.0.0.1:{_closed_port()}", timeout=5)
    with pytest.raises(BackendError, match="could not be used"):
        dead.embed([{"text": "x"}])


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Busy(http.server.BaseHTTPRequestHandler):
    """Answers 503 (Retry-After: 0) `busy` times, then one embedding."""

    busy = 0
    seen = 0

    def do_POST(self):
        type(self).seen += 1
        self.rfile.read(int(self.headers["Content-Length"]))
        if type(self).seen <= type(self).busy:
            body, status = {"error": {"message": "loading", "type": "x", "param": None, "code": None}}, 503
        else:
            body, status = {"embeddings": {"float": [[0.6, 0.8]]}}, 200
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Retry-After", "0")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("busy, retries, ok", [(2, 3, True), (3, 2, False)])
def test_a_warming_up_server_is_retried_a_bounded_number_of_times(busy, retries, ok):
    handler = type("Busy", (_Busy,), {"busy": busy, "seen": 0})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        client = Client(f"http://127.0.0.1:{httpd.server_address[1]}", retries=retries)
        if ok:
            assert np.array_equal(client.embed([{"text": "x"}]), np.array([[0.6, 0.8]], np.float32))
        else:
            with pytest.raises(UnavailableError, match="unavailable: loading"):
                client.embed([{"text": "x"}])
        assert handler.seen == min(busy + 1, retries + 1)
    finally:
        httpd.shutdown()
        httpd.server_close()
