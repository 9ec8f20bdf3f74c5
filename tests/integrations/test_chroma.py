"""Chroma: the "q3vl" embedding function in a real on-disk `PersistentClient`, in-process and remote.

Documents, images (numpy arrays, as Chroma passes them) and a video by reference (`uris` through
`Q3VLLoader`, the q3vl item form) get exactly `Embedder.process`'s vectors; the collection reopened
in a new process rebuilds the function from its stored config, and each stored item is its own
nearest neighbour; a bad image fails that `add` with a message naming it and loses nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from q3vl.errors import InputError
from tests.integrations.conftest import API_KEY, close

pytest.importorskip("chromadb")
import chromadb

from q3vl.integrations.chroma import Q3VLEmbeddingFunction, Q3VLLoader

TEXTS = ["a dog on a beach", "quarterly revenue grew 12%"]
QUERY_INSTRUCTION = "Retrieve images or text relevant to the user's query."


def test_documents_images_items_and_queries_equal_the_embedder(embed_source, offline, media):
    emb = offline[0]
    ef = Q3VLEmbeddingFunction(**embed_source, dim=32, query_instruction=QUERY_INSTRUCTION)
    photo = np.asarray(Image.open(media / "photo.png"))
    grey = np.asarray(Image.open(media / "photo2.jpg").convert("L")).astype(np.int64)  # Chroma's ImageDType
    clip = str(media / "clip.mp4")
    got = ef([TEXTS[0], photo, grey, {"video": clip}])
    want = emb.process([{"text": TEXTS[0]}, {"image": str(media / "photo.png")},
                        {"image": Image.open(media / "photo2.jpg").convert("L")}, {"video": clip}], dim=32)
    close(got, want)
    close(ef.embed_query([TEXTS[1]]), emb.process([{"text": TEXTS[1], "instruction": QUERY_INSTRUCTION}], dim=32))
    with pytest.raises(InputError, match=r"^input 1: an image array must be"):
        ef([TEXTS[0], np.zeros((4, 4, 2), np.uint8)])


REOPEN = textwrap.dedent("""
    import json, sys
    import chromadb
    from q3vl.integrations.chroma import Q3VLLoader  # registers "q3vl" in this new process
    client = chromadb.PersistentClient(path=sys.argv[1])
    out = {}
    for name in ("local", "remote"):
        col = client.get_collection(name, data_loader=Q3VLLoader())  # the function comes from the stored config
        out[name] = {"count": col.count(), "config": col.configuration_json.get("embedding_function"), "hits": []}
        stored = col.get(include=["documents", "uris"])
        for i, doc, uri in zip(stored["ids"], stored["documents"], stored["uris"]):
            query = {"query_texts": [doc]} if doc is not None else {"query_uris": [uri]}
            res = col.query(n_results=col.count(), **query)
            out[name]["hits"].append([i, res["ids"][0][0], 1 - res["distances"][0][0], len(res["ids"][0])])
    print(json.dumps(out))
""")


def test_mixed_collection_reopened_in_a_new_process_finds_each_item_first(tiny_embedding_bundle, server, offline,
                                                                          media, tmp_path, monkeypatch):
    monkeypatch.setenv("Q3VL_API_KEY", API_KEY)  # read from the environment: never stored in the collection
    client = chromadb.PersistentClient(path=str(tmp_path / "chroma"))
    sources = {"local": {"bundle": str(tiny_embedding_bundle)}, "remote": {"url": server.base, "model": "emb"}}
    items = [{"text": TEXTS[0]}, {"text": TEXTS[1]}, {"image": str(media / "photo.png")},
             {"image": str(media / "photo2.jpg")}, {"video": str(media / "clip.mp4")}]
    for name, source in sources.items():
        col = client.create_collection(name, embedding_function=Q3VLEmbeddingFunction(**source),
                                       data_loader=Q3VLLoader())
        col.add(ids=["t0", "t1"], documents=TEXTS)
        col.add(ids=["i0", "i1"], uris=[str(media / "photo.png"), str(media / "photo2.jpg")])
        col.add(ids=["v0"], uris=[str(media / "clip.mp4")])
        stored = col.get(ids=["t0", "t1", "i0", "i1", "v0"], include=["embeddings"])
        close(stored["embeddings"], offline[0].process(items))
        with pytest.raises(InputError, match=r"input 1: unreadable or corrupt image .*bad\.png"):
            col.add(ids=["i2", "bad"], uris=[str(media / "photo.png"), str(media / "bad.png")])
        assert col.count() == 5 and col.get(ids=["i2"])["ids"] == []  # nothing lost, nothing half-added
    done = subprocess.run([sys.executable, "-c", REOPEN, str(tmp_path / "chroma")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for name in sources:
        assert result[name]["count"] == 5
        assert result[name]["config"]["name"] == "q3vl" and API_KEY not in json.dumps(result[name]["config"])
        for stored_id, first, similarity, n in result[name]["hits"]:
            assert first == stored_id and similarity >= 0.9999 and n == 5, (name, stored_id, first, similarity)
