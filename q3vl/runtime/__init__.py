"""The torch-free runtime: `Embedder` and `Reranker` over an exported bundle, and their batch API."""

from q3vl.runtime.batch import BatchPolicy, Details, Loaded, Plan
from q3vl.runtime.embedder import Embedder
from q3vl.runtime.reranker import Reranker

__all__ = ["BatchPolicy", "Details", "Embedder", "Loaded", "Plan", "Reranker"]
