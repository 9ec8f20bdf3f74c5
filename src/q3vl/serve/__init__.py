"""`q3vl serve`: an HTTP server for embedding and reranking bundles, API-compatible with OpenAI, Cohere
and vLLM clients.

A thin layer over the runtime's batch seam (`BatchModel.plan`, then `run_batches`): the routes
(`routes.py`) turn requests into runtime items, the cross-request queue (`queue.py`) gathers the items
of concurrent requests into micro-batches and streams them to `run_batches`, and the rest is HTTP:
schemas copied from the anchors' APIs, errors in the OpenAI shape, auth, body limits and Prometheus
metrics. Only `q3vl serve`
imports this package; `import q3vl` and the runtime never import FastAPI.
"""
