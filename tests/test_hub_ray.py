"""`q3vl embed-dataset --bundle org/name` on a local Ray with 2 embedding workers, against the loopback Hub.

The driver downloads the bundle once; it hands the workers the repo id pinned to the commit it got
(`org/name@<sha>`), and each worker resolves that commit from the shared Hub cache with no request:
the server's log shows each file fetched once, and the vectors equal the local folder's.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("ray")
pytest.importorskip("pyarrow")

from q3vl.ray.store import iter_shards, read_manifest
from tests.hub_server import LoopbackHub, hub_env
from tests.test_cli import q3vl

pytestmark = pytest.mark.ray


def test_embed_dataset_by_id_resolves_on_every_worker_from_the_cache(tiny_embedding_bundle, tmp_path):
    from q3vl import Embedder

    texts = [f"row {i} " + "word " * (i % 7) for i in range(48)]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": f"r{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    with LoopbackHub() as hub:
        sha = hub.add_folder("org/corpus-bundle", tiny_embedding_bundle)
        r = q3vl("embed-dataset", str(src), "-o", str(tmp_path / "out"), "--bundle", "org/corpus-bundle",
                 "--workers", "2", "--num-cpus", "2", "--rows-per-call", "8", "--no-progress",
                 env=hub_env(hub, tmp_path / "hf"))
        assert r.returncode == 0, r.stderr
        files = json.loads((tiny_embedding_bundle / "q3vl.json").read_text())["files"]
        assert sorted(hub.downloads()) == sorted(["q3vl.json", *files])  # once, by the driver
        listings = [e for e in hub.log if e["path"].startswith("/api/models/")]
        assert len(listings) == 1  # the workers asked nothing: the pinned commit is in the cache
    manifest = read_manifest(tmp_path / "out")
    assert manifest["bundle"]["path"] == f"org/corpus-bundle@{sha}"
    rows = {row["id"]: row["embedding"] for t in iter_shards(tmp_path / "out") for row in t.to_pylist()}
    assert sorted(rows) == sorted(f"r{i}" for i in range(len(texts)))
    got = np.array([rows[f"r{i}"] for i in range(len(texts))], dtype=np.float32)
    with Embedder(tiny_embedding_bundle) as local:
        expected = local.process([{"text": t} for t in texts])
    assert np.all(np.sum(got * expected, axis=1) >= 0.999999)
