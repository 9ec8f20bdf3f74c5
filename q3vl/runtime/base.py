"""What Embedder and Reranker share: loading a bundle, the backend, and the batch loop.

The batch loop plans every item first (cheap), sorts by total tokens (text + vision), runs fixed
micro-batches and restores input order. A bad item raises an `InputError` naming its index, or,
with `on_error="skip"`, is reported in the log and gets a NaN result while the rest are computed.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from q3vl.bundle import Manifest, verify_files
from q3vl.errors import BundleError, InputError
from q3vl.preprocess.encode import Encoded, Encoder, PreprocessConfig
from q3vl.preprocess.prompt import ChatTemplate, TextTokenizer
from q3vl.runtime.backends.base import create
from q3vl.runtime.pipeline import GraphRunner

log = logging.getLogger(__name__)
ON_ERROR = ("raise", "skip")


class BundleModel:
    """A loaded bundle for one task, with its backend and preprocessing."""

    task = ""

    def __init__(self, bundle: str | Path, config: PreprocessConfig, *, backend: str, batch_size: int,
                 max_batch_tokens: int, max_vision_patches: int, verify: str, allow_unverified: bool,
                 backend_options: dict[str, Any]) -> None:
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
                              **backend_options)
        self.runner = GraphRunner(self.backend, self.manifest.spec, tokenizer.special.endoftext, max_vision_patches)
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens

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
        for i in range(n):
            try:
                encoded[i] = plan(i)
            except InputError as e:
                errors[i] = self._fail(e, i, on_error)
        outputs: dict[int, dict[str, np.ndarray]] = {}
        batches = self._batches(encoded)
        bar = _progress(progress, len(encoded), desc)
        try:
            for batch in batches:
                loaded = []
                for i in batch:
                    try:
                        loaded.append((i, self.encoder.load(encoded[i].media)))
                    except InputError as e:
                        errors[i] = self._fail(e, i, on_error)
                if loaded:
                    res = self.runner.run([encoded[i] for i, _ in loaded], [b for _, b in loaded])
                    for row, (i, _) in enumerate(loaded):
                        outputs[i] = {k: v[row] for k, v in res.items()}
                if bar is not None:
                    bar.update(len(batch))
        finally:
            if bar is not None:
                bar.close()
        return outputs, errors

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
