"""The torch-free runtime: `Embedder` and `Reranker` over an exported bundle."""

from q3vl.runtime.embedder import Embedder, truncate_dim
from q3vl.runtime.reranker import Reranker

__all__ = ["Embedder", "Reranker", "truncate_dim"]
