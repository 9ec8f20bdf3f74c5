"""3-D M-RoPE position ids, as transformers' `Qwen3VLModel.get_rope_index` computes them.

Text tokens get t = h = w = running index. A vision block (an image, or one frame pair of a video,
each its own run of pad tokens) starting at running index s gets t = s, h = s + row, w = s + col over
its merged grid; the running index then jumps to s + max(rows, cols). Text-only sequences reduce to
plain 1-D positions. Padding positions are 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import numpy as np


def rope_positions(ids: np.ndarray, vision_ids: Sequence[int], grids: Sequence[tuple[int, int]],
                   merge: int = 2) -> np.ndarray:
    """int64 `[3, L]` for one unpadded sequence.

    Args:
        ids: token ids `[L]`.
        vision_ids: the pad token ids that mark vision rows (image and video pads).
        grids: the `(h, w)` patch grid of each vision block, in sequence order.
        merge: spatial merge size (2).
    """
    is_vision = np.isin(ids, np.asarray(vision_ids))
    # runs of equal "is vision" flags: [start, end)
    change = np.flatnonzero(np.diff(is_vision.astype(np.int8))) + 1
    bounds = np.concatenate([[0], change, [len(ids)]])
    out = np.empty((3, len(ids)), np.int64)
    cur, block = 0, 0
    for start, end in pairwise(bounds):
        if not is_vision[start]:
            out[:, start:end] = np.arange(cur, cur + end - start)
            cur += end - start
            continue
        # a run may hold several adjacent blocks only if the template put nothing between them;
        # Qwen3-VL always wraps each block in vision_start/vision_end, so one run is one block
        h, w = grids[block][0] // merge, grids[block][1] // merge
        if h * w != end - start:
            raise ValueError(f"vision run of {end - start} tokens does not match grid {grids[block]}")
        rows, cols = np.divmod(np.arange(h * w), w)
        out[0, start:end] = cur
        out[1, start:end] = cur + rows
        out[2, start:end] = cur + cols
        cur += max(h, w)
        block += 1
    if block != len(grids):
        raise ValueError(f"{len(grids)} vision blocks given, {block} found in the token ids")
    return out
