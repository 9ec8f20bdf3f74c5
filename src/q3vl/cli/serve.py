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
import sys
import time
from typing import Any

from q3vl.cli import command

log = logging.getLogger(__name__)
# seconds a thread holding the GIL keeps it while another waits (Python's default: 0.005). The event
# loop answering a flood of refused requests holds it nearly all the time, and every hand-off of a
# normal request to its planning and inference threads waited up to that long: a short text
# request's p50 went from 2.3 to 28.7 ms next to two clients looping a refused body, 13.6 ms at 0.0005.
SWITCH_INTERVAL = 0.0005


def _args(p: argparse.ArgumentParser) -> None:
    from q3vl.options import add_flags
    from q3vl.serve.config import ServeConfig

    add_flags(p, ServeConfig())  # every flag, its default and help: the ServeConfig fields


def config_from(a: argparse.Namespace) -> Any:
    """The `ServeConfig` for parsed flags."""
    from q3vl.options import from_args
    from q3vl.serve.config import ServeConfig

    return from_args(a, ServeConfig())


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
    sys.setswitchinterval(SWITCH_INTERVAL)
    svc = Service(config, freeze_heap=True)  # this process is the server: see release_free_memory
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
