"""Refusals paced per client: a client whose requests keep being refused is answered at a bounded rate.

The other limits bound what one refused request costs (its body's bytes, a parse that stops at the
first bound, one error object); nothing bounded how many a client gets per second. Two clients
looping a refused 200 KB body got about 700 refusals a second, and every other request
waited its turn for the interpreter behind them: a short text request's p50 went to 2.2x its idle
figure (`benchmarks/hostile_load.py`, invalid-rerank). Pacing is what nginx's `limit_req` does,
aimed at the offender only: an accepted request is never delayed, and a refused one waits for its
slot before its answer leaves. A client that waits for each answer before sending again (HTTP/1.1
without pipelining; a pipelined request waits behind the answer before it) therefore sends at most
`refusal_rate` refused requests per second, after a burst of `refusal_burst`.

- The bucket is kept per client address (an IPv6 client by its /64, the block one host usually
  gets) as one timestamp: the generic cell rate algorithm. Behind a reverse proxy every client has
  the proxy's address, so one client's refusals also pace the others' refusals (never their
  accepted requests).
- A refusal costs one unit, plus one per `UNIT_BYTES` of body the server received for it: a 12 MB
  body costs what 13 small ones do, and a single full-size (20 MiB) body, 21 units, waits at most
  0.1 s on a full default bucket. A body refused from its Content-Length alone (413) costs one
  unit: the server never read it, and a client that got its size wrong once is answered at once.
- Counted: every 4xx the application answers but 408 (the connection closes anyway) and 429 (the
  server's load, not the client's fault). The protocol's own refusals (431, the connection cap's
  503) close their connection and are not paced.
- A paced answer is held, small, after the request is done with: the body and the parsed request
  are freed before the wait, so a paced client holds one connection and an error message. The wait
  is at most `MAX_DELAY`; a client that keeps many connections refused at once gets one answer per
  connection per `MAX_DELAY`, and the connection cap bounds those.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Callable
from typing import Any

UNIT_BYTES = 1024 * 1024  # body bytes one refusal unit stands for
MAX_DELAY = 5.0  # seconds a paced answer waits at most
MAX_CLIENTS = 65_536  # addresses tracked at once (those with a full bucket are forgotten first)
UNPACED = {408, 429}


def client_key(scope: dict[str, Any]) -> str:
    """The address a request is paced by: the client's IPv4 address or IPv6 /64 (a mapped IPv4 as itself)."""
    client = scope.get("client")
    host = str(client[0]) if client else ""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return host  # a unix socket or a test client: one bucket per name
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


class RefusalPacer:
    """Per-client refusal budgets: `rate` units a second, bursts of `burst` (GCRA: one timestamp each)."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval, self.tolerance, self.clock = 1.0 / rate, burst / rate, clock
        self.tat: dict[str, float] = {}  # each client's theoretical arrival time

    def delay(self, client: str, units: float = 1.0) -> float:
        """Seconds this refusal of `client` waits (0 within the budget), at most `MAX_DELAY`."""
        now = self.clock()
        tat = max(self.tat.get(client, now), now) + units * self.interval
        wait = tat - now - self.tolerance
        if wait > MAX_DELAY:  # the debt stops growing: a paced answer never waits longer
            tat -= wait - MAX_DELAY
            wait = MAX_DELAY
        self.tat[client] = tat
        if len(self.tat) > MAX_CLIENTS:
            self._forget(now)
        return max(0.0, wait)

    def _forget(self, now: float) -> None:
        """Drop clients whose bucket is full again; if that is not enough, those closest to full."""
        self.tat = {k: t for k, t in self.tat.items() if t > now}
        if len(self.tat) > MAX_CLIENTS // 2:
            kept = sorted(self.tat.items(), key=lambda kv: kv[1])[-(MAX_CLIENTS // 2):]
            self.tat = dict(kept)


def refusal(status: int) -> bool:
    """Whether an answer with this status counts against the client's budget."""
    return 400 <= status < 500 and status not in UNPACED


class RefusalPacing:
    """ASGI middleware: answers a client's refusals beyond its budget late (see the module docstring)."""

    def __init__(self, app: Any, rate: float, burst: int) -> None:
        self.app, self.pacer = app, RefusalPacer(rate, burst)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        received = 0
        held: list[dict[str, Any]] = []

        async def counting() -> dict[str, Any]:
            nonlocal received
            message: dict[str, Any] = await receive()
            received += len(message.get("body", b""))
            return message

        async def holding(message: dict[str, Any]) -> None:
            if held or (message["type"] == "http.response.start" and refusal(int(message["status"]))):
                held.append(message)
                return
            await send(message)

        await self.app(scope, counting, holding)
        if not held:
            return
        wait = self.pacer.delay(client_key(scope), 1.0 + received / UNIT_BYTES)
        if wait > 0:
            await asyncio.sleep(wait)
        for message in held:
            await send(message)

