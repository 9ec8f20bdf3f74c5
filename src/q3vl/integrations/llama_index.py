"""LlamaIndex on q3vl: `Q3VLMultiModalEmbedding` (a `MultiModalEmbedding`: text and image embeddings,
batched, sync and async) and `Q3VLRerank` (a node postprocessor that reranks with a Qwen3-VL-Reranker).

Both run a bundle in this process (`bundle=`) or call a `q3vl serve` URL (`url=`, `api_key=`), with
the same numbers. The `llamaindex` extra: `pip install 'q3vl[llamaindex]'`.
"""

from __future__ import annotations

import base64
from io import BytesIO
from typing import Any

from q3vl.checks import require

require("llamaindex")

from llama_index.core.bridge.pydantic import Field, PrivateAttr  # noqa: E402
from llama_index.core.embeddings import MultiModalEmbedding  # noqa: E402
from llama_index.core.postprocessor.types import BaseNodePostprocessor  # noqa: E402
from llama_index.core.schema import (  # noqa: E402
    BaseNode,
    ImageNode,
    MediaResource,
    MetadataMode,
    Node,
    NodeWithScore,
    QueryBundle,
)

from q3vl.errors import InputError  # noqa: E402
from q3vl.integrations.models import aembed, arerank, embedding_model, items_of, rerank_model  # noqa: E402
from q3vl.preprocess import to_item as item_of  # noqa: E402


def to_item(value: Any, kind: str = "text", instruction: str | None = None) -> dict[str, Any]:
    """The q3vl item for one LlamaIndex input.

    `value` is a text (`kind="text"`), an image (`kind="image"`: a path/URL/data URI or a `BytesIO`,
    LlamaIndex's `ImageType`), a node (a `TextNode`'s content with its embed-mode metadata, an
    `ImageNode`'s image and text, a multimodal `Node`'s text, image and video resources), a
    `QueryBundle` (its query text and `image_path`) or a q3vl item dict, taken as it is.
    `instruction`, when given, is set on items that do not carry their own.
    """
    if isinstance(value, dict):
        item = dict(value)
    elif isinstance(value, BaseNode):
        item = _node_item(value)
    elif isinstance(value, QueryBundle):
        item = {k: v for k, v in (("text", value.query_str), ("image", value.image_path)) if v}
    elif kind == "image" and isinstance(value, (str, BytesIO)):
        item = {"image": value.getvalue() if isinstance(value, BytesIO) else value}
    elif kind == "text" and isinstance(value, str):
        item = {"text": value}
    else:
        raise InputError(f"expected a str ({kind}), a node, a QueryBundle or a q3vl item dict, not "
                         f"{type(value).__name__}")
    if not item:
        raise InputError(f"this {type(value).__name__} has no text, image or video")
    if instruction is not None and "instruction" not in item:
        item["instruction"] = instruction
    return item_of(item)  # the one item adapter: keys, values and paths checked as every front end does


def _node_item(node: BaseNode) -> dict[str, Any]:
    item: dict[str, Any] = {}
    if isinstance(node, Node):
        for key, res in (("image", node.image_resource), ("video", node.video_resource)):
            media = _resource(res)
            if media is not None:
                item[key] = media
        text = node.text_resource.text if node.text_resource else None
    else:
        text = node.get_content(metadata_mode=MetadataMode.EMBED)
    if isinstance(node, ImageNode):
        image = base64.b64decode(node.image) if node.image else node.image_path or node.image_url
        if image:
            item["image"] = image
    if text:
        item["text"] = text
    return item


def _resource(res: MediaResource | None) -> Any:
    """A media resource's bytes (stored base64), path or URL; None when it holds none."""
    if res is None:
        return None
    if res.data is not None:
        return base64.b64decode(res.data)
    if res.path is not None:
        return str(res.path)
    return str(res.url) if res.url is not None else None


def _items(values: list[Any], kind: str, instruction: str | None) -> list[dict[str, Any]]:
    return items_of(values, lambda v: to_item(v, kind, instruction))


class Q3VLMultiModalEmbedding(MultiModalEmbedding):
    """LlamaIndex text and image embeddings from a Qwen3-VL-Embedding bundle, in-process or remote.

    Give `bundle` (a directory or a loaded `q3vl.Embedder`) or `url` (+ `api_key`, default
    `$Q3VL_API_KEY`, and `model`). `dim` is the Matryoshka dimension; `instruction` the instruction
    of texts and images (None: the bundle's default), `query_instruction` that of queries (None: the
    same). `options`: `q3vl.Embedder` keyword arguments, or the remote client's. Batches follow
    `embed_batch_size` (LlamaIndex's own batching); `embed_items` takes q3vl item dicts (video too).
    """

    model_name: str = "q3vl"
    bundle: Any = Field(default=None, exclude=True)
    url: str | None = None
    api_key: str | None = Field(default=None, exclude=True, repr=False)
    model: str | None = None
    dim: int | None = None
    instruction: str | None = None
    query_instruction: str | None = None
    options: dict[str, Any] | None = None
    _model: Any = PrivateAttr(default=None)

    def model_post_init(self, context: Any, /) -> None:
        super().model_post_init(context)
        self._model = embedding_model(self.bundle, self.url, api_key=self.api_key, model=self.model,
                                      options=self.options)

    @classmethod
    def class_name(cls) -> str:
        return "Q3VLMultiModalEmbedding"

    @property
    def _query_instruction(self) -> str | None:
        return self.query_instruction if self.query_instruction is not None else self.instruction

    def _embed(self, items: list[dict[str, Any]]) -> list[list[float]]:
        rows: list[list[float]] = self._model.embed(items, self.dim).tolist()
        return rows

    async def _aembed(self, items: list[dict[str, Any]]) -> list[list[float]]:
        rows: list[list[float]] = (await aembed(self._model, items, self.dim)).tolist()
        return rows

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._embed([to_item(query, "text", self._query_instruction)])[0]

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return (await self._aembed([to_item(query, "text", self._query_instruction)]))[0]

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._embed([to_item(text, "text", self.instruction)])[0]

    async def _aget_text_embedding(self, text: str) -> list[float]:
        return (await self._aembed([to_item(text, "text", self.instruction)]))[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return self._embed(_items(texts, "text", self.instruction))

    async def _aget_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return await self._aembed(_items(texts, "text", self.instruction))

    def _get_image_embedding(self, img_file_path: Any) -> list[float]:
        return self._embed([to_item(img_file_path, "image", self.instruction)])[0]

    async def _aget_image_embedding(self, img_file_path: Any) -> list[float]:
        return (await self._aembed([to_item(img_file_path, "image", self.instruction)]))[0]

    def _get_image_embeddings(self, img_file_paths: list[Any]) -> list[list[float]]:
        return self._embed(_items(img_file_paths, "image", self.instruction))

    async def _aget_image_embeddings(self, img_file_paths: list[Any]) -> list[list[float]]:
        return await self._aembed(_items(img_file_paths, "image", self.instruction))

    def embed_items(self, items: list[Any]) -> list[list[float]]:
        """Embeddings of q3vl item dicts or nodes (mixed text/image/video), in one batch."""
        return self._embed(_items(items, "item", self.instruction))

    async def aembed_items(self, items: list[Any]) -> list[list[float]]:
        """Async `embed_items`."""
        return await self._aembed(_items(items, "item", self.instruction))


class Q3VLRerank(BaseNodePostprocessor):
    """Reranks retrieved nodes with a Qwen3-VL-Reranker, in this process or behind `q3vl serve`.

    Keeps the `top_n` best nodes (None: all), best first, with the reranker's score as the node's
    score. The query is the `QueryBundle`'s text and `image_path`; a node is its text and media
    (see `to_item`). Give `bundle` (a directory or a loaded `q3vl.Reranker`) or `url` (+ `api_key`,
    `model`); `instruction` replaces the bundle's default.
    """

    bundle: Any = Field(default=None, exclude=True)
    url: str | None = None
    api_key: str | None = Field(default=None, exclude=True, repr=False)
    model: str | None = None
    top_n: int | None = 3
    instruction: str | None = None
    options: dict[str, Any] | None = None
    _reranker: Any = PrivateAttr(default=None)

    def model_post_init(self, context: Any, /) -> None:
        super().model_post_init(context)
        self._reranker = rerank_model(self.bundle, self.url, api_key=self.api_key, model=self.model,
                                      options=self.options)

    @classmethod
    def class_name(cls) -> str:
        return "Q3VLRerank"

    def _request(self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None) -> tuple[Any, Any]:
        if query_bundle is None:
            raise InputError("Q3VLRerank needs a query (query_bundle or query_str)")
        return to_item(query_bundle), _items([n.node for n in nodes], "node", None)

    def _ranked(self, nodes: list[NodeWithScore], scores: list[float]) -> list[NodeWithScore]:
        order = sorted(range(len(nodes)), key=lambda i: -scores[i])[:self.top_n]
        return [NodeWithScore(node=nodes[i].node, score=scores[i]) for i in order]

    def _postprocess_nodes(self, nodes: list[NodeWithScore],
                           query_bundle: QueryBundle | None = None) -> list[NodeWithScore]:
        if not nodes:
            return []
        query, docs = self._request(nodes, query_bundle)
        return self._ranked(nodes, self._reranker.rerank(query, docs, self.instruction))

    async def _apostprocess_nodes(self, nodes: list[NodeWithScore],
                                  query_bundle: QueryBundle | None = None) -> list[NodeWithScore]:
        if not nodes:
            return []
        query, docs = self._request(nodes, query_bundle)
        return self._ranked(nodes, await arerank(self._reranker, query, docs, self.instruction))


__all__ = ["Q3VLMultiModalEmbedding", "Q3VLRerank", "to_item"]
