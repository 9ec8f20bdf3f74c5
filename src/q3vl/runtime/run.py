"""The batch seam: the protocol every model satisfies and the one loop that runs micro-batches.

Every road from a front end to the graphs ends here. `process()`, the server's cross-request
queue, the Ray callables and the export parity harness all hand micro-batches of planned items to
`run_batches`, which loads each (the next one's media decoding while the current one runs, with
`prefetch`), runs it with `model.run_batch`, and reports to a `BatchSink`: a micro-batch's outputs
(`BatchResult`, rows in item order), or an item's error. Who the rows belong to (one call, many
requests, dataset rows) is the sink's business, so the loop is the same for all of them.

A micro-batch whose `run_batch` raises is run again item by item (`one_by_one`), so one item that
breaks the graphs costs only its own output; an item that fails alone is reported as a
`BackendError` chained to what the backend raised. Before each load is awaited and before each run
the sink is asked whether it still wants the item (`wanted`): the server drops the items of a
request that failed or whose client left, at the next micro-batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Protocol, TypeAlias, TypeVar, runtime_checkable

import numpy as np

from q3vl.errors import BackendError, ConfigError, InputError, QueryError
from q3vl.runtime.batch import BatchPolicy, Loaded, Plan

if TYPE_CHECKING:
    from q3vl.progress import Progress
    from q3vl.tasks import Task

log = logging.getLogger(__name__)
Outputs = dict[str, np.ndarray]  # text-graph outputs of a micro-batch, one row per item
R = TypeVar("R", contravariant=True)
T = TypeVar("T")
ON_ERROR = ("raise", "skip")


def as_input_error(e: BaseException) -> InputError:
    """`e` itself if it is an `InputError`, else an `InputError` naming what raised it (Pillow, PyAV,
    numpy, the OS, ...), chained to it so `-v` / a debugger still shows the original.
    """
    if isinstance(e, InputError):
        return e
    try:
        detail = str(e)
    except Exception:  # an object whose __str__ raises must not escape either
        detail = "(no message)"
    err = InputError(f"could not read this item ({type(e).__name__}: {detail[:300]})")
    err.__cause__ = e
    return err


def guarded(index: int, fn: Callable[[], T]) -> T | InputError:
    """`fn()`, or the `InputError` (attributed to item `index`) that any exception it raises becomes:
    errors are values, so one bad item never loses the rest of a batch.

    `KeyboardInterrupt`/`SystemExit` pass, and so does a `QueryError`, which concerns every item.
    """
    try:
        return fn()
    except QueryError:
        raise
    except Exception as e:
        err = as_input_error(e)
        return err.at(index) if err.index is None else err


@runtime_checkable
class BatchRunner(Protocol):
    """What `run_batches` (and a scheduler built on it) needs of a model."""

    def batches(self, plans: Sequence[Plan]) -> list[list[Plan]]:
        """Length-sorted micro-batches of `plans` under the model's `BatchPolicy`."""

    def submit_load(self, plans: Sequence[Plan]) -> list[Future[Loaded | InputError]]:
        """Start decoding the media of `plans`; one future per plan (completed at once without media)."""

    def run_batch(self, loaded: Sequence[Loaded]) -> Outputs:
        """One micro-batch through the graphs: every text-graph output, one row per item."""


@runtime_checkable
class BatchModel(BatchRunner, Protocol[R]):
    """The batch seam `Embedder` and `Reranker` satisfy; `R` is what `plan` takes (a list of items for
    the embedder, a request dict for the reranker). Front ends hold models by this type.
    """

    task: ClassVar[Task]

    @property
    def policy(self) -> BatchPolicy:
        """How plans are cut into micro-batches (clamped to the backend's engine limits)."""

    @property
    def max_length(self) -> int:
        """The longest sequence (text + vision tokens) an item may plan to."""

    @property
    def dim(self) -> int:
        """Width of one item's value: the embedding width, 1 for a reranker score."""

    def plan(self, inputs: R) -> list[Plan | InputError]:
        """One `Plan` or `InputError` per output row."""

    def load(self, plans: Sequence[Plan]) -> list[Loaded | InputError]:
        """`submit_load`, waited for."""

    def values(self, outputs: Outputs) -> np.ndarray:
        """The task's values from `run_batch` outputs: float32 `[B, dim]` embeddings (normalised) or
        `[B]` scores.
        """


@dataclass(frozen=True)
class BatchResult:
    """One micro-batch that ran: its items, the outputs (row `i` is `items[i]`'s) and its timings.

    `load_seconds` is the time spent waiting for its loads (reported once: 0 in the results of a
    failed micro-batch's items after the first); `run_seconds` is `run_batch`'s time.
    """

    items: list[Loaded]
    outputs: Outputs = field(repr=False)
    load_seconds: float
    run_seconds: float

    @property
    def tokens(self) -> int:
        """Text + vision tokens of the items that ran."""
        return sum(x.plan.tokens for x in self.items)


@runtime_checkable
class BatchSink(Protocol):
    """Where `run_batches` reports, called on the thread that runs it."""

    def wanted(self, plan: Plan) -> bool:
        """Whether `plan` should still be loaded and run (False: its caller has gone or failed)."""

    def failed(self, plan: Plan, error: InputError | BackendError) -> None:
        """`plan` gives no output: an `InputError` found while loading (a `QueryError` for a
        reranker query) or a `BackendError` when it failed the graphs even alone. May raise, which
        ends the run (`process(on_error="raise")`).
        """

    def ran(self, result: BatchResult) -> None:
        """A micro-batch's outputs."""


def run_batches(model: BatchRunner, batches: Iterable[Sequence[Plan]], sink: BatchSink, *,
                prefetch: bool = True, one_by_one: bool = True) -> None:
    """Load and run each micro-batch of `batches`, reporting every item's outputs or error to `sink`.

    `batches` is consumed lazily: with `prefetch` the next micro-batch is taken and its loads started
    before the current one is waited for, so a scheduler can hand out work as it arrives (the
    server's queue yields rounds of requests). `one_by_one=False` raises a failed `run_batch` instead
    of retrying its items (a harness that compares whole batches). Loads started for a micro-batch
    that never runs (an exception, the sink raising) are cancelled.
    """
    source = iter(batches)
    ahead = _start(model, sink, next(source, None))
    try:
        while ahead is not None:
            current = ahead
            ahead = _start(model, sink, next(source, None)) if prefetch else None
            _run(model, sink, current, one_by_one)
            if not prefetch:
                ahead = _start(model, sink, next(source, None))
    finally:
        if ahead is not None:
            for _, pending in ahead:
                pending.cancel()


Started: TypeAlias = "list[tuple[Plan, Future[Loaded | InputError]]]"


def _start(model: BatchRunner, sink: BatchSink, batch: Sequence[Plan] | None) -> Started | None:
    """The wanted plans of `batch` with their loads started (None: no more batches)."""
    if batch is None:
        return None
    plans = [p for p in batch if sink.wanted(p)]
    return list(zip(plans, model.submit_load(plans))) if plans else []


def _run(model: BatchRunner, sink: BatchSink, started: Started, one_by_one: bool) -> None:
    """Wait for a micro-batch's loads (reporting failures), then run what is still wanted."""
    start = time.monotonic()
    ready: list[Loaded] = []
    for plan, future in started:
        if not sink.wanted(plan):
            future.cancel()
            continue
        got = _result(plan, future)
        if isinstance(got, InputError):
            sink.failed(plan, got)
        else:
            ready.append(got)
    ready = [x for x in ready if sink.wanted(x.plan)]  # a failure above may have ended a caller
    if ready:
        _infer(model, sink, ready, time.monotonic() - start, one_by_one)


def _result(plan: Plan, future: Future[Loaded | InputError]) -> Loaded | InputError:
    """A load's outcome; whatever it raised becomes the item's `InputError` (a query's stays a `QueryError`)."""
    try:
        return future.result()
    except QueryError as e:
        return e
    except Exception as e:
        err = as_input_error(e)
        return err.at(plan.index) if err.index is None else err


def _infer(model: BatchRunner, sink: BatchSink, items: list[Loaded], waited: float, one_by_one: bool) -> None:
    start = time.monotonic()
    try:
        outputs = model.run_batch(items)
    except Exception as e:
        if not one_by_one:
            raise
        if len(items) == 1:
            err = BackendError(f"inference failed: {type(e).__name__}")
            err.__cause__ = e
            sink.failed(items[0].plan, err)
            return
        log.warning("a micro-batch of %d failed (%s: %s); running its items one by one", len(items),
                    type(e).__name__, e)
        for k, x in enumerate(items):
            if sink.wanted(x.plan):
                _infer(model, sink, [x], waited if k == 0 else 0.0, True)
        return
    sink.ran(BatchResult(items, outputs, waited, time.monotonic() - start))


class Collector:
    """The sink of one call (`process()`): every result kept, errors by item index.

    `on_error="raise"` raises an item's `InputError` as it is found; `"skip"` records it (logged as a
    warning). A reranker query's `QueryError` and an item's `BackendError` always raise.
    """

    def __init__(self, on_error: str = "raise", progress: Progress | None = None) -> None:
        if on_error not in ON_ERROR:
            raise ConfigError(f"on_error must be one of {list(ON_ERROR)}, not {on_error!r}")
        self.on_error, self.progress = on_error, progress
        self.results: list[BatchResult] = []
        self.errors: dict[int, InputError] = {}

    def wanted(self, plan: Plan) -> bool:
        return True

    def failed(self, plan: Plan, error: InputError | BackendError) -> None:
        if isinstance(error, InputError) and not isinstance(error, QueryError):
            self.skip(plan.index, error)
        else:
            raise error
        if self.progress is not None:
            self.progress.update(1)

    def skip(self, index: int, error: InputError) -> None:
        """Record item `index`'s error (raising it in "raise" mode)."""
        if self.on_error == "raise":
            raise error
        log.warning("skipping %s", error)
        self.errors[index] = error

    def ran(self, result: BatchResult) -> None:
        self.results.append(result)
        if self.progress is not None:
            self.progress.update(len(result.items))

    def stacked(self) -> tuple[list[int], Outputs]:
        """(item indices in ascending order, their output rows stacked in that order); `([], {})` if none ran."""
        if not self.results:
            return [], {}
        index = np.array([x.plan.index for r in self.results for x in r.items])
        order = np.argsort(index, kind="stable")
        outputs = {k: np.concatenate([r.outputs[k] for r in self.results])[order] for k in self.results[0].outputs}
        return [int(i) for i in index[order]], outputs
