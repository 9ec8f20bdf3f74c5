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
from q3vl.runtime.backends.base import Backend, DeviceView, register

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
    device_type, device_id = "cpu", 0

    def __init__(self, graphs: Mapping[str, Path], threads: int | None = None, spinning: bool = False,
                 provider_options: dict[str, Any] | None = None, session_config: dict[str, str] | None = None,
                 optimization: str = "all", io_binding: bool | None = None) -> None:
        ort = _ort()
        self._ort_module = ort
        if io_binding is not None:
            self.io_binding = io_binding
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

    def alloc(self, shape: tuple[int, ...]) -> Any:
        return self._ort_module.OrtValue.ortvalue_from_shape_and_type(list(shape), np.float32, self.device_type,
                                                                     self.device_id)

    def _bind(self, bind: Any, name: str, view: DeviceView) -> None:
        ptr = view.buffer.data_ptr() + 4 * view.offset
        bind(name, self.device_type, self.device_id, np.float32, list(view.shape), ptr)

    def run_bound(self, graph: str, inputs: Mapping[str, np.ndarray | DeviceView],
                  outputs: Mapping[str, DeviceView]) -> dict[str, np.ndarray]:
        sess = self.sessions[graph]
        io = sess.io_binding()
        for name, value in inputs.items():
            if isinstance(value, DeviceView):
                self._bind(io.bind_input, name, value)
            else:
                io.bind_cpu_input(name, np.ascontiguousarray(value))
        host = [o.name for o in sess.get_outputs() if o.name not in outputs]
        for name, view in outputs.items():
            self._bind(io.bind_output, name, view)
        for name in host:
            io.bind_output(name, "cpu")
        sess.run_with_iobinding(io)
        values = io.get_outputs()  # OrtValues in binding order: device views first, then host outputs
        return {n: v.numpy() for n, v in zip([*outputs, *host], values) if n in host}

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
    """ONNX Runtime's CUDA execution provider (onnxruntime-gpu).

    IO binding is on: the vision graph writes its outputs straight into the text graph's input
    buffers on the GPU (see `GraphRunner.run`), and only token ids, positions and pixels cross PCIe.
    `cuda_graph=True` asks ORT to capture CUDA graphs, which only pays off when input shapes repeat
    (fixed batch and length buckets).
    """

    providers = ("CUDAExecutionProvider", "CPUExecutionProvider")
    device_type = "cuda"
    io_binding = True

    def __init__(self, graphs: Mapping[str, Path], device: int = 0, cuda_graph: bool = False, **kw: Any) -> None:
        opts = kw.pop("provider_options", None) or {}
        opts.setdefault("CUDAExecutionProvider", {"device_id": device, "cudnn_conv_algo_search": "HEURISTIC",
                                                  "enable_cuda_graph": "1" if cuda_graph else "0"})
        self.device_id = device
        super().__init__(graphs, provider_options=opts, **kw)
