"""LlamaIndex: `Q3VLMultiModalEmbedding` and `Q3VLRerank` against the real llama-index-core, in-process and remote."""

from __future__ import annotations

import asyncio
from io import BytesIO

import pytest

from tests.integrations.conftest import close

pytest.importorskip("llama_index.core")
from llama_index.core.embeddings import MultiModalEmbedding
from llama_index.core.schema import ImageNode, MediaResource, Node, NodeWithScore, QueryBundle, TextNode

from q3vl.integrations.llama_index import Q3VLMultiModalEmbedding, Q3VLRerank

TEXTS = ["a dog on a beach", "quarterly revenue grew 12%", "Быстрая бурая лиса", "短い文章", "x"]
QUERY_INSTRUCTION = "Retrieve images or text relevant to the user's query."


def test_text_query_and_image_embeddings_in_batches_sync_and_async(embed_source, offline, media):
    emb = offline[0]
    li = Q3VLMultiModalEmbedding(**embed_source, embed_batch_size=2, query_instruction=QUERY_INSTRUCTION)
    assert isinstance(li, MultiModalEmbedding)
    texts = emb.process([{"text": t} for t in TEXTS])
    close(li.get_text_embedding_batch(TEXTS), texts)
    close(li.get_text_embedding(TEXTS[1]), texts[1])
    query = emb.process([{"text": TEXTS[0], "instruction": QUERY_INSTRUCTION}])[0]
    close(li.get_query_embedding(TEXTS[0]), query)
    photo = str(media / "photo.png")
    images = [photo, BytesIO((media / "photo2.jpg").read_bytes()), photo]
    want_images = emb.process([{"image": photo}, {"image": str(media / "photo2.jpg")}, {"image": photo}])
    close(li.get_image_embedding_batch(images), want_images)
    close(li.get_image_embedding(photo), want_images[0])

    async def all_async():
        return await asyncio.gather(li.aget_text_embedding_batch(TEXTS), li.aget_query_embedding(TEXTS[0]),
                                    li.aget_image_embedding_batch(images), li.aget_image_embedding(photo),
                                    li.aget_text_embedding(TEXTS[2]))

    a_texts, a_query, a_images, a_image, a_text = asyncio.run(all_async())
    close(a_texts, texts)
    close(a_query, query)
    close(a_images, want_images)
    close(a_image, want_images[0])
    close(a_text, texts[2])


def test_nodes_and_items_with_video_and_dimension(embed_source, offline, media):
    li = Q3VLMultiModalEmbedding(**embed_source, dim=16, instruction="Represent it.")
    clip = str(media / "clip.mp4")
    nodes = [Node(video_resource=MediaResource(path=clip), text_resource=MediaResource(text="a clip")),
             ImageNode(image_path=str(media / "photo.png")), TextNode(text="plain text"), {"video": clip}]
    items = [{"video": clip, "text": "a clip"}, {"image": str(media / "photo.png")}, {"text": "plain text"},
             {"video": clip}]
    want = offline[0].process([{**it, "instruction": "Represent it."} for it in items], dim=16)
    close(li.embed_items(nodes), want)
    close(asyncio.run(li.aembed_items(nodes)), want)


def test_rerank_postprocessor_orders_nodes_by_the_reranker(rerank_source, offline, media):
    photo = str(media / "photo.png")
    nodes = [NodeWithScore(node=TextNode(text="a kitten asleep"), score=0.9),
             NodeWithScore(node=ImageNode(image_path=photo, text="a photo"), score=0.5),
             NodeWithScore(node=Node(video_resource=MediaResource(path=str(media / "clip.mp4"))), score=0.1),
             NodeWithScore(node=TextNode(text="stock prices fell"), score=0.3)]
    items = [{"text": "a kitten asleep"}, {"text": "a photo", "image": photo}, {"video": str(media / "clip.mp4")},
             {"text": "stock prices fell"}]
    query = {"text": "a cat", "image": photo}
    want = offline[1].process({"query": query, "documents": items})
    order = sorted(range(4), key=lambda i: -want[i])
    post = Q3VLRerank(**rerank_source, top_n=None)
    out = post.postprocess_nodes(nodes, QueryBundle("a cat", image_path=photo))
    assert [n.node.node_id for n in out] == [nodes[i].node.node_id for i in order]
    close([n.score for n in out], [want[i] for i in order])
    text_only = offline[1].process({"query": {"text": "a cat"}, "documents": items})
    top = asyncio.run(Q3VLRerank(**rerank_source, top_n=2).apostprocess_nodes(nodes, query_str="a cat"))
    best = sorted(range(4), key=lambda i: -text_only[i])[:2]
    assert [n.node.node_id for n in top] == [nodes[i].node.node_id for i in best]
    close([n.score for n in top], [text_only[i] for i in best])
