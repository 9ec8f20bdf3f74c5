"""The one interface every backend implements: run a named graph on named numpy inputs.

Embedder and Reranker never branch on the backend beyond choosing it. A backend owns its sessions
(or engines) for the bundle's two graphs, `vision` and `text`.
"""

from __future__ import annotations

import abc
import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from q3vl.errors import BackendUnavailableError, ConfigError, UnknownOptionError


@dataclass(frozen=True)
class DeviceView:
    """A float32 window of a buffer allocated by `Backend.alloc`: `offset` elements in, `shape` long.

    Vision outputs are written through views into one text-graph input buffer, so on a GPU they
    never leave the device.
    """

    buffer: Any
    offset: int
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ShapeLimits:
    """The largest inputs a backend's engines accept (TensorRT profiles); None for ONNX Runtime's CPU/CUDA.

    The model clamps its batching policy to these and refuses a longer item before any graph runs.
    """

    max_batch: int  # sequences per text-graph call
    max_tokens: int  # tokens per sequence (text + vision)
    max_blocks: int  # vision blocks (images, frame pairs) per vision-graph call
    max_patches: int  # patches per vision block


@dataclass(frozen=True)
class BackendOptions:
    """A backend's options: a frozen dataclass per backend, built from a dict by `parse`.

    An unknown option is an `UnknownOptionError` naming the allowed ones (never silently dropped),
    a value of the wrong type a `ConfigError` naming the option.
    """

    @classmethod
    def parse(cls, options: Any) -> BackendOptions:
        """`options` (None, a dict, or already an instance of this class) as an instance of this class."""
        if options is None:
            return cls()
        if isinstance(options, cls):
            return options
        if not isinstance(options, Mapping):
            raise ConfigError(f"backend options must be a dict or a {cls.__name__}, not {type(options).__name__}")
        hints = typing.get_type_hints(cls)
        allowed = sorted(f.name for f in dataclasses.fields(cls))
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise UnknownOptionError(f"unknown backend options {unknown}; this backend takes {allowed}")
        for name, value in options.items():
            if not _matches(value, hints[name]):
                raise ConfigError(f"backend option {name!r} must be {hints[name]}, not {value!r}")
        return cls(**options)


def _matches(value: Any, hint: Any) -> bool:
    """A shallow isinstance check against a type hint (unions, Literal, dict/ bool-is-not-int)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if hint is type(None):
        return value is None
    if origin is not None:
        return isinstance(value, origin)
    if hint in (int, float) and isinstance(value, bool):
        return False
    if hint is float:
        return isinstance(value, (int, float))
    return isinstance(value, hint) if isinstance(hint, type) else True


class Backend(abc.ABC):
    """Runs the bundle's graphs. Subclasses load in `__init__` and fail there, not mid-run.

    Subclasses declare their `Options` dataclass; `create` validates user options against it.
    """

    name: str = "base"
    Options: ClassVar[type[BackendOptions]] = BackendOptions
    io_binding: bool = False  # True: the pipeline keeps intermediate tensors in `alloc` buffers

    def shape_limits(self) -> ShapeLimits | None:
        """The engines' input limits, or None when any shape runs."""
        return None

    def io_shapes(self, graph: str) -> dict[str, tuple[Any, ...]]:
        """Each input and output of `graph` with its declared shape (ints where static, anything else
        where symbolic); empty when the backend cannot tell. Checked against the manifest at load.
        """
        return {}

    @abc.abstractmethod
    def run(self, graph: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run graph "vision" or "text"; returns every output by name as host numpy arrays."""

    @abc.abstractmethod
    def input_dtypes(self, graph: str) -> dict[str, np.dtype]:
        """The dtype each input of `graph` expects (float inputs follow the graph's precision)."""

    def alloc(self, shape: tuple[int, ...]) -> Any:
        """A float32 buffer on the backend's device (only used when `io_binding`)."""
        raise NotImplementedError(f"backend {self.name!r} does not bind device buffers")

    def run_bound(self, graph: str, inputs: Mapping[str, np.ndarray | DeviceView],
                  outputs: Mapping[str, DeviceView]) -> dict[str, np.ndarray]:
        """Run with some inputs/outputs in device buffers; outputs not in `outputs` return to the host."""
        raise NotImplementedError(f"backend {self.name!r} does not bind device buffers")

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release device memory; the default has nothing to release."""


BACKENDS: dict[str, type[Backend]] = {}


def register(name: str) -> Callable[[type[Backend]], type[Backend]]:
    """Class decorator adding a backend to the registry under `name`."""
    def wrap(cls: type[Backend]) -> type[Backend]:
        cls.name = name
        BACKENDS[name] = cls
        return cls
    return wrap


def backend_option_names(name: str) -> frozenset[str]:
    """The options backend `name` takes (none for an unknown name)."""
    from dataclasses import fields

    from q3vl.runtime import backends  # noqa: F401  (registers the built-in backends)

    cls = BACKENDS.get(name)
    return frozenset(f.name for f in fields(cls.Options)) if cls is not None else frozenset()


def create(name: str, graphs: Mapping[str, Path], options: Any = None) -> Backend:
    """Instantiate backend `name` ("cpu", "cuda", "tensorrt-ep", "tensorrt") for the graph files.

    `options` is a dict or the backend's `Options` instance, validated before anything loads.
    """
    from q3vl.runtime import backends  # noqa: F401  (registers the built-in backends)

    if name not in BACKENDS:
        raise BackendUnavailableError(f"unknown backend {name!r}; available: {sorted(BACKENDS)}")
    cls: Any = BACKENDS[name]  # every registered subclass takes (graphs, options)
    return cls(graphs, cls.Options.parse(options))
