"""LanceDB: the "q3vl" embedding function in a real on-disk LanceDB, in-process and remote.

Rows are embedded on insert and queries on search with exactly `Embedder.process`'s vectors; a
mixed corpus (texts, images, a video in the q3vl item form) survives a reopen in a new process,
where each stored item is its own nearest neighbour; a bad image fails that insert with a message
naming it and leaves what was stored untouched.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.integrations.conftest import API_KEY, close

pytest.importorskip("lancedb")
import lancedb
from lancedb.embeddings import get_registry
from lancedb.pydantic import LanceModel, Vector
from pydantic import BaseModel

from q3vl.integrations.lancedb import Q3VLEmbeddingFunction

QUERY_INSTRUCTION = "Retrieve images or text relevant to the user's query."


class Item(BaseModel):
    """The q3vl item form as a struct column."""

    text: str | None = None
    image: str | None = None
    video: str | None = None


def corpus(media):
    return [{"text": "a dog on a beach"}, {"text": "quarterly revenue grew 12%"},
            {"image": str(media / "photo.png")}, {"image": str(media / "photo2.jpg")},
            {"video": str(media / "clip.mp4")}]


def mixed_table(db, name, options):
    fn = get_registry().get("q3vl").create(**options)

    class Row(LanceModel):
        id: str
        item: Item = fn.SourceField()
        vector: Vector(fn.ndims()) = fn.VectorField()  # type: ignore[valid-type]

    return db.create_table(name, schema=Row)


def test_text_and_image_source_fields_embed_on_insert_and_on_query(embed_source, offline, media, tmp_path):
    emb = offline[0]
    registry = get_registry()
    if "api_key" in embed_source:  # LanceDB refuses a hard-coded sensitive key: it goes through a variable
        registry.set_var("q3vl_key", embed_source["api_key"])
        embed_source = {**embed_source, "api_key": "$var:q3vl_key"}
    texts = registry.get("q3vl").create(**embed_source, dim=32, query_instruction=QUERY_INSTRUCTION)
    images = registry.get("q3vl").create(**embed_source, dim=32, source="image", query_instruction=QUERY_INSTRUCTION)
    assert isinstance(texts, Q3VLEmbeddingFunction) and texts.ndims() == 32

    class Photo(LanceModel):
        caption: str = texts.SourceField()
        path: str = images.SourceField()
        caption_vector: Vector(32) = texts.VectorField()  # type: ignore[valid-type]
        image_vector: Vector(32) = images.VectorField()  # type: ignore[valid-type]

    table = lancedb.connect(tmp_path / "db").create_table("photos", schema=Photo)
    rows = [("a gradient", "photo.png"), ("another gradient", "photo2.jpg")]
    table.add([{"caption": c, "path": str(media / p)} for c, p in rows])
    stored = table.to_arrow().to_pylist()
    close([r["caption_vector"] for r in stored], emb.process([{"text": c} for c, _ in rows], dim=32))
    close([r["image_vector"] for r in stored], emb.process([{"image": str(media / p)} for _, p in rows], dim=32))
    query = emb.process([{"text": "a gradient", "instruction": QUERY_INSTRUCTION}], dim=32)[0]
    hits = table.search("a gradient", vector_column_name="image_vector").distance_type("cosine").limit(2).to_list()
    image_vectors = np.asarray([r["image_vector"] for r in stored])
    want = 1 - image_vectors @ query / np.linalg.norm(image_vectors, axis=1) / np.linalg.norm(query)
    assert [h["path"] for h in hits] == [stored[i]["path"] for i in np.argsort(want)]
    close(sorted(h["_distance"] for h in hits), np.sort(want), tol=1e-5)


REOPEN = textwrap.dedent("""
    import json, sys
    import lancedb
    import q3vl.integrations.lancedb  # registers "q3vl" in this new process
    db = lancedb.connect(sys.argv[1])
    out = {}
    for name in ("local", "remote"):
        table = db.open_table(name)
        rows = table.to_arrow().to_pylist()
        hits = []
        for row in rows:
            item = {k: v for k, v in row["item"].items() if v is not None}
            top = table.search(item).distance_type("cosine").limit(len(rows)).to_list()
            hits.append([row["id"], top[0]["id"], 1 - top[0]["_distance"], len(top)])
        out[name] = {"count": table.count_rows(), "hits": hits}
    print(json.dumps(out))
""")


def test_mixed_corpus_reopened_in_a_new_process_finds_each_item_first(tiny_embedding_bundle, server, offline, media,
                                                                       tmp_path, monkeypatch):
    monkeypatch.setenv("Q3VL_API_KEY", API_KEY)  # the remote function's key comes from the environment, never the table
    db = lancedb.connect(tmp_path / "db")
    items = corpus(media)
    tables = {"local": mixed_table(db, "local", {"bundle": str(tiny_embedding_bundle)}),
              "remote": mixed_table(db, "remote", {"url": server.base, "model": "emb"})}
    for table in tables.values():
        table.add([{"id": f"row{i}", "item": it} for i, it in enumerate(items)])
        close([r["vector"] for r in table.to_arrow().to_pylist()], offline[0].process(items))
        with pytest.raises(RuntimeError, match=r"input 1: unreadable or corrupt image .*bad\.png"):
            table.add([{"id": "good", "item": {"text": "fine"}},
                       {"id": "bad", "item": {"image": str(media / "bad.png")}}])
        assert table.count_rows() == len(items)  # nothing lost, and nothing half-added
    assert API_KEY not in str(tables["remote"].schema.metadata)
    done = subprocess.run([sys.executable, "-c", REOPEN, str(tmp_path / "db")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for name in ("local", "remote"):
        assert result[name]["count"] == len(items)
        for stored, first, similarity, n in result[name]["hits"]:
            assert first == stored and similarity >= 0.9999 and n == len(items), (name, stored, first, similarity)
