"""A small ONNX graph writer that streams weights to the external-data file as they are added.

The fused graphs are built node by node (as onnxruntime-genai's model builder does) rather than
traced, so the exact ops are chosen here. Each weight is written to `<graph>.onnx.data` the moment
it is added and only its location stays in memory, so a 2B or 8B graph is built with about one
tensor in RAM at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MS = "com.microsoft"
ALIGN = 64
DTYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
          np.dtype(np.int64): TensorProto.INT64, np.dtype(np.int32): TensorProto.INT32,
          np.dtype(np.bool_): TensorProto.BOOL, np.dtype(np.uint8): TensorProto.UINT8,
          np.dtype(np.int8): TensorProto.INT8}


class GraphWriter:
    """Collects nodes, inputs and outputs; weights go straight to disk.

    `transform(name, array)`, when given, maps every weight before it is written (an int8 plan's
    smoothing folds, `q3vl.export.quantize.quantized`). With `data=False` no weight is written:
    each initializer keeps only its name, shape and type (a graph skeleton, for static checks of
    a shape whose weights are gigabytes, `q3vl.testing.skeleton`).
    """

    def __init__(self, path: Path, transform: Callable[[str, np.ndarray], np.ndarray] | None = None,
                 data: bool = True) -> None:
        self.path = Path(path)
        self.transform = transform
        self.data_name = self.path.name + ".data"
        for f in (self.path, self.path.with_name(self.data_name)):
            f.unlink(missing_ok=True)
        self._data = open(self.path.with_name(self.data_name), "wb") if data else None  # noqa: SIM115 (closed in save)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._count = 0

    def fresh(self, hint: str) -> str:
        """A unique value name."""
        self._count += 1
        return f"{hint}_{self._count}"

    def weight(self, name: str, array: np.ndarray) -> str:
        """A constant tensor stored in the external-data file."""
        if self._data is None:  # a skeleton: name, shape and type only
            t = onnx.TensorProto(name=name, dims=list(array.shape), data_type=DTYPES[np.dtype(array.dtype)])
            t.data_location = TensorProto.EXTERNAL
            t.external_data.add(key="location", value=self.data_name)
            self.initializers.append(t)
            return name
        arr = np.ascontiguousarray(array if self.transform is None else self.transform(name, array))
        pad = (-self._data.tell()) % ALIGN
        self._data.write(b"\0" * pad)
        offset = self._data.tell()
        self._data.write(arr.tobytes())
        t = onnx.TensorProto(name=name, dims=list(arr.shape), data_type=DTYPES[arr.dtype])
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.data_name), ("offset", str(offset)), ("length", str(arr.nbytes))):
            t.external_data.add(key=k, value=v)
        self.initializers.append(t)
        return name

    def const(self, array: Any, hint: str = "const", dtype: Any = None) -> str:
        """A small constant kept inline in the graph."""
        arr = np.asarray(array, dtype=dtype)
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(arr, name))
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", hint: str | None = None,
           **attrs: Any) -> Any:
        """Add a node; returns its output name (or a list when `n_out` > 1)."""
        outs = [self.fresh(hint or op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.fresh(op_type), domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs

    def add_input(self, name: str, elem: int, shape: list[Any]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem, shape))
        return name

    def add_output(self, value: str, name: str, elem: int, shape: list[Any]) -> None:
        """Expose `value` as graph output `name` (through an Identity, so names never collide)."""
        self.nodes.append(helper.make_node("Identity", [value], [name], name=self.fresh("output")))
        self.outputs.append(helper.make_tensor_value_info(name, elem, shape))

    def save(self, graph_name: str, opset: int = 20) -> Path:
        """Write the graph proto next to its data file."""
        if self._data is not None:
            self._data.close()
        graph = helper.make_graph(self.nodes, graph_name, self.inputs, self.outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)],
                                  producer_name="q3vl")
        model.ir_version = 10
        onnx.save_model(model, str(self.path))
        return self.path
