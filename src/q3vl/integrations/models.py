"""What every integration embeds and scores with: a bundle in this process, or a `q3vl serve` URL.

An integration maps its framework's objects to q3vl items and hands them to one of these; the two
modes give the same numbers (`Embedder.process` / `Reranker.process` of the same items, tested).
A bundle path is loaded once per process and set of options, and shared: vector databases create a
new embedding-function object each time a table or collection is opened, which must not reload
the model. A loaded model takes calls from many threads at once (the runtime keeps no per-call
state), so the async variants simply run the call in a worker thread: an event loop is never
blocked by a model run or an HTTP request, and concurrent calls overlap.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from q3vl.errors import ConfigError, InputError
from q3vl.integrations.client import Client

_LOADED: dict[tuple[Any, ...], Any] = {}
_LOADED_LOCK = threading.Lock()


class EmbeddingModel(Protocol):
    """Embeds q3vl items: normalised float32 `[N, dim or D]`, in order."""

    def embed(self, items: Sequence[dict[str, Any]], dim: int | None = None) -> np.ndarray: ...

    def width(self) -> int: ...


class RerankModel(Protocol):
    """Scores content dicts against a query content dict, one float per document, in order."""

    def rerank(self, query: dict[str, Any], documents: Sequence[dict[str, Any]],
               instruction: str | None = None) -> list[float]: ...


def items_of(values: Sequence[Any], convert: Callable[[Any], dict[str, Any]]) -> list[dict[str, Any]]:
    """`convert` (a framework's value -> q3vl item) of every value; an `InputError` names the index."""
    out = []
    for i, value in enumerate(values):
        try:
            out.append(convert(value))
        except InputError as e:
            raise e.at(i) from e
    return out


async def aembed(model: EmbeddingModel, items: Sequence[dict[str, Any]], dim: int | None = None) -> np.ndarray:
    """`model.embed` in a worker thread."""
    return await asyncio.to_thread(model.embed, items, dim)


async def arerank(model: RerankModel, query: dict[str, Any], documents: Sequence[dict[str, Any]],
                  instruction: str | None = None) -> list[float]:
    """`model.rerank` in a worker thread."""
    return await asyncio.to_thread(model.rerank, query, documents, instruction)


class LocalEmbedding:
    """An `Embedder` in this process."""

    def __init__(self, embedder: Any) -> None:
        self.embedder = embedder

    def embed(self, items: Sequence[dict[str, Any]], dim: int | None = None) -> np.ndarray:
        if not items:
            self.embedder.check_dim(dim)
            return np.zeros((0, dim or self.embedder.dim), np.float32)
        out: np.ndarray = self.embedder.process(list(items), dim=dim)
        return out

    def width(self) -> int:
        return int(self.embedder.dim)


class RemoteEmbedding:
    """Embeddings from `q3vl serve` (its `/v2/embed`)."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self._width: int | None = None

    def embed(self, items: Sequence[dict[str, Any]], dim: int | None = None) -> np.ndarray:
        if not items:
            return np.zeros((0, dim or self.width()), np.float32)
        return self.client.embed(items, dim)

    def width(self) -> int:
        """The served model's full width (asked once, with a one-word item: the API does not state it)."""
        if self._width is None:
            self._width = int(self.client.embed([{"text": "width"}]).shape[1])
        return self._width


class LocalRerank:
    """A `Reranker` in this process."""

    def __init__(self, reranker: Any) -> None:
        self.reranker = reranker

    def rerank(self, query: dict[str, Any], documents: Sequence[dict[str, Any]],
               instruction: str | None = None) -> list[float]:
        if not documents:
            return []
        request = {"query": query, "documents": list(documents),
                   **({"instruction": instruction} if instruction is not None else {})}
        scores: list[float] = self.reranker.process(request)
        return scores


class RemoteRerank:
    """Scores from `q3vl serve` (its `/v1/rerank`)."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def rerank(self, query: dict[str, Any], documents: Sequence[dict[str, Any]],
               instruction: str | None = None) -> list[float]:
        return self.client.rerank(query, documents, instruction) if documents else []


def embedding_model(bundle: Any = None, url: str | None = None, *, api_key: str | None = None,
                    model: str | None = None, options: dict[str, Any] | None = None) -> EmbeddingModel:
    """A bundle (a path, or a loaded `q3vl.Embedder`) in this process, or a `q3vl serve` URL.

    `options` are `Embedder` keyword arguments (in-process) or `Client` ones (remote).
    """
    from q3vl.runtime import Embedder

    _one_of(bundle, url)
    if url is not None:
        return RemoteEmbedding(Client(url, api_key, model, **(options or {})))
    return LocalEmbedding(bundle if isinstance(bundle, Embedder) else _shared(Embedder, bundle, options))


def rerank_model(bundle: Any = None, url: str | None = None, *, api_key: str | None = None,
                 model: str | None = None, options: dict[str, Any] | None = None) -> RerankModel:
    """A reranker bundle (a path, or a loaded `q3vl.Reranker`) in this process, or a `q3vl serve` URL."""
    from q3vl.runtime import Reranker

    _one_of(bundle, url)
    if url is not None:
        return RemoteRerank(Client(url, api_key, model, **(options or {})))
    return LocalRerank(bundle if isinstance(bundle, Reranker) else _shared(Reranker, bundle, options))


def _one_of(bundle: Any, url: str | None) -> None:
    if (bundle is None) == (url is None):
        raise ConfigError("give exactly one of bundle= (a q3vl bundle directory, run in this process) or url= "
                          "(a `q3vl serve` address such as http://127.0.0.1:8000)")


def _shared(cls: Any, bundle: Any, options: dict[str, Any] | None) -> Any:
    """One loaded `cls` per bundle directory and options in this process."""
    if not isinstance(bundle, (str, os.PathLike)):
        raise ConfigError(f"bundle must be a bundle directory or a loaded q3vl.{cls.__name__}, not "
                          f"{type(bundle).__name__}")
    options = dict(options or {})
    try:
        key = (cls.__name__, os.path.realpath(bundle), tuple(sorted(options.items())))
        hash(key)
    except TypeError:  # an unhashable option (a dict of backend options): not shared
        return cls(Path(bundle), **options)
    with _LOADED_LOCK:
        if key not in _LOADED:
            _LOADED[key] = cls(Path(bundle), **options)
        return _LOADED[key]


__all__ = ["EmbeddingModel", "RerankModel", "aembed", "arerank", "embedding_model", "rerank_model"]
