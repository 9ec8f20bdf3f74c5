"""Backends: typed options, lifecycle, and the native TensorRT backend's thread safety (with a fake engine)."""

from __future__ import annotations

import ctypes
import json
import shutil
import sys
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from q3vl.errors import ConfigError, UnknownOptionError
from q3vl.runtime import Embedder
from q3vl.runtime.backends import BACKENDS
from q3vl.runtime.backends.ort import CudaOptions, OrtOptions


def test_every_backend_declares_typed_options():
    for name, cls in BACKENDS.items():
        assert cls.Options.parse(None) == cls.Options(), name
        with pytest.raises(UnknownOptionError, match=r"unknown backend options \['thread'\]"):
            cls.Options.parse({"thread": 2})


def test_options_are_validated_not_dropped(tiny_embedding_bundle):
    with pytest.raises(UnknownOptionError, match=r"this backend takes \[.*'threads'.*\]"):
        Embedder(tiny_embedding_bundle, backend_options={"treads": 2})
    with pytest.raises(ConfigError, match="'threads' must be"):
        Embedder(tiny_embedding_bundle, backend_options={"threads": "2"})
    with pytest.raises(ConfigError, match="'optimization' must be"):
        Embedder(tiny_embedding_bundle, backend_options={"optimization": "max"})
    with pytest.raises(ConfigError, match="'threads' must be >= 1"):
        OrtOptions.parse({"threads": 0})
    with pytest.raises(ConfigError, match="'spinning' must be"):
        OrtOptions.parse({"spinning": 1})
    assert CudaOptions.parse({"device": 1, "threads": None}).device == 1
    model = Embedder(tiny_embedding_bundle, backend_options=OrtOptions(threads=1, optimization="basic"))
    assert model.process([{"text": "x"}]).shape == (1, model.dim)


def test_models_close_their_backend_and_loader(tiny_embedding_bundle):
    closed = []
    with Embedder(tiny_embedding_bundle) as model:
        model.process([{"text": "warm"}])
        real = model.backend.close
        model.backend.close = lambda: closed.append(True) or real()
    assert closed == [True] and not model.backend.sessions
    model.close()  # idempotent
    assert closed == [True]
    gone = Embedder(tiny_embedding_bundle)
    backend = gone.backend
    del gone
    import gc

    gc.collect()
    assert not backend.sessions  # released at garbage collection too


# ---------------------------------------------------------------- a fake TensorRT + CUDA runtime
class FakeCuda:
    """cuda.bindings.runtime over host memory: malloc is a ctypes buffer, memcpy is memmove."""

    class cudaMemcpyKind:
        cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost = 1, 2

    def __init__(self) -> None:
        self.buffers: dict[int, ctypes.Array] = {}
        self.mallocs = 0

    def cudaSetDevice(self, d):
        return (0,)

    def cudaStreamCreate(self):
        return (0, object())

    def cudaStreamDestroy(self, s):
        return (0,)

    def cudaStreamSynchronize(self, s):
        return (0,)

    def cudaMalloc(self, n):
        buf = ctypes.create_string_buffer(n)
        self.buffers[ctypes.addressof(buf)] = buf
        self.mallocs += 1
        return (0, ctypes.addressof(buf))

    def cudaFree(self, ptr):
        del self.buffers[ptr]
        return (0,)

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        ctypes.memmove(dst, src, n)
        return (0,)


class FakeContext:
    """y = 2 * x, slowly: without a lock, concurrent runs would overwrite each other's addresses."""

    def __init__(self) -> None:
        self.shape: tuple[int, ...] = ()
        self.addr: dict[str, int] = {}

    def set_input_shape(self, name, shape):
        self.shape = tuple(shape)

    def set_tensor_address(self, name, ptr):
        self.addr[name] = ptr

    def get_tensor_address(self, name):
        return self.addr[name]

    def get_tensor_shape(self, name):
        return self.shape

    def execute_async_v3(self, stream):
        n = int(np.prod(self.shape))
        x = np.frombuffer((ctypes.c_float * n).from_address(self.addr["x"]), np.float32).copy()
        time.sleep(0.002)
        y = np.frombuffer((ctypes.c_float * n).from_address(self.addr["y"]), np.float32)
        y[:] = 2 * x
        return True


class FakeEngine:
    num_io_tensors = 2

    def get_tensor_name(self, i):
        return ["x", "y"][i]

    def get_tensor_mode(self, name):
        return "in" if name == "x" else "out"

    def get_tensor_dtype(self, name):
        return "f32"

    def create_execution_context(self):
        return FakeContext()


def fake_tensorrt() -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    trt.Runtime = type("Runtime", (), {"__init__": lambda self, logger: None,
                                       "deserialize_cuda_engine": lambda self, data: FakeEngine()})
    trt.TensorIOMode = types.SimpleNamespace(INPUT="in")
    trt.nptype = lambda dtype: np.float32
    return trt


def test_native_tensorrt_backend_is_safe_under_concurrent_calls(tiny_embedding_bundle, tmp_path, monkeypatch):
    from q3vl.runtime.backends.base import create

    bundle = shutil.copytree(tiny_embedding_bundle, tmp_path / "bundle")  # engines are faked: any graphs do
    manifest = json.loads((bundle / "q3vl.json").read_text())
    profile = {"x": [[1], [64], [4096]]}
    manifest["tensorrt"] = {"engines": {g: {"file": f"{g}.engine", "profile": profile} for g in ("vision", "text")}}
    (bundle / "q3vl.json").write_text(json.dumps(manifest))
    for g in ("vision", "text"):
        (bundle / f"{g}.engine").write_bytes(b"fake")
    cuda = FakeCuda()
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = cuda
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt())
    monkeypatch.setitem(sys.modules, "cuda", types.ModuleType("cuda"))
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cuda)
    backend = create("tensorrt", {g: bundle / f"{g}.onnx" for g in ("vision", "text")}, {"device": 0})
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal(int(rng.integers(1, 4096))).astype(np.float32) for _ in range(64)]

    def run(k: int) -> bool:
        x = inputs[k % len(inputs)]
        return np.array_equal(backend.run("text" if k % 2 else "vision", {"x": x})["y"], 2 * x)

    with ThreadPoolExecutor(8) as pool:
        ok = list(pool.map(run, range(400)))
    assert all(ok)
    assert cuda.mallocs <= 2 * 2 * 14  # buffers grow by doubling, per graph and tensor: never per run
    with pytest.raises(ValueError, match="outside the engine's range"):
        backend.run("text", {"x": np.zeros(5000, np.float32)})
    assert threading.active_count() < 40
    backend.close()
    assert not cuda.buffers  # every device buffer freed
