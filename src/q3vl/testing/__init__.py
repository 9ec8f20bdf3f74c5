"""Random-weight checkpoints with the real Qwen3-VL layout, for tests and benchmarks (needs the export extra).

`make_checkpoint` loads on first use, so the command line's `q3vl testing ...` registration stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from q3vl.testing.checkpoint import make_checkpoint
    from q3vl.testing.shapes import SHAPES

__all__ = ["SHAPES", "make_checkpoint"]


def __getattr__(name: str) -> Any:
    if name == "make_checkpoint":
        from q3vl.testing.checkpoint import make_checkpoint

        return make_checkpoint
    if name == "SHAPES":
        from q3vl.testing.shapes import SHAPES

        return SHAPES
    raise AttributeError(f"module 'q3vl.testing' has no attribute {name!r}")
