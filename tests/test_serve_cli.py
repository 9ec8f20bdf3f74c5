"""`q3vl serve` as a command: what it imports, how it fails, and the --auth-probes switch."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from q3vl.errors import ConfigError
from tests.serve_server import ROOT, Server

BLOCK_FASTAPI = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('fastapi', 'uvicorn', 'starlette'):
            raise ModuleNotFoundError('blocked: ' + name, name=name)
sys.meta_path.insert(0, Block())
"""


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_q3vl_and_the_runtime_never_import_the_server_stack():
    out = run("""
import sys, q3vl, q3vl.runtime, q3vl.cli
q3vl.cli._register_more()
q3vl.cli.build_parser()
bad = [m for m in sys.modules if m.split('.')[0] in ('fastapi', 'uvicorn', 'starlette', 'prometheus_client')]
assert not bad, bad
print('ok')
""")
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_missing_serve_extra_names_it(tiny_embedding_bundle):
    out = run(BLOCK_FASTAPI + f"""
from q3vl.cli import main
sys.exit(main(['serve', '--embedding', {str(tiny_embedding_bundle)!r}]))
""")
    assert out.returncode == 2 and "pip install 'q3vl[serve]'" in out.stderr, out.stderr


def test_bad_arguments_and_bundles_exit_2(tmp_path, tiny_reranker_bundle):
    out = subprocess.run([sys.executable, "-m", "q3vl", "serve"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2 and "--embedding BUNDLE and/or --reranker BUNDLE" in out.stderr
    srv = Server(["--embedding", str(tiny_reranker_bundle)], tmp_path)  # a reranker bundle given as the embedder
    assert srv.proc.wait(120) == 2
    assert "is a reranker bundle" in srv.log() and "q3vl: error:" in srv.log()


def test_config_checks():
    from q3vl.serve.config import ServeConfig

    for bad in ({"max_queue_items": 4, "max_client_batch_size": 8}, {"batch_size": 0}, {"max_wait_ms": -1},
                {"api_key": " "}, {"media_root": "/nonexistent/dir"}):
        with pytest.raises(ConfigError):
            ServeConfig(embedding="x", **bad)


@pytest.mark.parametrize(("probes", "path", "headers", "status"), [
    (False, "/health", [], 200), (True, "/health", [], 401), (True, "/metrics", [], 401),
    (True, "/metrics", [(b"authorization", b"Bearer k")], 200), (False, "/v1/models", [], 401),
])
def test_auth_probes_switch(probes, path, headers, status):
    from q3vl.serve.app import PROBES
    from q3vl.serve.http import AuthMiddleware

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    mw = AuthMiddleware(app, "k", set() if probes else PROBES)
    asyncio.run(mw({"type": "http", "path": path, "headers": headers, "method": "GET"}, receive, send))
    assert sent[0]["status"] == status
