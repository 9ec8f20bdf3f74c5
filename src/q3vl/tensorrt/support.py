"""Static check: is every op and dtype of a graph supported by TensorRT 10's ONNX parser?

The table is onnx-tensorrt's `docs/operators.md` for TensorRT 10.15 (opset 9 to 24), reduced to the
ops and types q3vl's graphs can contain plus their neighbours. TensorRT cannot be installed where
q3vl is developed, so this check is what stands between an export and a failed engine build.

The plain graphs (`graph="plain"`) are the TensorRT input: standard ONNX ops only. The fused graphs
use ONNX Runtime's `com.microsoft` contrib ops, which TensorRT's parser does not know; the check
reports them, and `q3vl trt build` refuses such bundles with that reason.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

F, H, B16, I32, I64, BOOL, U8 = "FLOAT", "FLOAT16", "BFLOAT16", "INT32", "INT64", "BOOL", "UINT8"
_FLOATS = {F, H, B16}
_NUM = _FLOATS | {I32, I64}
_ALL = _NUM | {BOOL}

TRT_VERSION = "10.15"
OPSET_RANGE = (9, 24)
# op -> types TensorRT 10.15 accepts (operators.md "Supported Types"), for the ops q3vl emits or may emit
SUPPORTED: dict[str, set[str]] = {
    "Abs": _NUM, "Add": _NUM, "And": {BOOL}, "ArgMax": _NUM, "ArgMin": _NUM, "Cast": _ALL | {U8},
    "Clip": _FLOATS, "Concat": _ALL, "Constant": _ALL, "ConstantOfShape": _ALL, "Cos": _FLOATS, "CumSum": _FLOATS,
    "Div": _NUM, "Einsum": _FLOATS, "Equal": _NUM, "Erf": _FLOATS, "Exp": _FLOATS, "Expand": _ALL, "Flatten": _ALL,
    "Floor": _FLOATS, "Gather": _ALL, "GatherElements": _ALL, "GatherND": _ALL, "Gelu": _FLOATS | {I32, I64},
    "Gemm": _FLOATS, "Greater": _NUM, "GreaterOrEqual": _NUM, "Identity": _ALL, "If": _ALL, "IsNaN": _NUM,
    "LayerNormalization": _FLOATS, "Less": _NUM, "LessOrEqual": _NUM, "Log": _FLOATS, "LogSoftmax": _FLOATS,
    "LpNormalization": _FLOATS, "MatMul": _FLOATS, "Max": _NUM, "Min": _NUM, "Mod": _NUM, "Mul": _NUM,
    "Neg": _NUM, "Not": {BOOL}, "Or": {BOOL}, "Pad": _NUM, "Pow": _NUM, "Range": _NUM, "Reciprocal": _FLOATS,
    "ReduceL2": _NUM, "ReduceMax": _NUM, "ReduceMean": _NUM, "ReduceMin": _NUM, "ReduceProd": _NUM,
    "ReduceSum": _NUM, "ReduceSumSquare": _NUM, "Relu": _NUM, "Reshape": _ALL, "RMSNormalization": _FLOATS,
    "RotaryEmbedding": _FLOATS, "Round": _FLOATS, "Shape": _ALL, "Sigmoid": _FLOATS, "Sign": _NUM, "Sin": _FLOATS,
    "Size": _ALL, "Slice": _ALL, "Softmax": _FLOATS, "Split": _ALL, "Sqrt": _FLOATS, "Squeeze": _ALL, "Sub": _NUM,
    "Sum": _NUM, "Tanh": _FLOATS, "Tile": _ALL, "TopK": _NUM, "Transpose": _ALL, "Trilu": _ALL, "Unsqueeze": _ALL,
    "Where": _ALL, "Xor": {BOOL}, "Attention": _FLOATS,
}
UNSUPPORTED = {"DynamicQuantizeLinear": "no TensorRT importer", "MatMulInteger": "no TensorRT importer",
               "NonZero": "data-dependent shape", "Unique": "no TensorRT importer"}


@dataclass
class SupportReport:
    """What a graph uses and what TensorRT 10 would reject."""

    path: str
    opset: int
    ops: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        head = f"{self.path}: opset {self.opset}, {sum(self.ops.values())} nodes, {len(self.ops)} op types"
        return head + (": supported by TensorRT " + TRT_VERSION if self.ok else
                       f": {len(self.problems)} problem(s): " + "; ".join(self.problems[:8]))


def _types(model: Any) -> dict[str, str]:
    import onnx

    names = {v: k for k, v in onnx.TensorProto.DataType.items()}
    types: dict[str, str] = {}
    for vi in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        if vi.type.HasField("tensor_type"):
            types[vi.name] = names[vi.type.tensor_type.elem_type]
    for init in model.graph.initializer:
        types[init.name] = names[init.data_type]
    return types


def check_graph(path: str | Path) -> SupportReport:
    """Check one ONNX file (weights not loaded): ops, domains, opset and tensor types."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    report = SupportReport(str(path), opset)
    if not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        report.problems.append(f"opset {opset} outside TensorRT's {OPSET_RANGE}")
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # contrib ops can stop inference; report types where known
        inferred = model
    types = _types(inferred)
    for node in model.graph.node:
        domain = node.domain or "ai.onnx"
        report.ops[f"{domain}:{node.op_type}" if domain != "ai.onnx" else node.op_type] += 1
        if domain != "ai.onnx":
            report.problems.append(f"{node.op_type} is an ONNX Runtime {domain} op TensorRT cannot parse")
            continue
        if node.op_type not in SUPPORTED:
            reason = UNSUPPORTED.get(node.op_type, "not in TensorRT's operator list")
            report.problems.append(f"{node.op_type}: {reason}")
            continue
        # the table's "Supported Types" are those of the data input (input 1 for Where; the rest of
        # the inputs are indices, axes or shapes, and comparisons output BOOL by definition)
        data = node.input[1] if node.op_type == "Where" else (node.input[0] if node.input else "")
        t = types.get(data)
        if data and t and t not in SUPPORTED[node.op_type]:
            report.problems.append(f"{node.op_type} on {t} ({data})")
    report.problems = list(dict.fromkeys(report.problems))  # one line per distinct problem
    return report
