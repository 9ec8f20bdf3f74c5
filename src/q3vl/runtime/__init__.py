"""The torch-free runtime: `Embedder` and `Reranker` over an exported bundle, and their batch seam.

The seam (`run.py`): `BatchModel`, the protocol both models satisfy (plan -> batches -> load ->
run_batch -> values), and `run_batches`, the one loop that runs micro-batches, reporting each
item's outputs or error to a `BatchSink` (`Collector` for one call). Every front end (the API's
`process()`, the server's queue, the Ray callables, the export parity harness) runs its items
through it; `guarded` / `as_input_error` turn any failure of one item into that item's `InputError`.
`prepare_image` is the embedder's own preparation of one image, for a stage that decodes apart
from the model.

The names load on first use, so `q3vl.runtime.options` (and the command line, which checks its
options before it loads a model) does not pay for the preprocessing stack and ONNX Runtime.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from q3vl.runtime.backends.base import backend_option_names
    from q3vl.runtime.batch import BatchPolicy, Details, Loaded, Plan
    from q3vl.runtime.embedder import Embedder
    from q3vl.runtime.images import bundle_geometry, prepare_image
    from q3vl.runtime.options import RuntimeOptions
    from q3vl.runtime.reranker import Reranker
    from q3vl.runtime.run import (
        BatchModel,
        BatchResult,
        BatchRunner,
        BatchSink,
        Collector,
        Outputs,
        as_input_error,
        guarded,
        run_batches,
    )

_WHERE = {"BatchPolicy": "batch", "Details": "batch", "Loaded": "batch", "Plan": "batch", "Embedder": "embedder",
          "Reranker": "reranker", "BatchModel": "run", "BatchResult": "run", "BatchRunner": "run", "BatchSink": "run",
          "Collector": "run", "Outputs": "run", "as_input_error": "run", "guarded": "run", "run_batches": "run",
          "bundle_geometry": "images", "prepare_image": "images", "RuntimeOptions": "options",
          "backend_option_names": "backends.base"}
__all__ = ["BatchModel", "BatchPolicy", "BatchResult", "BatchRunner", "BatchSink", "Collector", "Details", "Embedder",
           "Loaded", "Outputs", "Plan", "Reranker", "RuntimeOptions", "as_input_error", "backend_option_names",
           "bundle_geometry", "guarded",
           "model_for", "prepare_image", "run_batches"]


def model_for(task: str) -> Any:
    """The runtime class (`Embedder` / `Reranker`) that runs bundles of `task`, a `q3vl.tasks` name."""
    from q3vl.errors import ConfigError
    from q3vl.runtime.embedder import Embedder
    from q3vl.runtime.reranker import Reranker

    models = {m.task.name: m for m in (Embedder, Reranker)}
    if task not in models:
        raise ConfigError(f"no runtime class runs {task!r} bundles; known tasks: {sorted(models)}")
    return models[task]


def __getattr__(name: str) -> object:
    if name in _WHERE:
        return getattr(importlib.import_module(f"q3vl.runtime.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'q3vl.runtime' has no attribute {name!r}")
