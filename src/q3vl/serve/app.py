"""The FastAPI application: routes, error handlers and middlewares around one `Service`.

Middleware order, outermost first: metrics (counts every response, 401s and 413s included), refusal
pacing (a client's refusals beyond its budget are answered late: `pacing.py`), auth (an
unauthenticated client never gets its body read), the body reader (size, deadline, rate and
budget before parsing: `body.py`), the app. Connection limits live in the protocol (`connection.py`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

import q3vl
from q3vl.serve.body import BodyReader
from q3vl.serve.http import AuthMiddleware, install_handlers
from q3vl.serve.metrics import MetricsMiddleware
from q3vl.serve.pacing import RefusalPacing
from q3vl.serve.routes import build_router
from q3vl.serve.service import Service

PROBES = {"/health", "/ready", "/metrics"}  # open without the API key unless --auth-probes


def create_app(svc: Service, on_failure: Callable[[BaseException], None] | None = None) -> FastAPI:
    """The app for a `Service`; starting it starts loading the models (`on_failure` if they cannot load)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        svc.start(on_failure)
        try:
            yield
        finally:
            svc.close()

    app = FastAPI(title="q3vl serve", version=q3vl.__version__, lifespan=lifespan,
                  description="Qwen3-VL-Embedding / Qwen3-VL-Reranker bundles behind the OpenAI, Cohere and "
                              "vLLM embedding and rerank APIs.")
    install_handlers(app)
    app.state.svc = svc
    router = build_router()
    app.include_router(router)
    c = svc.config
    app.add_middleware(BodyReader, max_bytes=c.max_request_bytes, max_items=c.max_client_batch_size, limits=c.http)
    if svc.config.api_key:
        app.add_middleware(AuthMiddleware, api_key=svc.config.api_key,
                           open_paths=set() if svc.config.auth_probes else PROBES)
    if c.refusal_rate > 0:
        app.add_middleware(RefusalPacing, rate=c.refusal_rate, burst=c.refusal_burst)
    routes = {getattr(r, "path", "") for r in router.routes} | {"/openapi.json", "/docs", "/redoc"}
    app.add_middleware(MetricsMiddleware, metrics=svc.metrics, routes=routes)
    return app
