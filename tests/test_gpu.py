"""GPU backends (ONNX Runtime CUDA / TensorRT EP) against the CPU fp32 path; run where a GPU is.

Marked `gpu`: skipped by default and on machines without onnxruntime-gpu's CUDA provider.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import noise_image

ort = pytest.importorskip("onnxruntime")
HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
HAS_TRT_EP = "TensorrtExecutionProvider" in ort.get_available_providers()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu with CUDAExecutionProvider and a GPU")
pytestmark = [pytest.mark.gpu]

ITEMS = [{"text": "a short text"}, {"text": "a longer text about retrieval " * 20},
         {"image": noise_image(448, 448, 1)}, {"image": noise_image(720, 1280, 2), "text": "caption"},
         {"video": [noise_image(120, 160, i) for i in range(6)]}]


def cos_rows(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cuda_backend_parity(tiny_embedding, tmp_path, ref_embedder, precision):
    from q3vl.export.exporter import export_bundle
    from q3vl.runtime import Embedder

    bundle = export_bundle(tiny_embedding, tmp_path / precision, precision=precision, progress=False)
    gpu = Embedder(bundle, backend="cuda")
    assert gpu.backend.io_binding
    got = gpu.process(ITEMS)
    floor = 0.9999 if precision == "fp32" else 0.999
    assert cos_rows(got, ref_embedder.process(ITEMS).numpy()).min() >= floor
    assert np.abs(Embedder(bundle, backend="cuda", batch_size=1).process(ITEMS) - got).max() <= 1e-3


@needs_cuda
def test_cuda_reranker_parity(tiny_reranker, tmp_path, ref_reranker):
    from q3vl.export.exporter import export_bundle
    from q3vl.runtime import Reranker

    bundle = export_bundle(tiny_reranker, tmp_path / "fp16", precision="fp16", progress=False)
    req = {"query": {"text": "a gradient"}, "documents": ITEMS}
    got, ref = Reranker(bundle, backend="cuda").process(req), ref_reranker.process(req)
    assert np.abs(np.array(got) - np.array(ref)).max() <= 5e-3


@needs_cuda
def test_bf16_plain_export_validates_on_cuda(tiny_embedding, tmp_path):
    from q3vl.bundle import Manifest
    from q3vl.export.exporter import export_bundle

    bundle = export_bundle(tiny_embedding, tmp_path / "bf16", precision="bf16", graph="plain", progress=False)
    assert Manifest.read(bundle).parity["passed"]


@pytest.mark.skipif(not HAS_TRT_EP, reason="needs onnxruntime-gpu built with the TensorRT EP, and TensorRT")
def test_tensorrt_ep_parity(tiny_embedding_plain, ref_embedder):
    from q3vl.runtime import Embedder

    got = Embedder(tiny_embedding_plain, backend="tensorrt-ep").process(ITEMS[:3])
    assert cos_rows(got, ref_embedder.process(ITEMS[:3]).numpy()).min() >= 0.999
