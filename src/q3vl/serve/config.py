"""The server's settings: one frozen dataclass whose fields are the `q3vl serve` flags, checked once.

Each field is declared once (`q3vl.options.opt`): its flag, help and default come from here, the
batching options that the runtime also has are the runtime's own declarations (`like`) with the
server's defaults, and the media options are `MediaOptions`' with the server's stricter defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

from q3vl.errors import ConfigError
from q3vl.hub.source import RepoRef, check_source, parse_source
from q3vl.options import check_fields, like, opt
from q3vl.preprocess import MediaOptions
from q3vl.runtime import RuntimeOptions

MODELS, NETWORK, BATCHING = "models", "network", "batching and limits"
WORK, CONNECTIONS = "work in flight (all requests together)", "connections (HTTP limits)"
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
    (429 beyond; a body that is complete no longer counts). `refusal_rate` / `refusal_burst`: refused
    requests (4xx but 408 and 429) one client address is answered at once, per second and in a burst;
    beyond, each refusal's answer waits for its slot (at most 5 s; `serve/pacing.py`); 0 turns it off.
    """

    header_timeout: float = opt(10.0, "seconds to send a request head, from the connect or the previous response "
                                      "(408, close)", above=0, group=CONNECTIONS)
    keep_alive_timeout: float = opt(5.0, "seconds an idle kept-alive connection stays", above=0, group=CONNECTIONS)
    body_timeout: float = opt(30.0, "seconds to send a whole request body (408, close)", above=0, group=CONNECTIONS)
    body_min_rate: int = opt(1024, "bytes/s a request body must keep up over every 5 s (408, close; 0: off)", low=0,
                             group=CONNECTIONS)
    send_timeout: float = opt(30.0, "seconds a client may leave a response unread before its connection is dropped",
                              above=0, group=CONNECTIONS)
    max_connections: int = opt(1024, "open connections (lowered to fit the open-file limit); at the cap the oldest "
                                     "idle one is closed, or a 503 when none is idle", low=1, group=CONNECTIONS)
    max_pending_body_bytes: int = opt(256 * MIB, "bytes of request bodies being received, all connections together "
                                                 "(429 beyond)", low=1, group=CONNECTIONS)
    refusal_rate: float = opt(10.0, "refused requests (4xx) per second one client address is answered at once; "
                                    "beyond, each answer waits for its slot, up to 5 s (0: off)", low=0,
                              group=CONNECTIONS)
    refusal_burst: int = opt(20, "refused requests one client address may have answered at once in a burst", low=1,
                             group=CONNECTIONS)

    def __post_init__(self) -> None:
        check_fields(self)


def _instructions(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--input-type-instruction takes TYPE=TEXT, not {pair!r}")
        out[key] = text
    return out


@dataclass(frozen=True)
class ServeConfig(MediaOptions):
    """Everything `q3vl serve` can be told; defaults are the safe server defaults.

    Batching: `batch_size` items and `max_batch_tokens` (text + vision) per micro-batch;
    `max_wait_ms` is how long an idle model waits for companions before running what is queued (0: it
    never waits); `max_batch_requests` caps the distinct requests one round may hold (1 turns
    cross-request batching off, 0 means no cap). Limits: `max_client_batch_size` items (or documents)
    per request and `max_request_bytes` per body (413), `max_queue_items` waiting items (429).
    Media (`MediaOptions`): local paths and `file://` only under `media_root`; http(s) URLs to public
    addresses (`allowed_hosts` narrows them; `allow_private_urls` admits loopback/private/link-local
    ones), `max_media_bytes` / `max_media_request_bytes` caps, a `media_deadline` per item (and per
    request: all its items share one), `max_redirects`.
    Work in flight (`admission.py`, `planning.py`): `max_inflight_media_bytes` of fetched and decoded
    media and `max_inflight_pixels` of decoded pixels, all requests together (429 beyond, 413 for one
    request above the whole budget; 2 GiB and 256 Mi pixels, about 4 GB at the peak, sized for a 24 GiB
    machine), `max_queue_tokens` text + vision tokens waiting per queue; requests with media plan on
    `plan_threads` threads of their own, fetching `fetches_per_request` URLs at a time.
    Connections: `HttpLimits`' fields (`http` gathers them).
    """

    FLAG_GROUPS: ClassVar[tuple[str, ...]] = (MODELS, NETWORK, BATCHING, WORK, MediaOptions.GROUP, CONNECTIONS)

    # the model source: a bundle directory or a Hub repo id (`parse=str`: a flag's string stays one)
    embedding: str | Path | None = opt(None, "embedding bundle: a directory or a Hub repo id ORG/NAME[@REVISION]",
                                       parse=str, group=MODELS)
    reranker: str | Path | None = opt(None, "reranker bundle: a directory or a Hub repo id ORG/NAME[@REVISION]",
                                      parse=str, group=MODELS)
    embedding_name: str | None = opt(None, "the `model` name clients use (default: the bundle directory's name, or "
                                     "the repo id)", group=MODELS)
    reranker_name: str | None = opt(None, "the reranker's `model` name (default: the bundle directory's name, "
                                    "or the repo id)", group=MODELS)
    backend: str | None = like(RuntimeOptions, "backend", group=MODELS)
    calibration: Path | None = opt(None, "calibration JSON for Cohere's int8/uint8 embedding types", group=MODELS)
    input_type_instructions: dict[str, str] = opt(
        dict, "instruction for a Cohere input_type (repeatable), e.g. search_query='Find the document'",
        flag="--input-type-instruction", metavar="TYPE=TEXT", append=True, parse=_instructions, factory=True,
        group=MODELS)
    host: str = opt("127.0.0.1", "address to listen on", group=NETWORK)
    port: int = opt(8000, "port to listen on (0: any free port)", low=0, group=NETWORK)
    api_key: str | None = opt(None, "require 'Authorization: Bearer KEY' (none: no auth)", env="Q3VL_API_KEY",
                              group=NETWORK)
    auth_probes: bool = opt(False, "require the key on /health, /ready and /metrics too", group=NETWORK)
    batch_size: int = like(RuntimeOptions, "batch_size", 32, group=BATCHING)
    max_batch_tokens: int = like(RuntimeOptions, "max_batch_tokens", group=BATCHING)
    max_wait_ms: float = opt(0.0, "how long an idle model waits for more items before running (0: never)", low=0,
                             group=BATCHING)
    max_batch_requests: int = opt(0, "distinct requests per batch round (1: no cross-request batching; 0: no cap)",
                                  low=0, group=BATCHING)
    max_client_batch_size: int = opt(128, "items or documents per request (413 above)", low=1, group=BATCHING)
    max_request_bytes: int = opt(20 * MIB, "request body bytes (413 above)", low=1, group=BATCHING)
    max_queue_items: int = opt(1024, "items waiting before 429", low=1, group=BATCHING)
    loader_threads: int | None = like(RuntimeOptions, "loader_threads", group=BATCHING)
    max_queue_tokens: int = opt(1 << 20, "text + vision tokens waiting per queue (429 beyond; 413 for one request "
                                         "above it)", low=1, group=BATCHING)
    drain_timeout: float = opt(30.0, "seconds SIGTERM waits for requests in flight (then a 503 for each; the "
                                     "process exits within ~3 s more)", low=0, group=BATCHING)
    max_inflight_media_bytes: int = opt(2048 * MIB, "fetched and decoded media bytes of all requests in flight "
                                                    "(429 beyond; 413 for one request above it)", low=1, group=WORK)
    max_inflight_pixels: int = opt(256 * MIB, "full-resolution pixels of the images and video frames of all "
                                              "requests in flight (429 beyond; 413 for one request above it)",
                                   low=1, group=WORK)
    plan_threads: int = opt(8, "threads planning requests with media (text-only requests never wait for them)",
                            low=1, group=WORK)
    fetches_per_request: int = opt(4, "http(s) media URLs one request fetches at once", low=1, group=WORK)
    header_timeout: float = like(HttpLimits, "header_timeout")
    keep_alive_timeout: float = like(HttpLimits, "keep_alive_timeout")
    body_timeout: float = like(HttpLimits, "body_timeout")
    body_min_rate: int = like(HttpLimits, "body_min_rate")
    send_timeout: float = like(HttpLimits, "send_timeout")
    max_connections: int = like(HttpLimits, "max_connections")
    max_pending_body_bytes: int = like(HttpLimits, "max_pending_body_bytes")
    refusal_rate: float = like(HttpLimits, "refusal_rate")
    refusal_burst: int = like(HttpLimits, "refusal_burst")
    max_media_bytes: int = like(MediaOptions, "max_media_bytes", 32 * MIB)
    max_media_request_bytes: int = like(MediaOptions, "max_media_request_bytes", 256 * MIB)
    media_deadline: float = like(MediaOptions, "media_deadline", 30.0)
    max_redirects: int = like(MediaOptions, "max_redirects", 3)

    def __post_init__(self) -> None:
        check_fields(self)  # MediaOptions' own checks run too (below)
        for name in ("embedding", "reranker"):  # a malformed repo id: refused here, before the server starts
            check_source(getattr(self, name), name)
        MediaOptions.__post_init__(self)
        if self.max_queue_items < self.max_client_batch_size:
            raise ConfigError(f"max_queue_items ({self.max_queue_items}) must be at least max_client_batch_size "
                              f"({self.max_client_batch_size}): a full-size request must fit in an empty queue")
        if self.max_pending_body_bytes < self.max_request_bytes:
            raise ConfigError(f"max_pending_body_bytes ({self.max_pending_body_bytes}) must be at least "
                              f"max_request_bytes ({self.max_request_bytes}): a full-size body must fit")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("api_key must not be empty (omit it to serve without authentication)")

    @property
    def http(self) -> HttpLimits:
        """The HTTP layer's limits (`HttpLimits`), from these fields."""
        return HttpLimits(**{f.name: getattr(self, f.name) for f in fields(HttpLimits)})

    def model_names(self) -> dict[str, str]:
        """Task -> the name clients put in `model` (the flag's, or the bundle directory's)."""
        if self.embedding is None and self.reranker is None:
            raise ConfigError("q3vl serve needs --embedding BUNDLE and/or --reranker BUNDLE")
        names = {}
        if self.embedding is not None:
            names["embedding"] = self.embedding_name or _default_name(self.embedding)
        if self.reranker is not None:
            names["reranker"] = self.reranker_name or _default_name(self.reranker)
        if len(set(names.values())) < len(names):
            raise ConfigError("the embedding and reranker bundles need different names "
                              "(--embedding-name / --reranker-name)")
        return names

    def runtime(self, **overrides: Any) -> RuntimeOptions:
        """The options every served model is built with: these batching options, the media policy
        (no local files without `--media-root`), no prefetch (the queue overlaps loads itself), a
        media timeout within the per-item deadline, and no ONNX Runtime host arena (it never shrinks:
        a burst of large images would keep the server hundreds of MB up for good).
        """
        from q3vl.runtime import backend_option_names

        if "memory_arena" in backend_option_names(self.backend or "cpu") and "backend_options" not in overrides:
            overrides["backend_options"] = {"memory_arena": False}
        return RuntimeOptions(backend=self.backend, batch_size=self.batch_size,
                              max_batch_tokens=self.max_batch_tokens, loader_threads=self.loader_threads,
                              prefetch=False, timeout=min(10.0, self.media_deadline),
                              media_policy=self.policy(local_files=False), **overrides)


def _default_name(source: str | Path) -> str:
    """A local bundle's directory name, or a Hub bundle's repo id (without its revision)."""
    where = parse_source(source)
    return where.repo_id if isinstance(where, RepoRef) else Path(where).resolve().name


ServeOptions = ServeConfig  # the options' name; `ServeConfig` is what the server has always called them

__all__ = ["HttpLimits", "ServeConfig", "ServeOptions"]
