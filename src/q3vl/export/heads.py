"""The tasks' heads, on the final-norm state `h [B, D]` of each sequence's last valid token.

    embedding:  h -> (h / max(||h||, 1e-12), h)          outputs sentence_embedding [B, D], pooled_state [B, D]
    reranker:   h -> sigmoid(h . (w_yes - w_no))          output  relevance_score [B]

The reranker never carries the 151,936-row LM head: only the difference of its "yes" and "no" rows
(the LM head, or the token embeddings when they are tied). Each head exists twice, for the two graph
kinds: ops added to a hand-built (fused) graph, and a torch module for the traced (plain) graph.
`HEADS` maps each task of the `q3vl.tasks` registry (by name) to its heads, so the torch-free registry
never imports this side; `heads_for` looks a task's up, and a test checks that every task has one.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import numpy as np
from onnx import TensorProto as T

from q3vl.errors import ConfigError
from q3vl.tasks import EMBEDDING, POOLED, SCORE, TASKS, Task

EMBED_TABLE = "model.language_model.embed_tokens.weight"


def yes_minus_no(weights: Any, token_ids: dict[str, int]) -> Any:
    """The torch tensor `w_yes - w_no` [D] from the LM head (or the tied token embeddings)."""
    if "yes" not in token_ids or "no" not in token_ids:
        raise ValueError("the reranker head needs the 'yes' and 'no' token ids")
    rows = weights.get("lm_head.weight" if "lm_head.weight" in weights.map else EMBED_TABLE)
    return rows[token_ids["yes"]] - rows[token_ids["no"]]


# ---------------------------------------------------------------- hand-built (fused) graphs
def embedding_fused(g: Any, last: str, hidden: int) -> None:
    """Normalised and raw pooled state as the graph's two outputs."""
    norm = g.op("Max", [g.op("ReduceL2", [last, g.const([-1], dtype=np.int64)], keepdims=1),
                        g.const(1e-12, dtype=np.float32)])
    g.add_output(g.op("Div", [last, norm]), EMBEDDING, T.FLOAT, ["batch", hidden])
    g.add_output(last, POOLED, T.FLOAT, ["batch", hidden])


def reranker_fused(g: Any, last: str, weights: Any, token_ids: dict[str, int],
                   matmul: Callable[[str, np.ndarray, str], str] | None = None) -> None:
    """One [D, 1] MatMul and a sigmoid: the relevance score [B]. `matmul(x, w, name)`, when given,
    writes the MatMul (a quantized export's weight format); otherwise it is a float32 MatMul.
    """
    w = yes_minus_no(weights, token_ids).float().numpy()[:, None]
    logit = (g.op("MatMul", [last, g.weight("yes_minus_no", w)]) if matmul is None
             else matmul(last, w, "yes_minus_no"))
    g.add_output(g.op("Reshape", [g.op("Sigmoid", [logit]), g.const([-1], dtype=np.int64)]), SCORE, T.FLOAT,
                 ["batch"])


# ---------------------------------------------------------------- traced (plain) graphs
def embedding_torch() -> Any:
    """A module h -> (normalised h, h)."""
    from torch import nn

    class EmbeddingHead(nn.Module):
        def forward(self, h: Any) -> Any:
            return h / h.norm(dim=-1, keepdim=True).clamp(min=1e-12), h

    return EmbeddingHead()


def reranker_torch(weights: Any, token_ids: dict[str, int]) -> Any:
    """A module h -> sigmoid(h . (w_yes - w_no)), the row kept in float32."""
    import torch
    from torch import nn

    class RerankerHead(nn.Module):
        def __init__(self, w: Any) -> None:
            super().__init__()
            self.score_w = nn.Parameter(w.to(torch.float32).contiguous(), requires_grad=False)

        def forward(self, h: Any) -> Any:
            return torch.sigmoid(h @ self.score_w)

    return RerankerHead(yes_minus_no(weights, token_ids))


# ---------------------------------------------------------------- the heads of each task
class TaskHeads(abc.ABC):
    """The torch and ONNX parts of one task: its two heads and the head on the reference's state."""

    @abc.abstractmethod
    def reference_outputs(self, model: Any, last_hidden: Any, token_ids: dict[str, int]) -> dict[str, np.ndarray]:
        """The head applied in torch to transformers' final-norm state at each row's last token."""

    @abc.abstractmethod
    def torch_head(self, weights: Any, token_ids: dict[str, int]) -> Any:
        """The plain graph's head: a torch module on the pooled state."""

    @abc.abstractmethod
    def fused_head(self, g: Any, last: str, hidden: int, weights: Any, token_ids: dict[str, int],
                   matmul: Any = None) -> None:
        """Add the head's ops and outputs to a hand-built text graph `g`.

        `matmul(x, w, name)`, when given, writes the head's constant-weight MatMuls (a quantized
        export's weight format, `q3vl.export.quantize.quantized`); otherwise they are float32 MatMuls.
        """


class EmbeddingHeads(TaskHeads):
    """Normalised and raw pooled state."""

    def reference_outputs(self, model: Any, last_hidden: Any, token_ids: dict[str, int]) -> dict[str, np.ndarray]:
        import torch

        return {EMBEDDING: torch.nn.functional.normalize(last_hidden, dim=-1).numpy(), POOLED: last_hidden.numpy()}

    def torch_head(self, weights: Any, token_ids: dict[str, int]) -> Any:
        return embedding_torch()

    def fused_head(self, g: Any, last: str, hidden: int, weights: Any, token_ids: dict[str, int],
                   matmul: Any = None) -> None:
        embedding_fused(g, last, hidden)


class RerankerHeads(TaskHeads):
    """Sigmoid of the yes-minus-no logit."""

    def reference_outputs(self, model: Any, last_hidden: Any, token_ids: dict[str, int]) -> dict[str, np.ndarray]:
        import torch

        w = model.lm_head.weight
        return {SCORE: torch.sigmoid(last_hidden @ (w[token_ids["yes"]] - w[token_ids["no"]])).numpy()}

    def torch_head(self, weights: Any, token_ids: dict[str, int]) -> Any:
        return reranker_torch(weights, token_ids)

    def fused_head(self, g: Any, last: str, hidden: int, weights: Any, token_ids: dict[str, int],
                   matmul: Any = None) -> None:
        reranker_fused(g, last, weights, token_ids, matmul)


HEADS: dict[str, TaskHeads] = {"embedding": EmbeddingHeads(), "reranker": RerankerHeads()}


def heads_for(task: Task | str) -> TaskHeads:
    """The heads of a task of the registry (or of its name)."""
    name = task if isinstance(task, str) else task.name
    if name not in HEADS:
        raise ConfigError(f"task {name!r} has no heads in q3vl.export.heads; known: {sorted(HEADS)}"
                          + ("" if name in TASKS else f" (and it is not a task: {sorted(TASKS)})"))
    return HEADS[name]
