"""`q3vl.Reranker`: the published `Qwen3VLReranker.process()` on an exported bundle, without torch.

The published wrapper scores one (query, document) pair per forward pass; this runs pairs in
micro-batches (right padding, last valid token) and gives the same scores (tested). The query is
planned once per call and its media decoded once, whatever the number of documents.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from q3vl.errors import InputError
from q3vl.preprocess.encode import Encoded, Encoder, SharedMedia
from q3vl.preprocess.items import RerankRequest, content, rerank_request
from q3vl.runtime.base import BundleModel
from q3vl.runtime.batch import Details, Plan
from q3vl.tasks import SCORE, TASKS

if TYPE_CHECKING:
    from q3vl.runtime.run import BatchModel

DOCUMENT_KEYS = ("text", "image", "video")


class Reranker(BundleModel):
    """Scores documents against a query with a Qwen3-VL-Reranker bundle.

    Example:
        >>> rr = Reranker("bundles/qwen3-vl-reranker-2b")                        # doctest: +SKIP
        >>> rr.process({"query": {"text": "a cat"}, "documents": [{"text": "a kitten"}, {"image": "dog.jpg"}]})
        [0.93, 0.12]                                                             # doctest: +SKIP
    """

    task = TASKS["reranker"]

    @property
    def dim(self) -> int:
        """Width of one document's value: 1 (a score)."""
        return 1

    def plan(self, inputs: Mapping[str, object]) -> list[Plan | InputError]:
        """Batch API step 1: one `Plan` or `InputError` per document (`[]` for an empty query or no
        documents). A bad query raises `QueryError` (every score depends on it).
        """
        req = rerank_request(inputs)
        if not req.query_given or not req.documents:  # the wrapper: an empty query dict or no documents
            return []
        # the wrapper: a (instruction, text) query tuple replaces the request's instruction
        instruction = (req.query_instruction if req.query_is_tuple else req.instruction) or self.default_instruction
        encoder = self.encoder.configured(req.pixels)  # the request's own pixel limits, if it sets any
        with self.media_call():
            shared = encoder.plan_query(req.query, instruction, req.fps, req.max_frames)
            return self._plan_each(len(req.documents), lambda i: self._plan_pair(encoder, req, shared, instruction, i))

    @staticmethod
    def _plan_pair(encoder: Encoder, req: RerankRequest, shared: SharedMedia, instruction: str, i: int) -> Encoded:
        doc = req.documents[i]
        if not isinstance(doc, dict):
            raise InputError(f"document must be a dict, not {type(doc).__name__}")
        extra = sorted(set(doc) - set(DOCUMENT_KEYS))
        if extra:
            raise InputError(f"document has unknown keys {extra}; allowed: {list(DOCUMENT_KEYS)}")
        return encoder.rerank_pair(req.query, content(doc), instruction, req.fps, req.max_frames, shared)

    def process_details(self, inputs: Mapping[str, object], *, on_error: str = "raise",
                        progress: bool | None = None) -> Details[list[float]]:
        """`process()` plus per-document token counts and errors: a `Details` whose `values` are
        exactly what `process()` returns.
        """
        plans = self.plan(inputs)
        run = self._run(plans, on_error, progress, "reranking")
        scores = [float("nan")] * len(plans)
        done, outputs = run.stacked()
        for i, s in zip(done, self.scores(outputs) if done else []):
            scores[i] = s
        return Details.of(scores, plans, run.errors)

    def process(self, inputs: Mapping[str, object], *, on_error: str = "raise",
                progress: bool | None = None) -> list[float]:
        """One float score in [0, 1] per document, in order; `[]` for an empty query or no documents.

        Args:
            inputs: {"query": {...}, "documents": [{...}, ...], "instruction"?, "fps"?, "max_frames"?,
                "min_pixels"?, "max_pixels"?, "total_pixels"?, "video_budget"?} (the last four override the
                constructor's).
            on_error: "raise" (an `InputError` naming the document index) or "skip" (that score is NaN).
            progress: show a progress bar (default: on a TTY for large inputs).
        """
        return self.process_details(inputs, on_error=on_error, progress=progress).values

    @staticmethod
    def scores(outputs: dict[str, np.ndarray]) -> list[float]:
        """Python float scores from `run_batch` outputs."""
        return [float(s) for s in outputs[SCORE]]

    def values(self, outputs: dict[str, np.ndarray]) -> np.ndarray:
        """The batch seam's values: the scores, float32 `[B]`."""
        return np.asarray(outputs[SCORE], np.float32).reshape(-1)


if TYPE_CHECKING:  # mypy proves that Reranker satisfies the batch seam's protocol
    def _is_a_batch_model(model: Reranker) -> BatchModel[Mapping[str, object]]:
        return model
