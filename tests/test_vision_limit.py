"""The runner honours a backend's per-call vision-block limit (TensorRT profiles report one).

A CPU backend that reports `max_blocks=3` must split every vision call to at most 3 blocks and give
the same vectors as the plain CPU backend, which stacks as many blocks as the patch budget allows.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest

from q3vl.runtime.backends.base import BACKENDS, ShapeLimits
from q3vl.runtime.backends.ort import CpuBackend
from tests.conftest import make_video, noise_image

MAX_BLOCKS = 3


class LimitedCpu(CpuBackend):
    """The CPU backend, reporting TensorRT-like limits and recording each vision call's block count."""

    calls: list[int]

    def shape_limits(self) -> ShapeLimits:
        return ShapeLimits(max_batch=64, max_tokens=1 << 20, max_blocks=MAX_BLOCKS, max_patches=1 << 20)

    def run(self, graph: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if graph == "vision":
            self.calls.append(int(feeds["pixel_values"].shape[0]))
        return super().run(graph, feeds)


@pytest.fixture
def limited_backend(monkeypatch: pytest.MonkeyPatch) -> type[LimitedCpu]:
    LimitedCpu.calls = []
    LimitedCpu.name = "cpu-limited"
    monkeypatch.setitem(BACKENDS, "cpu-limited", LimitedCpu)
    return LimitedCpu


def test_vision_calls_respect_the_backends_block_limit(tiny_embedding_bundle, tmp_path, limited_backend):
    from q3vl import Embedder

    images = []
    for i in range(40):
        path = tmp_path / f"img{i}.png"
        noise_image(48, 64, seed=i).save(path)
        images.append({"image": str(path)})
    video = make_video(tmp_path / "v64.mp4", frames=64, width=96, height=64)
    items = [*images, {"video": str(video), "fps": 10.0, "max_frames": 64}]
    with Embedder(tiny_embedding_bundle, batch_size=64, max_batch_tokens=1 << 20) as plain:
        expected = plain.process(items)
        plain_calls = plain.plan(items)
    with Embedder(tiny_embedding_bundle, backend="cpu-limited", batch_size=64, max_batch_tokens=1 << 20) as limited:
        got = limited.process(items)
    cos = np.sum(expected * got, axis=1)
    assert cos.min() >= 0.999999, cos.min()
    calls = limited_backend.calls
    frame_pairs = sum(len(p.encoded.grids) for p in plain_calls[-1:])  # the video's blocks
    assert frame_pairs == 32
    assert sum(calls) == 40 + frame_pairs  # every block once
    assert max(calls) == MAX_BLOCKS
    assert len(calls) >= -(-40 // MAX_BLOCKS) + -(-frame_pairs // MAX_BLOCKS)
