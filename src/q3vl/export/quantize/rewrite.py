"""Apply an `Int8Plan` to an fp32 fused graph: the same graphs `q3vl export --weights int8` writes.

Every initializer goes through `Int8Plan.transform` (smoothing folded into norms, v and up
columns), and every planned MatMul is replaced by the ops `emit_matmul` writes at export time, its
output keeping the MatMul's name. Node order, op types, attributes and weight values then match
the export-time graph, so the two ways give the same numbers (tested).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from q3vl.export.quantize.int8 import Int8Plan, emit_matmul

log = logging.getLogger(__name__)


class _Sink:
    """The `OpSink` interface over a list of new nodes and initializers (names prefixed, never colliding)."""

    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self._count = 0

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"q8_{hint}_{self._count}"

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", hint: str | None = None,
           **attrs: Any) -> Any:
        from onnx import helper

        outs = [self.fresh(hint or op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.fresh(op_type), domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, array: Any, hint: str = "const", dtype: Any = None) -> str:
        from onnx import numpy_helper

        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(array, dtype=dtype), name))
        return name

    def weight(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name


def rewrite(src: Path, dst: Path, plan: Int8Plan) -> int:
    """Write the int8 version of fused graph `src` to `dst` (+ `.data`); returns the MatMuls quantized."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    sink, nodes, replaced = _Sink(), [], set()
    for node in g.node:
        if node.op_type == "MatMul" and node.input[1] in inits and plan.quantized(node.input[1]):
            w = numpy_helper.to_array(inits[node.input[1]])
            start = len(sink.nodes)
            emit_matmul(sink, node.input[0], w, node.input[1], plan)
            sink.nodes[-1].output[0] = node.output[0]  # the last op yields the product: keep the MatMul's name
            nodes.extend(sink.nodes[start:])
            replaced.add(node.input[1])
        else:
            nodes.append(node)
    kept = []
    for init in g.initializer:
        if init.name in replaced:
            continue
        arr = numpy_helper.to_array(init)
        new = plan.transform(init.name, arr)
        kept.append(init if new is arr else numpy_helper.from_array(new.astype(arr.dtype), init.name))
    del g.node[:]
    g.node.extend(nodes)
    del g.initializer[:]
    g.initializer.extend(kept + sink.initializers)
    for f in (dst, dst.with_name(dst.name + ".data")):
        f.unlink(missing_ok=True)
    onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=dst.name + ".data", size_threshold=1024)
    log.info("%s: %d MatMuls int8, %d kept float", dst.name, len(replaced),
             sum(1 for n in nodes if n.op_type == "MatMul"))
    return len(replaced)
