"""Request bodies: read whole before the app runs, within a size, a deadline, a minimum rate and a
process-wide budget, and never parsed when the client leaves half way.

`BodyReader` is plain ASGI (not `BaseHTTPMiddleware`), so the route can still hear the client
disconnect through `receive` after the body was replayed to it. For each request it:

- refuses a body over `max_bytes` (413, from the Content-Length when given), and one whose bytes
  announce too many JSON values: more than `MAX_JSON_VALUES` commas, or more colons (object keys)
  or brackets (objects and arrays) than `STRUCTURE_PER_ITEM` per item the server admits; counting
  bytes costs nothing next to building a million Python objects on the event loop;
- answers 408 and closes the connection when the body is not complete `body_timeout` seconds
  after the head, or when fewer than `body_min_rate` bytes per second arrived over a
  `RATE_WINDOW`-second window (a stalled or drip-fed body);
- counts every byte it holds of unfinished bodies against one budget (`max_pending_body_bytes`,
  all connections together): a chunk beyond it is a 429 with Retry-After, and the request's bytes
  are freed at once;
- drops the bytes of a client that disconnects before its body is complete: the app never sees
  (and never parses) a partial body.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi.responses import JSONResponse

from q3vl.serve.config import RATE_WINDOW, HttpLimits
from q3vl.serve.errors import RequestTooLargeError
from q3vl.serve.http import error_response, from_error

MAX_JSON_VALUES = 1 << 20  # commas in one body: bounds the list elements a JSON parse can allocate
STRUCTURE_PER_ITEM = 1024  # object keys, and objects + arrays, per admitted item (131,072 at 128 items)
CLOSE = {"connection": "close"}


class PendingBytes:
    """Bytes of request bodies still being received, against one budget for the process."""

    def __init__(self, limit: int) -> None:
        self.limit, self.held = limit, 0

    def take(self, n: int) -> bool:
        if self.held + n > self.limit:
            return False
        self.held += n
        return True

    def give(self, n: int) -> None:
        self.held -= n


class Disconnected(Exception):
    """The client left before its body was complete."""


class BodyReader:
    """Reads, bounds and replays every HTTP request body (see the module docstring)."""

    def __init__(self, app: Any, max_bytes: int, max_items: int, limits: HttpLimits) -> None:
        self.app, self.max_bytes, self.limits = app, max_bytes, limits
        self.max_structure = STRUCTURE_PER_ITEM * max_items
        self.pending = PendingBytes(limits.max_pending_body_bytes)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            refusal, body = await self._read(scope, receive)
        except Disconnected:
            return  # nobody to answer; the partial body is dropped unparsed
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _read(self, scope: dict[str, Any], receive: Any) -> tuple[JSONResponse | None, bytes]:
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return error_response(400, "invalid Content-Length header", "invalid_request_error"), b""
            if int(length) > self.max_bytes:
                return self._too_large(int(length)), b""
        chunks: list[bytes] = []
        clock = _Clock(self.limits)
        counts = [0, 0, 0]  # commas, colons, brackets
        try:
            while True:
                message = await clock.next(receive)
                if isinstance(message, JSONResponse):
                    return message, b""
                if message["type"] == "http.disconnect":
                    raise Disconnected
                chunk = message.get("body", b"")
                refusal = self._check(chunk, clock, counts)
                if refusal is not None:
                    return refusal, b""
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return None, b"".join(chunks)
        finally:
            self.pending.give(clock.size)

    def _check(self, chunk: bytes, clock: _Clock, counts: list[int]) -> JSONResponse | None:
        """A refusal for the body so far with `chunk` added, or None (the chunk is then held)."""
        if clock.size + len(chunk) > self.max_bytes:
            return self._too_large(clock.size + len(chunk))
        counts[0] += chunk.count(b",")
        counts[1] += chunk.count(b":")
        counts[2] += chunk.count(b"{") + chunk.count(b"[")
        if counts[0] > MAX_JSON_VALUES or max(counts[1], counts[2]) > self.max_structure:
            return from_error(RequestTooLargeError(
                f"the body holds more JSON values than this server reads in one request (at most {MAX_JSON_VALUES} "
                f"list elements, {self.max_structure} object keys, {self.max_structure} objects and arrays); "
                "split the request"))
        if not self.pending.take(len(chunk)):
            return error_response(429, "the server is receiving too many request bodies at once "
                                  "(--max-pending-body-bytes); retry shortly", "rate_limit_error", None,
                                  "server_busy", {"Retry-After": "1"})
        clock.size += len(chunk)
        return None

    def _too_large(self, size: int) -> JSONResponse:
        return from_error(RequestTooLargeError(
            f"request body of {size}+ bytes is over this server's limit of {self.max_bytes} bytes "
            "(--max-request-bytes); send fewer or smaller items per request"))


class _Clock:
    """One body's deadline and minimum-rate windows: `next()` is the next message, or the 408."""

    def __init__(self, limits: HttpLimits) -> None:
        self.loop = asyncio.get_running_loop()
        now = self.loop.time()
        self.deadline = now + limits.body_timeout
        self.min_rate = limits.body_min_rate
        self.window_end = now + RATE_WINDOW if self.min_rate else float("inf")
        self.window_start_size = 0
        self.size = 0  # bytes held (and taken from the pending budget)

    async def next(self, receive: Any) -> dict[str, Any] | JSONResponse:
        while True:
            refusal = self._late()
            if refusal is not None:
                return refusal
            wait = min(self.deadline, self.window_end) - self.loop.time()
            try:
                async with asyncio.timeout(max(wait, 0.0)):
                    message: dict[str, Any] = await receive()
                    return message
            except TimeoutError:
                continue

    def _late(self) -> JSONResponse | None:
        now = self.loop.time()
        if now >= self.deadline:
            return timed_out("the request body was not received within --body-timeout")
        while now >= self.window_end:
            if self.size - self.window_start_size < self.min_rate * RATE_WINDOW:
                return timed_out(f"the request body arrived slower than --body-min-rate ({self.min_rate} bytes/s)")
            self.window_end += RATE_WINDOW
            self.window_start_size = self.size
        return None


def timed_out(message: str) -> JSONResponse:
    """A 408 that closes the connection (a body still on its way must not be read further)."""
    return error_response(408, message, "invalid_request_error", None, "request_timeout", CLOSE)
