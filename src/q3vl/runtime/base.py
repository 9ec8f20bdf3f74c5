"""What Embedder and Reranker share: loading a bundle, the backend, and the batch API.

The batch API (`runtime/batch.py`) is four public steps, `plan` -> `batches` -> `load` ->
`run_batch`, and the models satisfy the seam's protocol (`runtime/run.py:BatchModel`).
`process()` and `process_details()` run their planned items through the one micro-batch loop,
`run_batches`, as the HTTP server, the Ray integration and the export parity harness do. A bad item
becomes an `InputError` for that item at whichever step sees it, whatever library raised
underneath, so `on_error="skip"` never loses the rest of a batch.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from pathlib import Path
from typing import ClassVar, TypeVar

import numpy as np

from q3vl.bundle import Manifest, check_graph_io, expected_io, verify_files
from q3vl.errors import BundleError, ConfigError, InputError, LimitError, UnknownOptionError, option
from q3vl.preprocess.encode import Encoded, Encoder, PreprocessConfig
from q3vl.preprocess.media import CallBudget, MediaPolicy, media_call
from q3vl.preprocess.prompt import ChatTemplate, TextTokenizer, check_text
from q3vl.preprocess.vision import Geometry
from q3vl.progress import Progress, on_terminal
from q3vl.runtime.backends.base import Backend, ShapeLimits, create
from q3vl.runtime.batch import BatchPolicy, Loaded, Plan
from q3vl.runtime.options import RuntimeOptions
from q3vl.runtime.pipeline import GraphRunner
from q3vl.runtime.run import Collector, as_input_error, guarded, run_batches
from q3vl.tasks import Task

log = logging.getLogger(__name__)
T = TypeVar("T")
M = TypeVar("M", bound="BundleModel")


class BundleModel:
    """A loaded bundle for one task, with its backend, preprocessing and loader pool.

    Its options are a `RuntimeOptions` (`q3vl.runtime.options`: each field's meaning and default),
    given whole as `options=`, or as the published wrapper's seven positional arguments (`max_length`,
    `min_pixels`, `max_pixels`, `total_pixels`, `fps`, `max_frames`, `default_instruction`) and keyword
    arguments named like the fields (`Embedder(bundle, max_pixels=65536, batch_size=4)`), on top of
    `options` when both are given; an unknown name raises, naming the allowed ones. `max_length` and
    `default_instruction` default to the task's values (8192 and "Represent the user's input." for
    the embedder, 10240 and "Given a search query, retrieve relevant candidates that answer the
    query." for the reranker); `media_policy` defaults to `MediaPolicy()` (local files, data URIs and
    public http(s) URLs: pass `MediaPolicy.strict()` for untrusted input).

    Use it as a context manager, or call `close()`, to release the backend and the loader pool now
    rather than at garbage collection.
    """

    task: ClassVar[Task]

    def __init__(self, bundle: str | Path, *positional: int | float | str | None,
                 options: RuntimeOptions | None = None, **keywords: object) -> None:
        self.options = o = RuntimeOptions.of(positional, keywords, options, type(self).__name__)
        config = PreprocessConfig(max_length=o.max_length or self.task.default_max_length, min_pixels=o.min_pixels,
                                  max_pixels=o.max_pixels, total_pixels=o.total_pixels, fps=o.fps,
                                  max_frames=o.max_frames, truncation=o.truncation, timeout=o.timeout,
                                  max_text_chars=o.max_text_chars, max_parts=o.max_parts,
                                  media_policy=o.media_policy or MediaPolicy(), video_budget=o.video_budget)
        self.default_instruction = self.task.default_instruction if o.default_instruction is None \
            else o.default_instruction
        try:
            check_text(self.default_instruction, "default_instruction")
        except InputError as e:
            raise ConfigError(e.reason) from None
        self.path = Path(bundle)
        self.manifest = Manifest.read(self.path)
        self._check_bundle(o.verify, o.allow_unverified)
        tokenizer = TextTokenizer(self.path / "tokenizer.json")
        self.manifest.check_tokenizer(tokenizer.special.as_dict())
        template = ChatTemplate((self.path / "chat_template.jinja").read_text(encoding="utf-8"))
        self.encoder = Encoder(tokenizer, template, config, Geometry.from_spec(self.manifest.spec.vision))
        _check_cuda_fit(self.path, self.manifest, o.backend or "cpu", o.backend_options)
        self.backend = create(o.backend or "cpu", {g: self.path / m.file for g, m in self.manifest.graphs.items()},
                              o.backend_options)
        io = expected_io(self.manifest.spec, self.manifest.task)
        for graph in io:
            check_graph_io(graph, io[graph], self.backend.io_shapes(graph))
        self.limits: ShapeLimits | None = self.backend.shape_limits()
        self.runner = GraphRunner(self.backend, self.manifest.spec, tokenizer.special.endoftext,
                                  self._vision_budget(o.max_vision_patches))
        self.policy = self._policy(o.batch_size, o.max_batch_tokens)
        self.prefetch = o.prefetch
        threads = o.loader_threads or 1  # one source image decoded at a time: peak memory stays one source's
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="q3vl-load")  # threads start on first use
        self._finalizer = weakref.finalize(self, _release, self.backend, self._pool)

    # ------------------------------------------------------------------ construction
    def _check_bundle(self, verify: str, allow_unverified: bool) -> None:
        if self.manifest.task != self.task.name:
            from q3vl.tasks import task_for

            other = task_for(self.manifest.task)
            raise BundleError(f"{self.path} is a {self.manifest.task} bundle; use {other.class_name} "
                              f"(`{other.cli_command}` on the command line)")
        verify_files(self.path, self.manifest.files, full=verify == "full")
        parity = self.manifest.parity
        if parity.get("passed") is False and not allow_unverified:
            raise BundleError(f"{self.path} failed its export-time parity check ({parity.get('summary')}); "
                              f"pass {option('allow_unverified=True', '--allow-unverified')} to load it anyway")

    def _vision_budget(self, max_vision_patches: int) -> int:
        return max_vision_patches if self.limits is None else min(max_vision_patches, self.limits.max_patches)

    def _policy(self, batch_size: int, max_batch_tokens: int) -> BatchPolicy:
        """The batching policy, clamped to the backend's engine limits (TensorRT profiles)."""
        if self.limits is not None:
            batch_size = min(batch_size, self.limits.max_batch)
            max_batch_tokens = min(max_batch_tokens, self.limits.max_batch * self.limits.max_tokens)
        return BatchPolicy(batch_size, max_batch_tokens)

    @property
    def max_length(self) -> int:
        """The longest sequence (text + vision tokens) an item may plan to (the constructor's `max_length`)."""
        return self.encoder.config.max_length

    @property
    def batch_size(self) -> int:
        return self.policy.batch_size

    @property
    def max_batch_tokens(self) -> int:
        return self.policy.max_batch_tokens

    # ------------------------------------------------------------------ the batch API
    def media_call(self) -> AbstractContextManager[CallBudget]:
        """A context in which everything planned shares one call's media byte budget and fetch cache
        (a URL or data URI used by several items is fetched and charged once).
        """
        return media_call(self.encoder.config.media_policy)

    def _plan_each(self, n: int, plan: Callable[[int], Encoded]) -> list[Plan | InputError]:
        """Plan items 0..n-1 with `plan(i)`; each failure becomes that item's `InputError`."""
        return [guarded(i, lambda: self._check_limits(Plan(i, plan(i)))) for i in range(n)]  # noqa: B023

    def _check_limits(self, plan: Plan) -> Plan:
        """An item the engines cannot take fails here, naming the limit, before any graph runs."""
        lim = self.limits
        if lim is None:
            return plan
        if plan.tokens > lim.max_tokens:
            raise LimitError(f"item has {plan.tokens} tokens; the engine's max_tokens is {lim.max_tokens} "
                             "(shorten it, lower max_pixels/max_frames, or rebuild the engines with a larger limit)")
        patches = max((h * w for h, w in plan.encoded.grids), default=0)
        if patches > lim.max_patches:
            raise LimitError(f"an image or frame of this item has {patches} patches; the engine's maximum is "
                             f"{lim.max_patches} (lower max_pixels or rebuild with a larger max_image_pixels)")
        return plan

    def batches(self, plans: Sequence[Plan]) -> list[list[Plan]]:
        """Length-sorted micro-batches of `plans` under this model's `BatchPolicy`."""
        return self.policy.batches(plans)

    def submit_load(self, plans: Sequence[Plan]) -> list[Future[Loaded | InputError]]:
        """Start decoding the media of `plans` on the model's loader pool; one future per plan.

        A plan without media has nothing to decode: its future is completed here, without a trip
        through the pool (two thread switches per text item saved, which a server's latency feels).
        """
        return [self._pool.submit(self._load_one, p) if p.encoded.media else _completed(self._load_one(p))
                for p in plans]

    def load(self, plans: Sequence[Plan]) -> list[Loaded | InputError]:
        """Decode, resize and patchify the media of `plans` (on the loader pool); one result per plan."""
        return [f.result() for f in self.submit_load(plans)]

    def _load_one(self, plan: Plan) -> Loaded | InputError:
        return guarded(plan.index, lambda: Loaded(plan, self.encoder.blocks(plan.encoded)))

    def run_batch(self, loaded: Sequence[Loaded]) -> dict[str, np.ndarray]:
        """One micro-batch through the graphs: every text-graph output, one row per item, in order.

        Raises `LimitError` (before any graph runs) when the batch is larger than the engines allow.
        """
        if not loaded:
            raise ConfigError("run_batch needs at least one loaded item")
        lim = self.limits
        if lim is not None and len(loaded) > lim.max_batch:
            raise LimitError(f"micro-batch of {len(loaded)} items; the engine's max_batch is {lim.max_batch}")
        return self.runner.run([x.plan.encoded for x in loaded], [x.blocks for x in loaded])

    # ------------------------------------------------------------------ what process() runs
    def _run(self, plans: Sequence[Plan | InputError], on_error: str, progress: bool | None,
             desc: str) -> Collector:
        """Planned items through the batch seam (`run_batches`): their results and errors by index."""
        sink = Collector(on_error)
        for k, p in enumerate(plans):
            if isinstance(p, InputError):
                sink.skip(k, p)
        good = [p for p in plans if isinstance(p, Plan)]
        bar = _progress(progress, len(good), desc)
        sink.progress = bar
        try:
            run_batches(self, self.batches(good), sink, prefetch=self.prefetch)
        finally:
            if bar is not None:
                bar.close()
        return sink

    # ------------------------------------------------------------------ resources
    def close(self) -> None:
        """Release the backend (device memory, sessions) and stop the loader pool."""
        self._finalizer()

    def __enter__(self: M) -> M:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_cuda_fit(path: Path, manifest: Manifest, backend: str, options: object) -> None:
    """What the static CUDA check (docs/gpu.md) knows of non-fp16 fused bundles, said before ORT loads them.

    onnxruntime-gpu's GroupQueryAttention has fp16/bf16 kernels only, so in an fp32 (or int8/int4
    weights) fused text graph every layer's attention falls back to the CPU provider, with copies
    each call, and ORT refuses CUDA graphs for such a session.
    """
    text = manifest.graphs.get("text")
    if backend != "cuda" or text is None or text.kind != "fused" or text.precision == "fp16":
        return
    cuda_graph = options.get("cuda_graph") if isinstance(options, dict) else getattr(options, "cuda_graph", False)
    reason = (f"the fused text graph of {path} is {text.precision}, and onnxruntime-gpu runs GroupQueryAttention "
              "only in fp16/bf16: each layer's attention falls back to the CPU")
    if cuda_graph:
        raise ConfigError(f"cuda_graph=True needs an fp16 bundle: {reason}, and ONNX Runtime refuses CUDA graphs "
                          "then; export with --precision fp16 (docs/gpu.md)")
    log.warning("%s, with copies each call; export with --precision fp16 for the GPU (docs/gpu.md)", reason)


def _release(backend: Backend, pool: ThreadPoolExecutor) -> None:
    """Finalizer: runs once, at `close()` or when the model is garbage-collected."""
    pool.shutdown(wait=False, cancel_futures=True)
    backend.close()


def _completed(value: T) -> Future[T]:
    future: Future[T] = Future()
    future.set_result(value)
    return future


def _progress(progress: bool | None, total: int, desc: str) -> Progress | None:
    """Progress when asked (a bar on a terminal, log lines elsewhere), or by default a bar on a
    terminal for more than a few batches of work (a library stays quiet in logs unless asked).
    """
    show = progress if progress is not None else (on_terminal() and total > 32)
    return Progress(total, desc) if show else None


def check_kwargs(kwargs: Mapping[str, object], allowed: Sequence[str], where: str) -> None:
    """Unknown keyword arguments raise, naming the allowed ones."""
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise UnknownOptionError(f"{where} got unexpected keyword arguments {unknown}; allowed: {sorted(allowed)}")


__all__ = ["BundleModel", "as_input_error", "check_kwargs", "guarded"]
