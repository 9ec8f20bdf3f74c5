"""The server's settings: one frozen dataclass, filled from the `q3vl serve` flags and checked once."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from q3vl.errors import ConfigError

MIB = 1024**2
RATE_WINDOW = 5.0  # seconds over which HttpLimits.body_min_rate is measured


@dataclass(frozen=True)
class HttpLimits:
    """The HTTP layer's limits: how long and how much a connection may hold the server (the "connections"
    flags of `q3vl serve`; enforced by `serve/connection.py` and `serve/body.py`).

    `header_timeout`: seconds to send a request head, counted from the connect or from the previous
    response (408, or a silent close when nothing arrived). `keep_alive_timeout`: seconds an idle
    kept-alive connection stays open (uvicorn's own). `body_timeout`: seconds to send a whole body;
    `body_min_rate`: bytes per second a body must keep up over every 5 s window (0: off); either
    miss is a 408 and the connection is closed. `send_timeout`: seconds a client may leave a response
    unread before its connection is dropped. `max_connections`: open connections (lowered, with the
    listen backlog, to fit the process's open-file limit); a new connection at the cap closes the
    oldest one that is between requests, or is refused with a 503 when every one is busy.
    `max_pending_body_bytes`: bytes of request bodies still being received, all connections together
    (429 beyond; a body that is complete no longer counts).
    """

    header_timeout: float = 10.0
    keep_alive_timeout: float = 5.0
    body_timeout: float = 30.0
    body_min_rate: int = 1024
    send_timeout: float = 30.0
    max_connections: int = 1024
    max_pending_body_bytes: int = 256 * MIB

    def __post_init__(self) -> None:
        for name in ("header_timeout", "keep_alive_timeout", "body_timeout", "send_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ConfigError(f"{name} must be a finite number of seconds > 0, not {value!r}")
        _at_least("body_min_rate", self.body_min_rate, 0)
        _at_least("max_connections", self.max_connections, 1)
        _at_least("max_pending_body_bytes", self.max_pending_body_bytes, 1)


@dataclass(frozen=True)
class ServeConfig:
    """Everything `q3vl serve` can be told; defaults are the safe server defaults.

    Batching: `batch_size` items and `max_batch_tokens` (text + vision) per micro-batch;
    `max_wait_ms` is how long an idle model waits for companions before running what is queued (0: it
    never waits); `max_batch_requests` caps the distinct requests one round may hold (1 turns
    cross-request batching off, 0 means no cap). Limits: `max_client_batch_size` items (or documents)
    per request and `max_request_bytes` per body (413), `max_queue_items` waiting items (429).
    Media: local paths and `file://` only under `media_root`; http(s) URLs to public addresses
    (`allowed_hosts` narrows them; `allow_private_urls` admits loopback/private/link-local ones),
    `media_item_bytes` / `media_request_bytes` caps, a `media_deadline` per item, `max_redirects`.
    Work in flight (`admission.py`, `planning.py`): `max_inflight_media_bytes` of fetched and decoded
    media and `max_inflight_pixels` of decoded pixels, all requests together (429 beyond, 413 for one
    request above the whole budget; 2 GiB and 256 Mi pixels, about 4 GB at the peak, sized for a 24 GiB
    machine), `max_queue_tokens` text + vision tokens waiting per queue; media requests plan on
    `plan_threads` threads of their own, fetching `fetches_per_request` URLs at a time, all under one
    `media_deadline` per request.
    Connections: `http` (`HttpLimits`).
    """

    embedding: Path | None = None
    reranker: Path | None = None
    embedding_name: str | None = None
    reranker_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    backend: str = "cpu"
    batch_size: int = 32
    max_batch_tokens: int = 16384
    max_wait_ms: float = 0.0
    max_batch_requests: int = 0
    max_client_batch_size: int = 128
    max_request_bytes: int = 20 * MIB
    max_queue_items: int = 1024
    api_key: str | None = None
    auth_probes: bool = False
    calibration: Path | None = None
    media_root: Path | None = None
    allow_private_urls: bool = False
    allowed_hosts: tuple[str, ...] | None = None
    media_item_bytes: int = 32 * MIB
    media_request_bytes: int = 256 * MIB
    media_deadline: float = 30.0
    max_redirects: int = 3
    drain_timeout: float = 30.0
    loader_threads: int | None = None
    max_inflight_media_bytes: int = 2048 * MIB
    max_inflight_pixels: int = 256 * MIB
    max_queue_tokens: int = 1 << 20
    plan_threads: int = 8
    fetches_per_request: int = 4
    input_type_instructions: dict[str, str] = field(default_factory=dict)
    http: HttpLimits = field(default_factory=HttpLimits)

    def __post_init__(self) -> None:
        if self.embedding is None and self.reranker is None:
            raise ConfigError("q3vl serve needs --embedding BUNDLE and/or --reranker BUNDLE")
        for name in ("batch_size", "max_batch_tokens", "max_client_batch_size", "max_request_bytes",
                     "max_queue_items", "media_item_bytes", "media_request_bytes", "max_inflight_media_bytes",
                     "max_inflight_pixels", "max_queue_tokens", "plan_threads", "fetches_per_request"):
            _at_least(name, getattr(self, name), 1)
        if self.max_queue_items < self.max_client_batch_size:
            raise ConfigError(f"max_queue_items ({self.max_queue_items}) must be at least max_client_batch_size "
                              f"({self.max_client_batch_size}): a full-size request must fit in an empty queue")
        _at_least("max_batch_requests", self.max_batch_requests, 0)
        _at_least("max_redirects", self.max_redirects, 0)
        _at_least("port", self.port, 0)
        for name in ("max_wait_ms", "media_deadline", "drain_timeout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ConfigError(f"{name} must be a finite number >= 0, not {value!r}")
        if self.http.max_pending_body_bytes < self.max_request_bytes:
            raise ConfigError(f"max_pending_body_bytes ({self.http.max_pending_body_bytes}) must be at least "
                              f"max_request_bytes ({self.max_request_bytes}): a full-size body must fit")
        if self.media_deadline <= 0:
            raise ConfigError("media_deadline must be > 0 seconds")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("api_key must not be empty (omit it to serve without authentication)")
        if self.media_root is not None and not Path(self.media_root).is_dir():
            raise ConfigError(f"--media-root {self.media_root} is not a directory")

    def model_names(self) -> dict[str, str]:
        """Task -> the name clients put in `model` (the flag's, or the bundle directory's)."""
        names = {}
        if self.embedding is not None:
            names["embedding"] = self.embedding_name or Path(self.embedding).resolve().name
        if self.reranker is not None:
            names["reranker"] = self.reranker_name or Path(self.reranker).resolve().name
        if len(set(names.values())) < len(names):
            raise ConfigError("the embedding and reranker bundles need different names "
                              "(--embedding-name / --reranker-name)")
        return names


def _at_least(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, not {value!r}")
