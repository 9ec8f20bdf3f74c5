"""Meta-test: every registered backend, bundle precision and graph kind has a parity test.

Adding a backend, a precision or a graph kind without saying here which test holds it to the
reference fails the suite (tests that need a GPU or TensorRT are still listed: they run there).
"""

from __future__ import annotations

import importlib

from q3vl.export.exporter import GRAPHS
from q3vl.runtime.backends import BACKENDS
from q3vl.tolerances import TOLERANCES

PARITY_TESTS = {
    "backend:cpu": "test_runtime::test_embedder_parity_on_default_set",
    "backend:cuda": "test_gpu::test_cuda_backend_parity",
    "backend:tensorrt-ep": "test_gpu::test_tensorrt_ep_parity",
    "backend:tensorrt": "test_tensorrt::test_engines_build_and_match_onnxruntime",
    "precision:fp32": "test_export::test_embedding_graph_matches_reference",
    "precision:fp16": "test_export::test_fp16_bundle_within_stated_tolerance",
    "precision:bf16": "test_gpu::test_bf16_plain_export_validates_on_cuda",
    "precision:fp16-weights": "test_quantization::test_weight_quantized_bundles_meet_their_tolerance",
    "precision:int8-weights": "test_quantization::test_weight_quantized_bundles_meet_their_tolerance",
    "precision:int4-weights": "test_quantization::test_weight_quantized_bundles_meet_their_tolerance",
    "graph:fused": "test_export::test_embedding_graph_matches_reference",
    "graph:plain": "test_export::test_embedding_graph_matches_reference",
}


def test_every_backend_precision_and_graph_has_a_parity_test():
    registered = ({f"backend:{b}" for b in BACKENDS} | {f"precision:{p}" for p in TOLERANCES}
                  | {f"graph:{g}" for g in GRAPHS})
    assert registered - set(PARITY_TESTS) == set(), "add a parity test and list it in PARITY_TESTS"
    for key, ref in PARITY_TESTS.items():
        module, func = ref.split("::")
        assert callable(getattr(importlib.import_module(f"tests.{module}"), func, None)), f"{key}: {ref} not found"
