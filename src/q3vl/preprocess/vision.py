"""Host-side inputs of the vision graph: everything that depends on the grid's *values*.

transformers computes these inside the vision tower with data-dependent ops (`tolist()`,
`repeat_interleave`, per-image loops) that do not export; here they are plain numpy, and the graph
only sees shape-polymorphic tensors. One "block" is one attention segment: an image, or one frame
pair of a video (each frame pair of a video attends only to itself in Qwen3-VL). Blocks with the
same patch count are stacked along a leading dimension `S`, so the graph runs batched attention
`[S, heads, n, n]` with no mask and no O((S*n)^2) waste.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from q3vl.preprocess.image import normalize


@dataclass(frozen=True)
class Geometry:
    """How pixels become patches and tokens: patch side, frames per temporal patch, merge side.

    Read from the bundle's `ModelSpec` (16, 2 and 2 for every published Qwen3-VL checkpoint), never
    hard-coded, so preprocessing follows the model it feeds.
    """

    patch: int = 16
    temporal: int = 2
    merge: int = 2

    @classmethod
    def from_spec(cls, vision: Any) -> Geometry:
        """From a `VisionSpec` (patch_size, temporal_patch_size, spatial_merge_size)."""
        return cls(vision.patch_size, vision.temporal_patch_size, vision.spatial_merge_size)

    @property
    def factor(self) -> int:
        """Image sides are multiples of this (patch x merge: 32)."""
        return self.patch * self.merge


@dataclass(frozen=True)
class VisionBlock:
    """One attention segment: patch rows `[h*w, 1536]` for a `(h, w)` patch grid.

    `rows` are the uint8 pixels in patch order (a quarter of the bytes of float32, so a micro-batch
    of large images or long videos holds four times less while it waits for the graphs) or already
    normalised float32; `pixels` is always the float32 `pixel_values`.
    """

    rows: np.ndarray
    grid: tuple[int, int]

    @property
    def pixels(self) -> np.ndarray:
        """float32 `pixel_values` rows (normalised here when the rows are uint8)."""
        return normalize(self.rows) if self.rows.dtype == np.uint8 else self.rows

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def num_tokens(self, merge: int) -> int:
        """Merged tokens this block contributes to the text sequence (merge x merge patches each)."""
        return self.num_patches // merge**2


def _block_order(h: int, w: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column of each patch, in merge-block order (the order pixel_values rows come in)."""
    rows = np.repeat(np.arange(h), w).reshape(h // merge, merge, w // merge, merge)
    cols = np.tile(np.arange(w), h).reshape(h // merge, merge, w // merge, merge)
    return rows.transpose(0, 2, 1, 3).reshape(-1), cols.transpose(0, 2, 1, 3).reshape(-1)


def _taps(index: np.ndarray, size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear (align_corners=True) taps of `index` on an axis of `size` into a table of `side`."""
    src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
    floor = np.floor(src)
    offsets = np.arange(2)
    taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
    weights = np.clip(1 - np.abs(src[:, None] - floor[:, None] - offsets), 0, None).astype(np.float32)
    return taps, weights


@lru_cache(maxsize=256)
def grid_inputs(h: int, w: int, merge: int, num_position_embeddings: int) -> tuple[np.ndarray, ...]:
    """(rotary coords int64 [n, 2], table taps int64 [n, 4], tap weights float32 [n, 4]) for one grid.

    Matches transformers' get_vision_position_ids and get_vision_interpolation_indices_and_weights
    (bilinear, align_corners=True) for a single frame; cached because sizes repeat.
    """
    side = round(num_position_embeddings**0.5)
    rows, cols = _block_order(h, w, merge)
    row_taps, row_w = _taps(rows, h, side)
    col_taps, col_w = _taps(cols, w, side)
    taps = (row_taps[:, :, None] * side + col_taps[:, None, :]).reshape(-1, 4)
    weights = (row_w[:, :, None] * col_w[:, None, :]).reshape(-1, 4)
    coords = np.stack([rows, cols], -1).astype(np.int64)
    for a in (coords, taps, weights):
        a.setflags(write=False)
    return coords, taps.astype(np.int64), weights


def _stack_pixels(blocks: list[VisionBlock]) -> np.ndarray:
    """float32 `[S, n, 1536]`; uint8 rows are stacked first and normalised once (same values)."""
    if all(b.rows.dtype == np.uint8 for b in blocks):
        return normalize(np.stack([b.rows for b in blocks]))
    return np.stack([b.pixels for b in blocks])


def stack_blocks(blocks: list[VisionBlock], merge: int, num_position_embeddings: int) -> dict[str, np.ndarray]:
    """Feeds for one vision-graph call over blocks that share a patch count.

    Returns `pixel_values [S, n, 1536]`, `pos_ids [S, n, 2]`, `interp_idx [S, n, 4]`,
    `interp_w [S, n, 4]`.
    """
    n = blocks[0].num_patches
    if any(b.num_patches != n for b in blocks):
        raise ValueError("blocks stacked in one vision call must share a patch count")
    per = [grid_inputs(*b.grid, merge, num_position_embeddings) for b in blocks]
    return {
        "pixel_values": _stack_pixels(blocks),
        "pos_ids": np.stack([p[0] for p in per]),
        "interp_idx": np.stack([p[1] for p in per]),
        "interp_w": np.stack([p[2] for p in per]),
    }
