"""Chroma on q3vl: `Q3VLEmbeddingFunction` (registered with Chroma as "q3vl") and `Q3VLLoader`.

The embedding function takes what Chroma's multimodal collections pass it: documents (str) and
images (numpy arrays, as Chroma's `ImageLoader` or `add(images=...)` give them), and also q3vl
item dicts. `Q3VLLoader` is a data loader for `uris`: it turns each URI into a q3vl item (an image,
or a video for any other file), so a collection can hold videos by reference and be queried with
`query_uris`. Queries use `query_instruction` (Chroma calls `embed_query` for them).

Chroma stores `get_config()` in the collection and rebuilds the function from it by name when the
collection is opened again: import this module first in that process (and pass `data_loader=`
again; Chroma does not store loaders). The API key is never stored: the config names the
environment variable that holds it (`Q3VL_API_KEY` by default). The `chroma` extra:
`pip install 'q3vl[chroma]'`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from q3vl.checks import require

require("chroma")

import numpy as np  # noqa: E402
from chromadb.api.types import Embeddable, EmbeddingFunction, Embeddings, Space  # noqa: E402
from chromadb.utils.embedding_functions import register_embedding_function  # noqa: E402

from q3vl.errors import ConfigError, InputError  # noqa: E402
from q3vl.integrations.client import API_KEY_ENV  # noqa: E402
from q3vl.integrations.models import EmbeddingModel, embedding_model, items_of  # noqa: E402
from q3vl.preprocess import to_item as item_of  # noqa: E402
from q3vl.preprocess.items import IMAGE_EXTENSIONS  # noqa: E402

CONFIG_KEYS = ("bundle", "url", "model", "dim", "instruction", "query_instruction", "api_key_env_var")


def to_item(value: Any, instruction: str | None = None) -> dict[str, Any]:
    """The q3vl item for one Chroma input: a document (str), an image (a numpy array: H x W, H x W x 3
    or H x W x 4 with values 0..255) or a q3vl item dict, taken as it is.
    """
    if isinstance(value, dict):
        item = dict(value)
    elif isinstance(value, str):
        item = {"text": value}
    elif isinstance(value, np.ndarray):
        item = {"image": _image(value)}
    else:
        raise InputError(f"expected a document (str), an image (numpy array) or a q3vl item dict, not "
                         f"{type(value).__name__}")
    if instruction is not None and "instruction" not in item:
        item["instruction"] = instruction
    return item_of(item)  # the one item adapter: keys, values and paths checked as every front end does


def _image(array: np.ndarray) -> Any:
    """A Chroma image array as a PIL image (grey, RGB or RGBA, as Chroma's `ImageLoader` reads files)."""
    from PIL import Image

    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise InputError(f"an image array must be H x W, H x W x 3 or H x W x 4, not of shape {array.shape}")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.number) or array.size == 0 or not np.isfinite(array).all() \
                or array.min() < 0 or array.max() > 255 or not np.array_equal(array, np.round(array)):
            raise InputError(f"an image array must hold whole values 0..255, not {array.dtype} values like these")
        array = array.astype(np.uint8)
    return Image.fromarray(array)


class Q3VLLoader:
    """A Chroma data loader: each URI (path or URL) as a q3vl item, an image or else a video."""

    def __call__(self, uris: Sequence[str | None]) -> list[dict[str, Any] | None]:
        return [None if u is None else {"image" if _is_image(u) else "video": u} for u in uris]


def _is_image(uri: str) -> bool:
    return uri.startswith("data:image") or os.path.splitext(uri.split("?")[0].lower())[1] in IMAGE_EXTENSIONS


@register_embedding_function
class Q3VLEmbeddingFunction(EmbeddingFunction[Embeddable]):
    """Qwen3-VL-Embedding vectors for a Chroma collection, in this process or from `q3vl serve`.

    Give `bundle` (a bundle directory) or `url` (+ `model`; the API key is read from the environment
    variable `api_key_env_var`, default `Q3VL_API_KEY`, or given as `api_key`, which is never stored).
    `dim` is the Matryoshka dimension, `instruction` that of stored items (None: the bundle's
    default), `query_instruction` that of queries (None: the same). `options`: `q3vl.Embedder`
    keyword arguments, or the remote client's (not stored in the collection).
    """

    def __init__(self, bundle: str | None = None, url: str | None = None, *, api_key: str | None = None,
                 model: str | None = None, dim: int | None = None, instruction: str | None = None,
                 query_instruction: str | None = None, api_key_env_var: str = API_KEY_ENV,
                 options: dict[str, Any] | None = None) -> None:
        if bundle is not None and not isinstance(bundle, (str, os.PathLike)):
            raise ConfigError("bundle must be a bundle directory (Chroma stores it in the collection)")
        self.bundle = os.fspath(bundle) if bundle is not None else None
        self.url, self.model, self.dim = url, model, dim
        self.instruction, self.query_instruction = instruction, query_instruction
        self.api_key_env_var = api_key_env_var
        self._model: EmbeddingModel = embedding_model(
            self.bundle, url, api_key=api_key or os.environ.get(api_key_env_var), model=model, options=options)

    def _embed(self, values: Sequence[Any], instruction: str | None) -> Embeddings:
        items = items_of(values, lambda value: to_item(value, instruction))
        return list(self._model.embed(items, self.dim))

    def __call__(self, input: Any) -> Embeddings:
        """Vectors of stored items: documents, images, q3vl items (a bad one raises, naming its index)."""
        return self._embed(input, self.instruction)

    def embed_query(self, input: Any) -> Embeddings:
        """Vectors of queries (with `query_instruction`)."""
        instruction = self.query_instruction if self.query_instruction is not None else self.instruction
        return self._embed(input, instruction)

    @staticmethod
    def name() -> str:
        return "q3vl"

    def default_space(self) -> Space:
        return "cosine"

    def supported_spaces(self) -> list[Space]:
        return ["cosine", "ip", "l2"]

    def get_config(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in CONFIG_KEYS if getattr(self, k) is not None}

    @staticmethod
    def build_from_config(config: dict[str, Any]) -> Q3VLEmbeddingFunction:
        Q3VLEmbeddingFunction.validate_config(config)
        return Q3VLEmbeddingFunction(**config)

    @staticmethod
    def validate_config(config: dict[str, Any]) -> None:
        unknown = sorted(set(config) - set(CONFIG_KEYS))
        if unknown:
            raise ConfigError(f"unknown q3vl embedding function options {unknown}; allowed: {list(CONFIG_KEYS)}")

    def validate_config_update(self, old_config: dict[str, Any], new_config: dict[str, Any]) -> None:
        changed = sorted(k for k in ("bundle", "url", "model", "dim") if k in new_config
                         and new_config[k] != old_config.get(k))
        if changed:
            raise ConfigError(f"{changed} cannot change: the stored vectors were made with the old values")


__all__ = ["Q3VLEmbeddingFunction", "Q3VLLoader", "to_item"]
