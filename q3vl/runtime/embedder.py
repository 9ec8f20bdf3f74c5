"""`q3vl.Embedder`: the published `Qwen3VLEmbedder.process()` on an exported bundle, without torch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from q3vl.bundle import EMBEDDING, POOLED
from q3vl.errors import InputError
from q3vl.preprocess.items import embed_item
from q3vl.runtime.base import BundleModel

DEFAULT_INSTRUCTION = "Represent the user's input."


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

    task = "embedding"
    DEFAULT_MAX_LENGTH = 8192
    DEFAULT_INSTRUCTION = DEFAULT_INSTRUCTION

    @property
    def dim(self) -> int:
        """Width of the full embedding (the backbone's hidden size)."""
        return self.manifest.spec.text.hidden_size

    def process(self, inputs: Sequence[dict[str, Any]], normalize: bool = True, dim: int | None = None, *,
                on_error: str = "raise", progress: bool | None = None) -> np.ndarray:
        """Embeddings float32 `[N, D]` in input order.

        Args:
            inputs: dicts with `text`, `image`, `video` (scalar or list), `instruction`, `fps`, `max_frames`.
            normalize: L2-normalise (the wrapper's default). False returns the raw pooled state.
            dim: Matryoshka dimension: keep the first `dim` values, then L2-normalise again.
            on_error: "raise" (an `InputError` naming the item) or "skip" (that row is NaN).
            progress: show a progress bar (default: on a TTY for large inputs).
        """
        if not isinstance(inputs, (list, tuple)) or not inputs:
            raise InputError("inputs must be a non-empty list of dicts")
        if dim is not None and not 0 < dim <= self.dim:
            raise ValueError(f"dim must be in 1..{self.dim}, got {dim}")

        def plan(i: int) -> Any:
            return self.encoder.embedding(embed_item(inputs[i]), self.default_instruction)

        outputs, _ = self.run_items(len(inputs), plan, on_error, progress, "embedding")
        key = EMBEDDING if normalize else POOLED
        out = np.full((len(inputs), self.dim), np.nan, np.float32)
        for i, o in outputs.items():
            out[i] = o[key]
        return truncate_dim(out, dim, renormalize=normalize) if dim else out


def truncate_dim(emb: np.ndarray, dim: int, renormalize: bool = True) -> np.ndarray:
    """Matryoshka truncation: the first `dim` values of each row, L2-normalised again."""
    out = np.ascontiguousarray(emb[:, :dim], dtype=np.float32)
    if renormalize:
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out
