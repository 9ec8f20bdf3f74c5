"""The HTTP layer's limits on a real `q3vl serve` (loopback, raw sockets), and what a rejected body costs.

One server with short limits, so every wait is a second or a few: the head timeout and keep-alive,
the body deadline and minimum rate (408 and close), the budget for bodies being received (429),
a partial body dropped unparsed when its client leaves (499, never a 400), the connection cap
(the oldest idle connection goes; 503 when all are busy), the send watchdog (an unread response is
dropped), `/ready` without the API key, and strict numeric fields. Each socket loop has a deadline.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from pydantic import ValidationError

from q3vl.errors import ConfigError
from q3vl.serve.errors import RequestTooLargeError
from tests.serve_server import Server, metric, request

KEY = "limits-key"
AUTH = {"authorization": f"Bearer {KEY}"}
HEAD_TIMEOUT, KEEP_ALIVE, BODY_TIMEOUT, MIN_RATE, SEND_TIMEOUT = 1.5, 1.0, 7.0, 2000, 2.0
RATE_WINDOW = 5.0  # serve/config.py
MAX_CONNECTIONS, MAX_BODY, PENDING = 12, 1 << 20, 2 << 20
SLACK = 1.5  # seconds a shared 2-core machine may add to a timer


@pytest.fixture(scope="module")
def server(tiny_embedding_bundle, tiny_reranker_bundle, tmp_path_factory):
    srv = Server(["--embedding", str(tiny_embedding_bundle), "--reranker", str(tiny_reranker_bundle),
                  "--api-key", KEY, "--max-client-batch-size", "8", "--max-request-bytes", str(MAX_BODY),
                  "--header-timeout", str(HEAD_TIMEOUT), "--keep-alive-timeout", str(KEEP_ALIVE),
                  "--body-timeout", str(BODY_TIMEOUT), "--body-min-rate", str(MIN_RATE),
                  "--send-timeout", str(SEND_TIMEOUT), "--max-connections", str(MAX_CONNECTIONS),
                  "--max-pending-body-bytes", str(PENDING)], tmp_path_factory.mktemp("limits-log"), headers=AUTH)
    srv.wait_ready()
    yield srv
    srv.stop()


def connect(server, rcvbuf: int | None = None) -> socket.socket:
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(30)
    s.connect(("127.0.0.1", server.port))
    return s


def head(path: str = "/v1/embeddings", length: int | None = None, chunked: bool = False) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: x", "Content-Type: application/json", f"Authorization: Bearer {KEY}"]
    lines += [f"Content-Length: {length}"] if length is not None else []
    lines += ["Transfer-Encoding: chunked"] if chunked else []
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def until_closed(s: socket.socket, limit: float, drip: bytes = b"", every: float = 0.0) -> tuple[float, bytes]:
    """Seconds until the server closed `s` (EOF or reset; `limit` if it never did) and what it sent;
    `drip` bytes are sent every `every` seconds meanwhile.
    """
    start, got, next_drip = time.monotonic(), b"", time.monotonic() + every
    while time.monotonic() - start < limit:
        s.settimeout(max(0.01, min(next_drip - time.monotonic(), 0.1)) if drip else 0.1)
        try:
            data = s.recv(65536)
        except TimeoutError:
            if drip and time.monotonic() >= next_drip:
                next_drip += every
                try:
                    s.sendall(drip)
                except OSError:
                    return time.monotonic() - start, got
            continue
        except OSError:
            return time.monotonic() - start, got
        if not data:
            return time.monotonic() - start, got
        got += data
    return limit, got


def read_response(s: socket.socket) -> bytes:
    """One whole response with a Content-Length (head and body)."""
    got = b""
    while b"\r\n\r\n" not in got:
        got += s.recv(65536)
    head_part, body = got.split(b"\r\n\r\n", 1)
    length = int(next(line.split(b":")[1] for line in head_part.lower().split(b"\r\n")
                      if line.startswith(b"content-length:")))
    while len(body) < length:
        body += s.recv(65536)
    return head_part + b"\r\n\r\n" + body


def status_of(answer: bytes) -> int | None:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else None


def counts(server, route: str, status: str) -> float:
    return metric(request(server.base, "GET", "/metrics")[2], "q3vl_requests_total", route=route, status=status)


# ---------------------------------------------------------------- heads and keep-alive
def test_idle_and_slow_heads_are_closed_at_the_header_timeout(server):
    idle = [connect(server) for _ in range(3)]
    slow = connect(server)
    slow.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
    kept = connect(server)  # one complete request, then part of a second head
    kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    first = read_response(kept)
    kept.sendall(b"GET /hea")
    quiet = connect(server)  # one complete request, then nothing: uvicorn's keep-alive timeout
    quiet.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    read_response(quiet)
    with ThreadPoolExecutor(6) as pool:
        waits = [pool.submit(until_closed, s, 10) for s in idle]
        slow_wait = pool.submit(until_closed, slow, 10, b"X", 0.3)  # a header byte every 0.3 s, forever
        kept_wait, quiet_wait = pool.submit(until_closed, kept, 10), pool.submit(until_closed, quiet, 10)
        results = [w.result() for w in waits]
        slow_result, kept_result, quiet_result = slow_wait.result(), kept_wait.result(), quiet_wait.result()
    assert status_of(first) == 200
    for took, answer in results:  # nothing sent: closed silently
        assert HEAD_TIMEOUT - 0.3 <= took <= HEAD_TIMEOUT + SLACK and answer == b"", (took, answer)
    for took, answer in (slow_result, kept_result):  # part of a head: a 408, then closed
        assert HEAD_TIMEOUT - 0.3 <= took <= HEAD_TIMEOUT + SLACK and status_of(answer) == 408, (took, answer)
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
    assert KEEP_ALIVE - 0.3 <= quiet_result[0] <= KEEP_ALIVE + SLACK and quiet_result[1] == b""


def test_a_head_growing_past_its_bound_gets_431_and_close(server):
    from q3vl.serve.connection import MAX_HEAD_BYTES

    s = connect(server)
    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: ")
    took, answer = until_closed(s, 5, b"a" * 4096, 0.05)  # 80 KB/s of one header value, never ending
    s.close()
    assert took < 5 and status_of(answer) == 431, (took, answer[:200])
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_head_too_large"
    ok = connect(server)  # a long but bounded head is fine
    ok.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * (MAX_HEAD_BYTES // 2) + b"\r\n\r\n")
    assert status_of(read_response(ok)) == 200
    ok.close()


# ---------------------------------------------------------------- bodies
def test_bodies_never_sent_trickled_or_too_slow_get_408_and_close(server):
    before = counts(server, "/v1/embeddings", "408")
    never = connect(server)
    never.sendall(head(length=100_000) + b'{"input": "')
    trickle = connect(server)
    trickle.sendall(head(chunked=True) + b'b\r\n{"input": "\r\n')
    steady = connect(server)  # above the minimum rate, but a 1 MB body would take 330 s: the deadline ends it
    steady.sendall(head(length=MAX_BODY) + b'{"input": "')
    refused = connect(server)  # answered 413 at once (too long), its body keeps trickling: drained, then closed
    refused.sendall(head(length=MAX_BODY + 1) + b'{"input": "')
    with ThreadPoolExecutor(4) as pool:
        n = pool.submit(until_closed, never, 15)
        t = pool.submit(until_closed, trickle, 15, b"8\r\naaaaaaaa\r\n", 0.5)
        s = pool.submit(until_closed, steady, 15, b"a" * 1500, 0.5)
        r = pool.submit(until_closed, refused, 15, b"a" * 8, 0.5)
        results = {"never": n.result(), "trickle": t.result(), "steady": s.result()}
        took, answer = r.result()
    assert RATE_WINDOW - 0.3 <= took <= RATE_WINDOW + SLACK and status_of(answer) == 413, (took, answer)
    for name, (took, answer) in results.items():
        expected = BODY_TIMEOUT if name == "steady" else RATE_WINDOW
        assert expected - 0.3 <= took <= expected + SLACK and status_of(answer) == 408, (name, took, answer)
        message = json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["message"]
        assert ("--body-timeout" if name == "steady" else "--body-min-rate") in message, message
        assert b"connection: close" in answer.lower()
    assert counts(server, "/v1/embeddings", "408") == before + 3


def test_a_partial_body_is_dropped_unparsed_when_its_client_leaves(server):
    left, bad = counts(server, "/v1/embeddings", "499"), counts(server, "/v1/embeddings", "400")
    s = connect(server)
    s.sendall(head(length=1000) + b'{"input": "an unfinished')
    time.sleep(0.3)
    s.close()
    end = time.monotonic() + 10
    while counts(server, "/v1/embeddings", "499") < left + 1:
        assert time.monotonic() < end, "the disconnect was never counted"
        time.sleep(0.05)
    assert counts(server, "/v1/embeddings", "400") == bad  # parsed, it would have been a 400


def test_bodies_being_received_share_one_budget(server):
    holders = [connect(server) for _ in range(2)]
    for h in holders:  # each holds MAX_BODY - 1 bytes of an unfinished body: the budget is (nearly) full
        h.sendall(head(length=MAX_BODY) + b"x" * (MAX_BODY - 1))
    time.sleep(0.5)
    pad = json.dumps({"input": "x", "pad": "y" * 600_000}).encode()
    status, headers, body = request(server.base, "POST", "/v1/embeddings", raw=pad, headers=AUTH)
    assert status == 429 and headers["retry-after"] == "1" and body["error"]["code"] == "server_busy", body
    for h in holders:
        h.close()
    end = time.monotonic() + 10
    while (status := request(server.base, "POST", "/v1/embeddings", raw=pad, headers=AUTH)[0]) == 429:
        assert time.monotonic() < end, "the budget was never given back"
        time.sleep(0.1)
    assert status == 400  # read whole and refused for its unknown field: the budget was free again


# ---------------------------------------------------------------- connections
def open_now(s: socket.socket) -> bool:
    s.setblocking(False)
    try:
        return s.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        s.setblocking(True)


def test_connection_cap_closes_the_oldest_idle_then_refuses_when_all_are_busy(server):
    time.sleep(HEAD_TIMEOUT + 0.5)  # earlier tests' connections are gone
    idle = [connect(server) for _ in range(MAX_CONNECTIONS)]
    assert request(server.base, "GET", "/health")[0] == 200  # one over the cap: the oldest idle one goes
    time.sleep(0.2)
    assert not open_now(idle[0]) and all(open_now(s) for s in idle[2:]), [open_now(s) for s in idle]
    for s in idle:
        s.close()
    time.sleep(0.3)
    busy = [connect(server) for _ in range(MAX_CONNECTIONS)]
    for s in busy:  # each inside a request (its body is on its way): none may be closed for room
        s.sendall(head(length=1000) + b'{"input": "')
    time.sleep(0.3)
    extra = connect(server)
    took, answer = until_closed(extra, 5)
    assert took < 5 and status_of(answer) == 503 and b"too_many_connections" in answer, answer
    assert all(open_now(s) for s in busy)
    for s in busy:
        s.close()


def test_a_response_left_unread_is_dropped_after_the_send_timeout(server):
    time.sleep(0.5)
    s = connect(server, rcvbuf=4096)
    with urllib.request.urlopen(urllib.request.Request(server.base + "/openapi.json", headers=AUTH)) as r:
        size = len(r.read())
    n = 400
    s.sendall(b"".join(f"GET /openapi.json HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\r\n".encode()
                       for _ in range(n)))
    time.sleep(SEND_TIMEOUT + 2 * SLACK)  # read nothing: the server's buffer stops shrinking
    got = 0
    try:
        while data := s.recv(1 << 20):
            got += len(data)
    except OSError:
        pass
    s.close()
    assert got < n * size // 2, (got, n * size)
    assert "unread" in server.log(), server.log()[-2000:]


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
    assert status == 413 and body["error"]["param"] == "documents" and "10+ items" in body["error"]["message"]
    keys = ('{"input": "x", ' + ",".join(f'"k{i}": 0' for i in range(20_000)) + "}").encode()  # over 1024 x 8 keys
    status, _, body = request(server.base, "POST", "/v1/embeddings", raw=keys, headers=AUTH)
    assert status == 413 and "JSON values" in body["error"]["message"], body
    few = {"input": "x", **{f"k{i}": 0 for i in range(40)}}
    status, _, body = request(server.base, "POST", "/v1/embeddings", few, headers=AUTH)
    assert status == 400 and "41 fields" in body["error"]["message"] and "k0" in body["error"]["message"], body


PARSE_CASES = [b'{"input": ["a", "b"], "dimensions": 4}', b' {\n "input" : [ ] ,"x":{"y":[1,2,{"z":null}]}}\t',
               b'{"input": ["\\u00e9\\ud83d\\ude00", "\\"q\\"", 1.5e3, true, null, NaN, -Infinity]}',
               b'{"input": "x", "input": ["dup"]}', b'{}', b'[1, 2]', b'"text"',
               b'{"documents": [[1, [2]], {"a": []}]}',
               '{"input": ["caf\u00e9"]}'.encode("utf-16"), b'\xef\xbb\xbf{"input": ["bom"]}']
BAD_JSON = [b'{"input": ["a",]}', b'{"input": ["a" "b"]}', b'{"input": [1, 2', b'{"input" ["a"]}', b'{input: 1}',
            b'{"input": ["a"]} x', b'{"input": ["a"],}', b'{"a": 1 "b": 2}', b'{"input": [01]}', b'']


def test_bounded_parse_equals_json_loads():
    """Oracle: `json.loads` gives the same value for every body it accepts and fails on the same ones."""
    from q3vl.serve.parse import parse_body, parse_bounded

    for parse in (parse_body, parse_bounded):  # small bodies take json.loads itself: the parser is checked too
        for raw in PARSE_CASES:
            want = json.loads(raw)
            got = parse(raw, ("input", "documents"), 32)
            assert json.dumps(got) == json.dumps(want) and type(got) is type(want), raw
        for raw in BAD_JSON:
            with pytest.raises(json.JSONDecodeError):
                json.loads(raw)
            with pytest.raises(json.JSONDecodeError):
                parse(raw, ("input",), 32)
    many = b",".join([b"1"] * 100_000)
    for raw, param in [(b'{"model": "m", "documents": [' + many + b"]}", "documents"),
                       (b'{"documents": [{"content": [' + many + b"]}]}", "documents[0].content"),
                       (b'{"top_n": [' + many + b"]}", "top_n"), (b"[" * 40 + b"]" * 40, "[0]" * 32),
                       (b'{"input": "x", ' + b", ".join(b'"k%d": 0' % i for i in range(70)) + b"}", "body")]:
        with pytest.raises(RequestTooLargeError) as e:  # refused where the bound is passed, never parsed whole
            parse_body(raw, ("documents",), 32)
        assert e.value.param.startswith(param), (param, e.value.param)
    assert parse_body(b'{"other": [' + b",".join([b"1"] * 100) + b"]}", ("input",), 32)["other"] == [1] * 100


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


def test_http_limits_are_checked():
    from q3vl.serve.config import HttpLimits, ServeConfig
    from q3vl.serve.connection import connection_limits

    for bad in ({"header_timeout": 0}, {"body_timeout": float("inf")}, {"body_min_rate": -1},
                {"max_connections": 0}, {"send_timeout": True}, {"max_pending_body_bytes": 0}):
        with pytest.raises(ConfigError):
            HttpLimits(**bad)
    with pytest.raises(ConfigError, match="max_pending_body_bytes"):
        ServeConfig(embedding="x", max_request_bytes=4 << 20, max_pending_body_bytes=1 << 20)
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        assert connection_limits(1024) == (144, 16) and connection_limits(100) == (100, 16)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(20000, hard), hard))
        assert connection_limits(1024) == (1024, 1250) or hard < 20000
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_no_request_got_a_server_error(server):
    """Last: after all of the above the server answers normally, and nothing was a 5xx but the 503s
    of warming up (the cap's 503 is written by the connection layer, outside the app and its metrics).
    """
    assert request(server.base, "POST", "/v1/embeddings", {"input": "still fine"}, headers=AUTH)[0] == 200
    text = request(server.base, "GET", "/metrics")[2]
    statuses = {line.split('status="')[1].split('"')[0] for line in text.splitlines()
                if line.startswith("q3vl_requests_total{")}
    assert {"200", "400", "408", "413", "429", "499"} <= statuses, statuses
    assert not any(s[0] == "5" for s in statuses - {"503"}), statuses  # 503: while loading (documented)
