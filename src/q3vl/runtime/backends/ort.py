"""ONNX Runtime backends: CPU, CUDA and the TensorRT execution provider.

Session settings that matter on small machines: intra-op threads default to the physical cores,
and worker threads do not spin (`allow_spinning=0`): with two sessions on two cores, busy-waiting
threads made end-to-end runs 4x slower in the feasibility probe.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from q3vl.errors import BackendError, BackendUnavailableError, BundleError, ConfigError, missing_extra
from q3vl.runtime.backends.base import Backend, BackendOptions, DeviceView, register

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32, "tensor(bool)": np.bool_, "tensor(double)": np.float64}


def _ort() -> Any:
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise missing_extra("onnxruntime", None) from e
    return ort


@dataclass(frozen=True)
class OrtOptions(BackendOptions):
    """ONNX Runtime session settings.

    `threads`: intra-op threads (default: the cores this process may use); `spinning`: let idle
    threads busy-wait (faster alone, much slower when sessions share few cores); `provider_options`:
    per execution provider; `session_config`: raw `SessionOptions` config entries; `optimization`:
    graph optimization level; `io_binding`: keep vision outputs in backend buffers (default: on for
    GPU backends); `memory_arena`: keep the host memory a run frees in ONNX Runtime's own arena for the
    next run (ONNX Runtime's default). Faster (small int8 bundle: 448 px image 6% and 8 texts 3-4%
    slower without it), but the arena never shrinks: 16 images of 3200x3200 left a process at 813 MB
    with it, 207 MB without, for good. `q3vl serve` turns it off, so its memory comes back down after
    a burst.
    """

    threads: int | None = None
    spinning: bool = False
    provider_options: dict[str, Any] | None = None
    session_config: dict[str, str] | None = None
    optimization: Literal["none", "basic", "extended", "all"] = "all"
    io_binding: bool | None = None
    memory_arena: bool = True

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"backend option 'threads' must be >= 1, not {self.threads}")


@dataclass(frozen=True)
class CudaOptions(OrtOptions):
    """`OrtOptions` plus the GPU to use and CUDA-graph capture."""

    device: int = 0
    cuda_graph: bool = False


class OrtBackend(Backend):
    """One InferenceSession per graph on the given execution providers."""

    Options = OrtOptions
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    device_type, device_id = "cpu", 0

    def __init__(self, graphs: Mapping[str, Path], options: OrtOptions) -> None:
        ort = _ort()
        self._ort_module = ort
        if options.io_binding is not None:
            self.io_binding = options.io_binding
        missing = [p for p in self.providers if p not in ort.get_available_providers()]
        if missing:
            raise BackendUnavailableError(
                f"backend {self.name!r} needs {missing}, which this onnxruntime build lacks "
                f"(it has {ort.get_available_providers()}); install onnxruntime-gpu for CUDA/TensorRT")
        self.provider_options = dict(options.provider_options or {})
        self.sessions = {name: self._session(ort, path, options, self.options_for(name))
                         for name, path in graphs.items()}

    def options_for(self, graph: str) -> dict[str, Any]:
        """Provider options for one graph (the TensorRT EP gives each graph its own profile)."""
        return self.provider_options

    def _session(self, ort: Any, path: Path, options: OrtOptions, provider_options: dict[str, Any]) -> Any:
        so = ort.SessionOptions()
        so.intra_op_num_threads = options.threads or _physical_cores()
        so.log_severity_level = 3
        so.enable_cpu_mem_arena = options.memory_arena
        so.graph_optimization_level = {
            "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[options.optimization]
        if not options.spinning:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        for k, v in (options.session_config or {}).items():
            so.add_session_config_entry(k, v)
        providers = [(p, provider_options.get(p, {})) for p in self.providers]
        try:
            return ort.InferenceSession(str(path), so, providers=providers)
        except Exception as e:  # ORT raises its own Fail/InvalidGraph/... types
            raise BundleError(f"ONNX Runtime cannot load {path}: {e}") from e

    def run(self, graph: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        sess = self.sessions[graph]
        try:
            outs = sess.run(None, dict(feeds))
        except Exception as e:  # ORT raises its own Fail/RuntimeException types
            raise BackendError(f"ONNX Runtime failed running the {graph} graph: {e}") from e
        return {o.name: v for o, v in zip(sess.get_outputs(), outs)}

    def io_shapes(self, graph: str) -> dict[str, tuple[Any, ...]]:
        sess = self.sessions[graph]
        return {v.name: tuple(v.shape) for v in [*sess.get_inputs(), *sess.get_outputs()]}

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
        try:
            sess.run_with_iobinding(io)
        except Exception as e:
            raise BackendError(f"ONNX Runtime failed running the {graph} graph: {e}") from e
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
    (fixed batch and length buckets): ORT replays a captured graph without checking shapes, and it
    refuses the option for a session with Memcpy nodes, so fp16 fused bundles only (docs/gpu.md).
    """

    Options = CudaOptions
    providers = ("CUDAExecutionProvider", "CPUExecutionProvider")
    device_type = "cuda"
    io_binding = True

    def __init__(self, graphs: Mapping[str, Path], options: CudaOptions) -> None:
        opts = dict(options.provider_options or {})
        opts.setdefault("CUDAExecutionProvider", {"device_id": options.device, "cudnn_conv_algo_search": "HEURISTIC",
                                                  "enable_cuda_graph": "1" if options.cuda_graph else "0"})
        self.device_id = options.device
        super().__init__(graphs, dataclasses.replace(options, provider_options=opts))
