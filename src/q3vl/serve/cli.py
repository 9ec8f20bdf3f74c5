"""`q3vl serve`: the command. FastAPI and uvicorn are imported only when it runs.

SIGTERM (or Ctrl-C) drains: the server keeps listening but answers 503 to new requests (so `/ready`
tells a load balancer to stop sending) and lets every accepted request finish until one deadline,
--drain-timeout after the signal; a request still in flight then gets a clean 503 (its queued items
dropped), uvicorn stops (its graceful shutdown limited to 2 s: every response is out) and the queues
close with what is left of the same deadline; the process exits 0 within --drain-timeout + ~3 s.
A second signal is uvicorn's: shut down now (and exit by that signal).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any

from q3vl.cli import command
from q3vl.errors import ConfigError

log = logging.getLogger(__name__)


def _args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models")
    g.add_argument("--embedding", type=Path, help="embedding bundle")
    g.add_argument("--reranker", type=Path, help="reranker bundle")
    g.add_argument("--embedding-name", help="the `model` name clients use (default: the bundle directory's name)")
    g.add_argument("--reranker-name", help="the reranker's `model` name (default: the bundle directory's name)")
    g.add_argument("--backend", default="cpu", help="cpu | cuda | tensorrt-ep | tensorrt")
    g.add_argument("--calibration", type=Path, help="calibration JSON for Cohere's int8/uint8 embedding types")
    g.add_argument("--input-type-instruction", action="append", default=[], metavar="TYPE=TEXT",
                   help="instruction for a Cohere input_type (repeatable), e.g. search_query='Find the document'")
    g = p.add_argument_group("network")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=os.environ.get("Q3VL_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $Q3VL_API_KEY; none: no auth)")
    g.add_argument("--auth-probes", action="store_true", help="require the key on /health, /ready and /metrics too")
    g = p.add_argument_group("batching and limits")
    g.add_argument("--batch-size", type=int, default=32, help="items per micro-batch")
    g.add_argument("--max-batch-tokens", type=int, default=16384, help="text + vision tokens per micro-batch")
    g.add_argument("--max-wait-ms", type=float, default=0.0,
                   help="how long an idle model waits for more items before running (0: never)")
    g.add_argument("--max-batch-requests", type=int, default=0,
                   help="distinct requests per batch round (1: no cross-request batching; 0: no cap)")
    g.add_argument("--max-client-batch-size", type=int, default=128, help="items or documents per request (413)")
    g.add_argument("--max-request-bytes", type=int, default=20 * 1024**2, help="request body bytes (413)")
    g.add_argument("--max-queue-items", type=int, default=1024, help="items waiting before 429")
    g.add_argument("--loader-threads", type=int, help="media decoding threads per model")
    g.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds SIGTERM waits for requests in flight (then 503 for each; exit within ~3 s more)")
    g.add_argument("--max-queue-tokens", type=int, default=1 << 20,
                   help="text + vision tokens waiting per queue (429 beyond; 413 for one request above it)")
    g = p.add_argument_group("work in flight (all requests together)")
    g.add_argument("--max-inflight-media-bytes", type=int, default=2048 * 1024**2,
                   help="fetched and decoded media bytes (429 beyond; 413 for one request above it)")
    g.add_argument("--max-inflight-pixels", type=int, default=256 * 1024**2,
                   help="full-resolution pixels of the images and video frames being loaded (429 / 413)")
    g.add_argument("--plan-threads", type=int, default=8,
                   help="threads planning requests with media (text-only requests never wait for them)")
    g.add_argument("--fetches-per-request", type=int, default=4, help="http(s) media one request fetches at once")
    g = p.add_argument_group("media policy")
    g.add_argument("--media-root", type=Path, help="serve local paths and file:// under DIR (refused otherwise)")
    g.add_argument("--allow-private-urls", action="store_true",
                   help="let http(s) media URLs reach loopback, private and link-local addresses")
    g.add_argument("--allowed-hosts", help="comma-separated hosts http(s) media may come from ('.x.com': subdomains)")
    g.add_argument("--max-media-bytes", type=int, default=32 * 1024**2, help="bytes of one image or video")
    g.add_argument("--max-media-request-bytes", type=int, default=256 * 1024**2, help="media bytes per request")
    g.add_argument("--media-deadline", type=float, default=30.0, help="seconds to fetch and decode one item")
    g.add_argument("--max-redirects", type=int, default=3, help="redirects an http(s) media URL may take")
    _connection_args(p)


def _connection_args(p: argparse.ArgumentParser) -> None:
    """The HTTP layer's limits (`HttpLimits`; defaults are its defaults)."""
    g = p.add_argument_group("connections (HTTP limits; see HttpLimits)")
    g.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds to send a request head, from the connect or the previous response (408, close)")
    g.add_argument("--keep-alive-timeout", type=float, default=5.0, help="seconds an idle kept-alive connection stays")
    g.add_argument("--body-timeout", type=float, default=30.0, help="seconds to send a whole request body (408, close)")
    g.add_argument("--body-min-rate", type=int, default=1024,
                   help="bytes/s a request body must keep up over every 5 s (408, close; 0: off)")
    g.add_argument("--send-timeout", type=float, default=30.0,
                   help="seconds a client may leave a response unread before its connection is dropped")
    g.add_argument("--max-connections", type=int, default=1024,
                   help="open connections (lowered to fit the open-file limit); at the cap the oldest idle one "
                        "is closed, or a 503 when none is idle")
    g.add_argument("--max-pending-body-bytes", type=int, default=256 * 1024**2,
                   help="bytes of request bodies being received, all connections together (429 beyond)")


def _http_limits(a: argparse.Namespace) -> Any:
    from q3vl.serve.config import HttpLimits

    return HttpLimits(header_timeout=a.header_timeout, keep_alive_timeout=a.keep_alive_timeout,
                      body_timeout=a.body_timeout, body_min_rate=a.body_min_rate, send_timeout=a.send_timeout,
                      max_connections=a.max_connections, max_pending_body_bytes=a.max_pending_body_bytes)


def config_from(a: argparse.Namespace) -> Any:
    """The `ServeConfig` for parsed flags."""
    from q3vl.serve.config import ServeConfig

    instructions = {}
    for pair in a.input_type_instruction:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--input-type-instruction takes TYPE=TEXT, not {pair!r}")
        instructions[key] = text
    hosts = tuple(h.strip() for h in a.allowed_hosts.split(",") if h.strip()) if a.allowed_hosts else None
    return ServeConfig(
        embedding=a.embedding, reranker=a.reranker, embedding_name=a.embedding_name, reranker_name=a.reranker_name,
        host=a.host, port=a.port, backend=a.backend, batch_size=a.batch_size, max_batch_tokens=a.max_batch_tokens,
        max_wait_ms=a.max_wait_ms, max_batch_requests=a.max_batch_requests,
        max_client_batch_size=a.max_client_batch_size, max_request_bytes=a.max_request_bytes,
        max_queue_items=a.max_queue_items, api_key=a.api_key, auth_probes=a.auth_probes, calibration=a.calibration,
        media_root=a.media_root, allow_private_urls=a.allow_private_urls, allowed_hosts=hosts,
        media_item_bytes=a.max_media_bytes, media_request_bytes=a.max_media_request_bytes,
        media_deadline=a.media_deadline, max_redirects=a.max_redirects, drain_timeout=a.drain_timeout,
        loader_threads=a.loader_threads, input_type_instructions=instructions, http=_http_limits(a),
        max_inflight_media_bytes=a.max_inflight_media_bytes, max_inflight_pixels=a.max_inflight_pixels,
        max_queue_tokens=a.max_queue_tokens, plan_threads=a.plan_threads, fetches_per_request=a.fetches_per_request)


@command("serve", _args)
def _serve(a: argparse.Namespace) -> int:
    """Serve embedding/reranker bundles over HTTP (OpenAI, Cohere and vLLM APIs)."""
    from q3vl.checks import require

    require("serve")
    import uvicorn

    from q3vl.serve.admission import mmap_large_blocks
    from q3vl.serve.app import create_app
    from q3vl.serve.connection import protocol_class
    from q3vl.serve.service import Service

    config = config_from(a)
    mmap_large_blocks()  # freed media go back to the OS, so memory comes down after a burst
    svc = Service(config)
    server: Any = None

    def stop(error: BaseException) -> None:  # a bundle that cannot load: exit with its error
        server.should_exit = True

    protocol, backlog = protocol_class(config.http)
    server = _draining_server(uvicorn)(uvicorn.Config(
        create_app(svc, stop), host=config.host, port=config.port, log_level="warning", access_log=False,
        timeout_graceful_shutdown=max(1, int(config.drain_timeout)), lifespan="on", http=protocol,
        backlog=backlog), svc)
    log.info("serving %s on http://%s:%d", ", ".join(f"{t} {n!r}" for t, n in svc.names.items()),
             config.host, config.port)
    server.run()
    if svc.failure is not None:
        raise svc.failure
    return 0


def _draining_server(uvicorn: Any) -> Any:
    """A uvicorn.Server whose first exit signal drains (see the module docstring)."""

    class DrainingServer(uvicorn.Server):
        def __init__(self, config: Any, svc: Any) -> None:
            super().__init__(config)
            self.svc = svc
            self._drain_started = False

        def handle_exit(self, sig: int, frame: Any) -> None:
            if self._drain_started:  # a second signal: uvicorn's own (graceful, then forced) exit
                super().handle_exit(sig, frame)
                return
            self._drain_started = True
            self.svc.drain()
            log.info("signal %d: draining (new requests get 503; %d in flight)", sig, self.svc.active)
            asyncio.get_event_loop().call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))

        async def _drain(self) -> None:
            deadline = self.svc.drain_deadline or time.monotonic() + self.svc.config.drain_timeout
            while self.svc.active and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if self.svc.active:  # past the deadline: a clean 503 for each, never a cut connection or a 500
                log.warning("drain deadline: answering %d requests still in flight with 503", self.svc.abandon())
                end = time.monotonic() + 1.0
                while self.svc.active and time.monotonic() < end:
                    await asyncio.sleep(0.02)
            log.info("drained (%d still in flight); shutting down", self.svc.active)
            self.config.timeout_graceful_shutdown = 2  # the responses are out: uvicorn's wait is short
            self.should_exit = True  # not handle_exit: a completed drain exits 0, not by the signal

    return DrainingServer
