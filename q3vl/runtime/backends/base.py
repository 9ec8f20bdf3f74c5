"""The one interface every backend implements: run a named graph on named numpy inputs.

Embedder and Reranker never branch on the backend beyond choosing it. A backend owns its sessions
(or engines) for the bundle's two graphs, `vision` and `text`.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from q3vl.errors import BackendUnavailableError


class Backend(abc.ABC):
    """Runs the bundle's graphs. Subclasses load in `__init__` and fail there, not mid-run."""

    name: str = "base"

    @abc.abstractmethod
    def run(self, graph: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run graph "vision" or "text"; returns every output by name as host numpy arrays."""

    @abc.abstractmethod
    def input_dtypes(self, graph: str) -> dict[str, np.dtype]:
        """The dtype each input of `graph` expects (float inputs follow the graph's precision)."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release device memory; the default has nothing to release."""


BACKENDS: dict[str, type[Backend]] = {}


def register(name: str) -> type:
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
    return BACKENDS[name](graphs, **options)
