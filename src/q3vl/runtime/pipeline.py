"""One micro-batch through the two graphs: vision blocks grouped by size, then the text graph.

Vision: blocks (images, video frame pairs) are grouped by patch count and stacked along the
leading dimension, at most `max_vision_patches` patches per call and at most the backend's
`ShapeLimits.max_blocks` blocks per call (a TensorRT engine's profile), so attention is batched per
block with no cross-block mask and no call exceeds what the engines accept. Text: sequences are
right-padded (causal attention never lets a valid token see a pad, so padding cannot change a
result), visual rows are concatenated in token order, and a text-only batch gets one dummy visual
row.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from q3vl.preprocess.encode import Encoded
from q3vl.preprocess.vision import VisionBlock, stack_blocks
from q3vl.runtime.backends.base import Backend, DeviceView
from q3vl.spec import ModelSpec


def text_feeds(spec: ModelSpec, pad_id: int, seqs: Sequence[Encoded],
               visual: Sequence[Sequence[tuple[np.ndarray, np.ndarray]]]) -> dict[str, np.ndarray]:
    """The text graph's inputs for `seqs`: right-padded ids/mask/positions and the visual rows
    (merged embeddings, DeepStack) of every sequence in token order; one dummy row when there are none.

    A function of its own because int8 calibration feeds the same inputs to its layer-by-layer walk.
    """
    length = max(len(s.ids) for s in seqs)
    ids = np.full((len(seqs), length), pad_id, np.int64)
    mask = np.zeros((len(seqs), length), np.int64)
    pos = np.zeros((3, len(seqs), length), np.int64)
    for b, s in enumerate(seqs):
        ids[b, :len(s.ids)], mask[b, :len(s.ids)], pos[:, b, :len(s.ids)] = s.ids, 1, s.positions
    rows = [r for per_seq in visual for r in per_seq]
    d, k = spec.text.hidden_size, spec.num_deepstack
    if rows:
        vis = np.concatenate([r[0] for r in rows])
        ds = np.concatenate([r[1] for r in rows])
    else:
        vis, ds = np.zeros((1, d), np.float32), np.zeros((1, k, d), np.float32)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "visual_embeds": vis,
            "deepstack_embeds": ds}


class GraphRunner:
    """Feeds for, and calls of, the bundle's vision and text graphs."""

    def __init__(self, backend: Backend, spec: ModelSpec, pad_id: int, max_vision_patches: int = 8192) -> None:
        self.backend, self.spec, self.pad_id = backend, spec, pad_id
        self.max_vision_patches = max_vision_patches
        limits = backend.shape_limits()
        self.max_blocks = limits.max_blocks if limits is not None else None

    def blocks_per_call(self, patches: int) -> int:
        """How many blocks of `patches` patches one vision call takes: the patch budget, capped by the
        backend's per-call block limit (at least one: a single block is checked against the engines'
        patch limit when it is planned).
        """
        n = max(1, self.max_vision_patches // patches)
        return n if self.max_blocks is None else max(1, min(n, self.max_blocks))

    def vision(self, blocks: Sequence[VisionBlock]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(merged rows [n/4, D], deepstack [n/4, K, D]) per block, in the order given."""
        out: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(blocks)
        by_size: dict[int, list[int]] = defaultdict(list)
        for i, b in enumerate(blocks):
            by_size[b.num_patches].append(i)
        v = self.spec.vision
        for n, idx in by_size.items():
            per_call = self.blocks_per_call(n)
            for start in range(0, len(idx), per_call):
                chunk = idx[start:start + per_call]
                feeds = stack_blocks([blocks[i] for i in chunk], v.spatial_merge_size, v.num_position_embeddings)
                res = self.backend.run("vision", feeds)
                emb, ds = res["visual_embeds"], res["deepstack_embeds"]
                for j, i in enumerate(chunk):
                    out[i] = (emb[j], ds[j])
        return out  # type: ignore[return-value]

    def text_feeds(self, seqs: Sequence[Encoded], visual: Sequence[Sequence[tuple[np.ndarray, np.ndarray]]]
                   ) -> dict[str, np.ndarray]:
        """Right-padded ids/mask/positions and the visual rows of every sequence, in token order."""
        return text_feeds(self.spec, self.pad_id, seqs, visual)

    def text(self, seqs: Sequence[Encoded], visual: Sequence[Sequence[tuple[np.ndarray, np.ndarray]]]
             ) -> dict[str, np.ndarray]:
        """The text graph's outputs for the micro-batch, one row per sequence."""
        return self.backend.run("text", self.text_feeds(seqs, visual))

    def run(self, seqs: Sequence[Encoded], blocks: Sequence[Sequence[VisionBlock]]) -> dict[str, np.ndarray]:
        """Vision for every block of every sequence, then text; `blocks[b]` are sequence b's blocks."""
        if self.backend.io_binding:
            return self.run_bound(seqs, blocks)
        flat = [blk for per_seq in blocks for blk in per_seq]
        results = self.vision(flat) if flat else []
        visual, k = [], 0
        for per_seq in blocks:
            visual.append(results[k:k + len(per_seq)])
            k += len(per_seq)
        return self.text(seqs, visual)

    def run_bound(self, seqs: Sequence[Encoded], blocks: Sequence[Sequence[VisionBlock]]) -> dict[str, np.ndarray]:
        """The device-resident path: vision outputs are written into the text graph's input buffers.

        Blocks are taken in token order; each run of consecutive blocks with the same patch count
        (at most `blocks_per_call` of them) is one vision call whose outputs are bound to its rows
        of `visual_embeds [V, D]` and `deepstack_embeds [V, K, D]`: DeepStack is row-major by visual
        row precisely so that these windows are contiguous.
        """
        flat = [blk for per_seq in blocks for blk in per_seq]
        feeds = self.text_feeds(seqs, [[] for _ in seqs])  # ids, mask, positions; visual inputs replaced
        if not flat:
            return self.backend.run("text", feeds)
        d, k, v = self.spec.text.hidden_size, self.spec.num_deepstack, self.spec.vision
        rows = sum(b.num_tokens(v.spatial_merge_size) for b in flat)
        visual, deep = self.backend.alloc((rows, d)), self.backend.alloc((rows, k, d))
        start, row = 0, 0
        while start < len(flat):
            n = flat[start].num_patches
            end = start + 1
            budget = self.blocks_per_call(n)
            while end < len(flat) and flat[end].num_patches == n and end - start < budget:
                end += 1
            chunk, m = flat[start:end], n // v.spatial_merge_size**2
            vision_in = stack_blocks(chunk, v.spatial_merge_size, v.num_position_embeddings)
            self.backend.run_bound("vision", vision_in, {
                "visual_embeds": DeviceView(visual, row * d, (len(chunk), m, d)),
                "deepstack_embeds": DeviceView(deep, row * k * d, (len(chunk), m, k, d))})
            row += len(chunk) * m
            start = end
        inputs: dict[str, np.ndarray | DeviceView] = {
                  **{key: feeds[key] for key in ("input_ids", "attention_mask", "position_ids")},
                  "visual_embeds": DeviceView(visual, 0, (rows, d)),
                  "deepstack_embeds": DeviceView(deep, 0, (rows, k, d))}
        return self.backend.run_bound("text", inputs, {})
