"""The cross-request queue: items of concurrent requests gathered into micro-batches for one model.

Each model has one `ModelQueue` and one scheduler thread (ONNX Runtime releases the GIL, so the
event loop keeps serving while a batch runs). The thread repeats one step, a *round*:

1. gather up to `batch_size` items, at most `max_batch_tokens` real tokens (text + vision) and at most
   `max_batch_requests` distinct requests: first up to a quarter of the round from the **oldest**
   waiting request (so it always progresses), then the requests with the **fewest items left**
   (shortest remaining first, ties by age) until the round is full. A request of 100 items thus
   shares every round with the small requests that arrived after it, which finish in the next round
   instead of waiting for all of its items, and equal requests complete in arrival order rather
   than all at once at the end (lower mean latency than item-by-item round-robin);
2. cut the round into micro-batches with the model's own `BatchPolicy` (`model.batches`: length-sorted,
   padded-token budget, padding ratio) and hand them to the runtime's one micro-batch loop,
   `run_batches`, which loads each (the next one's media decoding while the current one runs), runs
   it and reports its rows to this queue's sink, which delivers each row to its request.

When the model is idle a round starts at once with whatever is queued (after `max_wait_ms`, 0 by
default: a lone request never waits); while a round runs, new items queue up and form the next one,
which is how batches fill under load. When the loop asks for the micro-batch after a round's last
one, a round that is already full is taken and fed to the same loop (its loads start while the
last micro-batch runs: prefetch), so decoding overlaps inference only when that cannot shrink a batch.

A request that fails (a bad item found while loading) or whose client disconnects has its waiting
items dropped, and the loop skips its items in later micro-batches (`BatchSink.wanted`); items
already in a running micro-batch finish and are discarded. A micro-batch that fails the graphs is
run again item by item inside `run_batches`, so only the request whose item breaks them fails.
Nothing here batches, loads or runs on its own.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from q3vl.errors import BackendError, InputError, OverloadedError, UnavailableError
from q3vl.options import default_of
from q3vl.runtime import BatchResult, BatchRunner, Plan, run_batches
from q3vl.serve.config import ServeConfig
from q3vl.serve.errors import RequestTooLargeError
from q3vl.serve.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Job:
    """One request's items in a queue: what is waiting, what came back, and its timings (seconds)."""

    plans: list[Plan]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Job]
    enqueued: float = field(default_factory=time.monotonic)
    pending: deque[Plan] = field(default_factory=deque)
    rows: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    error: BaseException | None = None
    cancelled: bool = False
    queue_time: float = 0.0  # the longest wait of its items before their round started
    load_time: float = 0.0  # waiting for its micro-batches' media loads
    inference_time: float = 0.0  # its micro-batches' run_batch time

    @property
    def finished(self) -> bool:
        return self.cancelled or self.error is not None or len(self.rows) == len(self.plans)

    def outputs(self) -> dict[str, np.ndarray]:
        """Every output stacked in the request's order (rows `[N, ...]`)."""
        keys = self.rows[self.plans[0].index]
        return {k: np.stack([self.rows[p.index][k] for p in self.plans]) for k in keys}


@dataclass
class Round:
    """Items taken from the queue together, and the request each belongs to."""

    items: list[tuple[Job, Plan]]
    owners: dict[int, Job] = field(init=False, repr=False)  # by id(plan)

    def __post_init__(self) -> None:
        self.owners = {id(p): j for j, p in self.items}


@dataclass(frozen=True)
class QueueLimits:
    """How rounds are gathered and how much may wait: the `ServeConfig` options of those names (the
    defaults are theirs; `max_wait` is `max_wait_ms` in seconds, `max_items` is `max_queue_items`).
    """

    batch_size: int
    max_batch_tokens: int
    max_wait: float = default_of(ServeConfig, "max_wait_ms") / 1000  # seconds
    max_batch_requests: int = default_of(ServeConfig, "max_batch_requests")  # 0: no cap
    max_items: int = default_of(ServeConfig, "max_queue_items")
    max_tokens: int = default_of(ServeConfig, "max_queue_tokens")  # waiting (429 beyond; 413 for one request above)

    @classmethod
    def of(cls, config: ServeConfig, batch_size: int, max_batch_tokens: int) -> QueueLimits:
        """The limits of `config` for a model whose batching policy is (`batch_size`, `max_batch_tokens`)."""
        return cls(batch_size, max_batch_tokens, config.max_wait_ms / 1000, config.max_batch_requests,
                   config.max_queue_items, config.max_queue_tokens)


class _Round:
    """Items being taken for one round, within its item, token and request caps."""

    def __init__(self, limits: QueueLimits) -> None:
        self.limits = limits
        self.picked: list[tuple[Job, Plan]] = []
        self.members: set[int] = set()
        self.tokens = 0

    def take(self, job: Job, n: int) -> bool:
        """Up to `n` of `job`'s waiting items; False once the round is full (stop gathering)."""
        lim = self.limits
        if lim.max_batch_requests and id(job) not in self.members and len(self.members) >= lim.max_batch_requests:
            return True  # no room for another request: try the next one
        while n and job.pending:
            if len(self.picked) >= lim.batch_size:
                return False
            plan = job.pending[0]
            if self.picked and self.tokens + plan.tokens > lim.max_batch_tokens:
                return False
            job.pending.popleft()
            self.picked.append((job, plan))
            self.members.add(id(job))
            self.tokens += plan.tokens
            n -= 1
        return len(self.picked) < lim.batch_size


class ModelQueue:
    """One model's queue and scheduler thread; `submit`/`cancel`/`run` are called on the event loop."""

    def __init__(self, model: BatchRunner, name: str, limits: QueueLimits, metrics: Metrics, lane: str = "") -> None:
        self.model, self.name, self.limits, self.metrics = model, name, limits, metrics
        self._cond = threading.Condition()
        self._jobs: deque[Job] = deque()  # requests with waiting items, in arrival order
        self._queued = 0
        self._queued_tokens = 0
        self._closing = False
        self._rate = 0.0  # tokens per second, smoothed, for Retry-After
        self._thread = threading.Thread(target=self._loop, name=f"q3vl-serve-{name}{lane}", daemon=True)

    # ------------------------------------------------------------ event-loop side
    def start(self) -> None:
        self._thread.start()

    def check_room(self, n: int) -> None:
        """Refuse (429/503) a request of `n` items now, before it is planned, if it could not be queued."""
        with self._cond:
            self._refuse(n, 0)

    def _refuse(self, n: int, tokens: int) -> None:
        if self._closing:
            raise UnavailableError("the server is draining before it exits; retry on another replica")
        if self._queued + n > self.limits.max_items:
            raise OverloadedError(f"the {self.name} queue is full ({self._queued} items waiting, limit "
                                  f"{self.limits.max_items}); retry later", self._retry_after(tokens))
        if tokens > self.limits.max_tokens:
            raise RequestTooLargeError(f"{tokens} tokens in one request; this server queues at most "
                                       f"{self.limits.max_tokens} (--max-queue-tokens): split the request")
        if self._queued_tokens + tokens > self.limits.max_tokens:
            raise OverloadedError(f"the {self.name} queue is full ({self._queued_tokens} tokens waiting, limit "
                                  f"{self.limits.max_tokens}); retry later", self._retry_after(tokens))

    def submit(self, plans: list[Plan]) -> Job:
        """Queue a request's planned items; 429 (`OverloadedError`) when the queue is full."""
        loop = asyncio.get_running_loop()
        job = Job(list(plans), loop, loop.create_future())
        tokens = sum(p.tokens for p in plans)
        with self._cond:
            self._refuse(len(plans), tokens)
            job.pending.extend(plans)
            self._jobs.append(job)
            self._queued += len(plans)
            self._queued_tokens += tokens
            self.metrics.queue_items.labels(self.name).inc(len(plans))
            self._cond.notify_all()
        return job

    def cancel(self, job: Job, reason: str = "disconnected") -> None:
        """Drop a request's waiting items (its client went away); running ones finish unseen."""
        with self._cond:
            if job.finished:
                return
            job.cancelled = True
            dropped = self._drop(job)
        if dropped:
            self.metrics.failed_items.labels(self.name, reason).inc(dropped)
        log.debug("%s: dropped %d queued items of a cancelled request", self.name, dropped)

    async def run(self, plans: list[Plan], disconnected: Callable[[], Awaitable[object]] | None) -> Job | None:
        """Queue `plans` and wait for their outputs; None when the client disconnected first.

        Raises the request's error (an `InputError` found while loading, a `BackendError`).
        """
        job = self.submit(plans)
        watcher = asyncio.ensure_future(disconnected()) if disconnected is not None else None
        waits: list[asyncio.Future[Job] | asyncio.Future[object]] = [job.future, *([watcher] if watcher else [])]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if not job.future.done():
                self.cancel(job)
                return None
            return job.future.result()
        finally:
            if watcher is not None:
                watcher.cancel()
            if not job.future.done():  # the handler itself was cancelled
                self.cancel(job, "cancelled")

    @property
    def queued(self) -> int:
        return self._queued

    def close(self, timeout: float) -> bool:
        """Stop taking requests, finish every queued item (up to `timeout` s), stop the thread; whether
        the thread has stopped (a queue closed before it started has nothing to finish).
        """
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread.ident is not None:
            self._thread.join(max(timeout, 0.0))
        return not self._thread.is_alive()

    # ------------------------------------------------------------ scheduler thread
    def _loop(self) -> None:
        while True:
            rnd = self._wait_round()
            if rnd is None:
                return
            rows = _Rows(self)
            try:
                run_batches(self.model, self._micro_batches(rnd, rows), rows, prefetch=True)
            except Exception as e:  # a bug here must not strand every waiting request
                log.exception("%s: scheduler error", self.name)
                for job in {id(j): j for r in rows.rounds for j, _ in r.items}.values():
                    self._fail(job, BackendError(f"internal error: {type(e).__name__}"), "internal_error")

    def _micro_batches(self, rnd: Round | None, rows: _Rows) -> Iterator[list[Plan]]:
        """The micro-batches of `rnd`, then of every round that is full when the loop asks for more."""
        while rnd is not None:
            rows.rounds.append(rnd)
            yield from self.model.batches([p for _, p in rnd.items])
            rnd = self._take_full_round()  # the loop prefetches: the last micro-batch is still to run

    def _wait_round(self) -> Round | None:
        """The next round: at once when items wait (after `max_wait` unless a round is full); None at close."""
        with self._cond:
            while True:
                if not self._queued:
                    if self._closing:
                        return None
                    self._cond.wait()
                    continue
                left = min(j.enqueued for j in self._jobs) + self.limits.max_wait - time.monotonic()
                if left > 0 and not self._closing and not self._full():
                    self._cond.wait(left)
                    continue
                return Round(self._gather())

    def _take_full_round(self) -> Round | None:
        with self._cond:
            if not self._queued or not self._full():
                return None
            return Round(self._gather())

    def _full(self) -> bool:
        return self._queued >= self.limits.batch_size or self._queued_tokens >= self.limits.max_batch_tokens

    def _gather(self) -> list[tuple[Job, Plan]]:
        """The next round's items (lock held): the oldest waiting request first, up to a quarter of the
        round, then the requests with the fewest items left (ties: the older) until the round is full.
        """
        lim = self.limits
        round_ = _Round(lim)
        if round_.take(self._jobs[0], max(1, lim.batch_size // 4)):
            for job in sorted(self._jobs, key=lambda j: len(j.pending)):  # stable: ties stay in arrival order
                if not round_.take(job, len(job.pending)):
                    break
        now = time.monotonic()
        for job, _ in round_.picked:
            job.queue_time = max(job.queue_time, now - job.enqueued)
            self.metrics.queue_seconds.labels(self.name).observe(now - job.enqueued)
        self._jobs = deque(j for j in self._jobs if j.pending)
        self._queued -= len(round_.picked)
        self._queued_tokens -= round_.tokens
        self.metrics.queue_items.labels(self.name).dec(len(round_.picked))
        return round_.picked

    def _deliver(self, result: BatchResult, jobs: list[Job]) -> None:
        """A micro-batch's rows to their requests (`jobs[i]` owns `result.items[i]`), with its metrics."""
        m, name = self.metrics, self.name
        m.preprocess_seconds.labels(name, "load").observe(result.load_seconds)
        m.inference_seconds.labels(name).observe(result.run_seconds)
        m.batch_items.labels(name).observe(len(jobs))
        m.batch_requests.labels(name).observe(len({id(j) for j in jobs}))
        m.batch_tokens.labels(name).observe(result.tokens)
        rate = result.tokens / max(result.run_seconds, 1e-6)
        self._rate = rate if not self._rate else 0.8 * self._rate + 0.2 * rate
        for job in {id(j): j for j in jobs}.values():
            job.inference_time += result.run_seconds
            job.load_time += result.load_seconds
        for row, (job, x) in enumerate(zip(jobs, result.items)):
            if job.finished:
                continue
            job.rows[x.plan.index] = {k: v[row] for k, v in result.outputs.items()}
            if job.finished:
                _post(job, job, None)

    def _fail(self, job: Job, err: BaseException, reason: str) -> None:
        with self._cond:
            if job.finished:
                return
            job.error = err
            dropped = self._drop(job)
        self.metrics.failed_items.labels(self.name, reason).inc(1 + dropped)
        _post(job, None, err)

    def _drop(self, job: Job) -> int:
        """Remove a request's waiting items (lock held); how many there were."""
        dropped = len(job.pending)
        if dropped:
            self._queued -= dropped
            self._queued_tokens -= sum(p.tokens for p in job.pending)
            job.pending.clear()
            self.metrics.queue_items.labels(self.name).dec(dropped)
        if job in self._jobs:
            self._jobs.remove(job)
        return dropped

    def _retry_after(self, tokens: int) -> int:
        """Seconds until the queue has room, from the measured token rate (1 s before any batch ran)."""
        if not self._rate:
            return 1
        return int(min(600, (self._queued_tokens + tokens) / self._rate)) + 1


class _Rows:
    """The batch sink of one scheduler pass: which request each item belongs to (the rounds it was
    fed; the loop holds at most two micro-batches, so at most two rounds are open), and where its
    row or error goes.
    """

    def __init__(self, queue: ModelQueue) -> None:
        self.queue = queue
        self.rounds: deque[Round] = deque(maxlen=2)

    def job(self, plan: Plan) -> Job:
        key = id(plan)
        for rnd in reversed(self.rounds):
            job = rnd.owners.get(key)
            if job is not None:
                return job
        raise KeyError(f"plan {plan.index} is in no open round")

    def wanted(self, plan: Plan) -> bool:
        return not self.job(plan).finished  # failed or cancelled meanwhile: its rows are not wanted

    def failed(self, plan: Plan, error: InputError | BackendError) -> None:
        if isinstance(error, BackendError):
            log.error("%s: inference failed", self.queue.name, exc_info=error.__cause__)
            self.queue._fail(self.job(plan), error, "inference_error")
        else:  # found while loading (a rerank query whose media failed: that request alone fails)
            self.queue._fail(self.job(plan), error, "invalid_input")

    def ran(self, result: BatchResult) -> None:
        self.queue._deliver(result, [self.job(x.plan) for x in result.items])


def _post(job: Job, result: Job | None, err: BaseException | None) -> None:
    """From the scheduler thread: resolve a request's future on its event loop (gone at shutdown: nothing to do)."""
    try:
        job.loop.call_soon_threadsafe(_resolve, job.future, result, err)
    except RuntimeError:  # the loop is closed
        log.debug("request finished after its event loop closed")


def _resolve(future: asyncio.Future[Job], job: Job | None, err: BaseException | None) -> None:
    """On the event loop: complete a request's future once (it may have been cancelled meanwhile)."""
    if future.done():
        return
    if err is not None:
        future.set_exception(err)
    else:
        future.set_result(job)  # type: ignore[arg-type]
