"""TensorRT: what can be checked without TensorRT (profiles, op support, errors), and the rest behind a marker."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnx
import pytest

from q3vl.bundle import Manifest
from q3vl.errors import BackendUnavailableError, BundleError
from q3vl.runtime.backends.base import create
from q3vl.tensorrt import Limits, check_graph, profiles
from q3vl.tensorrt.build import build_engines, check_bundle_for_tensorrt

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def test_profiles_follow_limits(tiny_embedding_bundle):  # profiles come from the spec, the same in both kinds
    spec = Manifest.read(tiny_embedding_bundle).spec
    lim = Limits(max_batch=16, max_tokens=4096, max_image_pixels=1280 * 720, max_frames=32, max_images=6)
    p = profiles(spec, lim)
    assert p["text"].shapes["input_ids"] == ((1, 2), (1, 256), (16, 4096))
    assert p["text"].shapes["position_ids"][2] == (3, 16, 4096)
    assert p["text"].shapes["deepstack_embeds"][2] == (16 * 4096, 2, 64)
    # 1280x720 = 3600 patches (multiple of 4); 32 frames = 16 frame pairs > 6 images
    assert p["vision"].shapes["pixel_values"] == ((1, 4, 1536), (1, 784, 1536), (16, 3600, 1536))
    opts = p["text"].ort_options()
    assert opts["trt_profile_max_shapes"].startswith("input_ids:16x4096,attention_mask:16x4096,position_ids:3x16x4096")
    assert Limits(max_batch=2, opt_batch=4, max_tokens=64).opt_batch == 2  # opt hints are clamped
    assert Limits(max_tokens=64).opt_tokens == 64
    with pytest.raises(ValueError, match="every limit must be >= 1"):
        Limits(max_batch=0)


def test_profile_check_names_the_limit(tiny_embedding_bundle):
    spec = Manifest.read(tiny_embedding_bundle).spec
    p = profiles(spec, Limits(max_batch=4, max_tokens=128))
    p["text"].check({"input_ids": np.zeros((2, 100)), "attention_mask": np.zeros((2, 100)),
                     "position_ids": np.zeros((3, 2, 100)), "visual_embeds": np.zeros((1, 64)),
                     "deepstack_embeds": np.zeros((1, 2, 64))})
    with pytest.raises(ValueError, match=r"'input_ids' dimension 1 is 300, outside .* \(max_tokens\)"):
        p["text"].check({"input_ids": np.zeros((2, 300))})


@pytest.mark.slow  # CI time: each tiny plain (traced) export takes about 40 s on 2 cores
def test_plain_graphs_pass_the_tensorrt_op_check(tiny_embedding_plain, tiny_reranker_plain):
    for bundle in (tiny_embedding_plain, tiny_reranker_plain):
        for name in ("vision.onnx", "text.onnx"):
            report = check_graph(bundle / name)
            assert report.ok, report.summary()
            assert report.ops["MatMul"] > 0
        check_bundle_for_tensorrt(bundle)
        assert not any(n.domain == "com.microsoft" for n in onnx.load(str(bundle / "text.onnx"),
                                                                      load_external_data=False).graph.node)
    if not HAS_TRT:  # a plain bundle passes the checks, then the build says what is missing
        with pytest.raises(BackendUnavailableError, match="TensorRT is not installed"):
            build_engines(tiny_embedding_plain)


def test_fused_graphs_are_refused_with_the_reason(tiny_embedding_bundle):
    report = check_graph(tiny_embedding_bundle / "text.onnx")
    assert not report.ok and any("GroupQueryAttention is an ONNX Runtime com.microsoft op" in p
                                 for p in report.problems)
    with pytest.raises(BundleError, match="TensorRT needs the plain graphs"):
        check_bundle_for_tensorrt(tiny_embedding_bundle)


def test_op_check_catches_unsupported_types(tmp_path):
    from onnx import TensorProto as T
    from onnx import helper as h

    node = h.make_node("CumSum", ["x", "axis"], ["y"])
    graph = h.make_graph([node], "g", [h.make_tensor_value_info("x", T.INT64, [4]),
                                       h.make_tensor_value_info("axis", T.INT64, [])],
                         [h.make_tensor_value_info("y", T.INT64, [4])])
    import onnx

    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 20)]), tmp_path / "g.onnx")
    report = check_graph(tmp_path / "g.onnx")
    assert "CumSum on INT64 (x)" in report.problems


@pytest.mark.skipif(HAS_TRT, reason="checks the error shown when TensorRT is absent")
def test_backends_explain_what_is_missing(tiny_embedding_bundle):
    graphs = {"vision": tiny_embedding_bundle / "vision.onnx", "text": tiny_embedding_bundle / "text.onnx"}
    with pytest.raises(BackendUnavailableError, match="needs TensorRT and cuda-python"):
        create("tensorrt", graphs)
    with pytest.raises(BackendUnavailableError, match="TensorrtExecutionProvider"):
        create("tensorrt-ep", graphs)
    with pytest.raises(BackendUnavailableError, match="CUDAExecutionProvider"):
        create("cuda", graphs)
    with pytest.raises(BackendUnavailableError, match="unknown backend 'tpu'"):
        create("tpu", graphs)


def test_native_backend_requires_built_engines(tiny_embedding_bundle, tmp_path, monkeypatch):
    """Without engines recorded in the manifest the backend says which command builds them."""
    import shutil
    import sys
    import types

    b = shutil.copytree(tiny_embedding_bundle, tmp_path / "b")
    fake_cuda = types.ModuleType("cuda")
    fake_bindings = types.ModuleType("cuda.bindings")
    fake_bindings.runtime = types.ModuleType("cuda.bindings.runtime")
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    monkeypatch.setitem(sys.modules, "cuda", fake_cuda)
    monkeypatch.setitem(sys.modules, "cuda.bindings", fake_bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", fake_bindings.runtime)
    with pytest.raises(BundleError, match="has no TensorRT engines: run `q3vl trt build"):
        create("tensorrt", {"vision": b / "vision.onnx", "text": b / "text.onnx"})
    assert json.loads((b / "q3vl.json").read_text()).get("tensorrt") is None


@pytest.mark.tensorrt
@pytest.mark.skipif(not HAS_TRT, reason="TensorRT is not installed (its wheels are not on this registry)")
def test_engines_build_and_match_onnxruntime(tiny_embedding_plain, tmp_path):
    import shutil

    from q3vl.runtime import Embedder

    b = shutil.copytree(tiny_embedding_plain, tmp_path / "b")
    m = build_engines(b, Limits(max_batch=4, max_tokens=512, max_image_pixels=448 * 448), precision="fp32")
    assert set(m.extra["tensorrt"]["engines"]) == {"vision", "text"}
    items = [{"text": "a"}, {"text": "b c d"}]
    ref = Embedder(b).process(items)
    got = Embedder(b, backend="tensorrt").process(items)
    assert np.abs(got - ref).max() < 1e-3


def test_export_tensorrt_refuses_fused_graphs(tiny_embedding, tmp_path, capsys):
    from q3vl.cli import main

    out = tmp_path / "b"
    assert main(["export", str(tiny_embedding), "-o", str(out), "--tensorrt", "--graph", "fused"]) == 2
    assert "--tensorrt needs --graph plain" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.skipif(HAS_TRT, reason="checks the error raised where TensorRT is missing")
def test_export_tensorrt_fails_before_exporting_when_tensorrt_is_missing(tiny_embedding, tmp_path, capsys):
    from q3vl.cli import main

    out = tmp_path / "b"
    assert main(["export", str(tiny_embedding), "-o", str(out), "--tensorrt", "--max-batch", "2"]) == 2
    assert "TensorRT is not installed" in capsys.readouterr().err
    assert not out.exists()  # no minutes of export before the error


@pytest.mark.tensorrt
@pytest.mark.skipif(not HAS_TRT, reason="TensorRT is not installed (its wheels are not on this registry)")
def test_export_tensorrt_builds_engines_into_the_bundle(tiny_embedding, tmp_path):
    from q3vl.cli import main

    out = tmp_path / "b"
    assert main(["export", str(tiny_embedding), "-o", str(out), "--tensorrt", "--trt-precision", "fp32",
                 "--max-batch", "2", "--max-tokens", "256", "--max-image-pixels", str(448 * 448)]) == 0
    m = Manifest.read(out)
    assert {g.kind for g in m.graphs.values()} == {"plain"}
    engines = m.extra["tensorrt"]["engines"]
    assert set(engines) == {"vision", "text"} and all((out / e["file"]).exists() for e in engines.values())
    assert m.extra["tensorrt"]["limits"]["max_batch"] == 2
