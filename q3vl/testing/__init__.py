"""Random-weight checkpoints with the real Qwen3-VL layout, for tests and benchmarks (needs the export extra)."""

from q3vl.testing.checkpoint import make_checkpoint
from q3vl.testing.shapes import SHAPES

__all__ = ["SHAPES", "make_checkpoint"]
