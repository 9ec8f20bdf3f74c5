"""The batch seam (`q3vl.runtime.run_batches` + the `BatchModel` protocol) and the server's queue on it.

A stand-in model implements the protocol without graphs: `run_batch` returns each item's own tag
(an integer the plan carries), so whoever gets a row can be checked to have got exactly its own.
Micro-batches can be held (to queue requests behind them, or to cancel a request while its items
run), made to fail as a whole (`together`: an item that breaks a batch but runs alone) or to fail
on one item even alone (`poison`). The last tests run `process()` on the tiny bundle with a
`run_batch` that fails, to show the retry is the same for the API.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from typing import ClassVar

import numpy as np
import pytest

from q3vl.errors import BackendError, InputError
from q3vl.preprocess.encode import Encoded
from q3vl.runtime import (
    BatchModel,
    BatchPolicy,
    BatchResult,
    BatchSink,
    Collector,
    Embedder,
    Loaded,
    Plan,
    Reranker,
    run_batches,
)
from q3vl.serve.metrics import Metrics
from q3vl.serve.queue import Limits, ModelQueue
from q3vl.tasks import TASKS


class TagModel:
    """`BatchModel[list[str]]` without graphs: item "r3.1" plans to tag code 3001, `tokens` long."""

    task: ClassVar = TASKS["embedding"]

    def __init__(self, batch_size: int = 4, max_batch_tokens: int = 1000, tokens: int = 10) -> None:
        self.policy = BatchPolicy(batch_size, max_batch_tokens)
        self.tokens = tokens
        self.ran: list[list[str]] = []  # every run_batch call, failed ones included
        self.bad_load: set[str] = set()
        self.together: set[str] = set()  # fails any batch of two or more
        self.poison: set[str] = set()  # fails every batch, alone too
        self.entered: dict[str, threading.Event] = {}  # a batch holding one of these tags sets it...
        self.release: dict[str, threading.Event] = {}  # ...and waits for this

    def hold(self, *held: str) -> None:
        for tag in held:
            self.entered[tag], self.release[tag] = threading.Event(), threading.Event()

    max_length = 8192
    dim = 1

    @staticmethod
    def code(tag: str) -> int:
        request, item = tag[1:].split(".")
        return int(request) * 1000 + int(item)

    def plan(self, inputs: list[str]) -> list[Plan | InputError]:
        out: list[Plan | InputError] = []
        for i, tag in enumerate(inputs):
            enc = Encoded(np.full(self.tokens, self.code(tag), np.int64), [], np.zeros((3, self.tokens), np.int64))
            enc.tag = tag  # type: ignore[attr-defined]
            out.append(Plan(i, enc))
        return out

    def batches(self, plans):
        return self.policy.batches(plans)

    def submit_load(self, plans):
        futures = []
        for p in plans:
            f: Future = Future()
            f.set_result(InputError("unreadable", p.index) if p.encoded.tag in self.bad_load else Loaded(p, []))
            futures.append(f)
        return futures

    def load(self, plans):
        return [f.result() for f in self.submit_load(plans)]

    def run_batch(self, loaded):
        tags = [x.plan.encoded.tag for x in loaded]
        self.ran.append(tags)
        for tag in set(tags) & set(self.release):
            self.entered[tag].set()
            assert self.release[tag].wait(10)
        if self.poison & set(tags) or (len(tags) > 1 and self.together & set(tags)):
            raise RuntimeError(f"graph failure on {tags}")
        return {"tag": np.array([x.plan.encoded.ids[0] for x in loaded], np.int64)}

    def values(self, outputs):
        return outputs["tag"]


def tags(request: int, n: int) -> list[str]:
    return [f"r{request}.{i}" for i in range(n)]


def codes(request: int, n: int) -> list[int]:
    return [TagModel.code(t) for t in tags(request, n)]


class Recorder:
    """A sink that records every report."""

    def __init__(self) -> None:
        self.rows: dict[int, int] = {}
        self.errors: dict[int, BaseException] = {}
        self.dropped: set[int] = set()

    def wanted(self, plan: Plan) -> bool:
        return plan.index not in self.dropped

    def failed(self, plan: Plan, error: InputError | BackendError) -> None:
        assert plan.index not in self.errors and plan.index not in self.rows
        self.errors[plan.index] = error

    def ran(self, result: BatchResult) -> None:
        for x, tag in zip(result.items, result.outputs["tag"]):
            assert x.plan.index not in self.rows
            self.rows[x.plan.index] = int(tag)


@pytest.fixture(scope="module")
def embedder(tiny_embedding_bundle):
    with Embedder(tiny_embedding_bundle, batch_size=4) as model:
        yield model


def test_the_models_and_sinks_satisfy_the_protocols(embedder, tiny_reranker_bundle):
    assert isinstance(TagModel(), BatchModel)
    assert isinstance(Recorder(), BatchSink) and isinstance(Collector(), BatchSink)
    with Reranker(tiny_reranker_bundle) as reranker:
        for model, task, dim in ((embedder, "embedding", 64), (reranker, "reranker", 1)):
            assert isinstance(model, BatchModel)
            assert model.task.name == task and model.dim == dim
            assert model.max_length == TASKS[task].default_max_length


def test_run_batches_reports_each_item_once_retries_and_prefetches_one_ahead():
    model = TagModel(batch_size=3)
    model.bad_load, model.together, model.poison = {"r0.1"}, {"r0.4"}, {"r0.7"}
    plans = [p for p in model.plan(tags(0, 10)) if isinstance(p, Plan)]
    batches = model.batches(plans)
    pulled: list[int] = []

    def lazily():
        for k, b in enumerate(batches):
            pulled.append(k)
            assert len(model.ran) >= k - 1  # never more than one micro-batch ahead of the runs
            yield b

    sink = Recorder()
    sink.dropped = {9}
    run_batches(model, lazily(), sink)
    assert pulled == list(range(len(batches)))
    assert sink.rows == {i: c for i, c in enumerate(codes(0, 10)) if i not in (1, 7, 9)}
    assert isinstance(sink.errors[1], InputError) and sink.errors[1].index == 1
    assert isinstance(sink.errors[7], BackendError) and "RuntimeError" in str(sink.errors[7])
    assert isinstance(sink.errors[7].__cause__, RuntimeError)
    assert set(sink.errors) == {1, 7}
    assert ["r0.4"] in model.ran and ["r0.7"] in model.ran  # the failed batches, run again item by item
    assert not any("r0.9" in b for b in model.ran)  # not wanted: never run

    model.ran.clear()
    with pytest.raises(RuntimeError, match="graph failure"):  # a harness that compares whole batches
        run_batches(model, [plans[3:6]], Recorder(), one_by_one=False)
    assert model.ran == [["r0.3", "r0.4", "r0.5"]]


def test_collector_raises_or_skips_and_stacks_in_item_order():
    model = TagModel(batch_size=2)
    model.bad_load = {"r0.2"}
    plans = [p for p in model.plan(tags(0, 5)) if isinstance(p, Plan)]
    sink = Collector("skip")
    run_batches(model, model.batches(plans[::-1]), sink)  # any order of micro-batches
    done, out = sink.stacked()
    assert done == [0, 1, 3, 4] and out["tag"].tolist() == [codes(0, 5)[i] for i in done]
    assert list(sink.errors) == [2]
    with pytest.raises(InputError) as err:
        run_batches(model, model.batches(plans), Collector("raise"))
    assert err.value.index == 2
    model.poison = {"r0.0"}
    with pytest.raises(BackendError):  # an item the graphs refuse alone: never skipped silently
        run_batches(model, model.batches(plans), Collector("skip"))


def make(model: TagModel, **kw) -> ModelQueue:
    queue = ModelQueue(model, "embedding", Limits(model.policy.batch_size, model.policy.max_batch_tokens, **kw),
                       Metrics())
    queue.start()
    return queue


def test_queue_routes_every_row_to_its_own_request_in_order():
    sizes = [1, 7, 3, 12, 2, 5, 1, 9, 4, 6]

    async def main():
        model = TagModel(batch_size=8)
        model.hold("r99.0")
        queue = make(model)
        hold = asyncio.ensure_future(queue.run(model.plan(tags(99, 1)), None))
        await asyncio.to_thread(model.entered["r99.0"].wait, 5)
        runs = [asyncio.ensure_future(queue.run(model.plan(tags(k, n)), None)) for k, n in enumerate(sizes)]
        await asyncio.sleep(0.05)
        model.release["r99.0"].set()
        jobs = await asyncio.gather(hold, *runs)
        queue.close(5)
        return model, jobs[1:]

    model, jobs = asyncio.run(main())
    for k, (n, job) in enumerate(zip(sizes, jobs)):
        assert job.outputs()["tag"].tolist() == codes(k, n), k
    mixed = [b for b in model.ran if len({t.split(".")[0] for t in b}) > 1]
    assert mixed and all(len(b) <= 8 for b in model.ran)  # requests shared micro-batches, within the cap
    assert sorted(t for b in model.ran[1:] for t in b) == sorted(t for k, n in enumerate(sizes) for t in tags(k, n))


def test_queue_retries_a_failed_micro_batch_item_by_item():
    """Request 0's item 1 breaks any batch and itself; request 1's item 0 breaks only a shared batch:
    request 0 fails with a BackendError, requests 1 and 2 get exactly their rows."""
    async def main():
        model = TagModel(batch_size=8)
        model.hold("r99.0")
        model.poison, model.together = {"r0.1"}, {"r1.0"}
        queue = make(model)
        hold = asyncio.ensure_future(queue.run(model.plan(tags(99, 1)), None))
        await asyncio.to_thread(model.entered["r99.0"].wait, 5)
        runs = [asyncio.ensure_future(queue.run(model.plan(tags(k, n)), None)) for k, n in ((0, 3), (1, 2), (2, 2))]
        await asyncio.sleep(0.05)
        model.release["r99.0"].set()
        await hold
        done = await asyncio.gather(*runs, return_exceptions=True)
        queue.close(5)
        return model, done, queue

    model, (failed, second, third), queue = asyncio.run(main())
    assert isinstance(failed, BackendError) and "inference failed: RuntimeError" in str(failed)
    assert second.outputs()["tag"].tolist() == codes(1, 2)
    assert third.outputs()["tag"].tolist() == codes(2, 2)
    shared = model.ran[1]
    assert len(shared) == 7 and ["r0.1"] in model.ran and ["r1.0"] in model.ran  # one batch, then one by one
    assert ["r0.2"] not in model.ran  # request 0 had failed: its last item was not run again
    assert b'q3vl_failed_items_total{model="embedding",reason="inference_error"} 1.0' in queue.metrics.render()


def test_queue_drops_a_cancelled_request_mid_batch():
    """Request 0's client leaves while a micro-batch holding its first item runs: that row is dropped,
    its items already in the next (prefetched) micro-batch are not run, and request 1, which shares
    both micro-batches, gets exactly its rows."""
    async def main():
        model = TagModel(batch_size=4)
        model.hold("r99.0", "r0.0")
        queue = make(model)
        first = asyncio.ensure_future(queue.run(model.plan(tags(99, 1)), None))
        await asyncio.to_thread(model.entered["r99.0"].wait, 5)
        gone = asyncio.Event()
        victim = asyncio.ensure_future(queue.run(model.plan(tags(0, 8)), gone.wait))
        other = asyncio.ensure_future(queue.run(model.plan(tags(1, 4)), None))
        await asyncio.sleep(0.05)
        model.release["r99.0"].set()
        await first
        await asyncio.to_thread(model.entered["r0.0"].wait, 5)  # the round with r0.0 and request 1's items runs
        gone.set()
        assert await victim is None
        model.release["r0.0"].set()
        job = await other
        queue.close(5)
        return model, job, queue

    model, job, queue = asyncio.run(main())
    assert job.outputs()["tag"].tolist() == codes(1, 4)
    assert model.ran[1] == ["r0.0", "r1.0", "r1.1", "r1.2"]  # the oldest's share, then the shortest request
    assert model.ran[2:] == [["r1.3"]]  # prefetched with r0.1, r0.2, r0.3: those were dropped
    assert queue.queued == 0


def test_process_runs_a_failed_micro_batch_item_by_item(embedder, monkeypatch):
    items = [{"text": f"item number {i}" + " more" * i} for i in range(6)]
    clean = embedder.process_details(items)
    real = embedder.run_batch
    calls: list[int] = []

    def fails_when_shared(loaded):
        calls.append(len(loaded))
        if len(loaded) > 1:
            raise RuntimeError("out of device memory")
        return real(loaded)

    monkeypatch.setattr(embedder, "run_batch", fails_when_shared)
    again = embedder.process_details(items)
    assert calls.count(1) == 6 and max(calls) > 1
    assert np.abs(again.values - clean.values).max() < 1e-5 and np.array_equal(again.tokens, clean.tokens)

    def refuses_item_3(loaded):
        if any(x.plan.index == 3 for x in loaded):
            raise RuntimeError("the graph refuses this one")
        return real(loaded)

    monkeypatch.setattr(embedder, "run_batch", refuses_item_3)
    for mode in ("raise", "skip"):  # on_error is about inputs: a graph failure always raises
        with pytest.raises(BackendError, match="inference failed: RuntimeError") as err:
            embedder.process(items, on_error=mode)
        assert "refuses this one" in str(err.value.__cause__)


def test_prepare_image_gives_the_embedders_own_pixels(embedder, tmp_path):
    """The Ray decode stage's function and the embedder's plan + load: the same pixels, per-item limits too."""
    from q3vl.runtime import bundle_geometry, prepare_image
    from q3vl.testing.inputs import gradient_image

    path = tmp_path / "big.png"
    gradient_image(300, 420, seed=7).save(path)
    for limits in ({}, {"max_pixels": 65536}, {"min_pixels": 200_000}):
        plan = embedder.plan([{"image": str(path), **limits}])[0]
        assert isinstance(plan, Plan)
        got = prepare_image(str(path), bundle_geometry(embedder.path), **limits)
        assert np.array_equal(got, plan.encoded.media[0].pixels()), limits
        assert got.shape[0] * got.shape[1] == sum(h * w for h, w in plan.encoded.grids) * 16 * 16, limits
