"""Backends: one small class per way of running the graphs (see `base.Backend`)."""

from q3vl.runtime.backends import ort as _ort  # noqa: F401  (registers cpu, cuda)
from q3vl.runtime.backends import tensorrt as _tensorrt  # noqa: F401  (registers tensorrt, tensorrt-ep)
from q3vl.runtime.backends.base import BACKENDS, Backend, create

__all__ = ["BACKENDS", "Backend", "create"]
