"""Prometheus metrics of one server (its own registry, so several apps can live in one process).

Requests by route and status (499: the client left before any response); latency split into queue
(waiting for a round), preprocessing (planning per request, media loading per micro-batch) and
inference (`run_batch` per micro-batch); batch size, distinct requests and tokens per micro-batch;
queue depth; failed items by reason. Route labels are the server's own paths (anything else is
"other"), so random URLs cannot grow the label set.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
COUNTS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)
CLIENT_LEFT = 499  # nginx's "client closed request"
TOKENS = (16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


class Metrics:
    """The server's metrics; `render()` is the `/metrics` body."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("q3vl_requests", "HTTP requests by route and status code", ["route", "status"],
                                registry=r)
        self.request_seconds = Histogram("q3vl_request_duration_seconds", "HTTP request time, end to end",
                                         ["route"], buckets=LATENCY, registry=r)
        self.queue_seconds = Histogram("q3vl_queue_duration_seconds", "time an item waited for its round",
                                       ["model"], buckets=LATENCY, registry=r)
        self.preprocess_seconds = Histogram(
            "q3vl_preprocess_duration_seconds",
            "preprocessing time: stage=plan per request (tokenize, media headers), stage=load per micro-batch "
            "(waiting for decoding and resizing)", ["model", "stage"], buckets=LATENCY, registry=r)
        self.inference_seconds = Histogram("q3vl_inference_duration_seconds", "graph time per micro-batch",
                                           ["model"], buckets=LATENCY, registry=r)
        self.batch_items = Histogram("q3vl_batch_size", "items per micro-batch", ["model"], buckets=COUNTS,
                                     registry=r)
        self.batch_requests = Histogram("q3vl_batch_requests", "distinct requests per micro-batch", ["model"],
                                        buckets=COUNTS, registry=r)
        self.batch_tokens = Histogram("q3vl_batch_tokens", "text + vision tokens per micro-batch", ["model"],
                                      buckets=TOKENS, registry=r)
        self.queue_items = Gauge("q3vl_queue_items", "items waiting in the queue", ["model"], registry=r)
        self.failed_items = Counter("q3vl_failed_items", "items that failed or were dropped, by reason",
                                    ["model", "reason"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """ASGI middleware: counts every HTTP response by route and status and times it."""

    def __init__(self, app: Any, metrics: Metrics, routes: set[str]) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope.get("path", "") if scope.get("path", "") in self.routes else "other"
        status = {"code": CLIENT_LEFT}  # no response at all: the client left (e.g. half way through its body)
        start = time.monotonic()

        async def record(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, record)
        except BaseException:
            if status["code"] == CLIENT_LEFT:
                status["code"] = 500  # what the server sends for an exception before any response
            raise
        finally:
            self.metrics.requests.labels(route, str(status["code"])).inc()
            self.metrics.request_seconds.labels(route).observe(time.monotonic() - start)
