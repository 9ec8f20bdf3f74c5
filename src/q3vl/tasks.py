"""The task registry: everything that differs between an embedding and a reranker bundle, in one place.

In the spirit of optimum's task/config pairing, a `Task` owns its text-graph outputs, its default
instruction and maximum length, how a list of items becomes a request for its runtime class, its
parity metric and tolerance. Export, parity, weight quantization, the reference
and the runtime look the task up by the name stored in the bundle manifest (`task_for`) instead of
branching on that name. Adding a task is adding one subclass here (see docs/architecture.md).

This module is torch-free and imports nothing above the contract layer, by statement or by string:
the layers above key their parts by the task's name: the runtime class (`q3vl.runtime.model_for`),
the PyTorch reference (`q3vl.reference.reference_for`), and the torch and ONNX heads
(`q3vl.export.heads.HEADS`).
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from q3vl.errors import ConfigError

if TYPE_CHECKING:
    from q3vl.tolerances import Tolerance

# Text-graph output names: the contract between the exported graphs and the runtime. They must not
# be names the exporter gives to intermediate values ("embedding" is the aten op's own output name).
EMBEDDING, POOLED, SCORE = "sentence_embedding", "pooled_state", "relevance_score"


def row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each row pair of `a` and `b` (any shape `[..., D]`), in float64: float64 `[rows]`."""
    a = np.asarray(a, np.float64).reshape(-1, np.shape(a)[-1])
    b = np.asarray(b, np.float64).reshape(-1, np.shape(b)[-1])
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return (a * b).sum(-1) / np.maximum(norms, 1e-30)


class Task(abc.ABC):
    """One kind of bundle. Subclasses are stateless singletons held in `TASKS`."""

    name: ClassVar[str]
    outputs: ClassVar[tuple[str, ...]]  # the text graph's outputs, in order
    default_instruction: ClassVar[str]
    default_max_length: ClassVar[int]
    class_name: ClassVar[str]  # `q3vl.Embedder` / `q3vl.Reranker`: what error messages tell the user to use
    verb: ClassVar[str]  # "embed" / "rerank": the CLI command (`q3vl <verb>`) and the benchmark workload kind
    name_hint: ClassVar[str]  # what a checkpoint's name contains ("Qwen3-VL-Reranker-2B": "rerank")
    model_name: ClassVar[str]  # the published model family's name
    metric: ClassVar[str]  # parity report key of the per-item figure
    metric_label: ClassVar[str]
    higher_is_better: ClassVar[bool]

    # ------------------------------------------------------------------ runtime
    @property
    def cli_command(self) -> str:
        """`q3vl embed` / `q3vl rerank`."""
        return f"q3vl {self.verb}"

    @abc.abstractmethod
    def output_shapes(self, hidden: int) -> dict[str, tuple[int | None, ...]]:
        """The text graph's outputs and their shapes (None: the batch axis)."""

    @abc.abstractmethod
    def request(self, items: list[dict[str, Any]]) -> Any:
        """The runtime's `plan()`/`process()` argument that runs `items` (one output row per item)."""

    def head_token_ids(self, tokenizer: Any) -> dict[str, int]:
        """Extra vocabulary ids the head needs, recorded in the manifest (none by default)."""
        return {}

    # ------------------------------------------------------------------ `q3vl parity` against the reference
    def parity_requests(self, items: list[dict[str, Any]], query_image: Any) -> list[tuple[str, Any]]:
        """(row label prefix, request) pairs that run every item against the reference.

        `query_image` is the image a task whose requests carry a query puts in its image query (the
        caller's sample input: this registry makes no inputs of its own).
        """
        return [("", self.request(items))]

    @abc.abstractmethod
    def values(self, model: Any, request: Any) -> np.ndarray:
        """The runtime's `process(request)` as an array (one row or value per item)."""

    @abc.abstractmethod
    def reference_values(self, reference: Any, request: Any) -> np.ndarray:
        """The PyTorch reference's output for the same request, as the wrapper computes it."""

    # ------------------------------------------------------------------ parity
    @abc.abstractmethod
    def compare(self, got: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> np.ndarray:
        """The per-item parity figure of two output sets (rows aligned): float64 `[N]`."""

    @abc.abstractmethod
    def bound(self, tol: Tolerance) -> float:
        """The limit a precision's `Tolerance` sets on this task's figure."""

    def worst(self, values: Any) -> float:
        """The worst of per-item figures."""
        values = np.asarray(values, np.float64)
        return float(values.min() if self.higher_is_better else values.max())

    def within(self, value: float, tol: Tolerance) -> bool:
        """Whether one figure (or the worst) meets the tolerance."""
        return bool(value >= self.bound(tol) if self.higher_is_better else value <= self.bound(tol))

    def describe(self, value: float) -> str:
        """`embedding min cos 0.9999999` / `score max |diff| 1.2e-06`."""
        return f"{self.metric.replace('_', ' ')} {value:.7f}" if self.higher_is_better else \
            f"{self.metric.replace('_', ' ')} {value:.2e}"


class EmbeddingTask(Task):
    """Qwen3-VL-Embedding: the L2-normalised final-norm state of the last valid token."""

    name = "embedding"
    outputs = (EMBEDDING, POOLED)  # (normalised, raw pooled): process(normalize=False) needs no 2nd graph
    default_instruction = "Represent the user's input."
    default_max_length = 8192
    class_name = "q3vl.Embedder"
    verb = "embed"
    name_hint = "embed"
    model_name = "Qwen3-VL-Embedding"
    metric = "embed_min_cos"
    metric_label = "cosine"
    higher_is_better = True

    def output_shapes(self, hidden: int) -> dict[str, tuple[int | None, ...]]:
        return {EMBEDDING: (None, hidden), POOLED: (None, hidden)}

    def request(self, items: list[dict[str, Any]]) -> Any:
        return items

    def values(self, model: Any, request: Any) -> np.ndarray:
        return np.asarray(model.process(request), np.float64)

    def reference_values(self, reference: Any, request: Any) -> np.ndarray:
        # one item per forward pass: the wrapper pads on the right, which never changes a pooled row
        return np.concatenate([reference.process([item]).float().numpy() for item in request]).astype(np.float64)

    def compare(self, got: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> np.ndarray:
        return row_cosine(got[EMBEDDING], ref[EMBEDDING])

    def bound(self, tol: Tolerance) -> float:
        return tol.embed_cos


class RerankerTask(Task):
    """Qwen3-VL-Reranker: sigmoid of the yes-minus-no logit at the last valid token."""

    name = "reranker"
    outputs = (SCORE,)
    default_instruction = "Given a search query, retrieve relevant candidates that answer the query."
    default_max_length = 10240
    class_name = "q3vl.Reranker"
    verb = "rerank"
    name_hint = "rerank"
    model_name = "Qwen3-VL-Reranker"
    metric = "score_max_abs_diff"
    metric_label = "|score diff|"
    higher_is_better = False
    # the fixed query every parity document is scored against
    PARITY_QUERY: ClassVar[dict[str, Any]] = {"text": "which picture shows a gradient?"}

    def output_shapes(self, hidden: int) -> dict[str, tuple[int | None, ...]]:
        return {SCORE: (None,)}

    def request(self, items: list[dict[str, Any]]) -> Any:
        return {"query": self.PARITY_QUERY, "documents": items}

    def parity_requests(self, items: list[dict[str, Any]], query_image: Any) -> list[tuple[str, Any]]:
        """Every item as a document against a text query, then against a query carrying `query_image`."""
        docs = [{k: v for k, v in it.items() if k in ("text", "image", "video")} for it in items]
        queries = (("text query / ", {"text": "a red box moving over a gradient"}),
                   ("image query / ", {"text": "like this", "image": query_image}))
        return [(label, {"query": q, "documents": docs}) for label, q in queries]

    def values(self, model: Any, request: Any) -> np.ndarray:
        return np.asarray(model.process(request), np.float64)

    def reference_values(self, reference: Any, request: Any) -> np.ndarray:
        return np.asarray(reference.process(request), np.float64)

    def head_token_ids(self, tokenizer: Any) -> dict[str, int]:
        yes, no = tokenizer.token_id("yes"), tokenizer.token_id("no")
        if yes is None or no is None:
            from q3vl.errors import CheckpointError

            raise CheckpointError("the tokenizer has no 'yes'/'no' tokens, which the reranker head needs")
        return {"yes": yes, "no": no}

    def compare(self, got: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> np.ndarray:
        return np.abs(np.asarray(got[SCORE], np.float64) - np.asarray(ref[SCORE], np.float64))

    def bound(self, tol: Tolerance) -> float:
        return tol.score_abs


TASKS: dict[str, Task] = {t.name: t for t in (EmbeddingTask(), RerankerTask())}


def task_for(name: str) -> Task:
    """The registered task called `name`; a `ConfigError` naming the known ones otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}") from None
