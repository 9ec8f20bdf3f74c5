"""The static CUDA check (`q3vl.export.cuda_support`) and what it keeps true of the fused graphs.

Oracle for the check itself: ONNX Runtime's own partitioner, run on the pinned onnxruntime-gpu wheel
with stub CUDA libraries (`benchmarks/ort_cuda_kernels.py validate`). It agreed node for node on
every tiny graph before and after the export fixes (benchmarks/results/cuda-coverage-validation.md);
the two hand-built graphs below are the two patterns it found in the export before them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h

from q3vl.export.cuda_support import check_model, coverage_markdown, ort_gpu_version, rows, table
from q3vl.testing.shapes import SHAPES
from q3vl.testing.skeleton import skeleton_coverage, skeleton_graphs

DOCS = Path(__file__).resolve().parents[1] / "docs" / "gpu.md"
BEGIN, END = "<!-- cuda-coverage:begin -->", "<!-- cuda-coverage:end -->"
# the one fallback left, by design: ORT's CUDA GroupQueryAttention is fp16/bf16 only, and the fp32
# bundle is the CPU product (docs/gpu.md says to export fp16 for the GPU)
FP32_FALLBACK = {("com.microsoft:GroupQueryAttention", "float")}
SHAPE_MATH = {"ai.onnx:Slice", "ai.onnx:Squeeze", "ai.onnx:Cast"}  # GQA's total_sequence_length, a host input


@pytest.fixture(scope="module")
def coverage(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, dict]]:
    return {shape: skeleton_coverage(shape, tmp_path_factory.mktemp(f"skeleton-{shape}"))
            for shape in ("tiny", "small", "2b")}


@pytest.mark.parametrize("shape", ["tiny", "small", "2b"])
def test_fused_graphs_run_on_cuda_without_copies(coverage, shape):
    layers = SHAPES[shape]["text"]["num_hidden_layers"]
    for title, reports in coverage[shape].items():
        for task, r in reports.items():
            cpu = [n for n in r.nodes if n.provider == "CPU"]
            if title == "text fp32":
                assert {(n.op, n.inputs[0]) for n in r.fallbacks} == FP32_FALLBACK, r.summary()
                assert len(r.fallbacks) == layers
                assert all("GroupQueryAttention" in (c.producer, *c.consumers) for c in r.copies)
                continue
            assert not r.fallbacks and r.cuda_graph_ok, f"{shape} {title} {task}: {r.summary()}"
            assert {n.op for n in cpu} <= SHAPE_MATH and all(n.why.startswith("shape math") for n in cpu)
            assert len(r.nodes) > 50


def test_every_shape_has_the_same_ops_and_types(coverage):
    """The docs table is written for the 2B shape; tiny and small must not hide another op or type."""
    for title in coverage["2b"]:
        for task in coverage["2b"][title]:
            # (op, the set of input types, placement): a variadic Concat has one input per DeepStack level
            keys = {shape: {(op, frozenset(types.split(", ")), where) for op, types, where in
                            rows(coverage[shape][title][task])} for shape in coverage}
            assert keys["tiny"] == keys["small"] == keys["2b"], (title, task)


def test_docs_table_is_the_check_of_the_2b_graphs(coverage):
    text = DOCS.read_text()
    block = text[text.index(BEGIN) + len(BEGIN):text.index(END)].strip()
    expected = coverage_markdown(coverage["2b"]).strip()
    assert block == expected, f"docs/gpu.md's CUDA table is stale; replace its block with:\n{expected}"
    assert f"onnxruntime-gpu=={ort_gpu_version()}" in text  # the release the table was read from is the one pinned


def test_skeleton_is_the_exported_graph(tiny_embedding_bundle, tmp_path):
    """Node for node (names, inputs, attributes) and initializer for initializer (shape, type)."""
    skeleton = skeleton_graphs("tiny", "embedding", "fp32", tmp_path)
    for name, path in skeleton.items():
        a, b = (onnx.load(str(p), load_external_data=False) for p in (path, tiny_embedding_bundle / f"{name}.onnx"))
        assert [(n.op_type, n.domain, list(n.input), list(n.output), str(n.attribute)) for n in a.graph.node] == \
               [(n.op_type, n.domain, list(n.input), list(n.output), str(n.attribute)) for n in b.graph.node]
        assert sorted((t.name, list(t.dims), t.data_type) for t in a.graph.initializer) == \
               sorted((t.name, list(t.dims), t.data_type) for t in b.graph.initializer)
        assert a.graph.input == b.graph.input and a.graph.output == b.graph.output


def _model(nodes, inputs, outputs, inits=()):
    g = h.make_graph(nodes, "g", inputs, outputs, list(inits))
    return h.make_model(g, opset_imports=[h.make_opsetid("", 23), h.make_opsetid("com.microsoft", 1)])


def test_host_index_math_into_a_cuda_node_is_one_copy():
    """The fused text graph before its fix: a row index from Shape (host) times a device tensor, and a
    ReduceProd on int64 (no CUDA kernel). ORT 1.31.1 placed the Gathers and ReduceProd on the CPU and
    added one MemcpyFromHost, which makes it refuse CUDA graphs."""
    i64 = lambda v, n: onnx.numpy_helper.from_array(np.array(v, np.int64), n)  # noqa: E731
    nodes = [h.make_node("Shape", ["ids"], ["shape"]),
             h.make_node("Gather", ["shape", "one"], ["seq"], axis=0),
             h.make_node("ReduceProd", ["shape"], ["n"], keepdims=0),
             h.make_node("ReduceSum", ["mask", "axes"], ["len"], keepdims=0),
             h.make_node("Mul", ["len", "seq"], ["start"]),
             h.make_node("Add", ["start", "n"], ["out"])]
    m = _model(nodes, [h.make_tensor_value_info("ids", T.INT64, ["b", "l"]),
                       h.make_tensor_value_info("mask", T.INT64, ["b", "l"])],
               [h.make_tensor_value_info("out", T.INT64, ["b"])], [i64(1, "one"), i64([1], "axes")])
    r = check_model(m)
    where = {n.name or n.op: (n.provider, n.why) for n in r.nodes}
    assert where["ai.onnx:ReduceProd"][1].startswith("no CUDA kernel for T=int64")
    assert where["ai.onnx:Gather"][0] == "CPU" and where["ai.onnx:Gather"][1].startswith("shape math")
    assert where["ai.onnx:Shape"][0] == where["ai.onnx:Mul"][0] == where["ai.onnx:ReduceSum"][0] == "CUDA"
    # seq (host, from the Gather) into Mul and n (host, from ReduceProd) into Add: two copies to the device
    assert sorted((c.tensor, c.direction) for c in r.copies) == [("n", "to CUDA"), ("seq", "to CUDA")]
    assert not r.cuda_graph_ok


def test_fp32_group_query_attention_falls_back_with_its_copies():
    f = [h.make_tensor_value_info(n, T.FLOAT, ["b", "l", 64]) for n in "qkv"]
    nodes = [h.make_node("Relu", [n], [n + "r"]) for n in "qkv"] + [
        h.make_node("GroupQueryAttention", ["qr", "kr", "vr", "", "", "lens", "total"], ["attn"],
                    domain="com.microsoft", num_heads=2, kv_num_heads=2),
        h.make_node("Relu", ["attn"], ["out"])]
    m = _model(nodes, [*f, h.make_tensor_value_info("lens", T.INT32, ["b"]),
                       h.make_tensor_value_info("total", T.INT32, [])],
               [h.make_tensor_value_info("out", T.FLOAT, ["b", "l", 64])])
    r = check_model(m)
    assert [(n.op, n.inputs[:3]) for n in r.fallbacks] == [("com.microsoft:GroupQueryAttention",
                                                            ("float", "float", "float"))]
    assert "CUDA has M=int32,T=bfloat16 or M=int32,T=float16" in r.fallbacks[0].why
    # q, k and v to the host, the attention back to the device (lens/total are graph inputs: fed, not copied)
    assert sorted((c.tensor, c.direction) for c in r.copies) == [("attn", "to CUDA"), ("kr", "to CPU"),
                                                                 ("qr", "to CPU"), ("vr", "to CPU")]
    half = _model([h.make_node("Cast", [n], [n + "h"], to=T.FLOAT16) for n in "qkv"] + [
        h.make_node("GroupQueryAttention", ["qh", "kh", "vh", "", "", "lens", "total"], ["out"],
                    domain="com.microsoft", num_heads=2, kv_num_heads=2)],
        [*f, h.make_tensor_value_info("lens", T.INT32, ["b"]), h.make_tensor_value_info("total", T.INT32, [])],
        [h.make_tensor_value_info("out", T.FLOAT16, ["b", "l", 64])])
    assert not check_model(half).fallbacks and check_model(half).cuda_graph_ok


def test_the_table_is_read_from_the_pinned_wheel():
    t = table()
    assert t["onnxruntime_gpu"] == ort_gpu_version() == "1.31.1"
    assert t["provenance"]["wheel"].startswith("onnxruntime_gpu-1.31.1-") and len(t["provenance"]["sha256"]) == 64
    gqa = t["kernels"]["com.microsoft:GroupQueryAttention"]
    assert {x for d in gqa for x in d[2]["T"]} == {"float16", "bfloat16"}
    assert t["memory"]["com.microsoft:GroupQueryAttention"] == {"cpu_inputs": [6]}


def test_an_fp32_bundle_on_cuda_is_told_before_loading(tiny_embedding_bundle, caplog):
    """The fallback above, said by the runtime: CUDA graphs refused up front, a warning otherwise."""
    import onnxruntime

    from q3vl.errors import BackendUnavailableError, ConfigError
    from q3vl.runtime import Embedder

    with pytest.raises(ConfigError, match=r"cuda_graph=True needs an fp16 bundle: .* is fp32, and onnxruntime-gpu "
                                          r"runs GroupQueryAttention only in fp16/bf16"):
        Embedder(tiny_embedding_bundle, backend="cuda", backend_options={"cuda_graph": True})
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with caplog.at_level("WARNING"), pytest.raises(BackendUnavailableError):
            Embedder(tiny_embedding_bundle, backend="cuda")
        assert "export with --precision fp16 for the GPU" in caplog.text
