"""Fixtures of the integration tests: one real `q3vl serve` (tiny bundles, an API key) for the package,
the offline oracle (`Embedder` / `Reranker` on the same bundles), media files, and each mode's options.

Every vector and score an integration returns is compared with `Embedder.process` /
`Reranker.process` of the same items: cos >= 0.999999 and |diff| <= 1e-6, in-process and remote.
"""

from __future__ import annotations

import numpy as np
import pytest

from q3vl.runtime import Embedder, Reranker
from q3vl.testing.inputs import gradient_image, write_video
from tests.serve_server import Server

API_KEY = "integration-test-key"
MODES = ["local", "remote"]


def close(got, want, tol=1e-6):
    """Vectors (or scores) equal within the integrations' tolerance."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert np.isfinite(got).all() and np.abs(got - want).max() <= tol, np.abs(got - want).max()
    if got.ndim == 2:
        cos = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
        assert cos.min() >= 0.999999, cos.min()


@pytest.fixture(scope="package")
def media(tmp_path_factory):
    """photo.png, photo2.jpg, clip.mp4 and bad.png (bytes that are no image)."""
    d = tmp_path_factory.mktemp("integration-media")
    gradient_image(96, 128, seed=4).save(d / "photo.png")
    gradient_image(80, 112, seed=7).save(d / "photo2.jpg", quality=90)
    write_video(d / "clip.mp4", frames=16, width=128, height=96, fps=8)
    (d / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really an image")
    return d


@pytest.fixture(scope="package")
def offline(tiny_embedding_bundle, tiny_reranker_bundle):
    with Embedder(tiny_embedding_bundle) as emb, Reranker(tiny_reranker_bundle) as rr:
        yield emb, rr


@pytest.fixture(scope="package")
def server(tiny_embedding_bundle, tiny_reranker_bundle, tmp_path_factory):
    srv = Server(["--embedding", str(tiny_embedding_bundle), "--reranker", str(tiny_reranker_bundle),
                  "--embedding-name", "emb", "--reranker-name", "rr", "--api-key", API_KEY],
                 tmp_path_factory.mktemp("integration-serve-log"), headers={"Authorization": f"Bearer {API_KEY}"})
    srv.wait_ready()
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(params=MODES)
def embed_source(request, tiny_embedding_bundle):
    """How an integration reaches the embedding model: a bundle in-process, or the server (remote)."""
    if request.param == "local":
        return {"bundle": str(tiny_embedding_bundle)}
    return {"url": request.getfixturevalue("server").base, "api_key": API_KEY, "model": "emb"}


@pytest.fixture(params=MODES)
def rerank_source(request, tiny_reranker_bundle):
    if request.param == "local":
        return {"bundle": str(tiny_reranker_bundle)}
    return {"url": request.getfixturevalue("server").base, "api_key": API_KEY, "model": "rr"}
