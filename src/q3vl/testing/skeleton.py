"""Graph skeletons: the fused graphs of any shape, every node and type, without a single weight.

A static check of the 2B or 8B graphs (which ops, which types: `q3vl.export.cuda_support`) needs
their nodes, not gigabytes of weights. The fused builders are hand-written ONNX, so they run here
unchanged on `MetaWeights`: tensors that have a shape and a dtype and no values (`MetaArray`), fed
with the tensor names and shapes transformers lays out for the config (`parameter_shapes`), and a
`GraphWriter(data=False)` that records each initializer's name, shape and type. The skeleton of a
shape is node for node the graph `export_bundle` writes for a checkpoint of that shape
(tests/test_cuda_support.py compares them at the tiny shape).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from q3vl.export.weights import Weights
from q3vl.spec import ModelSpec
from q3vl.tasks import task_for
from q3vl.testing.checkpoint import parameter_shapes, tokenizer_dir
from q3vl.testing.shapes import config_dict


class MetaArray:
    """A shape and a dtype: the few numpy/torch operations the fused builders apply to weights."""

    def __init__(self, shape: Iterable[int], dtype: Any = np.float32) -> None:
        self.shape = tuple(int(d) for d in shape)
        self.dtype = np.dtype(dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def T(self) -> MetaArray:  # numpy's name
        return MetaArray(self.shape[::-1], self.dtype)

    def astype(self, dtype: Any) -> MetaArray:
        return MetaArray(self.shape, dtype)

    def reshape(self, *shape: int) -> MetaArray:
        dims = list(shape[0] if len(shape) == 1 and isinstance(shape[0], tuple) else shape)
        if -1 in dims:
            known = math.prod(d for d in dims if d != -1)
            dims[dims.index(-1)] = math.prod(self.shape) // known
        return MetaArray(dims, self.dtype)

    def numpy(self) -> MetaArray:  # torch's tensor -> array, as `Weights` callers use it
        return self

    def float(self) -> MetaArray:
        return self.astype(np.float32)

    def __getitem__(self, key: Any) -> MetaArray:
        keys = key if isinstance(key, tuple) else (key,)
        shape, axis = [], 0
        for k in keys:
            if k is None:
                shape.append(1)
            elif isinstance(k, slice) and k == slice(None):
                shape.append(self.shape[axis])
                axis += 1
            elif isinstance(k, (int, np.integer)):
                axis += 1
            else:
                raise TypeError(f"MetaArray does not support index {k!r}")
        return MetaArray(shape + list(self.shape[axis:]), self.dtype)

    def __sub__(self, other: MetaArray) -> MetaArray:
        return MetaArray(np.broadcast_shapes(self.shape, other.shape), self.dtype)

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        if func is np.concatenate:
            parts, axis = args[0], kwargs.get("axis", args[1] if len(args) > 1 else 0)
            shape = list(parts[0].shape)
            shape[axis] = sum(p.shape[axis] for p in parts)
            return MetaArray(shape, parts[0].dtype)
        return NotImplemented


class MetaWeights(Weights):
    """`Weights` over a name -> shape table: every tensor is a float32 `MetaArray`."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]) -> None:  # no checkpoint to read
        self.path = Path("<skeleton>")
        self.shapes = dict(shapes)
        self.map = {name: "<skeleton>" for name in shapes}

    def many(self, names: Iterable[str]) -> dict[str, Any]:
        return {n: MetaArray(self.shapes[n]) for n in names}


@functools.lru_cache(maxsize=1)
def _tokenizer() -> Any:
    from q3vl.preprocess.prompt import TextTokenizer

    return TextTokenizer(tokenizer_dir() / "tokenizer.json")


def _token_ids(task: str) -> dict[str, int]:
    """The ids `export_bundle` records (the real Qwen tokenizer that `make_checkpoint` ships)."""
    tokenizer = _tokenizer()
    return {**tokenizer.special.as_dict(), **task_for(task).head_token_ids(tokenizer)}


@functools.lru_cache(maxsize=8)
def _shapes(shape: str, task: str) -> tuple[ModelSpec, dict[str, tuple[int, ...]]]:
    config = config_dict(shape, task)
    return ModelSpec.from_config(config), parameter_shapes(config)


def skeleton_graphs(shape: str, task: str, precision: str, out_dir: str | Path) -> dict[str, Path]:
    """Write the fused vision and text graphs of `shape` without weights; returns {"vision": ..., "text": ...}."""
    from q3vl.export.fused_text import TextGraph
    from q3vl.export.fused_vision import VisionGraph

    spec, shapes = _shapes(shape, task)
    kind = task_for(task)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = MetaWeights(shapes)
    token_ids = _token_ids(kind.name)
    return {"vision": VisionGraph(spec, weights, out / "vision.onnx", precision, data=False).build(),
            "text": TextGraph(spec, weights, out / "text.onnx", kind, token_ids, precision, data=False).build()}


def skeleton_coverage(shape: str, out_dir: str | Path) -> dict[str, dict[str, Any]]:
    """`cuda_support` reports of every fused graph of `shape`: {"text fp16": {"embedding": report, ...}, ...}.

    The vision graph does not depend on the task, so it is checked once ("both tasks": the embedding export's).
    """
    from q3vl.export.cuda_support import check_graph

    out: dict[str, dict[str, Any]] = {}
    for precision in ("fp16", "fp32"):
        for task in ("embedding", "reranker"):
            graphs = skeleton_graphs(shape, task, precision, Path(out_dir) / f"{shape}-{task}-{precision}")
            if task == "embedding":
                out[f"vision {precision}"] = {"both tasks": check_graph(graphs["vision"])}
            out.setdefault(f"text {precision}", {})[task] = check_graph(graphs["text"])
    return out
