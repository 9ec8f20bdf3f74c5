"""Admission by work: process-wide budgets for the media bytes and decoded pixels of requests in flight.

Why: the queue counts items, but an item may be a 30 MB URL or a 144-megapixel PNG. Sixteen
requests of eight 30 MB URLs held 5 GB, and two clients looping a 12000x12000 PNG held every other
client behind their decodes, without a single 429. Here every request gets a `Ticket` on one
`WorkBudget`:

- **media bytes**: each http(s) fetch reserves its per-item cap before it starts (so concurrent
  fetches cannot overshoot), settled to the real size when it ends; data URIs and encoded bytes are
  charged as they are decoded. `AdmittedBudget` is the request's `CallBudget`, so this happens where
  the media policy already counts a call's bytes.
- **decoded pixels**: once a request is planned, the full-resolution pixels its images and video
  frames will decode to (what the loader allocates) are charged before it is queued.

Over the budget, counting what other requests hold, is a 429 with `Retry-After`; a request that
could not fit even in an empty server is a 413. Everything a request holds is given back when its
response is ready (or its client leaves), and the allocator is asked to hand freed pages back to the
OS (`release_free_memory`), so memory goes back down after a burst.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import logging
import threading
from collections.abc import Sequence

from q3vl.errors import InputError, OverloadedError
from q3vl.preprocess import CallBudget, Deadline, MediaPolicy
from q3vl.preprocess import release_free_memory as trim_heap
from q3vl.serve.errors import RequestTooLargeError

log = logging.getLogger(__name__)
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 16 * 1024**2  # bytes: blocks this large are mapped on their own (mmap_large_blocks says why)
_RELEASING = threading.Lock()  # one release at a time: a burst's requests end together
RETRY_AFTER = 2  # seconds: a budget frees up when a request in flight ends, which is seconds, not minutes


class WorkBudget:
    """In-flight media bytes and decoded pixels, all requests together (thread-safe)."""

    def __init__(self, max_bytes: int, max_pixels: int) -> None:
        self.max_bytes, self.max_pixels = max_bytes, max_pixels
        self.bytes = 0
        self.pixels = 0
        self.refused = 0
        self._lock = threading.Lock()

    def ticket(self) -> Ticket:
        return Ticket(self)

    def _take(self, ticket: Ticket, n_bytes: int, n_pixels: int) -> None:
        """Add to the ticket's share, or raise (413 / 429) leaving every count as it was."""
        with self._lock:
            if ticket.closed:
                raise OverloadedError("the request has ended", RETRY_AFTER)
            for what, have, n, used, limit, flag in (
                    ("media bytes", ticket.bytes, n_bytes, self.bytes, self.max_bytes, "--max-inflight-media-bytes"),
                    ("decoded pixels", ticket.pixels, n_pixels, self.pixels, self.max_pixels,
                     "--max-inflight-pixels")):
                if n <= 0:
                    continue
                if have + n > limit:
                    raise RequestTooLargeError(f"this request needs more than {limit} {what} at once, the server's "
                                               f"whole budget ({flag}): send smaller or fewer media per request")
                if used + n > limit:
                    self.refused += 1
                    raise OverloadedError(f"the server is busy with other requests' media ({used} of {limit} "
                                          f"{what} in flight, {flag}); retry shortly", RETRY_AFTER)
            self.bytes += n_bytes
            self.pixels += n_pixels
            ticket.bytes += n_bytes
            ticket.pixels += n_pixels

    def _give_back(self, ticket: Ticket, n_bytes: int, n_pixels: int, close: bool = False) -> None:
        with self._lock:
            if close:  # everything it holds, counted under the lock
                ticket.closed, n_bytes, n_pixels = True, ticket.bytes, ticket.pixels
            n_bytes, n_pixels = min(n_bytes, ticket.bytes), min(n_pixels, ticket.pixels)
            self.bytes -= n_bytes
            self.pixels -= n_pixels
            ticket.bytes -= n_bytes
            ticket.pixels -= n_pixels


class Ticket:
    """One request's share of the `WorkBudget`; `refusal` is the 413/429 that stopped it, if any."""

    def __init__(self, budget: WorkBudget) -> None:
        self.budget = budget
        self.bytes = 0
        self.pixels = 0
        self.refusal: OverloadedError | RequestTooLargeError | None = None
        self.closed = False

    def take(self, n_bytes: int = 0, n_pixels: int = 0) -> None:
        """Count more work; a refusal is remembered (the request answers with it) and raised. A released
        ticket takes nothing more (a planning thread still winding down after its client left).
        """
        try:
            self.budget._take(self, n_bytes, n_pixels)
        except (OverloadedError, RequestTooLargeError) as e:
            if self.refusal is None:
                self.refusal = e
            raise

    def give_back(self, n_bytes: int = 0, n_pixels: int = 0) -> None:
        self.budget._give_back(self, n_bytes, n_pixels)

    def release(self) -> None:
        """Everything this request holds goes back, now and whatever it is charged later (idempotent)."""
        self.budget._give_back(self, 0, 0, close=True)


class AdmittedBudget(CallBudget):
    """A request's `CallBudget` whose bytes also count against the server's `WorkBudget`.

    A refusal inside planning must stop the item the way any media error does, so it is raised as
    the item's `InputError`; the `Ticket` keeps the real 413/429 for the request's answer.
    """

    def __init__(self, policy: MediaPolicy, ticket: Ticket, deadline: Deadline | None = None) -> None:
        super().__init__(policy, deadline)
        self.ticket = ticket
        self._fetching = threading.local()  # the cap a fetch on this thread reserved (fetches run in parallel)

    def room(self) -> tuple[int, str]:
        """Called right before a fetch (on its thread): reserve the most it may bring in."""
        cap, limit = super().room()
        self._admit(cap, 0)
        self._fetching.reserved = cap
        return cap, limit

    def charge(self, size: int, name: str) -> None:
        """Called once media are in memory: a fetch's reservation becomes its real size."""
        reserved, self._fetching.reserved = getattr(self._fetching, "reserved", 0), 0
        if reserved:
            self.ticket.give_back(reserved, 0)
        super().charge(size, name)
        self._admit(size, 0)

    def _admit(self, n_bytes: int, n_pixels: int) -> None:
        try:
            self.ticket.take(n_bytes, n_pixels)
        except (OverloadedError, RequestTooLargeError) as e:
            if self.deadline is not None:  # the request is answered 429/413: stop every fetch it started
                self.deadline.cancel()
            raise InputError(str(e)) from e


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def release_free_memory() -> None:
    """Free a finished request's media for good, and hand the pages back to the OS.

    First the reference cycles: an exception's traceback holds the frames that held the request's
    fetched bytes and decoded images, and those frames reach the exception again, so only the cycle
    collector frees them, and it may not run for minutes on an idle server. Measured (tiny bundles,
    16 requests of 8 x 30 MB URL images, 10 s after the burst): 1065 MB RSS with the heap trimmed,
    483 MB after a `gc.collect()`. The server freezes what it loaded at start (`gc.freeze`), so this
    collection scans only objects made since: about a millisecond, not 30. Then glibc `malloc_trim`
    (the preprocessing trims after each large image too).
    """
    with _RELEASING:
        gc.collect()
        trim_heap()


@functools.lru_cache(maxsize=1)
def mmap_large_blocks(threshold: int = MMAP_THRESHOLD) -> bool:
    """Serve every allocation of `threshold` bytes or more (fetched media, decoded images) from its own
    mapping, so freeing it returns it to the OS at once (glibc `mallopt(M_MMAP_THRESHOLD)`).

    Why: glibc raises its mmap threshold to the size of the largest block freed so far (up to 32 MiB),
    after which 30 MB media buffers come from the heap, where fragmentation keeps them. Measured with
    `benchmarks/hostile_load.py` (16 requests of 8 x 30 MB images, RSS above idle 30 s later, with the
    cycle collection of `release_free_memory`): 357 MB with glibc's adaptive threshold, 175 MB with
    16 MiB. The threshold is not lower because every block above it is mapped and faulted in afresh:
    at 8 MiB, `benchmarks/serve_load.py`'s mixed workload (32 clients, batched) ran 8% slower. Whether
    it was set.
    """
    mallopt = getattr(_libc(), "mallopt", None)
    return mallopt is not None and bool(mallopt(M_MMAP_THRESHOLD, threshold))


def decoded_pixels(media: Sequence[object]) -> int:
    """The pixels the media of one planned item hold while they load: a source image's full size (it is
    decoded whole, then resized); a video's sampled frames at their target size plus one source frame.
    """
    total = 0
    for m in media:
        image, plan = getattr(m, "image", None), getattr(m, "plan", None)
        if image is not None:  # an image: its header's size
            total += int(image.width) * int(image.height)
        elif plan is not None:
            frames = getattr(m, "images", None)  # a frame list: every frame is an image source
            source = (max(int(f.width) * int(f.height) for f in frames) if frames else
                      int(getattr(m, "src_width", 0)) * int(getattr(m, "src_height", 0)))
            total += source + int(plan.num_frames) * int(plan.height) * int(plan.width)
    return total
