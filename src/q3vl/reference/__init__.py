"""The PyTorch reference (transformers + qwen-vl-utils): q3vl's parity oracle and speed baseline.

Needs the `export` extra. Nothing in the runtime imports this package.
"""

from typing import Any

from q3vl.errors import ConfigError
from q3vl.reference.embedder import ReferenceEmbedder
from q3vl.reference.reranker import ReferenceReranker

REFERENCES: dict[str, Any] = {"embedding": ReferenceEmbedder, "reranker": ReferenceReranker}


def reference_for(task: str) -> Any:
    """The PyTorch reference class for checkpoints of `task`, a `q3vl.tasks` name."""
    if task not in REFERENCES:
        raise ConfigError(f"no PyTorch reference for {task!r} checkpoints; known tasks: {sorted(REFERENCES)}")
    return REFERENCES[task]


__all__ = ["REFERENCES", "ReferenceEmbedder", "ReferenceReranker", "reference_for"]
