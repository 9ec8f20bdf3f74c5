"""LangChain on q3vl: `Q3VLEmbeddings` (an `Embeddings`, with OpenCLIP's `embed_image` convention) and
`Q3VLRerank` (a document compressor that reranks with a Qwen3-VL-Reranker).

Both run a bundle in this process (`bundle=`) or call a `q3vl serve` URL (`url=`, `api_key=`), with
the same numbers. LangChain's own `OpenAIEmbeddings` works against `q3vl serve` only with
`check_embedding_ctx_length=False` (by default it sends tiktoken ids, which the server refuses:
ids from another tokenizer would give wrong vectors); these classes need no such setting and also
embed images and videos. The `langchain` extra: `pip install 'q3vl[langchain]'`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from q3vl.checks import require

require("langchain")

from langchain_core.callbacks import Callbacks  # noqa: E402
from langchain_core.documents import BaseDocumentCompressor, Document  # noqa: E402
from langchain_core.embeddings import Embeddings  # noqa: E402
from pydantic import ConfigDict, Field, PrivateAttr  # noqa: E402

from q3vl.errors import InputError  # noqa: E402
from q3vl.integrations.models import aembed, arerank, embedding_model, items_of, rerank_model  # noqa: E402
from q3vl.preprocess import to_item as item_of  # noqa: E402

MEDIA_KEYS = ("image", "video")  # Document.metadata keys that add media to a document's item


def to_item(value: Any, kind: str = "text", instruction: str | None = None) -> dict[str, Any]:
    """The q3vl item for one LangChain input.

    `value` is a text (`kind="text"`), an image path/URI (`kind="image"`, `embed_image`'s input), a
    `Document` (its `page_content` as text, plus q3vl media under `metadata["image"]` /
    `metadata["video"]`), or a q3vl item dict, taken as it is. `instruction`, when given, is set on
    items that do not carry their own.
    """
    if isinstance(value, Document):
        item: dict[str, Any] = {"text": value.page_content} if value.page_content else {}
        item.update({k: value.metadata[k] for k in MEDIA_KEYS if value.metadata.get(k) is not None})
    elif isinstance(value, dict):
        item = dict(value)
    elif kind in ("text", "image") and isinstance(value, str):
        item = {kind: value}
    else:
        raise InputError(f"expected a str ({kind}), a Document or a q3vl item dict, not {type(value).__name__}")
    if instruction is not None and "instruction" not in item:
        item["instruction"] = instruction
    return item_of(item)  # the one item adapter: keys, values and paths checked as every front end does


def _items(values: Sequence[Any], kind: str, instruction: str | None) -> list[dict[str, Any]]:
    return items_of(values, lambda v: to_item(v, kind, instruction))


class Q3VLEmbeddings(Embeddings):
    """LangChain embeddings from a Qwen3-VL-Embedding bundle, in this process or behind `q3vl serve`.

    Args:
        bundle: a bundle directory, or a loaded `q3vl.Embedder` (shared with other code).
        url: a `q3vl serve` address instead (`http://host:port`); `api_key` (default `$Q3VL_API_KEY`)
            and `model` (the served name, when it serves several) go with it.
        dim: Matryoshka dimension (the first `dim` values, renormalised); None: the full width.
        instruction: the instruction of documents and images (None: the bundle's default).
        query_instruction: the instruction of `embed_query` (None: the same as `instruction`).
        options: `q3vl.Embedder` keyword arguments (in-process) or the remote client's (`timeout`,
            `batch_size`, `max_request_bytes`, `retries`).

    Beyond LangChain's interface: `embed_image(uris)` (the convention of LangChain's OpenCLIP
    embeddings, which multimodal vector stores call) and `embed_items(items)` for q3vl item dicts
    (mixed text/image/video, per-item instruction), each with an async variant.
    """

    def __init__(self, bundle: Any = None, *, url: str | None = None, api_key: str | None = None,
                 model: str | None = None, dim: int | None = None, instruction: str | None = None,
                 query_instruction: str | None = None, options: dict[str, Any] | None = None) -> None:
        self.model = embedding_model(bundle, url, api_key=api_key, model=model, options=options)
        self.dim = dim
        self.instruction = instruction
        self.query_instruction = query_instruction if query_instruction is not None else instruction

    def _vectors(self, items: list[dict[str, Any]]) -> list[list[float]]:
        rows: list[list[float]] = self.model.embed(items, self.dim).tolist()
        return rows

    async def _avectors(self, items: list[dict[str, Any]]) -> list[list[float]]:
        rows: list[list[float]] = (await aembed(self.model, items, self.dim)).tolist()
        return rows

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self._vectors(_items(texts, "text", self.instruction))

    def embed_query(self, text: str) -> list[float]:
        return self._vectors([to_item(text, "text", self.query_instruction)])[0]

    def embed_image(self, uris: list[str]) -> list[list[float]]:
        """Embeddings of images given as paths, URLs or data URIs (OpenCLIP's convention)."""
        return self._vectors(_items(uris, "image", self.instruction))

    def embed_items(self, items: list[dict[str, Any]]) -> list[list[float]]:
        """Embeddings of q3vl item dicts (`text`, `image`, `video`, `instruction`, ...)."""
        return self._vectors(_items(items, "item", self.instruction))

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        return await self._avectors(_items(texts, "text", self.instruction))

    async def aembed_query(self, text: str) -> list[float]:
        return (await self._avectors([to_item(text, "text", self.query_instruction)]))[0]

    async def aembed_image(self, uris: list[str]) -> list[list[float]]:
        """Async `embed_image`."""
        return await self._avectors(_items(uris, "image", self.instruction))

    async def aembed_items(self, items: list[dict[str, Any]]) -> list[list[float]]:
        """Async `embed_items`."""
        return await self._avectors(_items(items, "item", self.instruction))


class Q3VLRerank(BaseDocumentCompressor):
    """Reranks retrieved documents with a Qwen3-VL-Reranker, in this process or behind `q3vl serve`.

    Keeps the `top_n` best documents (None: all), best first, each a copy with
    `metadata["relevance_score"]`. A document is its `page_content` plus any q3vl media in
    `metadata["image"]` / `metadata["video"]`. Give `bundle` (a directory or a loaded
    `q3vl.Reranker`) or `url` (+ `api_key`, `model`); `instruction` replaces the bundle's default;
    `options` as for `Q3VLEmbeddings`.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    bundle: Any = None
    url: str | None = None
    api_key: str | None = Field(default=None, repr=False, exclude=True)
    model: str | None = None
    top_n: int | None = 3
    instruction: str | None = None
    options: dict[str, Any] | None = None
    _reranker: Any = PrivateAttr(default=None)

    def model_post_init(self, context: Any, /) -> None:
        self._reranker = rerank_model(self.bundle, self.url, api_key=self.api_key, model=self.model,
                                      options=self.options)

    def _ranked(self, documents: Sequence[Document], scores: list[float]) -> list[Document]:
        order = sorted(range(len(documents)), key=lambda i: -scores[i])[:self.top_n]
        return [Document(page_content=documents[i].page_content, id=documents[i].id,
                         metadata={**documents[i].metadata, "relevance_score": scores[i]}) for i in order]

    def compress_documents(self, documents: Sequence[Document], query: str,
                           callbacks: Callbacks | None = None) -> Sequence[Document]:
        scores = self._reranker.rerank(to_item(query), _items(documents, "document", None), self.instruction)
        return self._ranked(documents, scores)

    async def acompress_documents(self, documents: Sequence[Document], query: str,
                                  callbacks: Callbacks | None = None) -> Sequence[Document]:
        scores = await arerank(self._reranker, to_item(query), _items(documents, "document", None), self.instruction)
        return self._ranked(documents, scores)


__all__ = ["Q3VLEmbeddings", "Q3VLRerank", "to_item"]
