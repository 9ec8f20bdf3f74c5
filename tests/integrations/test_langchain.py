"""LangChain: `Q3VLEmbeddings` and `Q3VLRerank` against the real langchain-core, in-process and remote."""

from __future__ import annotations

import asyncio
import base64

import pytest

from q3vl.errors import InputError
from tests.integrations.conftest import close

pytest.importorskip("langchain_core")
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings

from q3vl.integrations.langchain import Q3VLEmbeddings, Q3VLRerank

TEXTS = ["a dog on a beach", "quarterly revenue grew 12%", "Быстрая бурая лиса"]
QUERY_INSTRUCTION = "Retrieve images or text relevant to the user's query."


def test_embeddings_equal_the_embedder_sync_and_async(embed_source, offline, media):
    emb = offline[0]
    lc = Q3VLEmbeddings(**embed_source, query_instruction=QUERY_INSTRUCTION)
    assert isinstance(lc, Embeddings)
    close(lc.embed_documents(TEXTS), emb.process([{"text": t} for t in TEXTS]))
    query = emb.process([{"text": TEXTS[0], "instruction": QUERY_INSTRUCTION}])[0]
    close(lc.embed_query(TEXTS[0]), query)
    uri = "data:image/png;base64," + base64.b64encode((media / "photo.png").read_bytes()).decode()
    images = [str(media / "photo2.jpg"), uri]
    close(lc.embed_image(images), emb.process([{"image": x} for x in images]))
    items = [{"video": str(media / "clip.mp4"), "instruction": "Find the clip"},
             {"text": "a caption", "image": str(media / "photo.png")}]
    close(lc.embed_items(items), emb.process(items))
    assert lc.embed_documents([]) == []

    async def both():
        return await asyncio.gather(lc.aembed_documents(TEXTS), lc.aembed_query(TEXTS[0]), lc.aembed_image(images),
                                    lc.aembed_items(items))

    docs, q, imgs, its = asyncio.run(both())
    close(docs, emb.process([{"text": t} for t in TEXTS]))
    close(q, query)
    close(imgs, emb.process([{"image": x} for x in images]))
    close(its, emb.process(items))


def test_matryoshka_dimension_and_instruction(embed_source, offline):
    lc = Q3VLEmbeddings(**embed_source, dim=16, instruction="Represent the passage.")
    want = offline[0].process([{"text": t, "instruction": "Represent the passage."} for t in TEXTS], dim=16)
    close(lc.embed_documents(TEXTS), want)
    close(lc.embed_query(TEXTS[1]), want[1])  # query_instruction defaults to the instruction


def test_a_bad_image_is_named_by_its_index(embed_source, media):
    lc = Q3VLEmbeddings(**embed_source)
    with pytest.raises(InputError, match=r"^input 1: .*(corrupt|unreadable) image") as e:
        lc.embed_image([str(media / "photo.png"), str(media / "bad.png")])
    assert e.value.index == 1


def test_rerank_compressor_orders_by_the_reranker_scores(rerank_source, offline, media):
    rr = offline[1]
    docs = [Document(page_content="a kitten asleep"), Document(page_content="stock prices fell"),
            Document(page_content="a photo", metadata={"image": str(media / "photo.png"), "source": "x"}),
            Document(page_content="", metadata={"video": str(media / "clip.mp4")})]
    items = [{"text": "a kitten asleep"}, {"text": "stock prices fell"},
             {"text": "a photo", "image": str(media / "photo.png")}, {"video": str(media / "clip.mp4")}]
    want = rr.process({"query": {"text": "a cat"}, "documents": items, "instruction": "Find cats."})
    ranked = Q3VLRerank(**rerank_source, top_n=None, instruction="Find cats.")
    out = ranked.compress_documents(docs, "a cat")
    order = sorted(range(4), key=lambda i: -want[i])
    assert [d.page_content for d in out] == [docs[i].page_content for i in order]
    close([d.metadata["relevance_score"] for d in out], [want[i] for i in order])
    assert out[order.index(2)].metadata["source"] == "x" and "relevance_score" not in docs[2].metadata
    best2 = Q3VLRerank(**rerank_source, top_n=2, instruction="Find cats.")
    top2 = asyncio.run(best2.acompress_documents(docs, "a cat"))
    close([d.metadata["relevance_score"] for d in top2], [want[i] for i in order[:2]])
    assert ranked.compress_documents([], "a cat") == []
