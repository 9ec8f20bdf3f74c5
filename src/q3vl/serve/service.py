"""The served models and what every route shares: loading, warm-up, readiness, planning and queueing.

`start()` opens the bundles, starts the queues and warms each model up (every graph runs once) on a
thread, while the server already answers `/health`; `/ready` and the API routes say 503 until then
and again while draining. A bundle that fails to load stops the server (`on_failure`) and `q3vl
serve` exits with its error. `submit()` is a request's path through the runtime's batch API: plan on a worker thread,
turn per-item errors into 400s naming the item, then wait on the model's queue (whose scheduler runs
the items through the runtime's batch seam, `run_batches`). Models are held by the seam's protocol.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

import numpy as np
from PIL import Image
from starlette.types import Receive

from q3vl.codes.embeddings import Calibration
from q3vl.errors import (
    ConfigError,
    InputError,
    OverloadedError,
    QueryError,
    UnavailableError,
)
from q3vl.runtime import BatchModel, Embedder, Plan, Reranker
from q3vl.serve.admission import AdmittedBudget, Ticket, WorkBudget, decoded_pixels, release_free_memory
from q3vl.serve.config import ServeConfig
from q3vl.serve.errors import RequestError, RequestTooLargeError, UnknownModelError
from q3vl.serve.media import MediaGate
from q3vl.serve.metrics import Metrics
from q3vl.serve.planning import Planner, has_media
from q3vl.serve.queue import Job, ModelQueue, QueueLimits

log = logging.getLogger(__name__)
R = TypeVar("R")
ADMIT_WAIT = 2.0  # seconds a planned request waits for the pixel budget before its 429
RELEASE_DELAY = 0.5  # seconds: a finished media request's memory is released at most this much later, and the
# releases of a burst's requests coalesce into one per RELEASE_DELAY


@dataclass
class Outcome:
    """A request's planned items and, once run, its job (None: no items, or the client left)."""

    plans: list[Plan]
    job: Job | None
    plan_time: float
    gone: bool = False  # the client left before its items were planned

    @property
    def tokens(self) -> int:
        return sum(p.tokens for p in self.plans)

    def headers(self, started: float) -> dict[str, str]:
        """TEI's timing headers (milliseconds)."""
        job = self.job
        ms = {"x-total-time": time.monotonic() - started,
              "x-preprocess-time": self.plan_time + (job.load_time if job else 0.0),
              "x-queue-time": job.queue_time if job else 0.0,
              "x-inference-time": job.inference_time if job else 0.0}
        return {k: str(round(v * 1000, 3)) for k, v in ms.items()}


class Service:
    """Models, queues, media gate, calibration, metrics and the server's ready/draining state."""

    def __init__(self, config: ServeConfig, *, freeze_heap: bool = False) -> None:
        """`freeze_heap`: once loaded, exempt everything alive from the cycle collector (`gc.freeze`),
        so the collections that free finished requests' media scan only newer objects. For a process
        that is only this server (`q3vl serve`); in a process that also runs other code it would keep
        that code's later garbage cycles alive.
        """
        self.config = config
        self.freeze_heap = freeze_heap
        self.names = config.model_names()
        self.metrics = Metrics()
        self.gate = MediaGate.create(config.media_root, config.max_media_bytes)
        self.options = config.runtime()  # every model's: batching, media policy, backend
        self.media_policy = config.policy(local_files=False)  # the one the models read under (config.runtime())
        self.calibration = _calibration(config)
        self.work = WorkBudget(config.max_inflight_media_bytes, config.max_inflight_pixels)
        self.planner = Planner(self.media_policy, min(10.0, config.media_deadline), plan_threads=config.plan_threads,
                               fetch_threads=2 * config.plan_threads, fetches_per_request=config.fetches_per_request)
        self.models: dict[str, Embedder | Reranker] = {}
        self.queues: dict[str, ModelQueue] = {}  # media-free items
        self.media_queues: dict[str, ModelQueue] = {}  # items with images or videos: their own rounds
        self.ready = threading.Event()
        self.failure: BaseException | None = None
        self.draining = False
        self.drain_deadline: float | None = None  # monotonic: SIGTERM's one deadline for everything
        self.active = 0  # requests between planning and their last row (event-loop only)
        self._aborts: set[asyncio.Future[None]] = set()  # one per request in flight: set to answer it 503
        self._release_pending = False  # a release_free_memory is scheduled (event-loop only)
        self.created = int(time.time())

    # ------------------------------------------------------------ lifecycle
    def load(self) -> None:
        """Open every bundle and build its queue (raises on a broken bundle)."""
        c = self.config
        for task, path, cls in (("embedding", c.embedding, Embedder), ("reranker", c.reranker, Reranker)):
            if path is None:
                continue
            model = cls(path, options=self.options)
            self.models[task] = model
            pol = model.policy
            limits = QueueLimits.of(c, pol.batch_size, pol.max_batch_tokens)
            self.queues[task] = ModelQueue(model, task, limits, self.metrics)
            self.media_queues[task] = ModelQueue(model, task, limits, self.metrics, lane="-media")
            log.info("loaded %s bundle %s as %r", task, path, self.names[task])
        emb = self.models.get("embedding")
        if self.calibration is not None and (emb is None or self.calibration.dim > emb.dim):
            raise ConfigError(f"--calibration is for {self.calibration.dim} dimensions, which the embedding "
                              "bundle does not have")

    def start(self, on_failure: Callable[[BaseException], None] | None = None) -> None:
        """Load, start the queues and warm up on a thread; `ready` is set once every graph ran once."""
        threading.Thread(target=self._start, args=(on_failure,), name="q3vl-serve-start", daemon=True).start()

    def _start(self, on_failure: Callable[[BaseException], None] | None) -> None:
        start = time.monotonic()
        try:
            self.load()
            for queue in self._lanes():
                queue.start()
            self._warm_up()
            if self.freeze_heap:
                gc.collect()
                gc.freeze()  # what loading made lives as long as the server: later collections skip it
        except Exception as e:
            log.error("the server cannot start: %s", e)
            self.failure = e
            if on_failure is not None:
                on_failure(e)
            return
        self.ready.set()
        log.info("loaded and warmed up in %.2f s: ready", time.monotonic() - start)

    def _warm_up(self) -> None:
        image = Image.fromarray(np.full((64, 64, 3), 127, np.uint8))
        for model in self.models.values():
            if isinstance(model, Embedder):
                model.process([{"text": "warm up"}, {"image": image}])
            else:
                model.process({"query": {"text": "warm up"}, "documents": [{"image": image}]})

    def drain(self) -> None:
        """Stop taking new requests (503); queued and running ones still finish, until `drain_deadline`
        (--drain-timeout from now): one deadline for the drain, uvicorn's shutdown and `close()`.
        """
        self.draining = True
        if self.drain_deadline is None:
            self.drain_deadline = time.monotonic() + self.config.drain_timeout

    def abandon(self) -> int:
        """Answer every request still in flight with a clean 503 (the drain deadline passed); how many."""
        aborts, self._aborts = self._aborts, set()
        for abort in aborts:
            if not abort.done():
                abort.set_result(None)
        return len(aborts)

    def close(self) -> None:
        """Finish every queued item (up to the drain deadline), then release the models."""
        self.draining = True
        deadline = time.monotonic() + self.config.drain_timeout  # one budget for every queue
        if self.drain_deadline is not None:  # a SIGTERM drain already spent part of it
            deadline = min(deadline, max(self.drain_deadline, time.monotonic() + 0.5))
        self.planner.close()
        stopped: dict[str, bool] = {}
        for queue in self._lanes():
            stopped[queue.name] = queue.close(deadline - time.monotonic()) and stopped.get(queue.name, True)
        for task, model in list(self.models.items()):
            if stopped.get(task, True):  # never free sessions a scheduler thread may still be running
                model.close()
            else:
                log.warning("%s: still running a batch at the drain deadline; its model is left to exit", task)

    def _lanes(self) -> list[ModelQueue]:
        return [*self.queues.values(), *self.media_queues.values()]

    # ------------------------------------------------------------ per request
    def embedder(self, name: str | None) -> Embedder:
        """The embedding model a request asks for (see `model`)."""
        model = self.model("embedding", name)
        assert isinstance(model, Embedder)
        return model

    def reranker(self, name: str | None) -> Reranker:
        """The reranker a request asks for (see `model`)."""
        model = self.model("reranker", name)
        assert isinstance(model, Reranker)
        return model

    def model(self, task: str, name: str | None) -> Embedder | Reranker:
        """The model a request asks for: 503 when not ready or draining, 404 for a name not served."""
        if self.draining:
            raise UnavailableError("the server is draining before it exits", retry_after=5)
        if not self.ready.is_set():
            raise UnavailableError("the server is loading the models and warming up; retry shortly", retry_after=2)
        if task not in self.models:
            raise UnknownModelError(f"this server serves no {task} model (served: {sorted(self.names.values())})",
                                    "model")
        if name and name != self.names[task]:
            raise UnknownModelError(f"model {name[:100]!r} is not served here; the {task} model is "
                                    f"{self.names[task]!r}", "model")
        return self.models[task]

    def check_count(self, n: int, param: str) -> None:
        """413 for more items than --max-client-batch-size (naming both numbers), 400 for none."""
        limit = self.config.max_client_batch_size
        if n > limit:
            raise RequestTooLargeError(f"{n} items in one request; this server takes at most {limit} "
                                       "(--max-client-batch-size): split the request", param)
        if n == 0:
            raise RequestError("the request has no items", param)

    async def submit(self, model: BatchModel[R], inputs: R, params: list[str], receive: Receive,
                     check: Callable[[list[Plan]], None] | None = None) -> Outcome:
        """Plan `inputs` (what `model.plan` takes) on a worker thread (any bad item: a 400 naming it),
        then run them on the model's queue.

        A request still here when the drain deadline passes (`abandon`) is cancelled (its queued items
        dropped) and answered 503.
        """
        self.active += 1
        abort: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._aborts.add(abort)
        work = asyncio.ensure_future(self._submit(model, inputs, params, receive, check))
        waits: list[asyncio.Future[Outcome] | asyncio.Future[None]] = [work, abort]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if work.done():
                return work.result()
            work.cancel()
            raise UnavailableError("the server is shutting down and this request did not finish within "
                                   "--drain-timeout; retry on another replica", retry_after=1)
        finally:
            if not work.done():
                work.cancel()
            self._aborts.discard(abort)
            self.active -= 1

    async def _submit(self, model: BatchModel[R], inputs: R, params: list[str], receive: Receive,
                      check: Callable[[list[Plan]], None] | None) -> Outcome:
        task = model.task.name
        media = has_media(inputs)
        (self.media_queues if media else self.queues)[task].check_room(len(params))  # refused before any work
        ticket = self.work.ticket()
        try:
            return await self._plan_and_run(model, inputs, params, receive, check, ticket if media else None)
        finally:
            ticket.release()
            ticket.refusal = None  # its traceback's frames hold the request's media: no cycle may keep them
            if media:  # a refused one too: its body and partial fetches are garbage now
                self._release_soon()

    def _release_soon(self) -> None:
        """Free the media of finished requests for good, off the event loop (`release_free_memory`),
        within RELEASE_DELAY, once for all the requests that end meanwhile.
        """
        if self._release_pending:
            return
        self._release_pending = True
        loop = asyncio.get_running_loop()

        def release() -> None:
            self._release_pending = False
            loop.run_in_executor(None, release_free_memory)

        loop.call_later(RELEASE_DELAY, release)

    async def _plan_and_run(self, model: BatchModel[R], inputs: R, params: list[str], receive: Receive,
                            check: Callable[[list[Plan]], None] | None, ticket: Ticket | None) -> Outcome:
        """Plan (media: on the planner's pool under one deadline, admitted by the work budget), then run."""
        start = time.monotonic()
        budget = AdmittedBudget(self.media_policy, ticket, self.planner.deadline()) if ticket else None
        try:
            return await self._planned_run(model, inputs, params, receive, check, ticket, budget, start)
        finally:
            if budget is not None:  # fetched media and cached fetch errors (whose tracebacks hold partial
                budget.sources.clear()  # bodies) go with the request, not with whatever still references it

    async def _planned_run(self, model: BatchModel[R], inputs: R, params: list[str], receive: Receive,
                           check: Callable[[list[Plan]], None] | None, ticket: Ticket | None,
                           budget: AdmittedBudget | None, start: float) -> Outcome:
        task = model.task.name
        try:
            planned = await self.planner.plan(partial(model.plan, inputs), budget, inputs, _disconnect_of(receive))
        except QueryError as e:
            if ticket is not None and ticket.refusal is not None:
                raise ticket.refusal from e
            raise RequestError(e.reason, "query") from e
        took = time.monotonic() - start
        self.metrics.preprocess_seconds.labels(task, "plan").observe(took)
        if ticket is not None and ticket.refusal is not None:  # over the work budget: 429 / 413, not the item's 400
            raise ticket.refusal
        if planned is None:  # the client left while its media were being read
            self.metrics.failed_items.labels(task, "disconnected").inc(len(params))
            return Outcome([], None, took, gone=True)
        bad = [p for p in planned if isinstance(p, InputError)]
        if bad:
            self.metrics.failed_items.labels(task, "invalid_input").inc(len(bad))
            raise RequestError(bad[0].reason, _param(params, bad[0].index)) from bad[0]
        plans: list[Plan] = [p for p in planned if isinstance(p, Plan)]
        if check is not None:
            check(plans)
        if not plans:
            return Outcome(plans, None, took)
        if ticket is not None:
            await _admit_pixels(ticket, sum(decoded_pixels(p.encoded.media) for p in plans))
        try:
            job = await self._run(task, plans, receive)
        except QueryError as e:  # the query's media failed to load
            raise RequestError(e.reason, "query") from e
        except InputError as e:  # found while loading media
            raise RequestError(e.reason, _param(params, e.index)) from e
        return Outcome(plans, job, took)

    async def _run(self, task: str, plans: list[Plan], receive: Receive) -> Job | None:
        """A media-free request on the model's text lane, one with any image or video on its media lane
        (each lane has its own rounds, so a text request never waits for another request's decoding);
        None when the client left.

        A mixed request goes whole to the media lane: it cannot finish before its own media anyway,
        and splitting it cost batching (serve_load's mixed workload, 32 clients: 7 items per batch
        split, 10.5 whole; 0.84x the requests per second).
        """
        media = any(p.encoded.media for p in plans)
        queue = (self.media_queues if media else self.queues)[task]
        return await queue.run(plans, _disconnect_of(receive))


async def _admit_pixels(ticket: Ticket, pixels: int) -> None:
    """Charge a planned request's decoded pixels. While other requests hold the budget it waits for them
    (up to ADMIT_WAIT s, so a client that retries a 429 at once is held to the budget's pace instead of
    planning its media again and again) before its 429; a request above the whole budget is a 413 at once.
    """
    end = time.monotonic() + ADMIT_WAIT
    while True:
        try:
            ticket.take(n_pixels=pixels)
            return
        except OverloadedError:
            if time.monotonic() >= end:
                raise
            ticket.refusal = None
            await asyncio.sleep(0.05)


def _param(params: list[str], index: int | None) -> str | None:
    """The request field an item error points at (None when the error names no item of the request)."""
    return params[index] if index is not None and 0 <= index < len(params) else None


def _disconnect_of(receive: Receive) -> Callable[[], Awaitable[None]]:
    """A waiter that returns when the client disconnects (the body was read: the server's `receive`
    says nothing else until then).
    """
    async def wait() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    return wait


def _calibration(config: ServeConfig) -> Calibration | None:
    if config.calibration is None:
        return None
    try:
        return Calibration.load(config.calibration)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"--calibration {config.calibration}: {e}") from e
