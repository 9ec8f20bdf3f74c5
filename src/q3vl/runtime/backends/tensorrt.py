"""TensorRT backends: native engines (TensorRT Python API) and ONNX Runtime's TensorRT EP.

Both read the optimization profiles recorded by `q3vl trt build` (or derived from `Limits`), and
both check every call's shapes against them first, so an input outside the engine's range fails
with a message naming the limit instead of a TensorRT error. Device buffers for the native backend
come from cuda-python (`cuda.bindings.runtime`), the NVIDIA-maintained CUDA runtime binding.

Written against the documented TensorRT 10 API; TensorRT cannot be installed where q3vl is
developed, so these classes are exercised only by tests marked `tensorrt` (skipped elsewhere).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from q3vl.bundle import Manifest
from q3vl.errors import BackendError, BackendUnavailableError, BundleError
from q3vl.runtime.backends.base import Backend, BackendOptions, DeviceView, ShapeLimits, register
from q3vl.runtime.backends.ort import CudaOptions, OrtBackend
from q3vl.tensorrt.profiles import Limits, Profile, profiles


def _profiles_for(graphs: Mapping[str, Path], limits: Limits | None) -> dict[str, Profile]:
    bundle = next(iter(graphs.values())).parent
    manifest = Manifest.read(bundle)
    recorded = manifest.extra.get("tensorrt", {}).get("engines")
    if recorded and limits is None:
        return {g: Profile({k: tuple(tuple(s) for s in v) for k, v in e["profile"].items()})  # type: ignore[misc]
                for g, e in recorded.items()}
    return profiles(manifest.spec, limits or Limits())


def _shape_limits(profs: Mapping[str, Profile]) -> ShapeLimits:
    """The largest batch, sequence, vision call and block the engines' profiles accept."""
    batch, tokens = profs["text"].shapes["input_ids"][2]
    blocks, patches, _ = profs["vision"].shapes["pixel_values"][2]
    return ShapeLimits(max_batch=batch, max_tokens=tokens, max_blocks=blocks, max_patches=patches)


@dataclass(frozen=True)
class TensorRtEpOptions(CudaOptions):
    """`CudaOptions` plus the engines' `Limits` (default: the bundle's recorded profiles) and fp16."""

    limits: Limits | None = None
    fp16: bool = True


@dataclass(frozen=True)
class TensorRtOptions(BackendOptions):
    """The GPU that runs the bundle's native engines."""

    device: int = 0


@register("tensorrt-ep")
class TensorRtEpBackend(OrtBackend):
    """ONNX Runtime with the TensorRT execution provider (CUDA EP and CPU as fallbacks).

    Engines are cached next to the bundle (`trt_cache/`), with a timing cache, and built for the
    same profiles as `q3vl trt build`.
    """

    Options = TensorRtEpOptions
    providers = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    device_type = "cuda"
    io_binding = True

    def __init__(self, graphs: Mapping[str, Path], options: TensorRtEpOptions) -> None:
        self.profiles = _profiles_for(graphs, options.limits)
        cache = next(iter(graphs.values())).parent / "trt_cache"
        self._trt = {"device_id": options.device, "trt_fp16_enable": options.fp16, "trt_engine_cache_enable": True,
                     "trt_engine_cache_path": str(cache), "trt_timing_cache_enable": True,
                     "trt_timing_cache_path": str(cache)}
        self._device = self.device_id = options.device
        super().__init__(graphs, options)

    def shape_limits(self) -> ShapeLimits:
        return _shape_limits(self.profiles)

    def options_for(self, graph: str) -> dict[str, Any]:
        return {"TensorrtExecutionProvider": {**self._trt, **self.profiles[graph].ort_options()},
                "CUDAExecutionProvider": {"device_id": self._device}}

    def run(self, graph: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.profiles[graph].check(dict(feeds))
        return super().run(graph, feeds)

    def run_bound(self, graph: str, inputs: Mapping[str, np.ndarray | DeviceView],
                  outputs: Mapping[str, DeviceView]) -> dict[str, np.ndarray]:
        self.profiles[graph].check(dict(inputs))  # DeviceView and ndarray both carry .shape
        return super().run_bound(graph, inputs, outputs)


@register("tensorrt")
class TensorRtBackend(Backend):
    """Native TensorRT engines built by `q3vl trt build` (`vision.engine`, `text.engine`).

    Safe under concurrent calls: each graph's execution context, stream and device buffers are used
    under that graph's lock (a TensorRT execution context is not re-entrant), and the buffers are
    kept and grown, not allocated per run.
    """

    Options = TensorRtOptions

    def __init__(self, graphs: Mapping[str, Path], options: TensorRtOptions) -> None:
        try:
            import tensorrt as trt
            from cuda.bindings import runtime as cudart
        except ImportError as e:
            raise BackendUnavailableError(
                "the 'tensorrt' backend needs TensorRT and cuda-python (pip install tensorrt-cu13 cuda-python); "
                "'cuda' (onnxruntime-gpu) works without them") from e
        bundle = next(iter(graphs.values())).parent
        engines = Manifest.read(bundle).extra.get("tensorrt", {}).get("engines")
        if not engines:
            raise BundleError(f"{bundle} has no TensorRT engines: run `q3vl trt build {bundle}` first")
        self.cudart, self.trt = cudart, trt
        _check(cudart.cudaSetDevice(options.device))
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines = {g: runtime.deserialize_cuda_engine((bundle / e["file"]).read_bytes())
                        for g, e in engines.items()}
        self.contexts = {g: eng.create_execution_context() for g, eng in self.engines.items()}
        self.profiles = {g: Profile({k: tuple(tuple(s) for s in v) for k, v in e["profile"].items()})  # type: ignore[misc]
                         for g, e in engines.items()}
        self.streams = {g: _check(cudart.cudaStreamCreate()) for g in self.engines}
        self.locks = {g: threading.Lock() for g in self.engines}
        self.buffers: dict[tuple[str, str], tuple[int, int]] = {}  # (graph, tensor) -> (device ptr, bytes)

    def shape_limits(self) -> ShapeLimits:
        return _shape_limits(self.profiles)

    def input_dtypes(self, graph: str) -> dict[str, np.dtype]:
        eng = self.engines[graph]
        names = [eng.get_tensor_name(i) for i in range(eng.num_io_tensors)]
        return {n: np.dtype(self.trt.nptype(eng.get_tensor_dtype(n))) for n in names
                if eng.get_tensor_mode(n) == self.trt.TensorIOMode.INPUT}

    def _buffer(self, graph: str, name: str, nbytes: int) -> int:
        """The device buffer of one tensor, reallocated only when a run needs more bytes."""
        ptr, size = self.buffers.get((graph, name), (0, 0))
        if size < nbytes:
            if ptr:
                _check(self.cudart.cudaFree(ptr))
            size = max(nbytes, 1, 2 * size)
            ptr = _check(self.cudart.cudaMalloc(size))
            self.buffers[graph, name] = (ptr, size)
        return ptr

    def run(self, graph: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.profiles[graph].check(dict(feeds))
        with self.locks[graph]:
            return self._run_locked(graph, feeds)

    def _run_locked(self, graph: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        eng, ctx, rt, stream = self.engines[graph], self.contexts[graph], self.cudart, self.streams[graph]
        names = [eng.get_tensor_name(i) for i in range(eng.num_io_tensors)]
        inputs = [n for n in names if eng.get_tensor_mode(n) == self.trt.TensorIOMode.INPUT]
        host: dict[str, np.ndarray] = {}
        keep = []  # host arrays stay alive until the stream has copied them
        for n in inputs:
            arr = np.ascontiguousarray(feeds[n], dtype=self.trt.nptype(eng.get_tensor_dtype(n)))
            keep.append(arr)
            ctx.set_input_shape(n, arr.shape)
            ptr = self._buffer(graph, n, arr.nbytes)
            _check(rt.cudaMemcpyAsync(ptr, arr.ctypes.data, arr.nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice,
                                      stream))
            ctx.set_tensor_address(n, ptr)
        for n in names:
            if n not in inputs:
                host[n] = np.empty(tuple(ctx.get_tensor_shape(n)), dtype=self.trt.nptype(eng.get_tensor_dtype(n)))
                ctx.set_tensor_address(n, self._buffer(graph, n, host[n].nbytes))
        if not ctx.execute_async_v3(stream):
            raise BackendError(f"TensorRT execution of the {graph} engine failed")
        for n, arr in host.items():
            _check(rt.cudaMemcpyAsync(arr.ctypes.data, ctx.get_tensor_address(n), arr.nbytes,
                                      rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))
        _check(rt.cudaStreamSynchronize(stream))
        return {n: a.astype(np.float32, copy=False) for n, a in host.items()}

    def close(self) -> None:
        """Free the device buffers and streams (after any run in progress); a second call does nothing."""
        locks, self.locks = getattr(self, "locks", {}), {}
        for graph, lock in locks.items():
            with lock:
                for key in [k for k in self.buffers if k[0] == graph]:
                    self.cudart.cudaFree(self.buffers.pop(key)[0])
                self.cudart.cudaStreamDestroy(self.streams[graph])


def _check(result: Any) -> Any:
    """cuda-python returns (error, value...); raise on error, return the value."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise BackendError(f"CUDA error {err}")
    return rest[0] if len(rest) == 1 else rest
