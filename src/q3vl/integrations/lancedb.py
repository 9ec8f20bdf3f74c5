"""LanceDB on q3vl: `Q3VLEmbeddingFunction`, registered in LanceDB's embedding registry as "q3vl".

A table whose schema marks a `SourceField()` and a `VectorField()` of this function embeds rows on
insert and queries on search, in this process (`bundle=`) or through `q3vl serve` (`url=`). What a
source value is: a str is a text (`source="text"`, the default) or an image path/URI
(`source="image"`); bytes are an encoded image; a struct (a dict: the q3vl item form, e.g. a
nested model with optional `text` / `image` / `video` fields) is a q3vl item, so one column can hold
a mixed corpus of texts, images and videos. A query is a text (a str, also on an image column: that
is text-to-image search), an image (PIL image, bytes, array) or a q3vl item dict.

LanceDB stores the function's options in the table and re-creates the function when the table is
opened again, by its registry name: import this module first in that process. The API key is a
sensitive key in LanceDB's sense (give it as `"$var:NAME"` after `registry.set_var(NAME, key)`, or
leave it out and set `$Q3VL_API_KEY`). LanceDB's generic retry (every exception, with exponential
backoff) is not used: a bad item is not transient, and the remote client already retries a full or
warming-up server. The `lancedb` extra: `pip install 'q3vl[lancedb]'`.
"""

from __future__ import annotations

from typing import Any, Literal

from q3vl.checks import require

require("lancedb")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
from lancedb.embeddings import EmbeddingFunction, register  # noqa: E402
from pydantic import PrivateAttr  # noqa: E402

from q3vl.errors import InputError  # noqa: E402
from q3vl.integrations.models import EmbeddingModel, embedding_model, items_of  # noqa: E402
from q3vl.preprocess import to_item as item_of  # noqa: E402


def to_item(value: Any, source: str = "text", instruction: str | None = None) -> dict[str, Any]:
    """The q3vl item for one LanceDB source value or query (see the module docstring)."""
    from PIL import Image

    if isinstance(value, dict):
        item = {k: v for k, v in value.items() if v is not None}
    elif isinstance(value, (bytes, bytearray, memoryview, np.ndarray, Image.Image)):
        item = {"image": value}
    elif isinstance(value, str) and source in ("text", "image"):
        item = {source: value}
    else:
        raise InputError(f"expected a str ({source}), image bytes, a PIL image or a q3vl item dict, not "
                         f"{type(value).__name__}")
    if instruction is not None and "instruction" not in item:
        item["instruction"] = instruction
    return item_of(item)  # the one item adapter: keys, values and paths checked as every front end does


def _values(data: Any) -> list[Any]:
    """A source column (Arrow array, numpy array, list or one value) as Python values."""
    if isinstance(data, pa.ChunkedArray):
        data = data.combine_chunks()
    if isinstance(data, pa.Array):
        return list(data.to_pylist())
    if isinstance(data, np.ndarray) and data.dtype == object:
        return list(data)
    return list(data) if isinstance(data, (list, tuple)) else [data]


@register("q3vl")
class Q3VLEmbeddingFunction(EmbeddingFunction):
    """Qwen3-VL-Embedding vectors for a LanceDB table, in-process or from `q3vl serve`.

    Options (stored in the table): `bundle` (a bundle directory) or `url` (+ `api_key`, `model`);
    `dim` (Matryoshka dimension); `instruction` (of the stored rows; None: the bundle's default);
    `query_instruction` (of queries; None: the same); `source` ("text" or "image": what a str in the
    source column is); `options` (`q3vl.Embedder` keyword arguments, or the remote client's).
    """

    bundle: str | None = None
    url: str | None = None
    api_key: str | None = None
    model: str | None = None
    dim: int | None = None
    instruction: str | None = None
    query_instruction: str | None = None
    source: Literal["text", "image"] = "text"
    options: dict[str, Any] | None = None
    max_retries: int = 0
    _model: Any = PrivateAttr(default=None)

    @staticmethod
    def sensitive_keys() -> list[str]:
        return ["api_key"]

    def _embedding(self) -> EmbeddingModel:
        """The model, opened on first use (a bundle is loaded once per process and shared)."""
        if self._model is None:
            self._model = embedding_model(self.bundle, self.url, api_key=self.api_key, model=self.model,
                                          options=self.options)
        model: EmbeddingModel = self._model
        return model

    def ndims(self) -> int:
        return self.dim or self._embedding().width()

    def _embed(self, values: list[Any], source: str, instruction: str | None) -> list[np.ndarray]:
        items = items_of(values, lambda value: to_item(value, source, instruction))
        return list(self._embedding().embed(items, self.dim))

    # LanceDB's signatures are (*args, **kwargs) -> list[np.array | None]: kept, so the types check with or
    # without lancedb installed; it passes the source column / the query as the first argument.
    def compute_source_embeddings(self, *args: Any, **kwargs: Any) -> list[Any]:
        """Vectors of a batch of source values (one per value; a bad one raises, naming its index)."""
        return self._embed(_values(_first(args, kwargs)), self.source, self.instruction)

    def compute_query_embeddings(self, *args: Any, **kwargs: Any) -> list[Any]:
        """The vector of one query: a text (a str, whatever the source column holds: text-to-image search),
        an image or a q3vl item dict.
        """
        instruction = self.query_instruction if self.query_instruction is not None else self.instruction
        return self._embed([_first(args, kwargs)], "text", instruction)

    def compute_source_embeddings_with_retry(self, *args: Any, **kwargs: Any) -> list[Any]:
        return self.compute_source_embeddings(*args, **kwargs)

    def compute_query_embeddings_with_retry(self, *args: Any, **kwargs: Any) -> list[Any]:
        return self.compute_query_embeddings(*args, **kwargs)


def _first(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if args:
        return args[0]
    if len(kwargs) == 1:
        return next(iter(kwargs.values()))
    raise TypeError(f"expected one argument (the values to embed), got {len(kwargs)} keyword arguments")


__all__ = ["Q3VLEmbeddingFunction", "to_item"]
