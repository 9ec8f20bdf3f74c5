"""The torch-free runtime: `Embedder` and `Reranker` over an exported bundle, and their batch API.

The names load on first use, so `q3vl.runtime.options` (and the command line, which checks its
options before it loads a model) does not pay for the preprocessing stack and ONNX Runtime.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from q3vl.runtime.batch import BatchPolicy, Details, Loaded, Plan
    from q3vl.runtime.embedder import Embedder
    from q3vl.runtime.options import RuntimeOptions
    from q3vl.runtime.reranker import Reranker

__all__ = ["BatchPolicy", "Details", "Embedder", "Loaded", "Plan", "Reranker", "RuntimeOptions"]
_WHERE = {"BatchPolicy": "batch", "Details": "batch", "Loaded": "batch", "Plan": "batch", "Embedder": "embedder",
          "Reranker": "reranker", "RuntimeOptions": "options"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"q3vl.runtime.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'q3vl.runtime' has no attribute {name!r}")
