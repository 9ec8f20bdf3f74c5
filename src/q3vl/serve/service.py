"""The served models and what every route shares: loading, warm-up, readiness, planning and queueing.

`start()` opens the bundles, starts the queues and warms each model up (every graph runs once) on a
thread, while the server already answers `/health`; `/ready` and the API routes say 503 until then
and again while draining. A bundle that fails to load stops the server (`on_failure`) and `q3vl
serve` exits with its error. `submit()` is a request's path through the runtime's batch API: plan on a worker thread,
turn per-item errors into 400s naming the item, then wait on the model's queue (whose scheduler runs
the items through the runtime's batch seam, `run_batches`). Models are held by the seam's protocol.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import numpy as np
from PIL import Image
from starlette.types import Receive

from q3vl.codes.embeddings import Calibration
from q3vl.errors import (
    ConfigError,
    InputError,
    QueryError,
    RequestError,
    RequestTooLargeError,
    UnavailableError,
    UnknownModelError,
)
from q3vl.runtime import BatchModel, Embedder, Plan, Reranker
from q3vl.serve import media
from q3vl.serve.config import ServeConfig
from q3vl.serve.media import MediaGate
from q3vl.serve.metrics import Metrics
from q3vl.serve.queue import Job, Limits, ModelQueue

log = logging.getLogger(__name__)
R = TypeVar("R")


@dataclass
class Outcome:
    """A request's planned items and, once run, its job (None: no items, or the client left)."""

    plans: list[Plan]
    job: Job | None
    plan_time: float

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

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.names = config.model_names()
        self.metrics = Metrics()
        self.gate = MediaGate.create(config.media_root, config.media_item_bytes)
        self.media_policy = media.policy(config.media_root, config.allowed_hosts, config.allow_private_urls,
                                         config.max_redirects, config.media_item_bytes, config.media_request_bytes,
                                         config.media_deadline)
        self.calibration = _calibration(config)
        self.models: dict[str, Embedder | Reranker] = {}
        self.queues: dict[str, ModelQueue] = {}
        self.ready = threading.Event()
        self.failure: BaseException | None = None
        self.draining = False
        self.active = 0  # requests between planning and their last row (event-loop only)
        self.created = int(time.time())

    # ------------------------------------------------------------ lifecycle
    def load(self) -> None:
        """Open every bundle and build its queue (raises on a broken bundle)."""
        c = self.config
        common: dict[str, Any] = {
            "backend": c.backend, "batch_size": c.batch_size, "max_batch_tokens": c.max_batch_tokens,
            "timeout": min(10.0, c.media_deadline), "loader_threads": c.loader_threads, "prefetch": False,
            "media_policy": self.media_policy}
        for task, path, cls in (("embedding", c.embedding, Embedder), ("reranker", c.reranker, Reranker)):
            if path is None:
                continue
            model = cls(path, **common)
            self.models[task] = model
            pol = model.policy
            limits = Limits(pol.batch_size, pol.max_batch_tokens, c.max_wait_ms / 1000, c.max_batch_requests,
                            c.max_queue_items)
            self.queues[task] = ModelQueue(model, task, limits, self.metrics)
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
            for queue in self.queues.values():
                queue.start()
            self._warm_up()
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
        """Stop taking new requests (503); queued and running ones still finish."""
        self.draining = True

    def close(self) -> None:
        """Finish every queued item (up to --drain-timeout), then release the models."""
        self.draining = True
        deadline = time.monotonic() + self.config.drain_timeout  # one budget for every queue
        stopped = {task: queue.close(deadline - time.monotonic()) for task, queue in list(self.queues.items())}
        for task, model in list(self.models.items()):
            if stopped.get(task, True):  # never free sessions a scheduler thread may still be running
                model.close()
            else:
                log.warning("%s: still running a batch at the drain deadline; its model is left to exit", task)

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
        """
        self.active += 1
        try:
            return await self._submit(model, inputs, params, receive, check)
        finally:
            self.active -= 1

    async def _submit(self, model: BatchModel[R], inputs: R, params: list[str], receive: Receive,
                      check: Callable[[list[Plan]], None] | None) -> Outcome:
        task = model.task.name
        self.queues[task].check_room(len(params))  # a full queue refuses before any planning work
        start = time.monotonic()
        try:
            planned = await anyio.to_thread.run_sync(model.plan, inputs)
        except QueryError as e:
            raise RequestError(e.reason, "query") from e
        took = time.monotonic() - start
        self.metrics.preprocess_seconds.labels(task, "plan").observe(took)
        bad = [p for p in planned if isinstance(p, InputError)]
        if bad:
            self.metrics.failed_items.labels(task, "invalid_input").inc(len(bad))
            raise RequestError(bad[0].reason, _param(params, bad[0].index)) from bad[0]
        plans: list[Plan] = [p for p in planned if isinstance(p, Plan)]
        if check is not None:
            check(plans)
        if not plans:
            return Outcome(plans, None, took)
        try:
            job = await self.queues[task].run(plans, _disconnect_of(receive))
        except QueryError as e:  # the query's media failed to load
            raise RequestError(e.reason, "query") from e
        except InputError as e:  # found while loading media
            raise RequestError(e.reason, _param(params, e.index)) from e
        return Outcome(plans, job, took)


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
