"""`q3vl.Reranker`: the published `Qwen3VLReranker.process()` on an exported bundle, without torch.

The published wrapper scores one (query, document) pair per forward pass; this runs pairs in
micro-batches (right padding, last valid token) and gives the same scores (tested).
"""

from __future__ import annotations

from typing import Any

from q3vl.bundle import SCORE
from q3vl.errors import InputError
from q3vl.preprocess.items import content, rerank_request
from q3vl.runtime.base import BundleModel

DEFAULT_INSTRUCTION = "Given a search query, retrieve relevant candidates that answer the query."


class Reranker(BundleModel):
    """Scores documents against a query with a Qwen3-VL-Reranker bundle.

    Example:
        >>> rr = Reranker("bundles/qwen3-vl-reranker-2b")                        # doctest: +SKIP
        >>> rr.process({"query": {"text": "a cat"}, "documents": [{"text": "a kitten"}, {"image": "dog.jpg"}]})
        [0.93, 0.12]                                                             # doctest: +SKIP
    """

    task = "reranker"
    DEFAULT_MAX_LENGTH = 10240
    DEFAULT_INSTRUCTION = DEFAULT_INSTRUCTION

    def process(self, inputs: dict[str, Any], *, on_error: str = "raise", progress: bool | None = None) -> list[float]:
        """One float score in [0, 1] per document, in order; `[]` for an empty query or no documents.

        Args:
            inputs: {"query": {...}, "documents": [{...}, ...], "instruction"?, "fps"?, "max_frames"?}.
            on_error: "raise" (an `InputError` naming the document index) or "skip" (that score is NaN).
            progress: show a progress bar (default: on a TTY for large inputs).
        """
        req = rerank_request(inputs)
        if req.query.empty or not req.documents:
            return []
        instruction = req.query_instruction or req.instruction or self.default_instruction

        def plan(i: int) -> Any:
            doc = req.documents[i]
            if not isinstance(doc, dict):
                raise InputError(f"document must be a dict, not {type(doc).__name__}")
            extra = sorted(set(doc) - {"text", "image", "video"})
            if extra:
                raise InputError(f"document has unknown keys {extra}; allowed: ['image', 'text', 'video']")
            return self.encoder.rerank_pair(req.query, content(doc), instruction, req.fps, req.max_frames)

        outputs, _ = self.run_items(len(req.documents), plan, on_error, progress, "reranking")
        return [float(outputs[i][SCORE]) if i in outputs else float("nan") for i in range(len(req.documents))]
