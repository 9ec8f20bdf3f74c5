"""The PyTorch reference (transformers + qwen-vl-utils): q3vl's parity oracle and speed baseline.

Needs the `export` extra. Nothing in the runtime imports this package.
"""

from q3vl.reference.embedder import ReferenceEmbedder
from q3vl.reference.reranker import ReferenceReranker

__all__ = ["ReferenceEmbedder", "ReferenceReranker"]
