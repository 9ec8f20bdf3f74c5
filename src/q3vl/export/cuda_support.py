"""Static CUDA check: where would ONNX Runtime's CUDA provider run each node of a graph, and what would it copy?

No GPU is needed. The table (`assets/ort-cuda-kernels.json`) is the CUDA kernel registry of the pinned
onnxruntime-gpu release, read from its own wheel (`benchmarks/ort_cuda_kernels.py` says how), with the
operator schemas used to infer every node's input and output types. For each node this module
finds the CUDA kernel ONNX Runtime would pick (op, domain, opset and every type constraint must
match), then repeats the two steps of ONNX Runtime's session setup that decide the rest:

- `GetCpuPreferredNodes`: consumers of host tensors (Shape's output, say) whose inputs are all host
  tensors, small constants or graph inputs run on the CPU ("shape math"), unless the CUDA kernel
  takes that input from host memory on purpose (Reshape's shape, Range's bounds, ...);
- `TransformerMemcpy`: a tensor produced on one device and consumed on the other gets a Memcpy node.

A node without a CUDA kernel falls back to the CPU provider with the copies that causes; ORT refuses
CUDA graphs (`enable_cuda_graph`) for any session that has a Memcpy node. The simulation agrees node
for node with ORT's partitioner on q3vl's graphs (`benchmarks/results/cuda-coverage-validation.md`).
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ASSETS = Path(__file__).resolve().parent.parent / "assets"
TABLE_FILE = ASSETS / "ort-cuda-kernels.json"
HALF_TYPES = {"float16", "bfloat16", "float8e4m3fn", "float8e4m3fnuz", "float8e5m2", "float8e5m2fnuz"}
SMALL_INITIALIZER = 100  # elements; ORT's kSmallInitializerThreshold


@functools.lru_cache(maxsize=1)
def table() -> dict[str, Any]:
    """The vendored kernel table (see the module docstring)."""
    return dict(json.loads(TABLE_FILE.read_text()))


def ort_gpu_version() -> str:
    """The onnxruntime-gpu release the table was read from (the one q3vl's GPU docs pin)."""
    return str(table()["onnxruntime_gpu"])


@dataclass
class Placement:
    """One node: where ONNX Runtime's CUDA session would run it, and why."""

    name: str
    op: str  # "domain:op_type"
    inputs: tuple[str, ...]  # input types, "" for an absent optional input
    provider: str  # "CUDA" or "CPU"
    why: str


@dataclass
class Copy:
    """A Memcpy node ONNX Runtime would add: `tensor` crosses between host and device."""

    tensor: str
    direction: str  # "to CUDA" or "to CPU"
    producer: str
    consumers: tuple[str, ...]


@dataclass
class CudaReport:
    """The nodes of one graph with their placement, and the copies between CPU and CUDA nodes."""

    path: str
    nodes: list[Placement] = field(default_factory=list)
    copies: list[Copy] = field(default_factory=list)

    @property
    def fallbacks(self) -> list[Placement]:
        """Nodes with no CUDA kernel for their op and types."""
        return [n for n in self.nodes if n.provider == "CPU" and n.why.startswith("no CUDA kernel")]

    @property
    def cuda_graph_ok(self) -> bool:
        """ORT captures CUDA graphs only for sessions without Memcpy nodes."""
        return not self.copies

    def summary(self) -> str:
        cpu = Counter(n.op for n in self.nodes if n.provider == "CPU")
        return (f"{self.path}: {len(self.nodes)} nodes, {len(self.nodes) - sum(cpu.values())} on CUDA, "
                f"{len(self.fallbacks)} without a CUDA kernel, {sum(cpu.values()) - len(self.fallbacks)} "
                f"shape-math nodes on the CPU, {len(self.copies)} copies"
                + ("" if self.cuda_graph_ok else " (ORT refuses CUDA graphs)"))


# ------------------------------------------------------------------ types
def _elem(code: int) -> str:
    import onnx

    return str(onnx.TensorProto.DataType.Name(code)).lower()


def _schema(op: str, opset: int) -> list[Any] | None:
    """The schema in force at `opset`: [since, inputs, outputs, constraints], or None if unknown."""
    versions = [v for v in table()["schemas"].get(op, []) if v[0] <= opset]
    return versions[-1] if versions else None


def _formal(params: list[list[Any]], i: int) -> list[Any] | None:
    """The formal parameter of actual argument i (a variadic last parameter takes the rest)."""
    if i < len(params):
        return params[i]
    return params[-1] if params and params[-1][2] else None


def _bind(args: list[str], params: list[list[Any]], types: dict[str, str]) -> dict[str, list[str]]:
    """Constraint name (and formal parameter name) -> the types of the actual arguments it covers."""
    bound: dict[str, list[str]] = {}
    for i, arg in enumerate(args):
        formal = _formal(params, i)
        if not arg or formal is None or arg not in types:
            continue
        for key in (formal[1], formal[0]):
            bound.setdefault(key, []).append(types[arg])
    return bound


def _output_types(node: Any, schema: list[Any] | None, bound: dict[str, list[str]]) -> list[str | None]:
    if node.op_type == "Cast":
        return [_elem(next(a.i for a in node.attribute if a.name == "to"))]
    if node.op_type in ("Constant", "ConstantOfShape"):
        value = [a.t for a in node.attribute if a.name == "value"]
        return [_elem(value[0].data_type) if value else "float"]
    out: list[str | None] = []
    for j in range(len(node.output)):
        formal = _formal(schema[2], j) if schema else None
        if formal is None:
            out.append(None)
        elif formal[1].startswith("tensor("):
            out.append(formal[1][len("tensor("):-1])
        elif formal[1] in bound:
            out.append(bound[formal[1]][0])
        else:
            allowed = schema[3].get(formal[1], []) if schema else []
            out.append(allowed[0] if len(allowed) == 1 else None)
    return out


def infer_types(model: Any) -> dict[str, str]:
    """Every tensor's element type (graph inputs, initializers, node outputs) from the op schemas."""
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    types = {v.name: _elem(v.type.tensor_type.elem_type) for v in model.graph.input}
    types.update({t.name: _elem(t.data_type) for t in model.graph.initializer})
    for node in model.graph.node:
        domain = node.domain or "ai.onnx"
        schema = _schema(f"{domain}:{node.op_type}", opsets.get(domain, 1))
        bound = _bind(list(node.input), schema[1], types) if schema else {}
        for name, t in zip(node.output, _output_types(node, schema, bound)):
            if name and t:
                types[name] = t
    return types


# ------------------------------------------------------------------ kernels
def _kernel(node: Any, opset: int, types: dict[str, str]) -> tuple[list[Any] | None, str]:
    """(the CUDA kernel def ORT would pick, a one-line reason) for one node."""
    key = f"{node.domain or 'ai.onnx'}:{node.op_type}"
    schema = _schema(key, opset)
    if schema is None:
        return None, f"no CUDA kernel: {key} is not in q3vl's onnxruntime-gpu {ort_gpu_version()} table"
    since = schema[0]
    defs = [d for d in table()["kernels"].get(key, []) if d[0] <= since <= (d[1] if d[1] is not None else since)]
    if not defs:
        return None, f"no CUDA kernel for {key} at opset {since}"
    bound = {**_bind(list(node.input), schema[1], types), **{
        f"out:{k}": v for k, v in _bind(list(node.output), schema[2], types).items()}}
    for d in defs:
        ok = all(t in allowed for c, allowed in d[2].items() for t in bound.get(c, []) + bound.get(f"out:{c}", []))
        if ok:
            hi = "+" if d[1] is None else "" if d[1] == d[0] else f"-{d[1]}"
            return d, f"CUDA kernel, opset {d[0]}{hi}"
    have = sorted({f"{c}={t}" for c in defs[0][2] for t in bound.get(c, []) + bound.get(f"out:{c}", [])})
    offered = " or ".join(",".join(f"{c}={'/'.join(v)}" for c, v in d[2].items() if c in bound) for d in defs)
    return None, f"no CUDA kernel for {', '.join(have)} (CUDA has {offered})"


def _memory(node: Any) -> dict[str, list[int]]:
    return dict(table()["memory"].get(f"{node.domain or 'ai.onnx'}:{node.op_type}", {}))


def _cpu_preferred(model: Any, kernels: dict[int, Any], types: dict[str, str]) -> set[int]:
    """ORT's GetCpuPreferredNodes: small host-tensor computations it keeps on the CPU."""
    nodes = model.graph.node
    consumers: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        for arg in n.input:
            consumers.setdefault(arg, []).append(i)
    small = {t.name for t in model.graph.initializer if _numel(t) <= SMALL_INITIALIZER}
    graph_inputs = {v.name for v in model.graph.input}
    host: set[str] = set()
    queue: list[int] = []
    for i, n in enumerate(nodes):
        if i in kernels:
            for j in _memory(n).get("cpu_outputs", []):
                host.add(n.output[j])
                queue += consumers.get(n.output[j], [])
    seen, cpu = set(), set()
    while queue:
        queue.sort()  # nodes are written in topological order: ORT visits the earliest first
        i = queue.pop(0)
        if i in seen:
            continue
        seen.add(i)
        n = nodes[i]
        if i in kernels and not _host_only(n, host, small, graph_inputs, types):
            continue
        if i in kernels:
            cpu.add(i)
        host.update(o for o in n.output if o)
        queue += [c for o in n.output for c in consumers.get(o, [])]
    return cpu


def _host_only(node: Any, host: set[str], small: set[str], graph_inputs: set[str], types: dict[str, str]) -> bool:
    cpu_inputs = _memory(node).get("cpu_inputs", [])
    for i, arg in enumerate(node.input):
        if types.get(arg) in HALF_TYPES:
            return False
        if arg in small or arg in graph_inputs:
            continue
        if arg not in host or i in cpu_inputs:
            return False
    return True


def _numel(t: Any) -> int:
    n = 1
    for d in t.dims:
        n *= d
    return n


def _copies(model: Any, on_cuda: dict[int, bool]) -> list[Copy]:
    """ORT's TransformerMemcpy: one Memcpy per tensor that crosses between CPU and CUDA nodes."""
    dev_in: dict[str, set[bool]] = {}  # tensor -> devices its consumers read it on (True: CUDA)
    dev_out: dict[str, bool] = {}
    producer: dict[str, str] = {}
    readers: dict[str, list[str]] = {}
    for i, n in enumerate(model.graph.node):
        mem = _memory(n) if on_cuda[i] else {}
        for j, arg in enumerate(n.input):
            if arg:
                dev_in.setdefault(arg, set()).add(on_cuda[i] and j not in mem.get("cpu_inputs", []))
                readers.setdefault(arg, []).append(n.op_type)
        for j, arg in enumerate(n.output):
            if arg:
                dev_out[arg] = on_cuda[i] and j not in mem.get("cpu_outputs", [])
                producer[arg] = n.op_type
    graph_inputs = {v.name for v in model.graph.input}
    out = []
    for arg, devices in dev_in.items():
        if arg in graph_inputs and devices == {True, False}:
            out.append(Copy(arg, "to CUDA", "graph input", tuple(readers[arg])))
        elif arg in dev_out and (not dev_out[arg]) in devices:
            out.append(Copy(arg, "to CPU" if dev_out[arg] else "to CUDA", producer[arg], tuple(readers[arg])))
    return out


def check_model(model: Any, path: str = "<model>") -> CudaReport:
    """Place every node of an ONNX ModelProto (weights need not be loaded)."""
    types = infer_types(model)
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    kernels: dict[int, Any] = {}
    reasons: dict[int, str] = {}
    for i, n in enumerate(model.graph.node):
        d, reasons[i] = _kernel(n, opsets.get(n.domain or "ai.onnx", 1), types)
        if d is not None:
            kernels[i] = d
    preferred = _cpu_preferred(model, kernels, types)
    on_cuda = {i: i in kernels and i not in preferred for i in range(len(model.graph.node))}
    report = CudaReport(path)
    for i, n in enumerate(model.graph.node):
        why = reasons[i] if i not in preferred else (
            "shape math: ORT keeps small host-tensor computations on the CPU (no copy)")
        report.nodes.append(Placement(n.name, f"{n.domain or 'ai.onnx'}:{n.op_type}",
                                      tuple(types.get(a, "?") if a else "" for a in n.input),
                                      "CUDA" if on_cuda[i] else "CPU", why))
    report.copies = _copies(model, on_cuda)
    _note_copies(model, report, opsets)
    return report


def _param_name(params: list[list[Any]], i: int) -> str:
    formal = _formal(params, i)
    return str(formal[0]) if formal else str(i)


def _note_copies(model: Any, report: CudaReport, opsets: dict[str, int]) -> None:
    """Say on each fallback node which of its inputs and outputs cross to and from the device."""
    to_cpu = {c.tensor for c in report.copies if c.direction == "to CPU"}
    to_cuda = {c.tensor for c in report.copies if c.direction == "to CUDA"}
    for node, place in zip(model.graph.node, report.nodes):
        if place.provider != "CPU" or not place.why.startswith("no CUDA kernel"):
            continue
        schema = _schema(place.op, opsets.get(node.domain or "ai.onnx", 1)) or [0, [], [], {}]
        ins = [_param_name(schema[1], i) for i, a in enumerate(node.input) if a in to_cpu]
        outs = [_param_name(schema[2], i) for i, a in enumerate(node.output) if a in to_cuda]
        if ins or outs:
            place.why += (f"; copies {', '.join(ins) or 'nothing'} to the CPU and "
                          f"{', '.join(outs) or 'nothing'} back to CUDA")


def check_graph(path: str | Path) -> CudaReport:
    """`check_model` on an ONNX file, read without its external weights."""
    import onnx

    return check_model(onnx.load(str(path), load_external_data=False), str(path))


# ------------------------------------------------------------------ the docs table
def rows(report: CudaReport) -> dict[tuple[str, str, str], int]:
    """(op, input types, where it runs and why) -> node count."""
    out: Counter[tuple[str, str, str]] = Counter()
    for n in report.nodes:
        types = ", ".join(t or "-" for t in n.inputs)
        where = f"CUDA kernel ({n.why.removeprefix('CUDA kernel, ')})" if n.provider == "CUDA" else f"CPU: {n.why}"
        out[(n.op.removeprefix("ai.onnx:"), types, where)] += 1
    return dict(out)


def coverage_markdown(graphs: dict[str, dict[str, CudaReport]]) -> str:
    """One table per graph, one node-count column per task: {"text fp16": {"embedding": report, ...}}."""
    parts = []
    for title, reports in graphs.items():
        by_task = {task: rows(r) for task, r in reports.items()}
        keys = sorted({k for r in by_task.values() for k in r}, key=lambda k: (not k[2].startswith("CPU"), k))
        totals = "; ".join(f"{task}: " + r.summary().split(": ", 1)[1] for task, r in reports.items())
        parts += [f"**{title}** ({totals})", "", f"| op | input types | nodes ({' / '.join(by_task)}) | runs on |",
                  "|---|---|---|---|"]
        for op, types, where in keys:
            counts = " / ".join(str(r.get((op, types, where), 0)) for r in by_task.values())
            parts.append(f"| {op} | {types} | {counts} | {where} |")
        parts.append("")
    return "\n".join(parts)
