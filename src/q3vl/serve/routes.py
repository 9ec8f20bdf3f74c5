"""The endpoints: OpenAI/vLLM embeddings, Cohere v2 embed, rerank (three paths), models, probes, metrics.

Each handler validates (item-list lengths while the body is parsed: `parse.py`; then pydantic,
then the server's limits), converts the body to runtime items
(`convert.py`), hands them to `Service.submit` (plan -> queue -> run) and shapes the outputs with the
runtime's own `Embedder.vectors` (Matryoshka, normalisation) / `Reranker.scores`. Responses are built
as plain JSON; the response models document them in the OpenAPI schema.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from q3vl.errors import UnavailableError
from q3vl.runtime import Embedder, Plan
from q3vl.serve import convert, encodings
from q3vl.serve.errors import RequestError
from q3vl.serve.parse import bounded_route
from q3vl.serve.schemas import (
    EmbeddingRequest,
    EmbeddingResponse,
    EmbedV2Request,
    EmbedV2Response,
    ErrorResponse,
    ModelList,
    RerankRequest,
    RerankResponse,
    Status,
)
from q3vl.serve.service import Outcome, Service

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text} for code, text in (
        (400, "invalid field or item (`param` names it)"), (401, "missing or wrong API key"),
        (404, "model not served"), (413, "too many items or too large a body"),
        (429, "queue full (see Retry-After)"), (503, "warming up or draining"))}
RERANK_PATHS = ("/v1/rerank", "/rerank", "/v2/rerank")
DISCONNECTED = 499  # nginx's "client closed request": nobody reads it


def _respond(body: dict[str, Any], outcome: Outcome, started: float) -> Response:
    if outcome.gone or (outcome.plans and outcome.job is None):
        return Response(status_code=DISCONNECTED)
    return JSONResponse(body, headers=outcome.headers(started))


def _svc(request: Request) -> Service:
    svc: Service = request.app.state.svc
    return svc


async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
    """OpenAI embeddings (`input`), or vLLM's multimodal `messages` form (one embedding)."""
    started, svc = time.monotonic(), _svc(request)
    model = svc.embedder(body.model)
    if isinstance(body.input, list) and body.messages is None:  # before any per-item work
        svc.check_count(len(body.input), "input")
    items = convert.openai_items(body, svc.gate)
    dim = _dim(model, body.dimensions, "dimensions")
    outcome = await svc.submit(model, items.items, items.params, request.receive)
    vectors = model.vectors(outcome.job.outputs(), body.normalize, dim) if outcome.job else np.zeros((0, 0))
    encode = encodings.b64_float32 if body.encoding_format == "base64" else (lambda v: v.tolist())
    data = [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)]
    usage = {"prompt_tokens": outcome.tokens, "total_tokens": outcome.tokens}
    return _respond({"object": "list", "data": data, "model": svc.names["embedding"], "usage": usage},
                    outcome, started)


async def embed_v2(body: EmbedV2Request, request: Request) -> Response:
    """Cohere v2 embed: many mixed text/image(/video) inputs per request, several embedding types."""
    started, svc = time.monotonic(), _svc(request)
    model = svc.embedder(body.model)
    if body.truncate == "START":
        raise RequestError("truncate=START is not supported: q3vl shortens the end of an over-long text (END) "
                           "or refuses it (NONE)", "truncate")
    given = [name for name in ("texts", "images", "inputs") if getattr(body, name) is not None]
    if len(given) == 1:  # before any per-item work (the converter explains any other combination)
        svc.check_count(len(getattr(body, given[0])), given[0])
    items = convert.cohere_items(body, svc.gate, svc.config.input_type_instructions)
    dim = _dim(model, body.output_dimension, "output_dimension")
    types = list(body.embedding_types or ["float"])
    encodings.check_codes(types, svc.calibration, dim or model.dim)

    def check(plans: list[Plan]) -> None:
        _check_lengths(plans, items.params, body.max_tokens, body.truncate, model.max_length)

    outcome = await svc.submit(model, items.items, items.params, request.receive, check)
    if outcome.job is None:
        return _respond({}, outcome, started)
    vectors = model.vectors(outcome.job.outputs(), True, dim)
    images = sum(_count(it.get("image")) for it in items.items)
    units = {"input_tokens": outcome.tokens, **({"images": images} if images else {})}
    return _respond({"id": str(uuid.uuid4()), "embeddings": encodings.by_type(vectors, types, svc.calibration),
                     "texts": list(body.texts) if body.texts is not None else None,
                     "meta": {"api_version": {"version": "2"}, "billed_units": units,
                              "tokens": {"input_tokens": outcome.tokens}},
                     "response_type": "embeddings_by_type"}, outcome, started)


async def rerank(body: RerankRequest, request: Request) -> Response:
    """Rerank documents (text, or `{"content": [...]}` with images and videos) against a query."""
    started, svc = time.monotonic(), _svc(request)
    model = svc.reranker(body.model)
    if body.documents:  # before any per-document work (no documents: an empty ranking, as the anchors do)
        svc.check_count(len(body.documents), "documents")
    runtime_request, params = convert.rerank_request(body, svc.gate)
    outcome = await svc.submit(model, runtime_request, params, request.receive)
    scores = model.scores(outcome.job.outputs()) if outcome.job else []
    order = sorted(range(len(scores)), key=lambda i: -scores[i])[:body.top_n or None]
    results = [{"index": i, "relevance_score": scores[i],
                **({"document": convert.echo_document(body.documents[i])} if body.return_documents else {})}
               for i in order]
    tokens = outcome.tokens
    return _respond({"id": str(uuid.uuid4()), "model": svc.names["reranker"],
                     "usage": {"prompt_tokens": tokens, "total_tokens": tokens}, "results": results,
                     "meta": {"api_version": {"version": "2"}, "billed_units": {"search_units": 1},
                              "tokens": {"input_tokens": tokens}}}, outcome, started)


async def models(request: Request) -> dict[str, Any]:
    """The served models (their names are what `model` must say, when given)."""
    svc = _svc(request)
    return {"object": "list", "data": [{"id": name, "object": "model", "created": svc.created,
                                        "owned_by": "q3vl", "task": task} for task, name in svc.names.items()]}


async def health() -> dict[str, str]:
    """Liveness: the process answers (it may still be loading)."""
    return {"status": "ok"}


async def ready(request: Request) -> dict[str, str]:
    """Readiness: 200 once every graph ran once; 503 while loading or draining."""
    svc = _svc(request)
    if svc.draining:
        raise UnavailableError("draining before exit", retry_after=5)
    if not svc.ready.is_set():
        raise UnavailableError("loading the models and warming up", retry_after=2)
    return {"status": "ready"}


async def metrics(request: Request) -> Response:
    """Prometheus metrics."""
    svc = _svc(request)
    return Response(svc.metrics.render(), media_type=svc.metrics.content_type)


def build_router() -> APIRouter:
    """Every route (the handlers find the `Service` in `app.state.svc`)."""
    router = APIRouter()
    router.add_api_route("/v1/embeddings", embeddings, methods=["POST"], response_model=EmbeddingResponse,
                         responses=ERRORS, tags=["embeddings"], route_class_override=bounded_route("input"))
    router.add_api_route("/v2/embed", embed_v2, methods=["POST"], response_model=EmbedV2Response, responses=ERRORS,
                         tags=["embeddings"], route_class_override=bounded_route("texts", "images", "inputs"))
    for path in RERANK_PATHS:
        router.add_api_route(path, rerank, methods=["POST"], response_model=RerankResponse, responses=ERRORS,
                             tags=["rerank"], route_class_override=bounded_route("documents"))
    router.add_api_route("/v1/models", models, methods=["GET"], response_model=ModelList, responses=ERRORS,
                         tags=["service"])
    router.add_api_route("/health", health, methods=["GET"], response_model=Status, tags=["service"])
    router.add_api_route("/ready", ready, methods=["GET"], response_model=Status, responses=ERRORS, tags=["service"])
    router.add_api_route("/metrics", metrics, methods=["GET"], tags=["service"])
    return router


def _dim(model: Embedder, dim: int | None, param: str) -> int | None:
    """A Matryoshka dimension in 1..D, or None for the full vector."""
    if dim is not None and dim > model.dim:
        raise RequestError(f"{param} must be at most {model.dim} (the model's width), got {dim}", param)
    return None if dim == model.dim else dim


def _check_lengths(plans: list[Plan], params: list[str], max_tokens: int | None, truncate: str,
                   max_length: int) -> None:
    """Cohere's `max_tokens` (an item over it is refused) and `truncate=NONE` (an item that fills the
    model's context, where truncation would have cut it, is refused).
    """
    for p in plans:
        if max_tokens is not None and p.tokens > max_tokens:
            raise RequestError(f"input has {p.tokens} tokens (text + vision), over max_tokens={max_tokens}",
                               params[p.index])
        if truncate == "NONE" and p.tokens >= max_length:
            raise RequestError(f"input fills the model's {max_length}-token context and truncate=NONE forbids "
                               "cutting it; shorten it or use truncate=END", params[p.index])


def _count(value: Any) -> int:
    return len(value) if isinstance(value, list) else int(value is not None)
