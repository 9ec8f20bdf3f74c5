"""ONNX Runtime backends: CPU, CUDA and the TensorRT execution provider.

Session settings that matter on small machines: intra-op threads default to the physical cores,
and worker threads do not spin (`allow_spinning=0`): with two sessions on two cores, busy-waiting
threads made end-to-end runs 4x slower in the feasibility probe.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from q3vl.errors import BackendUnavailableError, BundleError, missing_extra
from q3vl.runtime.backends.base import Backend, register

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32, "tensor(bool)": np.bool_, "tensor(double)": np.float64}


def _ort() -> Any:
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise missing_extra("onnxruntime", "runtime") from e
    return ort


class OrtBackend(Backend):
    """One InferenceSession per graph on the given execution providers."""

    providers: tuple[str, ...] = ("CPUExecutionProvider",)

    def __init__(self, graphs: Mapping[str, Path], threads: int | None = None, spinning: bool = False,
                 provider_options: dict[str, Any] | None = None, session_config: dict[str, str] | None = None,
                 optimization: str = "all") -> None:
        ort = _ort()
        missing = [p for p in self.providers if p not in ort.get_available_providers()]
        if missing:
            raise BackendUnavailableError(
                f"backend {self.name!r} needs {missing}, which this onnxruntime build lacks "
                f"(it has {ort.get_available_providers()}); install onnxruntime-gpu for CUDA/TensorRT")
        self.provider_options = provider_options or {}
        self.sessions = {name: self._session(ort, path, threads, spinning, self.options_for(name),
                                             session_config or {}, optimization)
                         for name, path in graphs.items()}

    def options_for(self, graph: str) -> dict[str, Any]:
        """Provider options for one graph (the TensorRT EP gives each graph its own profile)."""
        return self.provider_options

    def _session(self, ort: Any, path: Path, threads: int | None, spinning: bool, provider_options: dict[str, Any],
                 session_config: dict[str, str], optimization: str) -> Any:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads or _physical_cores()
        so.log_severity_level = 3
        so.graph_optimization_level = {
            "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[optimization]
        if not spinning:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        for k, v in session_config.items():
            so.add_session_config_entry(k, v)
        providers = [(p, provider_options.get(p, {})) for p in self.providers]
        try:
            return ort.InferenceSession(str(path), so, providers=providers)
        except Exception as e:  # ORT raises its own Fail/InvalidGraph/... types
            raise BundleError(f"ONNX Runtime cannot load {path}: {e}") from e

    def run(self, graph: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        sess = self.sessions[graph]
        outs = sess.run(None, dict(feeds))
        return {o.name: v for o, v in zip(sess.get_outputs(), outs)}

    def input_dtypes(self, graph: str) -> dict[str, np.dtype]:
        return {i.name: np.dtype(_ORT_TYPES[i.type]) for i in self.sessions[graph].get_inputs()}

    def close(self) -> None:
        self.sessions.clear()


def _physical_cores() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


@register("cpu")
class CpuBackend(OrtBackend):
    """ONNX Runtime on the CPU (the default)."""

    providers = ("CPUExecutionProvider",)


@register("cuda")
class CudaBackend(OrtBackend):
    """ONNX Runtime's CUDA execution provider (onnxruntime-gpu)."""

    providers = ("CUDAExecutionProvider", "CPUExecutionProvider")

    def __init__(self, graphs: Mapping[str, Path], device: int = 0, **kw: Any) -> None:
        opts = kw.pop("provider_options", None) or {}
        opts.setdefault("CUDAExecutionProvider", {"device_id": device, "cudnn_conv_algo_search": "HEURISTIC"})
        super().__init__(graphs, provider_options=opts, **kw)
