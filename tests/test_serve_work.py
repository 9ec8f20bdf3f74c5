"""Admission by work, isolation, bounded planning and the SIGTERM deadline (issue 24, parts 1-3 and 6).

In process: the work budget's 429/413 and give-back, a request's media budget reserving each fetch
before it starts, URL fetches running a bounded number at a time under one deadline, and a
cancelled deadline aborting every open fetch. On a real `q3vl serve` (loopback, a loopback media
server that drips its bytes): a request over the whole pixel budget is a 413, one that finds the
byte budget taken a 429 with Retry-After, text requests answered at once while media requests hold
every planning thread, a disconnected client's fetches closed within a second, and SIGTERM with a
request stuck in planning: a clean 503 and an exit within --drain-timeout + 5 s.
"""

from __future__ import annotations

import base64
import io
import json
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from q3vl import MediaPolicy
from q3vl.errors import InputError, OverloadedError
from q3vl.preprocess.media import Deadline, MediaAccess
from q3vl.serve.admission import AdmittedBudget, WorkBudget
from q3vl.serve.errors import RequestTooLargeError
from q3vl.serve.planning import Planner, has_media, media_urls
from tests.hostile import HostileServer, serve
from tests.serve_server import Server, request

MB = 1024**2
SLACK = 1.5  # seconds a shared 2-core machine may add to a timer


class Drips:
    """Routes that send one byte every 0.2 s until the reader goes away; when each was opened and closed."""

    def __init__(self) -> None:
        self.opened: dict[str, float] = {}
        self.closed: dict[str, float] = {}

    def route(self, name: str):
        def run(h, stop: threading.Event) -> None:
            self.opened[name] = time.monotonic()
            h.send_response(200)
            h.send_header("Content-Type", "image/png")
            h.end_headers()
            try:
                while not stop.wait(0.2):
                    h.wfile.write(b"\x89")
                    h.wfile.flush()
            except OSError:
                pass
            finally:
                self.closed[name] = time.monotonic()
        return run


def png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (40, 80, 120)).save(buf, "PNG")
    return buf.getvalue()


def noise_png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def loopback_policy(**kw) -> MediaPolicy:
    return MediaPolicy(allow_private_networks=True, **kw)


# ---------------------------------------------------------------- in process
def test_work_budget_refuses_then_gives_back():
    budget = WorkBudget(max_bytes=100, max_pixels=1000)
    a, b = budget.ticket(), budget.ticket()
    a.take(60, 400)
    with pytest.raises(OverloadedError, match="max-inflight-media-bytes") as e:
        b.take(50)
    assert e.value.retry_after >= 1 and b.refusal is e.value and budget.bytes == 60
    with pytest.raises(RequestTooLargeError, match="max-inflight-pixels"):
        budget.ticket().take(n_pixels=1001)  # larger than the whole budget: 413, however idle the server
    a.release()
    assert (budget.bytes, budget.pixels) == (0, 0)
    b.take(50)
    with pytest.raises(OverloadedError):
        a.take(1)  # a released ticket takes nothing more (a planning thread winding down)
    b.release()
    b.release()
    assert (budget.bytes, budget.pixels) == (0, 0)


def test_release_frees_media_held_only_by_a_reference_cycle():
    """A refused request's exception traceback reaches frames that hold its media, and those frames
    reach the exception: only the cycle collector frees that, which release_free_memory runs."""
    import gc
    import weakref

    from q3vl.serve.admission import release_free_memory

    class Media:
        def __init__(self) -> None:
            self.data = bytearray(32 * 1024**2)

    def fetch() -> None:
        media = Media()  # noqa: F841 (held by this frame, which the traceback keeps)
        raise InputError("over budget")

    gc.disable()  # as on a server where nothing allocated enough since to trigger a collection
    try:
        try:
            fetch()
        except InputError as e:
            holder = {"refusal": e}
            holder["self"] = holder  # the cycle: the error's holder references itself
            frame = e.__traceback__.tb_next.tb_frame  # type: ignore[union-attr]
            media = weakref.ref(frame.f_locals["media"])
        del holder, frame
        assert media() is not None  # unreachable, yet alive: a cycle
        release_free_memory()
        assert media() is None
    finally:
        gc.enable()


def test_each_fetch_reserves_its_cap_before_it_starts():
    data = png(64, 64)
    policy = loopback_policy(max_item_bytes=MB)
    with HostileServer({"/a.png": serve(data, "image/png"), "/b.png": serve(data, "image/png")}) as srv:
        work = WorkBudget(max_bytes=MB + len(data) - 1, max_pixels=10**9)  # b itself would fit, its reservation not
        first, second = work.ticket(), work.ticket()
        MediaAccess(policy, 5.0, AdmittedBudget(policy, first)).source(srv.url("/a.png"), "image", Deadline(5))
        assert work.bytes == len(data)  # the 1 MB reservation became the real size
        deadline = Deadline(5)
        with pytest.raises(InputError, match="busy with other requests"):
            MediaAccess(policy, 5.0, AdmittedBudget(policy, second, deadline)).source(srv.url("/b.png"), "image",
                                                                                     deadline)
        assert isinstance(second.refusal, OverloadedError)
        assert deadline.cancelled  # a refused request stops every other fetch it started
        assert srv.hits == ["/a.png"]  # refused before it was fetched
        first.release()
        second.release()
        assert work.bytes == 0


def test_fetches_run_a_bounded_number_at_a_time_and_cancel_aborts_them():
    drips = Drips()
    names = [f"/d{i}.png" for i in range(5)]
    with HostileServer({n: drips.route(n) for n in names}) as srv:
        policy = loopback_policy(deadline=30.0)
        planner = Planner(policy, 5.0, fetches_per_request=3)
        deadline = Deadline(30.0)
        budget = AdmittedBudget(policy, WorkBudget(10**9, 10**9).ticket(), deadline)
        worker = threading.Thread(target=planner.prefetch, args=([srv.url(n) for n in names], budget, deadline))
        worker.start()
        end = time.monotonic() + 10
        while len(drips.opened) < 3 and time.monotonic() < end:
            time.sleep(0.02)
        time.sleep(0.3)
        assert sorted(drips.opened) == names[:3]  # three at once, the others wait their turn
        cancelled = time.monotonic()
        deadline.cancel()
        worker.join(SLACK + 1)
        assert not worker.is_alive()
        time.sleep(0.5)
        assert sorted(drips.opened) == names[:3]  # nothing new started after the cancel
        assert all(drips.closed[n] - cancelled < 1.0 + SLACK for n in names[:3])
        planner.close()


def test_a_request_shares_one_deadline():
    drips = Drips()
    with HostileServer({"/x.png": drips.route("x"), "/y.png": drips.route("y")}) as srv:
        policy = loopback_policy(deadline=1.0)
        planner = Planner(policy, 5.0, fetches_per_request=1)  # one after the other: 2 s with a deadline each
        deadline = planner.deadline()
        budget = AdmittedBudget(policy, WorkBudget(10**9, 10**9).ticket(), deadline)
        start = time.monotonic()
        planner.prefetch([srv.url("/x.png"), srv.url("/y.png")], budget, deadline)
        assert time.monotonic() - start < 1.0 + SLACK
        assert "y" not in drips.opened  # the deadline was spent on the first
        planner.close()


def test_which_requests_have_media():
    assert not has_media([{"text": "a"}, {"text": "b", "instruction": "x"}])
    assert has_media([{"text": "a"}, {"image": "http://h/x.png"}])
    assert has_media({"query": {"text": "q"}, "documents": [{"text": "d"}, {"video": ["a.png", "b.png"]}]})
    items = [{"image": "https://h/a.png"}, {"text": "http://not-media"}, {"video": ["http://h/f1.png", "x.png"]},
             {"image": "https://h/a.png"}]
    assert media_urls(items) == ["https://h/a.png", "http://h/f1.png"]


def test_short_text_requests_plan_on_the_loop_long_ones_on_a_worker():
    """No thread hop (two GIL waits when the loop is busy) for a short media-free request."""
    import asyncio

    from q3vl.serve.planning import INLINE_CHARS, text_chars

    assert text_chars([{"text": "abc", "instruction": "de"}, {"text": "f"}], 100) == 6
    assert text_chars({"query": {"text": "q" * 50}, "documents": ["d" * 60] * 1000}, 100) >= 100  # stops early
    planner = Planner(loopback_policy(), 5.0)

    async def where(inputs: object) -> str:
        return await planner.plan(lambda: threading.current_thread().name, None, inputs, None)

    async def both() -> tuple[str, str]:
        loop_thread = threading.current_thread().name
        short = await where([{"text": "x" * INLINE_CHARS}])
        long = await where([{"text": "x" * (INLINE_CHARS // 2)}, {"text": "y" * (INLINE_CHARS // 2 + 1)}])
        return short == loop_thread, long != loop_thread

    assert asyncio.run(both()) == (True, True)
    planner.close()


# ---------------------------------------------------------------- a real server
DRIPS = Drips()
DRIP_NAMES = [f"/p{i}.png" for i in range(12)]


@pytest.fixture(scope="module")
def media():
    with HostileServer({n: DRIPS.route(n) for n in DRIP_NAMES}) as srv:
        yield srv


@pytest.fixture(scope="module")
def server(tiny_embedding_bundle, tmp_path_factory):
    srv = Server(["--embedding", str(tiny_embedding_bundle), "--allow-private-urls", "--media-deadline", "3",
                  "--max-media-bytes", str(2 * MB), "--max-inflight-media-bytes", str(5 * MB),
                  "--max-inflight-pixels", "5000000", "--plan-threads", "3", "--fetches-per-request", "2",
                  "--drain-timeout", "1"], tmp_path_factory.mktemp("work-log"))
    srv.wait_ready()
    yield srv
    srv.stop()


def embed(server, images, timeout=60.0):
    body = {"inputs": [{"content": [{"type": "image_url", "image_url": {"url": u}}]} for u in images]}
    return request(server.base, "POST", "/v2/embed", body, timeout=timeout)


def wait_open(names, timeout=20.0):
    end = time.monotonic() + timeout
    while not all(n in DRIPS.opened for n in names):
        assert time.monotonic() < end, (names, sorted(DRIPS.opened))
        time.sleep(0.02)


def test_over_the_whole_pixel_budget_is_413(server):
    status, _, body = embed(server, [uri(png(2500, 2500))])  # 6.25 Mpx > --max-inflight-pixels 5 Mpx
    assert status == 413 and "--max-inflight-pixels" in body["error"]["message"], body


def test_budget_taken_by_others_is_429_and_text_is_never_held(server, media):
    with ThreadPoolExecutor(2) as pool:  # two requests planning (2 MB reserved by each fetch) on 2 of 3 threads
        held = [pool.submit(embed, server, [media.url(n)]) for n in DRIP_NAMES[:2]]
        wait_open(DRIP_NAMES[:2])
        status, headers, body = embed(server, [uri(noise_png(700, 700))])  # 1.4 MB more: over the 5 MB
        assert status == 429 and int(headers["retry-after"]) >= 1, body
        assert "max-inflight-media-bytes" in body["error"]["message"]
        for k in range(20):  # media-free requests do not plan on the media threads: answered at once
            t = time.monotonic()
            status, _, body = request(server.base, "POST", "/v1/embeddings", {"input": f"text {k}"})
            assert status == 200 and time.monotonic() - t < SLACK, body
        for f in held:
            assert f.result()[0] == 400  # the media deadline (3 s) ends each drip


def test_a_disconnected_client_fetches_nothing_more(server, media):
    names = DRIP_NAMES[3:6]  # --fetches-per-request 2: the third waits for a slot
    body = json.dumps({"inputs": [{"content": [{"type": "image_url", "image_url": {"url": media.url(n)}}]}
                                  for n in names]}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(b"POST /v2/embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        wait_open(names[:2])
    left = time.monotonic()
    end = left + 1.0 + SLACK
    while not all(n in DRIPS.closed for n in names[:2]) and time.monotonic() < end:
        time.sleep(0.02)
    assert all(DRIPS.closed.get(n, 1e18) - left < 1.0 + SLACK for n in names[:2]), DRIPS.closed
    time.sleep(1.0)
    assert names[2] not in DRIPS.opened


def test_sigterm_answers_what_is_left_503_and_exits_within_the_deadline(server, media):
    """Last in the module: a request stuck in planning when --drain-timeout (1 s) passes gets a clean 503."""
    with ThreadPoolExecutor(1) as pool:
        stuck = pool.submit(embed, server, [media.url(DRIP_NAMES[6])])
        wait_open(DRIP_NAMES[6:7])
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        status, _, body = stuck.result()
    assert status == 503 and body["error"]["code"] == "unavailable", body
    assert server.proc.wait(1 + 5) == 0
    assert time.monotonic() - signalled < 1 + 5
    log = server.log()
    assert "Traceback" not in log and " 500" not in log, log


def test_embed_dataset_media_root_confines_local_files(tmp_path):
    """`embed-dataset --media-root DIR` (the server's media flags, a trusted corpus's base): a row's
    relative path is resolved against the input file's directory and must stay under DIR.
    """
    from q3vl.preprocess import resolve_path
    from q3vl.ray.job import job_options

    corpus, outside = tmp_path / "corpus", tmp_path / "outside"
    corpus.mkdir()
    outside.mkdir()
    Image.new("RGB", (8, 8)).save(corpus / "ok.png")
    Image.new("RGB", (8, 8)).save(outside / "secret.png")
    _, confined = job_options(None, None, {"media_root": corpus})
    _, anywhere = job_options(None, None, {})
    for ref, policy, allowed in (("ok.png", confined.media_policy, True),
                                 ("../outside/secret.png", confined.media_policy, False),
                                 ("../outside/secret.png", anywhere.media_policy, True)):
        access = MediaAccess(policy, 5.0)
        path = resolve_path(ref, corpus)
        if allowed:
            assert access.source(path, "image", Deadline(5)).path == str((corpus / ref).resolve())
        else:
            with pytest.raises(InputError, match="not inside the allowed media root"):
                access.source(path, "image", Deadline(5))


def test_a_planned_request_waits_briefly_for_pixels_before_its_429(monkeypatch):
    import asyncio

    from q3vl.serve import service

    monkeypatch.setattr(service, "ADMIT_WAIT", 0.5)
    budget = WorkBudget(max_bytes=10, max_pixels=100)
    holder = budget.ticket()
    holder.take(n_pixels=80)

    async def freed_after(seconds: float) -> float:
        asyncio.get_running_loop().call_later(seconds, holder.release)
        start = time.monotonic()
        await service._admit_pixels(budget.ticket(), 50)
        return time.monotonic() - start

    assert 0.15 <= asyncio.run(freed_after(0.2)) < 0.5  # admitted once the holder finished
    assert budget.pixels == 50
    holder = budget.ticket()
    with pytest.raises(OverloadedError):  # the budget never frees: a 429 after the wait
        asyncio.run(service._admit_pixels(holder, 60))
    with pytest.raises(RequestTooLargeError):  # above the whole budget: at once
        asyncio.run(service._admit_pixels(budget.ticket(), 101))
