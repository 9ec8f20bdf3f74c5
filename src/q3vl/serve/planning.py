"""Bounded planning: a request's media are fetched and probed on threads of their own, under one deadline.

Why: planning (fetching URLs, reading image headers, tokenizing) ran on the framework's shared
40-thread pool, item by item, each URL with its own 30 s deadline: 45 requests with one drip-fed
URL each took every thread and text requests waited 29 s, and a request kept fetching for a minute
after its client left. Here:

- a request without media plans on the event loop's worker threads as before (tokenizing is short);
  a request with media plans on `Planner`'s own pool (`plan_threads`), so media never takes the
  threads text requests need. At most `max_waiting` media requests wait for that pool (429 beyond);
- every media item of a request shares one `Deadline` (`--media-deadline`), counted from the moment
  the request arrived, and its http(s) URLs are fetched up front, `fetches_per_request` at a time, on
  a shared pool of `fetch_threads`, into the request's media budget (its fetch cache), so planning
  then reads them from memory;
- when the client disconnects the deadline is cancelled: every open fetch of the request is aborted
  at once and nothing new starts (a waiting request never starts at all).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, TypeVar

import anyio

from q3vl.errors import InputError, OverloadedError
from q3vl.preprocess import CallBudget, Deadline, MediaAccess, MediaPolicy, media_call

log = logging.getLogger(__name__)
MEDIA_KEYS = ("image", "video", "image_url", "video_url")
MAX_PREFETCH = 1024  # URLs looked for in one request (a request has at most --max-client-batch-size items)
INLINE_CHARS = 2048  # text characters a media-free request may have to be planned on the event loop
T = TypeVar("T")


def has_media(value: object, depth: int = 0) -> bool:
    """Whether a request's items name any image or video (items are dicts; a rerank request nests them)."""
    if depth > 8:
        return False
    if isinstance(value, dict):
        return any((k in MEDIA_KEYS and v is not None) or has_media(v, depth + 1) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(has_media(v, depth + 1) for v in value)
    return False


def text_chars(value: object, stop: int, depth: int = 0) -> int:
    """The characters of every string in a request's items, counted until `stop` is reached."""
    if depth > 8:
        return stop
    if isinstance(value, str):
        return len(value)
    total = 0
    children = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    for v in children:
        total += text_chars(v, stop - total, depth + 1)
        if total >= stop:
            return total
    return total


def media_urls(value: object) -> list[str]:
    """The distinct http(s) URLs a request's image and video fields name, in order (at most MAX_PREFETCH)."""
    found: dict[str, None] = {}
    for url in _urls(value, False, 0):
        found[url] = None
        if len(found) >= MAX_PREFETCH:
            break
    return list(found)


def _urls(value: object, media: bool, depth: int) -> Iterator[str]:
    if depth > 8:
        return
    if isinstance(value, str):
        if media and value[:8].lower().startswith(("http://", "https://")):
            yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _urls(v, media or k in MEDIA_KEYS, depth + 1)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _urls(v, media, depth + 1)


class Planner:
    """The planning pools and the per-request media deadline (see the module docstring)."""

    def __init__(self, policy: MediaPolicy, timeout: float, *, plan_threads: int = 8, fetch_threads: int = 16,
                 fetches_per_request: int = 4, max_waiting: int = 64) -> None:
        self.policy, self.timeout = policy, timeout
        self.fetches_per_request, self.max_waiting = fetches_per_request, max_waiting
        self._plans = ThreadPoolExecutor(plan_threads, thread_name_prefix="q3vl-plan-media")
        self._fetches = ThreadPoolExecutor(fetch_threads, thread_name_prefix="q3vl-fetch")
        self._waiting = 0
        self._lock = threading.Lock()

    def deadline(self) -> Deadline:
        """A new request's media deadline (all its items share it)."""
        return Deadline(self.policy.deadline)

    async def plan(self, plan: Callable[[], T], budget: CallBudget | None, inputs: object,
                   disconnected: Callable[[], Awaitable[object]] | None) -> T | None:
        """`plan()`; None when the client disconnected first.

        With a `budget` (the request has media) it runs on the media pool, after the request's URLs
        were fetched into `budget` under its deadline. Without, a short request (at most
        INLINE_CHARS characters of text) plans right here on the event loop, a longer one on the
        loop's worker threads. Why inline: tokenizing a short text takes a fraction of a millisecond,
        while a hop to a worker thread and back waits for the GIL each way, up to the interpreter's
        switch interval when the loop is busy (two clients looping refused bodies made a short text
        request's p50 12x its idle figure).
        """
        if budget is None:
            if text_chars(inputs, INLINE_CHARS + 1) <= INLINE_CHARS:
                return plan()
            return await anyio.to_thread.run_sync(plan)
        deadline = budget.deadline or self.deadline()
        with self._lock:
            if self._waiting >= self.max_waiting:
                raise OverloadedError(f"{self._waiting} requests with media are being planned; retry shortly", 2)
            self._waiting += 1
        work = asyncio.wrap_future(self._plans.submit(self._run, plan, budget, inputs, deadline))
        work.add_done_callback(lambda _: self._done())
        watcher = asyncio.ensure_future(disconnected()) if disconnected is not None else None
        waits: list[asyncio.Future[Any]] = [work, *([watcher] if watcher else [])]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():  # the client left: stop its fetches now, let the thread wind down
                deadline.cancel()
                return None
            return work.result()
        finally:
            if watcher is not None:
                watcher.cancel()
            if not work.done():
                deadline.cancel()

    def _done(self) -> None:
        with self._lock:
            self._waiting -= 1

    def _run(self, plan: Callable[[], T], budget: CallBudget, inputs: object, deadline: Deadline) -> T:
        """On a media-pool thread: fetch the request's URLs, then plan with them in its budget."""
        if deadline.cancelled:
            raise InputError("the request was cancelled before its media were read")
        self.prefetch(media_urls(inputs), budget, deadline)
        with media_call(self.policy, budget):
            return plan()

    def prefetch(self, urls: Sequence[str], budget: CallBudget, deadline: Deadline) -> None:
        """Fetch `urls` into `budget`'s cache, `fetches_per_request` at a time, under `deadline`.

        A failure is cached by the budget as that URL's error (the item that names it reports it).
        """
        access = MediaAccess(self.policy, self.timeout, budget)

        def fetch(url: str) -> None:
            with contextlib.suppress(InputError):  # remembered in the budget's cache: its item reports it
                access.source(url, "image", deadline)

        running: set[Future[None]] = set()
        for url in urls:
            if deadline.expired():
                break
            if len(running) >= self.fetches_per_request:
                _, running = wait(running, return_when=FIRST_COMPLETED)
            running.add(self._fetches.submit(fetch, url))
        wait(running)

    def close(self) -> None:
        self._plans.shutdown(wait=False, cancel_futures=True)
        self._fetches.shutdown(wait=False, cancel_futures=True)
