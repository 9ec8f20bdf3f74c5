"""`q3vl.Embedder`: the published `Qwen3VLEmbedder.process()` on an exported bundle, without torch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from q3vl.codes.embeddings import truncate
from q3vl.errors import ConfigError, InputError
from q3vl.preprocess.items import embed_item
from q3vl.runtime.base import BundleModel
from q3vl.runtime.batch import Details, Plan
from q3vl.tasks import EMBEDDING, POOLED, TASKS

if TYPE_CHECKING:
    from q3vl.runtime.run import BatchModel


class Embedder(BundleModel):
    """Embeds text, images, videos and mixes with a Qwen3-VL-Embedding bundle.

    The constructor's first eight arguments and their defaults are the published wrapper's.
    `truncation="text"` (default) shortens user text so the template tail and every vision block
    survive; `"reference"` cuts on the right like the wrapper (failing when it would split vision).

    Example:
        >>> emb = Embedder("bundles/qwen3-vl-embedding-2b")                     # doctest: +SKIP
        >>> vecs = emb.process([{"text": "a cat"}, {"image": "cat.jpg"}])        # doctest: +SKIP
        >>> vecs.shape, vecs.dtype                                               # doctest: +SKIP
        ((2, 2048), dtype('float32'))
    """

    task = TASKS["embedding"]

    @property
    def dim(self) -> int:
        """Width of the full embedding (the backbone's hidden size)."""
        return self.manifest.spec.text.hidden_size

    def plan(self, inputs: Sequence[Mapping[str, object]]) -> list[Plan | InputError]:
        """Batch API step 1: one `Plan` (token ids, positions, sized media) or `InputError` per input."""
        if not isinstance(inputs, (list, tuple)):
            raise InputError(f"inputs must be a list of dicts, not {type(inputs).__name__}")
        with self.media_call():
            return self._plan_each(len(inputs), lambda i: self.encoder.embedding(embed_item(inputs[i]),
                                                                                 self.default_instruction))

    def values(self, outputs: dict[str, np.ndarray]) -> np.ndarray:
        """The batch seam's values: `vectors(outputs)`, the normalised embeddings float32 `[B, D]`."""
        return self.vectors(outputs)

    def vectors(self, outputs: dict[str, np.ndarray], normalize: bool = True, dim: int | None = None) -> np.ndarray:
        """Embeddings float32 `[B, dim or D]` from `run_batch` outputs (rows `[B, D]`): the normalised
        or raw pooled state, Matryoshka-truncated (and renormalised when `normalize`) when `dim` is given.
        """
        self.check_dim(dim)
        rows = np.asarray(outputs[EMBEDDING if normalize else POOLED], np.float32)
        return truncate(rows, dim, normalize) if dim else rows

    def check_dim(self, dim: int | None) -> None:
        """A Matryoshka dimension must be an integer in 1..D."""
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or not 0 < dim <= self.dim):
            raise ConfigError(f"dim must be in 1..{self.dim} (an integer Matryoshka dimension), got {dim!r}")

    def process_details(self, inputs: Sequence[Mapping[str, object]], normalize: bool = True, dim: int | None = None,
                        *, on_error: str = "raise", progress: bool | None = None) -> Details[np.ndarray]:
        """`process()` plus per-item token counts and errors (for usage accounting): a `Details` whose
        `values` are exactly what `process()` returns.
        """
        if not isinstance(inputs, (list, tuple)) or not inputs:
            raise InputError("inputs must be a non-empty list of dicts")
        self.check_dim(dim)
        plans = self.plan(inputs)
        run = self._run(plans, on_error, progress, "embedding")
        out = np.full((len(inputs), dim or self.dim), np.nan, np.float32)
        done, outputs = run.stacked()
        if done:
            out[done] = self.vectors(outputs, normalize, dim)
        return Details.of(out, plans, run.errors)

    def process(self, inputs: Sequence[Mapping[str, object]], normalize: bool = True, dim: int | None = None, *,
                on_error: str = "raise", progress: bool | None = None) -> np.ndarray:
        """Embeddings float32 `[N, D]` in input order.

        Args:
            inputs: dicts with `text`, `image`, `video` (scalar or list), `instruction`, `fps`, `max_frames`,
                and `min_pixels` / `max_pixels` / `total_pixels` / `video_budget` to override the constructor's
                for that item.
            normalize: L2-normalise (the wrapper's default). False returns the raw pooled state.
            dim: Matryoshka dimension: keep the first `dim` values, then L2-normalise again.
            on_error: "raise" (an `InputError` naming the item) or "skip" (that row is NaN).
            progress: show a progress bar (default: on a TTY for large inputs).
        """
        return self.process_details(inputs, normalize, dim, on_error=on_error, progress=progress).values


if TYPE_CHECKING:  # mypy proves that Embedder satisfies the batch seam's protocol
    def _is_a_batch_model(model: Embedder) -> BatchModel[Sequence[Mapping[str, object]]]:
        return model
