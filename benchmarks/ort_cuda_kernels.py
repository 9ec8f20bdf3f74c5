"""Vendor onnxruntime-gpu's CUDA kernel table into q3vl, read from the wheel itself, without a GPU.

`q3vl.export.cuda_support` checks every node of an exported graph against the CUDA kernels of the
pinned onnxruntime-gpu release. This script makes that table (`src/q3vl/assets/ort-cuda-kernels.json`)
from the release's own wheel, and cross-checks q3vl's simulated CUDA placement against ONNX
Runtime's real partitioner.

How a GPU build is read on a machine without a GPU: the wheel's CUDA provider library links
libcudart, libcublas, libcublasLt, libcurand and libcuda (and the TensorRT provider, which the
pybind module also loads, libnvinfer, libnvonnxparser and libcudnn). We build stub libraries that
export exactly the symbols the provider libraries import, with their version tags, where every
call succeeds and `cudaMalloc` is `malloc`. ONNX Runtime then loads the CUDA provider, builds its
kernel registry (`get_all_opkernel_def`, the same call its `gen_opkernel_doc.py` uses for
docs/OperatorKernels.md) and even creates CUDA sessions: partitioning, CPU fallback and Memcpy
insertion run for real. No kernel ever runs, so nothing numeric comes out of such a session.
Sanity check of the dump: its CPU part must equal the registry of the same release's CPU wheel.

Usage (needs gcc and nm, and a Python matching the wheel's tag with numpy and onnx installed;
never install onnxruntime-gpu into an environment that has onnxruntime: the two overwrite each
other, so the wheel is unpacked into a private folder):

    pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
        -d WORK onnxruntime-gpu==1.31.1
    python benchmarks/ort_cuda_kernels.py table --wheel WORK/onnxruntime_gpu-1.31.1-*.whl --python PY312
    python benchmarks/ort_cuda_kernels.py validate --wheel ... --python PY312 --out RESULT.md GRAPH.onnx...
    python benchmarks/ort_cuda_kernels.py docs      # rewrite docs/gpu.md's coverage table (2B skeletons)

`validate` runs each graph through ORT's partitioner (graph optimizations off, so nodes map one to
one onto the file's) and compares per-node placement and Memcpy nodes with `cuda_support.check_graph`;
it also records what a session at the runtime's optimization level ("all") inserts, and whether a
CUDA-graph session can be created.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TABLE = ROOT / "src" / "q3vl" / "assets" / "ort-cuda-kernels.json"

# the ops q3vl's graphs contain (fused fp32/fp16, int8/int4 weights, plain traced) and their neighbours
OPS = ("Abs", "Add", "And", "ArgMax", "Attention", "Cast", "Clip", "Concat", "ConstantOfShape", "Cos", "CumSum",
       "Div", "Equal", "Erf", "Exp", "Expand", "Flatten", "Gather", "GatherElements", "GatherND", "Gelu", "Gemm",
       "Greater", "GreaterOrEqual", "Identity", "LayerNormalization", "Less", "LessOrEqual", "Log", "MatMul",
       "MatMulInteger", "Max", "Min", "Mod", "Mul", "Neg", "Not", "Or", "Pow", "RMSNormalization", "Range",
       "Reciprocal", "ReduceL2", "ReduceMax", "ReduceMean", "ReduceProd", "ReduceSum", "Relu", "Reshape",
       "RotaryEmbedding", "Round", "Shape", "Sigmoid", "Sin", "Size", "Slice", "Softmax", "Split", "Sqrt",
       "Squeeze", "Sub", "Tanh", "Tile", "TopK", "Transpose", "Trilu", "Unsqueeze", "Where",
       "DynamicQuantizeLinear", "BiasGelu", "DynamicQuantizeMatMul", "FastGelu", "FusedMatMul",
       "GroupQueryAttention", "MatMulIntegerToFloat", "MatMulNBits", "MultiHeadAttention", "QuickGelu",
       "SimplifiedLayerNormalization", "SkipLayerNormalization", "SkipSimplifiedLayerNormalization")
DOMAINS = ("ai.onnx", "com.microsoft")
MIN_OPSET = 17  # older opsets are left out of the table (q3vl's graphs use 18 and up)

# Which inputs/outputs a CUDA kernel keeps in host memory (its KernelDefBuilder's InputMemoryType /
# OutputMemoryType in onnxruntime's CUDA kernel sources). The Python registry does not expose these,
# so they are listed here; `validate` checks the resulting placement against ORT's own partitioner.
MEMORY = {
    "ai.onnx:Shape": {"cpu_outputs": [0]}, "ai.onnx:Size": {"cpu_outputs": [0]},
    "ai.onnx:Reshape": {"cpu_inputs": [1]}, "ai.onnx:Expand": {"cpu_inputs": [1]},
    "ai.onnx:Tile": {"cpu_inputs": [1]}, "ai.onnx:ConstantOfShape": {"cpu_inputs": [0]},
    "ai.onnx:Slice": {"cpu_inputs": [1, 2, 3, 4]}, "ai.onnx:Squeeze": {"cpu_inputs": [1]},
    "ai.onnx:Unsqueeze": {"cpu_inputs": [1]}, "ai.onnx:Split": {"cpu_inputs": [1]},
    "ai.onnx:Range": {"cpu_inputs": [0, 1, 2]}, "ai.onnx:CumSum": {"cpu_inputs": [1]},
    "ai.onnx:TopK": {"cpu_inputs": [1]}, "ai.onnx:ReduceSum": {"cpu_inputs": [1]},
    "ai.onnx:ReduceMean": {"cpu_inputs": [1]}, "ai.onnx:ReduceMax": {"cpu_inputs": [1]},
    "ai.onnx:ReduceL2": {"cpu_inputs": [1]}, "ai.onnx:ReduceProd": {"cpu_inputs": [1]},
    "com.microsoft:GroupQueryAttention": {"cpu_inputs": [6]},
}

CHILD = r'''
import importlib.util, json, os, re, sys
capi = sys.argv[2]
if sys.argv[1] == "registry":
    spec = importlib.util.spec_from_file_location("onnxruntime_pybind11_state", [
        os.path.join(capi, f) for f in os.listdir(capi) if f.startswith("onnxruntime_pybind11_state")][0])
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    kernels = [[k.provider, k.domain or "ai.onnx", k.op_name, list(k.version_range),
                {c: list(t) for c, t in k.type_constraints.items()}] for k in m.get_all_opkernel_def()]
    schemas = [[s.domain or "ai.onnx", s.name, s.since_version,
                [[i.name, i.typeStr, str(i.option).endswith("Variadic")] for i in s.inputs],
                [[o.name, o.typeStr, str(o.option).endswith("Variadic")] for o in s.outputs],
                {c.type_param_str: list(c.allowed_type_strs) for c in s.type_constraints}]
               for s in m.get_all_operator_schema()]
    json.dump({"kernels": kernels, "schemas": schemas}, sys.stdout)
else:  # place GRAPH LEVEL CUDA_GRAPH: ORT's own partitioning, parsed from its verbose log
    sys.path.insert(0, os.path.dirname(os.path.dirname(capi)))
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 0
    so.graph_optimization_level = {"none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                                   "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[sys.argv[4]]
    try:
        ort.InferenceSession(sys.argv[3], so, providers=[
            ("CUDAExecutionProvider", {"enable_cuda_graph": sys.argv[5]}), "CPUExecutionProvider"])
        print("SESSION OK", file=sys.stderr)
    except Exception as e:
        print("SESSION FAILED", str(e).replace("\n", " ")[:400], file=sys.stderr)
'''


def _short(t: str) -> str:
    return t[len("tensor("):-1] if t.startswith("tensor(") else t


def build_stubs(capi: Path, out: Path) -> Path:
    """Stub CUDA/TensorRT libraries exporting what the provider libraries import (see the module doc)."""
    special = {
        "cudaGetDeviceCount": "int FN(int *n){ *n = 1; return 0; }",
        "cudaGetDevice": "int FN(int *d){ *d = 0; return 0; }",
        "cudaDeviceGetAttribute": "int FN(int *v, int a, int d){ *v = 9; return 0; }",
        "cudaRuntimeGetVersion": "int FN(int *v){ *v = 13000; return 0; }",
        "cudaDriverGetVersion": "int FN(int *v){ *v = 13000; return 0; }",
        "cudaMemGetInfo": "int FN(size_t *a, size_t *b){ *a = *b = (size_t)80 << 30; return 0; }",
        "cudaMalloc": "int FN(void **p, size_t n){ *p = malloc(n ? n : 1); return 0; }",
        "cudaMallocHost": "int FN(void **p, size_t n){ *p = malloc(n ? n : 1); return 0; }",
        "cudaHostAlloc": "int FN(void **p, size_t n, unsigned g){ *p = malloc(n ? n : 1); return 0; }",
        "cudaMallocFromPoolAsync": "int FN(void **p, size_t n, void *q, void *s){ *p = malloc(n ? n : 1); return 0; }",
        "cudaMemcpy": "int FN(void *d, const void *s, size_t n, int k){ if (n) memmove(d, s, n); return 0; }",
        "cudaMemcpyAsync": "int FN(void *d, const void *s, size_t n, int k, void *t)"
                           "{ if (n) memmove(d, s, n); return 0; }",
        "cudaMemset": "int FN(void *d, int v, size_t n){ memset(d, v, n); return 0; }",
        "cudaMemsetAsync": "int FN(void *d, int v, size_t n, void *s){ memset(d, v, n); return 0; }",
    }
    for name in ("cudaStreamCreate", "cudaEventCreate", "cublasCreate_v2", "cublasLtCreate", "cudnnCreate"):
        special[name] = "int FN(void **h){ *h = malloc(64); return 0; }"
    for name in ("cudaStreamCreateWithFlags", "cudaEventCreateWithFlags", "cudaMemPoolCreate"):
        special[name] = "int FN(void **h, long x){ *h = malloc(64); return 0; }"
    for name in ("cudaGetErrorString", "cudaGetErrorName", "cublasGetStatusName", "cublasGetStatusString"):
        special[name] = 'const char *FN(int e){ return "stub"; }'
    libs: dict[str, set[str]] = collections.defaultdict(set)
    for so in capi.glob("libonnxruntime_providers_*.so"):
        text = subprocess.run(["nm", "-D", "--undefined-only", str(so)], capture_output=True, text=True,
                              check=True).stdout
        for line in text.splitlines():
            sym = line.split()[-1]
            name, _, tag = sym.partition("@")
            if tag.startswith("libcu"):
                libs[tag].add(name)
            elif not tag and name.startswith("cu"):
                libs["libcuda.so.1"].add(name)
            elif not tag and re.match(r"(create|get)(Infer|NvOnnx|Plugin)", name):
                libs["libnvinfer.so.10"].add(name)
    for lib in ("libcurand.so.10", "libnvonnxparser.so.10"):
        libs.setdefault(lib, set())
    out.mkdir(parents=True, exist_ok=True)
    for lib, names in libs.items():
        body = ["#include <string.h>", "#include <stdlib.h>", "#include <stddef.h>"]
        body += [special.get(n, "long FN(void){ return 0; }").replace("FN(", f"{n}(", 1) for n in sorted(names)]
        (out / f"{lib}.c").write_text("\n".join(body) + "\n")
        tagged = lib.startswith("libcu") and lib != "libcuda.so.1"
        (out / f"{lib}.map").write_text(f"{lib} {{ global: *; }};\n" if tagged else "{ global: *; };\n")
        subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(out / lib), str(out / f"{lib}.c"),
                        f"-Wl,--version-script={out / lib}.map", f"-Wl,-soname,{lib}"], check=True)
    return out


def unpack(wheel: Path, work: Path) -> Path:
    with zipfile.ZipFile(wheel) as z:
        z.extractall(work / "site")
    return work / "site" / "onnxruntime" / "capi"


def run_child(python: str, stubs: Path, *args: str) -> subprocess.CompletedProcess[str]:
    script = stubs / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "LD_LIBRARY_PATH": str(stubs), "ORT_AGGRESSIVE_CPU_FALLBACK": "0"}
    return subprocess.run([python, str(script), *args], capture_output=True, text=True, env=env, timeout=1800)


def merge_defs(defs: list[list[Any]]) -> list[list[Any]]:
    """Fold typed kernel defs together where that is exact: same versions, one constraint differing.

    ORT registers one def per type (or type pair); a node matches a def when every constraint does,
    so two defs may only be merged when all their other constraints are equal.
    """
    defs = [[lo, hi, {c: sorted(t) for c, t in types.items()}] for lo, hi, types in defs]
    merged = True
    while merged:
        merged = False
        for i, (lo, hi, a) in enumerate(defs):
            for j in range(i + 1, len(defs)):
                lo2, hi2, b = defs[j]
                diff = [c for c in set(a) | set(b) if a.get(c) != b.get(c)]
                if (lo, hi) == (lo2, hi2) and set(a) == set(b) and len(diff) <= 1:
                    for c in diff:
                        a[c] = sorted(set(a[c]) | set(b[c]))
                    del defs[j]
                    merged = True
                    break
            if merged:
                break
    return sorted(defs, key=lambda d: (d[0], json.dumps(d[2])))


def make_table(wheel: Path, python: str, work: Path) -> dict[str, Any]:
    capi = unpack(wheel, work)
    stubs = build_stubs(capi, work / "stubs")
    proc = run_child(python, stubs, "registry", str(capi))
    if proc.returncode:
        raise SystemExit(f"registry dump failed ({proc.returncode}): {proc.stderr[-2000:]}")
    dump = json.loads(proc.stdout)
    version = re.search(r"onnxruntime_gpu-([0-9.]+)-", wheel.name).group(1)  # type: ignore[union-attr]
    kernels: dict[str, list[Any]] = collections.defaultdict(list)
    n_cpu = 0
    for provider, domain, op, (lo, hi), types in dump["kernels"]:
        n_cpu += provider == "CPUExecutionProvider"
        if provider == "CUDAExecutionProvider" and domain in DOMAINS and op in OPS and (
                domain != "ai.onnx" or hi >= MIN_OPSET):
            kernels[f"{domain}:{op}"].append(
                [lo, None if hi >= 2**31 - 1 else hi, {c: sorted(map(_short, t)) for c, t in sorted(types.items())}])
    schemas: dict[str, list[Any]] = collections.defaultdict(list)
    for domain, op, since, ins, outs, cons in dump["schemas"]:
        if domain in DOMAINS and op in OPS:
            schemas[f"{domain}:{op}"].append([since, ins, outs, {c: sorted(map(_short, t)) for c, t in cons.items()}])
    for key, versions in schemas.items():  # keep the versions in force at MIN_OPSET and later
        versions.sort(key=lambda e: e[0])
        first = max([i for i, v in enumerate(versions) if v[0] <= MIN_OPSET] or [0])
        schemas[key] = versions[first:] if key.startswith("ai.onnx:") else versions
    return {
        "onnxruntime_gpu": version,
        "provenance": {
            "wheel": wheel.name, "sha256": hashlib.sha256(wheel.read_bytes()).hexdigest(),
            "kernels": "the wheel's own CUDA kernel registry (onnxruntime_pybind11_state.get_all_opkernel_def) "
                       "with the CUDA provider loaded against stub CUDA libraries, no GPU; "
                       f"{len(dump['kernels'])} kernel defs, {n_cpu} of them CPU",
            "schemas": "the wheel's operator schemas (get_all_operator_schema): formal inputs/outputs and "
                       "type constraints, for inferring each node's types",
            "memory": "host-memory inputs/outputs of CUDA kernels (InputMemoryType/OutputMemoryType in "
                      "onnxruntime's CUDA kernel sources); checked by `validate` against ORT's partitioner",
            "made_by": "benchmarks/ort_cuda_kernels.py table",
            "scope": f"CUDA kernels and schemas of {len(OPS)} ops (those q3vl's graphs use and their neighbours), "
                     f"ai.onnx opsets {MIN_OPSET} and later",
        },
        "kernels": dict(sorted((k, merge_defs(v)) for k, v in kernels.items())),
        "schemas": dict(sorted(schemas.items())),
        "memory": MEMORY,
    }


def dump_table(table: dict[str, Any]) -> str:
    """JSON with one op per line, so a release bump reads as a small diff."""
    parts = []
    for key, value in table.items():
        if key in ("kernels", "schemas", "memory"):
            rows = ",\n".join(f"  {json.dumps(op)}: {json.dumps(v, separators=(',', ':'))}" for op, v in value.items())
            parts.append(f"{json.dumps(key)}: {{\n{rows}\n}}")
        else:
            parts.append(f"{json.dumps(key)}: {json.dumps(value, indent=1)}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def ort_placement(python: str, stubs: Path, capi: Path, graph: Path, level: str, cuda_graph: bool) -> dict[str, Any]:
    """ORT's own placement of `graph`'s nodes, the Memcpy nodes it adds, and whether the session loads."""
    proc = run_child(python, stubs, "place", str(capi), str(graph), level, "1" if cuda_graph else "0")
    placed: dict[str, str] = {}
    provider, copies, status, everything = "", [], "", ""
    for line in proc.stderr.splitlines():
        m = re.search(r"All nodes placed on \[(\w+)\]. Number of nodes: (\d+)", line)
        if m:  # ORT lists no nodes then
            everything = m.group(1)
            placed["*"] = m.group(1)
            continue
        m = re.search(r"Node\(s\) placed on \[(\w+)\]", line)
        if m:
            provider = m.group(1)
            continue
        m = re.search(r"VerifyEachNodeIsAssignedToAnEp\]\s+(\w+) \((.*)\)$", line)
        if m and provider:
            placed[m.group(2)] = provider
        m = re.search(r"Add (Memcpy\w+) (after|before) (\S+) for", line)
        if m:
            copies.append(f"{m.group(1)} {m.group(2)} {m.group(3)}")
        if line.startswith("SESSION"):
            status = line.replace("[ONNXRuntimeError] : 1 : FAIL : ", "")[:160]
    return {"placed": placed, "copies": copies, "session": status, "all_on": everything}


def validate(wheel: Path, python: str, work: Path, graphs: list[Path], note: str = "") -> str:
    sys.path.insert(0, str(ROOT / "src"))
    from q3vl.export.cuda_support import check_graph

    capi = unpack(wheel, work)
    stubs = build_stubs(capi, work / "stubs")
    lines = ["# q3vl's static CUDA placement vs ONNX Runtime's partitioner", "",
             f"onnxruntime-gpu wheel `{wheel.name}` with stub CUDA libraries (no GPU); "
             "made by `benchmarks/ort_cuda_kernels.py validate`. " + note, "",
             "ORT's columns are parsed from its verbose session log (`Node placements`, `Add Memcpy...`); "
             "'level all' is the runtime's optimization level, and its last column is a session created with "
             "`enable_cuda_graph`.", "",
             "| graph | nodes | q3vl: CPU nodes / copies | ORT (no optimizations): CPU nodes / Memcpy | agree "
             "| ORT (level all): Memcpy | CUDA-graph session |", "|---|---|---|---|---|---|---|"]
    for graph in graphs:
        report = check_graph(graph)
        ours = {n.name: n.provider for n in report.nodes}
        raw = ort_placement(python, stubs, capi, graph, "none", False)
        full = ort_placement(python, stubs, capi, graph, "all", True)
        placed = {name: raw["all_on"] for name in ours} if raw["all_on"] else raw["placed"]
        theirs = {k: ("CPU" if v == "CPUExecutionProvider" else "CUDA") for k, v in placed.items()
                  if not k.startswith("Memcpy")}
        # ORT's always-on transformers add or drop a few nodes even without optimizations (InsertCast
        # adds casts around fp16 nodes with CPU-only kernels, RemoveDuplicateCast drops Cast round trips)
        added, dropped = sorted(set(theirs) - set(ours)), sorted(set(ours) - set(theirs))
        common = set(ours) & set(theirs)
        agree = all(ours[k] == theirs[k] for k in common) and len(report.copies) == len(raw["copies"])
        ours, theirs = {k: ours[k] for k in common}, {k: theirs[k] for k in common}
        cpu_ours = sorted(k for k, v in ours.items() if v == "CPU")
        cpu_theirs = sorted(k for k, v in theirs.items() if v == "CPU")
        lines.append(f"| {graph.parent.name}/{graph.name} | {len(report.nodes)} "
                     f"| {len(cpu_ours)} / {len(report.copies)} "
                     f"| {len(cpu_theirs)} / {len(raw['copies'])} | {'yes' if agree else 'NO'} "
                     f"| {len(full['copies'])} | {full['session'].replace('SESSION ', '').replace('|', '/')} |")
        if added or dropped:
            lines.append(f"|  | ORT added {len(added)} node(s) ({', '.join(added[:4]) or '-'}) "
                         f"and dropped {len(dropped)} "
                         f"({', '.join(dropped[:4]) or '-'}); placements compared on the {len(common)} others |||||")
        if not agree:
            lines.append(f"|  | differ: q3vl CPU {cpu_ours} copies {[c.tensor for c in report.copies]}; "
                         f"ORT CPU {cpu_theirs} Memcpy {raw['copies']} |||||")
    return "\n".join(lines) + "\n"


def docs(path: Path) -> None:
    """Rewrite the CUDA coverage block of docs/gpu.md from the 2B graphs' skeletons (no wheel needed)."""
    sys.path.insert(0, str(ROOT / "src"))
    from q3vl.export.cuda_support import coverage_markdown
    from q3vl.testing.skeleton import skeleton_coverage

    with tempfile.TemporaryDirectory(prefix="q3vl-skeleton-") as tmp:
        block = coverage_markdown(skeleton_coverage("2b", tmp)).strip()
    text = path.read_text()
    begin, end = "<!-- cuda-coverage:begin -->", "<!-- cuda-coverage:end -->"
    head, rest = text.split(begin, 1)
    path.write_text(f"{head}{begin}\n{block}\n{end}{rest.split(end, 1)[1]}")
    print(f"rewrote the CUDA coverage table in {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["table", "validate", "docs"])
    p.add_argument("graphs", nargs="*", type=Path)
    p.add_argument("--wheel", type=Path, help="the onnxruntime-gpu wheel (table, validate)")
    p.add_argument("--python", help="an interpreter matching the wheel's tag, with numpy and onnx (table, validate)")
    p.add_argument("--out", type=Path)
    p.add_argument("--note", default="", help="validate: a sentence saying where the graphs come from")
    a = p.parse_intermixed_args()
    if a.mode == "docs":
        return docs(a.out or ROOT / "docs" / "gpu.md")
    if a.wheel is None or a.python is None:
        p.error(f"{a.mode} needs --wheel and --python")
    with tempfile.TemporaryDirectory(prefix="ort-cuda-") as tmp:
        if a.mode == "table":
            table = make_table(a.wheel, a.python, Path(tmp))
            out = a.out or TABLE
            out.write_text(dump_table(table))
            print(f"wrote {out}: {len(table['kernels'])} ops with CUDA kernels, {len(table['schemas'])} schemas")
        else:
            text = validate(a.wheel, a.python, Path(tmp), a.graphs, a.note)
            (a.out.write_text(text) if a.out else sys.stdout.write(text))


if __name__ == "__main__":
    main()
