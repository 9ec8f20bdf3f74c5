"""Refusal pacing (`serve/pacing.py`): the budget's arithmetic against a hand computation, and a real
`q3vl serve` on loopback answering one client's refusals late while its accepted requests, and the
refusals of a client at another address, go through at once.
"""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from q3vl.errors import ConfigError
from q3vl.serve.config import ServeConfig
from q3vl.serve.pacing import MAX_DELAY, UNIT_BYTES, RefusalPacer, client_key, refusal
from tests.serve_server import Server, metric, request

RATE, BURST = 4.0, 3
SLACK = 0.6  # seconds a shared 2-core machine may add to one answer


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_budget_is_a_burst_then_one_per_interval():
    clock = Clock()
    pacer = RefusalPacer(rate=4.0, burst=3, clock=clock)
    # a burst of 3 refusals at one instant is answered at once; the 4th waits 1/4 s, the 5th 2/4 s
    assert [pacer.delay("a") for _ in range(5)] == [0.0, 0.0, 0.0, 0.25, 0.5]
    assert pacer.delay("b") == 0.0  # another address has its own budget
    clock.now += 2.0  # 8 intervals later the debt (5 units at 100.0, i.e. up to 101.25) is paid
    assert [pacer.delay("a") for _ in range(4)] == [0.0, 0.0, 0.0, 0.25]


def test_units_follow_the_body_and_the_wait_is_capped():
    clock = Clock()
    pacer = RefusalPacer(rate=10.0, burst=20, clock=clock)
    # a refusal of 49 units (a 48 MiB body) against a burst of 20 leaves 29 intervals of 0.1 s to wait
    assert pacer.delay("big", 49) == pytest.approx(2.9)
    assert pacer.delay("big", 49) == MAX_DELAY  # the wait never exceeds the cap
    assert pacer.delay("big") == MAX_DELAY  # and the debt does not grow past it
    clock.now += MAX_DELAY
    assert pacer.delay("big") == pytest.approx(0.1)


def test_many_addresses_stay_bounded():
    clock = Clock()
    pacer = RefusalPacer(rate=1.0, burst=1, clock=clock)
    for k in range(70_000):
        pacer.delay(f"10.{k >> 16}.{(k >> 8) & 255}.{k & 255}")
    assert len(pacer.tat) <= 65_536


def test_client_keys():
    assert client_key({"client": ("127.0.0.1", 5000)}) == "127.0.0.1"
    assert client_key({"client": ("2001:db8:1:2:aaaa::1", 5000)}) == client_key({"client": ("2001:db8:1:2::9", 1)})
    assert client_key({"client": ("2001:db8:1:2::1", 1)}) == "2001:db8:1:2::/64"
    assert client_key({"client": ("2001:db8:1:3::1", 1)}) != client_key({"client": ("2001:db8:1:2::1", 1)})
    assert client_key({"client": ("::ffff:10.0.0.7", 1)}) == "10.0.0.7"
    assert client_key({"client": None}) == ""
    assert [refusal(s) for s in (200, 400, 401, 404, 408, 413, 422, 429, 500, 503)] == [
        False, True, True, True, False, True, True, False, False, False]


def test_pacing_options_are_checked():
    assert ServeConfig(embedding="x").http.refusal_rate == 10.0
    with pytest.raises(ConfigError, match="refusal_rate"):
        ServeConfig(embedding="x", refusal_rate=-1)
    with pytest.raises(ConfigError, match="refusal_burst"):
        ServeConfig(embedding="x", refusal_burst=0)


@pytest.fixture(scope="module")
def server(tiny_embedding_bundle, tmp_path_factory):
    srv = Server(["--embedding", str(tiny_embedding_bundle), "--refusal-rate", str(RATE), "--refusal-burst",
                  str(BURST)], tmp_path_factory.mktemp("pacing-log"))
    srv.wait_ready()
    yield srv
    srv.stop()


INVALID = {"input": [1, 2, 3]}  # a 400: items must be strings
VALID = {"input": "a cat on a mat"}


def timed(base: str, body: dict, path: str = "/v1/embeddings") -> tuple[int, float]:
    start = time.monotonic()
    status, _, _ = request(base, "POST", path, body)
    return status, time.monotonic() - start


def test_a_client_refused_beyond_its_budget_is_answered_at_the_rate(server):
    time.sleep(BURST / RATE + 0.5)  # a full bucket
    burst = [timed(server.base, INVALID) for _ in range(BURST)]
    assert [s for s, _ in burst] == [400] * BURST and max(t for _, t in burst) < SLACK
    start = time.monotonic()
    paced = [timed(server.base, INVALID) for _ in range(6)]
    took = time.monotonic() - start
    assert [s for s, _ in paced] == [400] * 6
    # 6 more refusals, one per 1/RATE s: at least 6 intervals (less what the burst took to send)
    assert 6 / RATE - 0.3 <= took <= 6 / RATE + 6 * SLACK / 2
    # meanwhile the same address's accepted requests are not paced
    status, t = timed(server.base, VALID)
    assert status == 200 and t < SLACK
    text = request(server.base, "GET", "/metrics")[2]
    assert metric(text, "q3vl_requests_total", route="/v1/embeddings", status="400") >= BURST + 6


def test_a_paced_client_does_not_slow_another_address(server):
    """Two loopback addresses (127.0.0.1 and 127.0.0.2) are two clients: the first one looping refusals
    waits for its answers, the second one's refusals within its own burst are answered at once.
    """
    time.sleep(BURST / RATE + 0.5)

    def flood() -> list[float]:
        return [timed(server.base, INVALID)[1] for _ in range(BURST + 4)]

    with ThreadPoolExecutor(1) as pool:
        flooding = pool.submit(flood)
        time.sleep(0.3)
        other = [raw_refusal(server.port, 400, json.dumps(INVALID).encode(), source="127.0.0.2")
                 for _ in range(BURST)]
        waits = flooding.result(60)
    assert all(t < SLACK for t in other)
    assert sum(waits) >= 4 / RATE - 0.3


def test_a_refusal_costs_the_body_received_not_the_size_declared(server):
    time.sleep(BURST / RATE + 0.5)
    # a 413 from the Content-Length alone (30 MiB declared, none sent) is one unit: the burst answers at once
    assert all(raw_refusal(server.port, 413, length=30 * UNIT_BYTES) < SLACK for _ in range(BURST))
    time.sleep(BURST / RATE + 0.5)
    # a 6 MiB body received and refused (a 400: `user` takes 256 characters) is 1 + 6 units, 4 over the burst
    status, took = timed(server.base, {"input": "x", "user": "y" * (6 * UNIT_BYTES)})
    assert status == 400 and 4 / RATE - 0.3 <= took <= 4 / RATE + SLACK


def raw_refusal(port: int, status: int, body: bytes = b"", length: int | None = None,
                source: str = "127.0.0.1") -> float:
    """Seconds until the head of the answer to a raw POST /v1/embeddings from `source` (a loopback address
    of its own), which must be `status`; `length` is the Content-Length declared (default: the body's).
    """
    s = socket.socket()
    s.settimeout(30)
    s.bind((source, 0))
    start = time.monotonic()
    try:
        s.connect(("127.0.0.1", port))
        declared = str(len(body) if length is None else length).encode()
        s.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + declared + b"\r\nConnection: close\r\n\r\n" + body)
        got = b""
        while b"\r\n\r\n" not in got:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    finally:
        s.close()
    assert got.startswith(f"HTTP/1.1 {status}".encode()), got[:80]
    return time.monotonic() - start
