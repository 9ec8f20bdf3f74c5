"""The runtime's batch API types and its batching policy.

A call flows through four public steps (TEI's queue -> batch -> backend, with q3vl's names):

    plan(items)          -> [Plan | InputError]     cheap: validate, tokenize, read media headers
    batches(plans)       -> [[Plan, ...], ...]      length-sorted micro-batches under a token budget
    load(plans)          -> [Loaded | InputError]   decode + resize + patchify, on the model's loader pool
    run_batch(loaded)    -> {output: [B, ...]}      one micro-batch through the vision and text graphs

`process()` runs planned items through the one micro-batch loop (`runtime/run.py:run_batches`); the HTTP
server and the Ray integration hand it micro-batches from their own queues (across requests, across
dataset rows) and so need no batching code of their own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

from q3vl.errors import InputError
from q3vl.preprocess.encode import Encoded
from q3vl.preprocess.vision import VisionBlock

V = TypeVar("V")
W = TypeVar("W")


@dataclass(frozen=True)
class Plan:
    """One planned item: its token ids and M-RoPE positions are final, its media not yet decoded.

    `index` is the item's position in the list the caller planned (a reranker: the document's).
    """

    index: int
    encoded: Encoded = field(repr=False)

    @property
    def tokens(self) -> int:
        """Tokens of the item's sequence: text + vision, as the graphs see them (and usage bills them)."""
        return len(self.encoded.ids)

    @property
    def vision_tokens(self) -> int:
        """The vision part of `tokens` (merged patches of every image and video frame pair)."""
        return self.encoded.num_vision_tokens


@dataclass(frozen=True)
class Loaded:
    """A plan with its media decoded into vision blocks, ready for `run_batch`."""

    plan: Plan
    blocks: list[VisionBlock] = field(repr=False)


@dataclass(frozen=True)
class BatchPolicy:
    """How plans are grouped into micro-batches.

    Sorted by length (text + vision tokens), at most `batch_size` items and `max_batch_tokens` padded
    tokens per micro-batch, and a batch is closed early when padding would exceed `max_padding` of its
    real tokens (a 900-token video must not pad eight 40-token texts to its length).
    """

    batch_size: int = 8
    max_batch_tokens: int = 16384
    max_padding: float = 0.25

    def batches(self, plans: Sequence[Plan]) -> list[list[Plan]]:
        """Micro-batches of `plans`, each sorted by length; every plan appears exactly once."""
        order = sorted(plans, key=lambda p: p.tokens)
        out: list[list[Plan]] = []
        current: list[Plan] = []
        real = 0
        for p in order:
            n = p.tokens  # the longest so far: the list is sorted
            padded = n * (len(current) + 1)
            if current and (len(current) == self.batch_size or padded > self.max_batch_tokens
                            or padded > (1 + self.max_padding) * (real + n)):
                out.append(current)
                current, real = [], 0
            current.append(p)
            real += n
        return out + ([current] if current else [])


@dataclass
class Details(Generic[V]):
    """What one `process_details()` call produced, item by item, in the caller's order.

    `values` is what `process()` returns (embeddings float32 `[N, D]` with NaN rows for failed items,
    or a list of reranker scores with NaN for failed documents). `tokens` int64 `[N]` counts text +
    vision tokens per item (0 for an item that failed planning); `errors` maps the index of each failed
    item to its `InputError` (only filled with `on_error="skip"`: in raise mode the first one raises).
    """

    values: V
    tokens: np.ndarray
    vision_tokens: np.ndarray
    errors: dict[int, InputError]

    @staticmethod
    def of(values: W, plans: Sequence[Plan | InputError], errors: dict[int, InputError]) -> Details[W]:
        """A call's values with the token counts of the items that ran (0 for failed ones)."""
        tokens = np.zeros(len(plans), np.int64)
        vision = np.zeros(len(plans), np.int64)
        for i, p in enumerate(plans):
            if isinstance(p, Plan) and i not in errors:
                tokens[i], vision[i] = p.tokens, p.vision_tokens
        return Details(values, tokens, vision, errors)

    @property
    def total_tokens(self) -> int:
        """Tokens of every item that ran (what a server bills as usage)."""
        return int(self.tokens.sum())
