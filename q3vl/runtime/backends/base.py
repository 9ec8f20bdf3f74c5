"""The one interface every backend implements: run a named graph on named numpy inputs.

Embedder and Reranker never branch on the backend beyond choosing it. A backend owns its sessions
(or engines) for the bundle's two graphs, `vision` and `text`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from q3vl.errors import BackendUnavailableError


@dataclass(frozen=True)
class DeviceView:
    """A float32 window of a buffer allocated by `Backend.alloc`: `offset` elements in, `shape` long.

    Vision outputs are written through views into one text-graph input buffer, so on a GPU they
    never leave the device.
    """

    buffer: Any
    offset: int
    shape: tuple[int, ...]


class Backend(abc.ABC):
    """Runs the bundle's graphs. Subclasses load in `__init__` and fail there, not mid-run."""

    name: str = "base"
    io_binding: bool = False  # True: the pipeline keeps intermediate tensors in `alloc` buffers

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


def create(name: str, graphs: Mapping[str, Path], **options: object) -> Backend:
    """Instantiate backend `name` ("cpu", "cuda", "tensorrt-ep", "tensorrt") for the graph files."""
    from q3vl.runtime import backends  # noqa: F401  (registers the built-in backends)

    if name not in BACKENDS:
        raise BackendUnavailableError(f"unknown backend {name!r}; available: {sorted(BACKENDS)}")
    cls: Any = BACKENDS[name]  # every registered subclass takes (graphs, **options)
    return cls(graphs, **options)
