"""What Embedder and Reranker share: loading a bundle, the backend, and the batch loop.

The batch loop plans every item first (cheap), sorts by total tokens (text + vision), runs fixed
micro-batches and restores input order. A bad item raises an `InputError` naming its index, or,
with `on_error="skip"`, is reported in the log and gets a NaN result while the rest are computed.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from q3vl.bundle import Manifest, verify_files
from q3vl.errors import BundleError, InputError
from q3vl.preprocess.encode import Encoded, Encoder, PreprocessConfig
from q3vl.preprocess.media import MediaPolicy, per_call
from q3vl.preprocess.prompt import ChatTemplate, TextTokenizer
from q3vl.runtime.backends.base import create
from q3vl.runtime.pipeline import GraphRunner

log = logging.getLogger(__name__)
ON_ERROR = ("raise", "skip")


class BundleModel:
    """A loaded bundle for one task, with its backend and preprocessing.

    The first eight arguments are the published wrapper's constructor arguments; `max_length` and
    `default_instruction` default to the task's values (`DEFAULT_MAX_LENGTH`, `DEFAULT_INSTRUCTION`:
    8192 and "Represent the user's input." for the embedder, 10240 and "Given a search query,
    retrieve relevant candidates that answer the query." for the reranker). Keyword-only: `backend`
    ("cpu", "cuda", "tensorrt-ep", "tensorrt"), `batch_size`, `max_batch_tokens` (padded tokens per
    micro-batch), `truncation` ("text": shorten user text so the template tail and every vision block
    survive; "reference": the wrapper's behaviour), `max_vision_patches` (patches per vision call),
    `timeout` (URL fetches), `verify` ("size", or "full" to hash the weight files too),
    `allow_unverified` (load a bundle that failed its export parity check), `prefetch` (load the next
    micro-batch's media on a helper thread while the current one runs), `backend_options`,
    `media_policy` (what media may be read and the per-item/per-call limits; default `MediaPolicy()`:
    local files, data URIs and public http(s) URLs; pass `MediaPolicy.strict()` for untrusted input).
    """

    task = ""
    DEFAULT_MAX_LENGTH = 8192
    DEFAULT_INSTRUCTION = ""

    def __init__(self, bundle: str | Path, max_length: int | None = None, min_pixels: int = 4096,
                 max_pixels: int = 1_843_200, total_pixels: int = 7_864_320, fps: float = 1.0, max_frames: int = 64,
                 default_instruction: str | None = None, *, backend: str = "cpu", batch_size: int = 8,
                 max_batch_tokens: int = 16384, truncation: str = "text", max_vision_patches: int = 8192,
                 timeout: float = 10.0, verify: str = "size", allow_unverified: bool = False,
                 prefetch: bool = True, backend_options: dict[str, Any] | None = None,
                 media_policy: MediaPolicy | None = None) -> None:
        config = PreprocessConfig(max_length=max_length or self.DEFAULT_MAX_LENGTH, min_pixels=min_pixels,
                                  max_pixels=max_pixels, total_pixels=total_pixels, fps=fps, max_frames=max_frames,
                                  truncation=truncation, timeout=timeout, media_policy=media_policy or MediaPolicy())
        self.default_instruction = self.DEFAULT_INSTRUCTION if default_instruction is None else default_instruction
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if verify not in ("size", "full"):
            raise ValueError("verify must be 'size' or 'full'")
        self.path = Path(bundle)
        self.manifest = Manifest.read(self.path)
        if self.manifest.task != self.task:
            raise BundleError(f"{self.path} is a {self.manifest.task} bundle; use "
                              f"q3vl.{'Embedder' if self.manifest.task == 'embedding' else 'Reranker'}")
        verify_files(self.path, self.manifest.files, full=verify == "full")
        parity = self.manifest.parity
        if parity.get("passed") is False and not allow_unverified:
            raise BundleError(f"{self.path} failed its export-time parity check ({parity.get('summary')}); "
                              "pass allow_unverified=True to load it anyway")
        tokenizer = TextTokenizer(self.path / "tokenizer.json")
        template = ChatTemplate((self.path / "chat_template.jinja").read_text(encoding="utf-8"))
        self.encoder = Encoder(tokenizer, template, config)
        self.backend = create(backend, {g: self.path / m["file"] for g, m in self.manifest.graphs.items()},
                              **(backend_options or {}))
        self.runner = GraphRunner(self.backend, self.manifest.spec, tokenizer.special.endoftext, max_vision_patches)
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.prefetch = prefetch

    def _batches(self, encoded: dict[int, Encoded]) -> list[list[int]]:
        """Length-sorted micro-batches of at most `batch_size` items and `max_batch_tokens` padded tokens,
        closed early when padding would exceed 25% of the real tokens (a 900-token video must not pad
        eight 40-token texts to its length).
        """
        order = sorted(encoded, key=lambda i: len(encoded[i].ids))
        batches: list[list[int]] = []
        current: list[int] = []
        real = 0
        for i in order:
            n = len(encoded[i].ids)  # the longest so far: the list is sorted
            padded = n * (len(current) + 1)
            if current and (len(current) == self.batch_size or padded > self.max_batch_tokens
                            or padded > 1.25 * (real + n)):
                batches.append(current)
                current, real = [], 0
            current.append(i)
            real += n
        return batches + ([current] if current else [])

    def run_items(self, n: int, plan: Callable[[int], Encoded], on_error: str, progress: bool | None,
                  desc: str) -> tuple[dict[int, dict[str, np.ndarray]], dict[int, InputError]]:
        """Plan, batch, load and run `n` items; returns per-item outputs and per-item errors."""
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, not {on_error!r}")
        errors: dict[int, InputError] = {}
        encoded: dict[int, Encoded] = {}
        plan = per_call(plan, self.encoder.config.media_policy)  # one media byte budget and fetch cache per call
        for i in range(n):
            try:
                encoded[i] = plan(i)
            except InputError as e:
                errors[i] = self._fail(e, i, on_error)
        outputs: dict[int, dict[str, np.ndarray]] = {}
        batches = self._batches(encoded)
        bar = _progress(progress, len(encoded), desc)
        # Media of batch k+1 are decoded and resized on a helper thread while batch k runs (numpy, PIL,
        # PyAV and ONNX Runtime release the GIL): on a GPU the host preprocessing hides behind the graphs.
        pool = ThreadPoolExecutor(1, thread_name_prefix="q3vl-load") if self.prefetch and len(batches) > 1 else None
        try:
            pending = self._submit(pool, batches[0], encoded) if batches else None
            for n, batch in enumerate(batches):
                loaded = pending.result() if isinstance(pending, Future) else pending
                if n + 1 < len(batches):
                    pending = self._submit(pool, batches[n + 1], encoded)
                good = []
                for i, media in loaded or []:
                    if isinstance(media, InputError):
                        errors[i] = self._fail(media, i, on_error)
                    else:
                        good.append((i, media))
                if good:
                    res = self.runner.run([encoded[i] for i, _ in good], [b for _, b in good])
                    for row, (i, _) in enumerate(good):
                        outputs[i] = {k: v[row] for k, v in res.items()}
                if bar is not None:
                    bar.update(len(batch))
        finally:
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)  # an error must not wait for a load
            if bar is not None:
                bar.close()
        return outputs, errors

    def _submit(self, pool: ThreadPoolExecutor | None, batch: list[int], encoded: dict[int, Encoded]) -> Any:
        """Load a batch's media now (no pool) or on the helper thread (a Future)."""
        return pool.submit(self._load, batch, encoded) if pool is not None else self._load(batch, encoded)

    def _load(self, batch: list[int], encoded: dict[int, Encoded]) -> list[tuple[int, Any]]:
        """(index, loaded vision blocks or the item's InputError) for each item of the batch."""
        out: list[tuple[int, Any]] = []
        for i in batch:
            try:
                out.append((i, self.encoder.load(encoded[i].media)))
            except InputError as e:
                out.append((i, e))
        return out

    @staticmethod
    def _fail(e: InputError, i: int, on_error: str) -> InputError:
        err = e.at(i) if e.index is None else e
        if on_error == "raise":
            raise err from e
        log.warning("skipping %s", err)
        return err


def _progress(progress: bool | None, total: int, desc: str) -> Any:
    """A tqdm bar when asked, or by default on a TTY for more than one batch of work."""
    show = progress if progress is not None else (sys.stderr.isatty() and total > 32)
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="item")


def check_kwargs(kwargs: dict[str, Any], allowed: Sequence[str], where: str) -> None:
    """Unknown keyword arguments raise, naming the allowed ones."""
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise TypeError(f"{where} got unexpected keyword arguments {unknown}; allowed: {sorted(allowed)}")
