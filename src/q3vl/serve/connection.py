"""Connections: uvicorn's httptools protocol plus the limits uvicorn does not enforce by itself.

uvicorn (0.55) arms a timer only after a response (`timeout_keep_alive`); before the first
request, while a request head trickles in, and while the next head arrives on a kept-alive
connection, nothing bounds a connection, and `limit_concurrency` answers 503 to *requests* once
enough *connections* are open, so idle sockets lock everyone out. `LimitedProtocol` adds:

- a head deadline (`header_timeout`): from the connect, or from the end of the previous response,
  the client has that long to send a whole request head (a 408 when part of one arrived, a silent
  close when nothing did); a client still sending the body of a request that was answered early
  (a 413, say) may finish it, as long as it keeps `body_min_rate` over each `RATE_WINDOW` and ends
  within `body_timeout` (nginx's lingering close), so it can read the answer;
- a connection cap (`max_connections`, lowered to fit the open-file limit): a connection beyond it
  closes the oldest connection that is between requests, or, when every one is busy with a request,
  is answered 503 and closed itself, so the server never runs out of file descriptors. asyncio
  accepts up to `backlog` sockets per loop tick and a connection is counted two ticks later, so the
  cap leaves room for three accept batches (`connection_limits`); running out matters, since
  Python 3.11's accept loop retries EMFILE `backlog` times per tick and floods its log;
- a send watchdog (`send_timeout`): a response the client stops reading (the transport's buffer
  does not shrink for that long) has its connection dropped, freeing the buffered bytes;
- a head size bound (`MAX_HEAD_BYTES`): a request head that grows past it is answered 431 and
  closed (uvicorn bounds a head only in its pure-Python h11 protocol).

It is built on uvicorn's httptools protocol (the C parser uvicorn picks by default) rather than its
pure-Python h11 one: on h11, `benchmarks/serve_load.py`'s short text requests ran at 0.84-0.91x the
requests per second of the server before these limits (tiny bundle; with httptools 0.91-1.00x).

Request bodies (deadline, minimum rate, bytes held) are `serve/body.py`'s, since they are read by
the application.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import time
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from q3vl.serve.config import RATE_WINDOW, HttpLimits

log = logging.getLogger(__name__)
RESERVED_FILES = 64  # descriptors kept for everything but client connections (models, logs, media fetches)
MAX_BACKLOG = 2048  # uvicorn's default listen backlog
MAX_HEAD_BYTES = 16 * 1024  # a request head's bytes (uvicorn's h11 bound; a q3vl request head is under 1 KiB)


def connection_limits(limit: int) -> tuple[int, int]:
    """(connection cap, listen backlog) for the open-file limit: the backlog is a sixteenth of it (16 to
    2048; asyncio accepts that many sockets per tick), and the cap leaves a quarter of the limit (at
    least 64) for everything else plus three accept batches in flight.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return limit, MAX_BACKLOG
    backlog = min(MAX_BACKLOG, max(16, soft // 16))
    return max(1, min(limit, soft - max(RESERVED_FILES, soft // 4) - 3 * backlog)), backlog


def raw_response(status: int, reason: str, message: str, code: str) -> bytes:
    """A complete HTTP/1.1 error response in the OpenAI error shape, closing the connection (for
    answers written outside any request cycle).
    """
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error" if status < 500 else
                                 "service_unavailable_error", "param": None, "code": code}}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode() + body


TIMED_OUT = raw_response(408, "Request Timeout", "the request head was not received in time (--header-timeout)",
                         "request_timeout")
BUSY = raw_response(503, "Service Unavailable", "too many open connections, all busy (--max-connections)",
                    "too_many_connections")
HEAD_TOO_LARGE = raw_response(431, "Request Header Fields Too Large",
                              f"the request head is larger than {MAX_HEAD_BYTES} bytes", "request_head_too_large")


class LimitedProtocol(HttpToolsProtocol):
    """uvicorn's `HttpToolsProtocol` with a head deadline and size bound, a connection cap and a send
    watchdog (see the module docstring). `protocol_class(limits)` makes the configured subclass
    uvicorn instantiates. The parser's callbacks tell where a request stands: `_in_head` from the
    first byte of a head to its end, `_in_body` from there to the end of its body.
    """

    limits = HttpLimits()
    cap = 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timeout_keep_alive = self.limits.keep_alive_timeout  # type: ignore[assignment]
        self.idle_since = time.monotonic()
        self._head_timer: asyncio.TimerHandle | None = None
        self._send_timer: asyncio.TimerHandle | None = None
        self._unsent = 0  # for the send watchdog
        self._unsent_at_arm = 0  # for the head timer
        self._received = 0  # bytes received, for the rate of a refused body being drained
        self._received_at_arm = 0
        self._linger_until = 0.0
        self._in_head = False
        self._in_body = False
        self._heads = 0  # heads begun on this connection
        # bytes of the unfinished head, counting only reads that held nothing else (so a head may pass
        # MAX_HEAD_BYTES by one read, at most 256 KiB, before it is refused)
        self._head_bytes = 0
        self._running: Any = None  # the request being answered

    # ------------------------------------------------------------ uvicorn's hooks
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.cap and not self._evict_idle():
            log.warning("%d connections open, none idle: refusing a new one (--max-connections)", len(self.connections))
            transport.write(BUSY)
            transport.close()
            return
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        self._received += len(data)
        draining = self._in_body and self.between_requests()
        head, heads = self._in_head, self._heads
        super().data_received(data)
        if head and self._in_head and self._heads == heads:  # all of `data` is in one unfinished head
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES and not self.transport.is_closing():
                self.transport.write(HEAD_TOO_LARGE)
                self.drop()
                return
        if self._head_timer is not None and not self.between_requests():
            self._head_timer.cancel()  # a request head arrived: the body and the app take it from here
            self._head_timer = None
        elif draining and not self._in_body and not self.transport.is_closing():
            self._arm_head_timer()  # a refused body was drained: a fresh wait for the next head

    # the parser's callbacks (uvicorn's, plus where the request stands)
    def on_message_begin(self) -> None:
        self._in_head, self._head_bytes = True, 0
        self._heads += 1
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._in_head, self._in_body = False, True
        super().on_headers_complete()

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        self._running = cycle  # with pipelining, `self.cycle` is the last one parsed, not this one
        super()._start_asgi_task(cycle, app)

    def on_message_complete(self) -> None:
        self._in_body = False
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.between_requests():
            self._linger_until = time.monotonic() + self.limits.body_timeout
            self._arm_head_timer()
            if self._in_body:  # answered before its body ended: check its rate
                self._arm_head_timer(RATE_WINDOW)

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._head_timer, self._send_timer):
            if timer is not None:
                timer.cancel()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_timer is None:
            self._unsent = self.transport.get_write_buffer_size()
            self._send_timer = self.loop.call_later(self.limits.send_timeout, self._check_send)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    # ------------------------------------------------------------ the limits
    def between_requests(self) -> bool:
        """No request in progress: waiting for the first head, or for the next one after a response."""
        return self.cycle is None or self.cycle.response_complete

    def _arm_head_timer(self, seconds: float | None = None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        if seconds is None:  # a fresh wait for a head (not a prolonged one)
            self.idle_since = time.monotonic()
            self._unsent_at_arm = self.transport.get_write_buffer_size() + 1
        self._received_at_arm = self._received
        self._head_timer = self.loop.call_later(seconds or self.limits.header_timeout, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.between_requests():
            return
        unsent = self.transport.get_write_buffer_size()
        if unsent and unsent < self._unsent_at_arm:  # the client is still reading the last response
            self._unsent_at_arm = unsent
            self._arm_head_timer(self.limits.header_timeout)
            return
        if self._in_body and self._lingering():
            return
        if self._in_head and not self.transport.is_closing():
            # part of a head arrived (a body still being drained has had its answer)
            self.transport.write(TIMED_OUT)
        self.drop()

    def _lingering(self) -> bool:
        """Whether a refused body still arriving may go on being drained (checked each `RATE_WINDOW`)."""
        left = self._linger_until - time.monotonic()
        if left <= 0 or self._received - self._received_at_arm < self.limits.body_min_rate * RATE_WINDOW:
            return False
        self._arm_head_timer(min(left, RATE_WINDOW))
        return True

    def _check_send(self) -> None:
        """The client read nothing of the buffered response for `send_timeout` seconds: drop it."""
        self._send_timer = None
        unsent = self.transport.get_write_buffer_size()
        if unsent and unsent >= self._unsent:
            log.info("a client left %d response bytes unread for %.0f s: dropping its connection", unsent,
                     self.limits.send_timeout)
            self._abort()
        elif unsent:
            self._unsent = unsent
            self._send_timer = self.loop.call_later(self.limits.send_timeout, self._check_send)

    def _evict_idle(self) -> bool:
        """Close the connection that has waited longest between requests; False when none is."""
        idle = [c for c in self.connections if c is not self and isinstance(c, LimitedProtocol)
                and c.between_requests() and not c.transport.is_closing()]
        if not idle:
            return False
        min(idle, key=lambda c: c.idle_since).drop()
        return True

    def drop(self) -> None:
        """Close now; abort when a response is still buffered (its reader is gone or too slow)."""
        if self.transport.get_write_buffer_size():
            self._abort()
        else:
            self._gone()
            self.transport.close()

    def _abort(self) -> None:
        self._gone()
        self.transport.abort()

    def _gone(self) -> None:
        """Tell this connection's requests, the running one and any pipelined behind it, that their
        client is gone now, not when the loop reports the closed socket: a pipelined request started
        meanwhile would write to a closed transport (uvloop raises there, asyncio ignores it).
        """
        for cycle in [self._running, self.cycle, *(c for c, _ in self.pipeline)]:
            if cycle is not None and not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
        self.pipeline.clear()


def protocol_class(limits: HttpLimits) -> tuple[type[LimitedProtocol], int]:
    """The protocol class for `uvicorn.Config(http=...)`, with `limits` and the connection cap set, and
    the listen backlog for `uvicorn.Config(backlog=...)`.
    """
    cap, backlog = connection_limits(limits.max_connections)
    if cap < limits.max_connections:
        log.info("--max-connections %d lowered to %d to fit the open-file limit", limits.max_connections, cap)
    return type("LimitedProtocol", (LimitedProtocol,), {"limits": limits, "cap": cap}), backlog
