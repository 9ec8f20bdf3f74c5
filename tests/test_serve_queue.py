"""The cross-request queue with a recording stand-in model: fairness (a large request interleaves with
small ones, equal requests finish in order), token and request caps, no waiting when idle, dropped
items of cancelled and failed requests, and the 429.

The stand-in has the runtime's batch API (`batches` is the real `BatchPolicy`), so what is checked
here is exactly what the queue hands the runtime.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future

import numpy as np
import pytest

from q3vl.errors import InputError, OverloadedError, UnavailableError
from q3vl.preprocess.encode import Encoded
from q3vl.runtime.batch import BatchPolicy, Loaded, Plan
from q3vl.serve.metrics import Metrics
from q3vl.serve.queue import ModelQueue, QueueLimits


def plan(index: int, tokens: int, tag: str) -> Plan:
    enc = Encoded(np.zeros(tokens, np.int64), [], np.zeros((3, tokens), np.int64))
    enc.tag = tag  # type: ignore[attr-defined]
    return Plan(index, enc)


class Model:
    """Records every micro-batch; `gate` holds run_batch until released; `bad` tags fail to load."""

    def __init__(self, batch_size: int = 4, max_batch_tokens: int = 1000) -> None:
        self.policy = BatchPolicy(batch_size, max_batch_tokens)
        self.ran: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.bad: set[str] = set()

    def batches(self, plans):
        return self.policy.batches(plans)

    def submit_load(self, plans):
        out = []
        for p in plans:
            f: Future = Future()
            tag = p.encoded.tag
            f.set_result(InputError("broken", p.index) if tag in self.bad else Loaded(p, []))
            out.append(f)
        return out

    def run_batch(self, loaded):
        self.gate.wait(10)
        self.ran.append([x.plan.encoded.tag for x in loaded])
        return {"out": np.array([[len(x.plan.encoded.ids)] for x in loaded], np.float32)}


def make(model: Model, **kw) -> ModelQueue:
    limits = QueueLimits(model.policy.batch_size, model.policy.max_batch_tokens, **kw)
    queue = ModelQueue(model, "embedding", limits, Metrics())
    queue.start()
    return queue


def test_large_request_interleaves_with_small_ones():
    async def main():
        model = Model(batch_size=4)
        model.gate.clear()  # hold the first batch so everything else queues behind it
        queue = make(model)
        big = asyncio.ensure_future(queue.run([plan(i, 10, f"big{i}") for i in range(12)], None))
        await asyncio.sleep(0.1)
        smalls = [asyncio.ensure_future(queue.run([plan(0, 10, f"s{k}")], None)) for k in range(3)]
        await asyncio.sleep(0.1)
        model.gate.set()
        jobs = await asyncio.gather(big, *smalls)
        queue.close(5)
        return model.ran, jobs

    ran, jobs = asyncio.run(main())
    assert ran[0] == ["big0", "big1", "big2", "big3"]  # the round that was running alone
    assert ran[1] == ["big4", "big5", "big6", "big7"]  # prefetched (full) when round 0 started
    assert sorted(ran[2]) == sorted(["big8", "s0", "s1", "s2"])  # the next round: one item from each request
    assert len(ran) == 4  # the small requests finished a round before the large one
    assert all(j.outputs()["out"].shape == (len(j.plans), 1) for j in jobs)
    flat = [t for b in ran for t in b]
    assert sorted(flat) == sorted([f"big{i}" for i in range(12)] + ["s0", "s1", "s2"])


def test_equal_requests_complete_in_arrival_order():
    """Shortest-remaining-first after the oldest's share: whole requests per round, not a slice of each."""
    async def main():
        model = Model(batch_size=8)
        model.gate.clear()
        queue = make(model)
        hold = asyncio.ensure_future(queue.run([plan(0, 10, "hold")], None))
        await asyncio.sleep(0.1)
        reqs = []
        for k in range(4):
            reqs.append(asyncio.ensure_future(queue.run([plan(i, 10, f"r{k}.{i}") for i in range(4)], None)))
            await asyncio.sleep(0.02)  # arrival order r0, r1, r2, r3
        model.gate.set()
        await asyncio.gather(hold, *reqs)
        queue.close(5)
        return model.ran

    ran = asyncio.run(main())
    assert [sorted({t.split(".")[0] for t in b}) for b in ran[1:]] == [["r0", "r1"], ["r2", "r3"]], ran


def test_token_budget_and_request_cap():
    async def main(**kw):
        model = Model(batch_size=8, max_batch_tokens=40)
        model.gate.clear()
        queue = make(model, **kw)
        first = asyncio.ensure_future(queue.run([plan(0, 10, "hold")], None))
        await asyncio.sleep(0.1)
        rest = [asyncio.ensure_future(queue.run([plan(i, 10, f"r{k}.{i}") for i in range(3)], None)) for k in range(3)]
        await asyncio.sleep(0.1)
        model.gate.set()
        await asyncio.gather(first, *rest)
        queue.close(5)
        return model.ran

    ran = asyncio.run(main())
    assert all(10 * len(b) <= 40 for b in ran) and max(len(b) for b in ran[1:]) == 4
    ran = asyncio.run(main(max_batch_requests=1))  # cross-request batching off
    assert all(len({t.split(".")[0] for t in b}) == 1 for b in ran), ran


def test_idle_model_does_not_wait_and_max_wait_gathers():
    async def timed(**kw):
        queue = make(Model(), **kw)
        start = time.monotonic()
        await queue.run([plan(0, 5, "a")], None)
        took = time.monotonic() - start
        queue.close(5)
        return took

    assert asyncio.run(timed()) < 0.2
    assert asyncio.run(timed(max_wait=0.3)) >= 0.29


def test_cancelled_and_failed_requests_drop_their_queued_items():
    async def main():
        model = Model(batch_size=2)
        model.bad = {"bad0"}
        model.gate.clear()
        queue = make(model)
        hold = asyncio.ensure_future(queue.run([plan(0, 5, "hold")], None))
        await asyncio.sleep(0.1)
        gone = asyncio.Event()
        victim = asyncio.ensure_future(queue.run([plan(i, 5, f"v{i}") for i in range(6)], gone.wait))
        failing = asyncio.ensure_future(queue.run([plan(0, 5, "bad0"), *[plan(i, 5, f"f{i}") for i in range(1, 6)]],
                                                  None))
        await asyncio.sleep(0.1)
        gone.set()  # the victim's client disconnects while everything waits
        assert await victim is None
        model.gate.set()
        with pytest.raises(InputError):
            await failing
        await hold
        queue.close(5)
        return model.ran, queue

    ran, queue = asyncio.run(main())
    flat = [t for b in ran for t in b]
    assert not any(t.startswith("v") for t in flat), flat  # dropped before any ran
    assert sum(t.startswith("f") for t in flat) <= 1, flat  # at most the one batched with the bad item
    assert queue.queued == 0


def test_full_queue_is_429_and_closing_is_503():
    async def main():
        model = Model()
        model.gate.clear()
        queue = make(model, max_items=4)
        hold = asyncio.ensure_future(queue.run([plan(0, 5, "hold")], None))
        await asyncio.sleep(0.1)
        waiting = asyncio.ensure_future(queue.run([plan(i, 5, f"w{i}") for i in range(3)], None))
        await asyncio.sleep(0.05)
        with pytest.raises(OverloadedError) as e:
            queue.submit([plan(i, 5, "x") for i in range(2)])
        assert e.value.retry_after >= 1
        model.gate.set()
        await asyncio.gather(hold, waiting)
        queue.close(5)
        with pytest.raises(UnavailableError):
            queue.submit([plan(0, 5, "late")])

    asyncio.run(main())
