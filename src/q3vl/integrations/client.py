"""The remote mode of every integration: q3vl items to a `q3vl serve` URL through the server's own HTTP API.

Why one client: LangChain, LlamaIndex, LanceDB and Chroma all embed and rerank the same q3vl items;
the only thing that changes with the remote mode is where the items go. Embeddings use Cohere v2
`POST /v2/embed` with `inputs` (the one endpoint that takes many mixed text/image/video items per
request, each with its own instruction and media options); scores use `POST /v1/rerank` with
`{"content": [...]}` documents. Local media (paths, PIL images, arrays, bytes) travel as `data:`
URIs, so the server needs no shared filesystem; http(s) URLs are passed on for the server to fetch
under its own media policy. A frame-list video has no form in the HTTP API and is refused here.

Requests are split by item count and body size below the server's defaults; a 429/503 is retried
after its Retry-After (bounded); a 400 about one item becomes that item's `InputError`, with the
index it has in the caller's list. Standard library only (urllib): the remote mode needs no extra.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import mimetypes
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from q3vl.errors import (
    AuthenticationError,
    BackendError,
    ConfigError,
    InputError,
    LimitError,
    OverloadedError,
    QueryError,
    UnavailableError,
)
from q3vl.preprocess.items import Content, content, embed_item

log = logging.getLogger(__name__)
API_KEY_ENV = "Q3VL_API_KEY"  # the variable `q3vl serve --api-key` reads by default
MIB = 1024**2
_ITEM_PARAM = re.compile(r"^(?:inputs|documents)\[(\d+)\]")
_RETRY_STATUS = (429, 503)


class Client:
    """`q3vl serve` at `url` (`http://host:port`, with or without a trailing `/v1`).

    `api_key` (default: `$Q3VL_API_KEY`) is sent as `Authorization: Bearer`; `model` names the served
    model when the server serves several names. `batch_size` items and `max_request_bytes` of body
    per request stay under the server's defaults (`--max-client-batch-size 128`,
    `--max-request-bytes` 20 MiB); `retries` bounds the retries of a full queue (429) or a server
    still warming up (503).
    """

    def __init__(self, url: str, api_key: str | None = None, model: str | None = None, *, timeout: float = 300.0,
                 batch_size: int = 32, max_request_bytes: int = 16 * MIB, retries: int = 3) -> None:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ConfigError(f"url must be an http(s) URL of a q3vl server, not {url!r}")
        for name, value in (("batch_size", batch_size), ("max_request_bytes", max_request_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, not {value!r}")
        base = url.rstrip("/")
        self.url = base[:-3] if base.endswith("/v1") else base
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
        self.model = model
        self.timeout = timeout
        self.batch_size = batch_size
        self.max_request_bytes = max_request_bytes
        self.retries = retries

    def __repr__(self) -> str:  # never the key
        return f"Client({self.url!r}, model={self.model!r})"

    # ------------------------------------------------------------------ the two calls
    def embed(self, items: Sequence[dict[str, Any]], dim: int | None = None) -> np.ndarray:
        """Normalised embeddings float32 `[N, dim or D]` of q3vl items, in order (`Embedder.process`)."""
        inputs = [_at(i, lambda: embed_input(item)) for i, item in enumerate(items)]  # noqa: B023
        files = [_files(item) for item in items]
        rows: list[np.ndarray] = []
        for start, chunk in self._chunks(inputs, 0):
            body = {"inputs": chunk, "embedding_types": ["float"], **self._model(),
                    **({"output_dimension": dim} if dim is not None else {})}
            answer = self._post("/v2/embed", body, start, files)
            rows.append(np.asarray(answer["embeddings"]["float"], np.float32))
        return np.concatenate(rows) if rows else np.zeros((0, dim or 0), np.float32)

    def rerank(self, query: dict[str, Any], documents: Sequence[dict[str, Any]],
               instruction: str | None = None) -> list[float]:
        """One score per document against `query` (content dicts), in order (`Reranker.process`)."""
        try:
            q = {"content": parts(content(query))}
        except InputError as e:
            raise QueryError(f"query: {e.reason}") from e
        docs = [_at(i, lambda: {"content": parts(content(d))}) for i, d in enumerate(documents)]  # noqa: B023
        files = [_files(d) for d in documents]
        scores = [float("nan")] * len(docs)
        for start, chunk in self._chunks(docs, _size(q)):
            body = {"query": q, "documents": chunk, "return_documents": False, **self._model(),
                    **({"instruction": instruction} if instruction is not None else {})}
            for result in self._post("/v1/rerank", body, start, files)["results"]:
                scores[start + int(result["index"])] = float(result["relevance_score"])
        return scores

    # ------------------------------------------------------------------ HTTP
    def _model(self) -> dict[str, str]:
        return {"model": self.model} if self.model else {}

    def _chunks(self, bodies: list[dict[str, Any]], shared: int) -> Iterator[tuple[int, list[dict[str, Any]]]]:
        """(offset, bodies) runs of at most `batch_size` items and about `max_request_bytes` (an item
        over the byte budget goes alone: the server says whether it takes it).
        """
        start, size = 0, shared
        for i, body in enumerate(bodies):
            n = _size(body)
            if i > start and (i - start >= self.batch_size or size + n > self.max_request_bytes):
                yield start, bodies[start:i]
                start, size = i, shared
            size += n
        if start < len(bodies):
            yield start, bodies[start:]

    def _post(self, path: str, body: dict[str, Any], offset: int, files: list[list[str]]) -> dict[str, Any]:
        """The JSON answer of one POST; 429/503 retried after Retry-After, other errors raised as q3vl's
        (`offset`: the caller's index of the body's first item; `files`: each item's local media files).
        """
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {self.api_key}"}
                                                            if self.api_key else {})}
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(self.url + path, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    answer: dict[str, Any] = json.loads(resp.read())
                    return answer
            except urllib.error.HTTPError as e:
                status, error, wait = e.code, _error_body(e), _retry_after(e)
                e.close()
            except (OSError, ValueError) as e:  # refused, reset, timed out, not JSON
                raise BackendError(f"q3vl serve at {self.url} could not be used: {type(e).__name__}: {e}") from e
            if status not in _RETRY_STATUS or attempt == self.retries:
                raise self._error(status, error, offset, files)
            log.info("q3vl serve answered %d; retrying in %.1f s", status, wait)
            time.sleep(wait)
        raise AssertionError("unreachable")

    def _error(self, status: int, error: dict[str, Any], offset: int, files: list[list[str]]) -> Exception:
        """The q3vl exception for an error answer (an item's error names the caller's index, and the
        files its media were read from: the server only saw their bytes).
        """
        message, param = str(error.get("message") or f"HTTP {status}"), str(error.get("param") or "")
        item = _ITEM_PARAM.match(param)
        if status in (400, 413) and item:
            index = offset + int(item.group(1))
            sent = f"; its media were sent as data: URIs of {', '.join(files[index])}" \
                if index < len(files) and files[index] else ""
            cls = LimitError if status == 413 else InputError
            return cls(f"{message} (q3vl serve, {param}{sent})", index)
        if status == 400 and param.startswith("query"):
            return QueryError(f"query: {message} (q3vl serve)")
        if status == 401:
            return AuthenticationError(f"q3vl serve at {self.url}: {message} (pass api_key= or set {API_KEY_ENV})")
        if status == 429:
            return OverloadedError(f"q3vl serve at {self.url} is full: {message}")
        if status == 503:
            return UnavailableError(f"q3vl serve at {self.url} is unavailable: {message}")
        if status in (400, 404, 413):
            return ConfigError(f"q3vl serve at {self.url} refused the request: {message}")
        return BackendError(f"q3vl serve at {self.url} answered HTTP {status}: {message}")


def _error_body(e: urllib.error.HTTPError) -> dict[str, Any]:
    try:
        error = json.loads(e.read()).get("error")
    except (OSError, ValueError, AttributeError):
        return {}
    return error if isinstance(error, dict) else {}


def _retry_after(e: urllib.error.HTTPError) -> float:
    try:
        return min(30.0, max(0.1, float(e.headers.get("Retry-After", "1"))))
    except (TypeError, ValueError):
        return 1.0


def _files(item: dict[str, Any]) -> list[str]:
    """The local files among an (already validated) item's images and videos: what its data: URIs hold."""
    c = content(item)
    refs = [*c.images, *(v for v in c.videos if isinstance(v, str))]
    return [str(r) for r in refs if isinstance(r, (str, Path)) and not str(r).startswith("data:")
            and not str(r).lower().startswith(("http://", "https://"))]


def _size(body: dict[str, Any]) -> int:
    return len(json.dumps(body))


def _at(index: int, build: Any) -> dict[str, Any]:
    try:
        out: dict[str, Any] = build()
    except InputError as e:
        raise e.at(index) from e
    return out


# ---------------------------------------------------------------- items -> the server's content parts
def embed_input(item: dict[str, Any]) -> dict[str, Any]:
    """One Cohere v2 `inputs` element for a q3vl embedding item: its content parts and its options."""
    parsed = embed_item(item)
    options: dict[str, Any] = dict(parsed.pixels)
    if parsed.instruction is not None:
        options["instruction"] = parsed.instruction
    if parsed.fps is not None:
        options["fps"] = parsed.fps
    if parsed.max_frames is not None:
        options["max_frames"] = parsed.max_frames
    return {"content": parts(parsed.content), **options}


def parts(c: Content) -> list[dict[str, Any]]:
    """Content parts (text, image_url, video_url) for one item's texts, images and videos."""
    if c.empty:
        raise InputError("the item has no text, image or video")
    out: list[dict[str, Any]] = [{"type": "text", "text": t} for t in c.texts]
    out += [{"type": "image_url", "image_url": {"url": media_url(x, "image")}} for x in c.images]
    for v in c.videos:
        if not isinstance(v, str):
            raise InputError("a video given as a list of frames cannot be sent to q3vl serve (its API takes "
                             "one video file or URL per video_url); pass the video file, or use a bundle in-process")
        out.append({"type": "video_url", "video_url": {"url": media_url(v, "video")}})
    return out


def media_url(ref: Any, kind: str) -> str:
    """The URL the server reads a medium from: http(s) and data: URIs as given, anything local as a
    `data:` URI of its bytes (files as they are; PIL images and arrays losslessly, as PNG or TIFF).
    """
    if isinstance(ref, (str, Path)):
        text = str(ref)
        if text.startswith("data:") or text.lower().startswith(("http://", "https://")):
            return text
        path = text[len("file://"):] if text.startswith("file://") else text
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise InputError(f"cannot read {kind} {path}: {e.strerror or e}") from e
        mime = mimetypes.guess_type(path)[0] or ""
        return _data_uri(data, mime if mime.startswith(f"{kind}/") else f"{kind}/octet-stream")
    if isinstance(ref, (bytes, bytearray, memoryview)):
        return _data_uri(bytes(ref), f"{kind}/octet-stream")
    return _data_uri(*_encoded_image(ref))


def _encoded_image(ref: Any) -> tuple[bytes, str]:
    """A PIL image or an H x W x 3 uint8 array as lossless bytes (PNG; TIFF for modes PNG cannot hold)."""
    from PIL import Image

    if isinstance(ref, np.ndarray):
        if ref.ndim != 3 or ref.shape[2] != 3 or ref.dtype != np.uint8:
            raise InputError(f"an image array must be H x W x 3 uint8 RGB, not {ref.dtype} of shape {ref.shape}")
        ref = Image.fromarray(ref, "RGB")
    if not isinstance(ref, Image.Image):
        raise InputError(f"image must be a path, URL, data URI or PIL.Image, an H x W x 3 uint8 array or encoded "
                         f"bytes, not {type(ref).__name__}")
    buf = io.BytesIO()
    try:
        ref.save(buf, format="PNG")
        return buf.getvalue(), "image/png"
    except (OSError, ValueError, KeyError):
        buf = io.BytesIO()
        ref.save(buf, format="TIFF")
        return buf.getvalue(), "image/tiff"


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


__all__ = ["API_KEY_ENV", "Client", "embed_input", "media_url", "parts"]
