"""Shared fixtures: tiny random-weight checkpoints (made once per session) and media files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VIDEO_FPS = 10


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def tiny_embedding(ckpt_dir: Path) -> Path:
    from q3vl.testing import make_checkpoint

    return make_checkpoint(ckpt_dir / "tiny-embedding", task="embedding", shape="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_reranker(ckpt_dir: Path) -> Path:
    from q3vl.testing import make_checkpoint

    return make_checkpoint(ckpt_dir / "tiny-reranker", task="reranker", shape="tiny", seed=1)


@pytest.fixture(scope="session")
def ref_embedder(tiny_embedding: Path):
    from q3vl.reference import ReferenceEmbedder

    return ReferenceEmbedder(tiny_embedding)


@pytest.fixture(scope="session")
def ref_reranker(tiny_reranker: Path):
    from q3vl.reference import ReferenceReranker

    return ReferenceReranker(tiny_reranker)


def make_video(path: Path, frames: int = 30, width: int = 200, height: int = 120, fps: int = VIDEO_FPS) -> Path:
    """An H.264 test clip with moving gradients and a noisy patch (real motion, real chroma)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        rng = np.random.default_rng(0)
        yy, xx = np.mgrid[0:height, 0:width]
        for i in range(frames):
            img = np.stack([(xx * 255 // width + i * 5) % 256, (yy * 255 // height) % 256,
                            (xx + yy + i * 7) % 256], -1).astype(np.uint8)
            img[10:40, 10:60] = rng.integers(0, 255, (30, 50, 3))
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="session")
def video_file(media_dir: Path) -> Path:
    return make_video(media_dir / "clip.mp4")


def noise_image(h: int, w: int, seed: int = 0, mode: str = "RGB"):
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 // max(w, 1)), (yy * 255 // max(h, 1)), (xx + yy) % 256], -1)
    arr = np.clip(base + rng.integers(-40, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr)
    return img.convert(mode) if mode != "RGB" else img


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bundles")


@pytest.fixture(scope="session")
def tiny_embedding_bundle(tiny_embedding: Path, bundle_dir: Path) -> Path:
    from q3vl.export.exporter import export_bundle

    return export_bundle(tiny_embedding, bundle_dir / "tiny-embedding", progress=False)


@pytest.fixture(scope="session")
def tiny_reranker_bundle(tiny_reranker: Path, bundle_dir: Path) -> Path:
    from q3vl.export.exporter import export_bundle

    return export_bundle(tiny_reranker, bundle_dir / "tiny-reranker", progress=False)


@pytest.fixture(scope="session")
def tiny_embedding_plain(tiny_embedding: Path, bundle_dir: Path) -> Path:
    from q3vl.export.exporter import export_bundle

    return export_bundle(tiny_embedding, bundle_dir / "tiny-embedding-plain", graph="plain", progress=False)


@pytest.fixture(scope="session")
def tiny_reranker_plain(tiny_reranker: Path, bundle_dir: Path) -> Path:
    from q3vl.export.exporter import export_bundle

    return export_bundle(tiny_reranker, bundle_dir / "tiny-reranker-plain", graph="plain", progress=False)


# The plain graphs (the TensorRT path) run their parity tests under -m slow: CI time on 2 cores.
@pytest.fixture(params=["fused", pytest.param("plain", marks=pytest.mark.slow)])
def embedding_bundles(request: pytest.FixtureRequest) -> Path:
    """The tiny embedding bundle of each graph kind (parity tests run on both)."""
    name = "tiny_embedding_bundle" if request.param == "fused" else "tiny_embedding_plain"
    return request.getfixturevalue(name)


@pytest.fixture(params=["fused", pytest.param("plain", marks=pytest.mark.slow)])
def reranker_bundles(request: pytest.FixtureRequest) -> Path:
    name = "tiny_reranker_bundle" if request.param == "fused" else "tiny_reranker_plain"
    return request.getfixturevalue(name)
