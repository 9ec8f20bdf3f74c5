"""`RuntimeOptions`: everything an `Embedder` or `Reranker` can be constructed with, declared once.

The first seven fields are the published wrapper's constructor arguments (and may be given
positionally, in that order: `Embedder(bundle, 8192, 4096)`); the rest are q3vl's own (batching,
limits, the backend, the media policy). `Embedder(bundle, max_pixels=..., batch_size=...)` maps its
keyword arguments onto these fields; `Embedder(bundle, options=RuntimeOptions(...))` takes them whole,
and so do `EmbedBatch`, `RerankBatch` and `embed_corpus`. The command-line flags of `embed`, `rerank`,
`parity`, `index build`, `bench`, `serve` and `embed-dataset` are made from these fields
(`q3vl.options.add_flags`). Fields marked `numbers` change the vectors and scores: a resumed
`embed-dataset` job must repeat them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from q3vl.options import check_fields, of, opt
from q3vl.preprocess import TRUNCATION_MODES
from q3vl.preprocess.items import VIDEO_BUDGETS
from q3vl.preprocess.media import MediaPolicy

BACKEND_NAMES = ("cpu", "cuda", "tensorrt-ep", "tensorrt")
PREPROCESSING, BATCHING, LIMITS, BACKEND = "preprocessing", "batching", "limits", "backend"


@dataclass(frozen=True)
class RuntimeOptions:
    """How a bundle is run (see the module docstring); checked at construction (`ConfigError`)."""

    max_length: int | None = opt(None, "tokens per item, vision included (default: the task's: 8192 embedding, "
                                       "10240 reranker)", numbers=True, low=1, group=PREPROCESSING)
    min_pixels: int = opt(4096, "smallest image area in pixels (the wrapper's min_pixels)", numbers=True, low=1,
                          group=PREPROCESSING)
    max_pixels: int = opt(1_843_200, "largest image area in pixels (the wrapper's max_pixels)", numbers=True,
                          low=1, group=PREPROCESSING)
    total_pixels: int = opt(7_864_320, "pixel budget of a frame-list video (the wrapper's total_pixels)",
                            numbers=True, low=1, group=PREPROCESSING)
    fps: float = opt(1.0, "video sampling rate (the wrapper's fps)", numbers=True, above=0, group=PREPROCESSING)
    max_frames: int = opt(64, "frames sampled from a video at most (the wrapper's max_frames)", numbers=True, low=2,
                          group=PREPROCESSING)
    default_instruction: str | None = opt(None, "instruction of items without one (default: the task's)",
                                          numbers=True, group=PREPROCESSING)
    truncation: str = opt("text", "text: shorten user text so the template tail and every vision block survive; "
                                  "reference: cut on the right like the wrapper", numbers=True,
                          choices=TRUNCATION_MODES, group=PREPROCESSING)
    video_budget: str = opt("off", "off: a video file whose prompt exceeds max_length is refused (the wrapper's "
                                   "behaviour); fit: it gets smaller frames, then fewer, until it fits (an item's "
                                   "own video_budget key overrides it)", numbers=True, choices=VIDEO_BUDGETS,
                            group=PREPROCESSING)
    max_text_chars: int = opt(1 << 20, "characters of text per item, checked before tokenizing (a longer item "
                                       "is refused)", numbers=True, low=1, group=LIMITS)
    max_parts: int = opt(16384, "text, image and video elements per item (more is refused)", numbers=True, low=1,
                         group=LIMITS)
    timeout: float = opt(10.0, "seconds to fetch and decode one media item", above=0, group=LIMITS)
    backend: str | None = opt(None, "cpu | cuda | tensorrt-ep | tensorrt (default: cpu; embed-dataset: cuda "
                                    "when its workers have GPUs)", choices=BACKEND_NAMES, group=BACKEND)
    backend_options: Any = opt(None, "the backend's typed options (a dict or its options object)", cli=False)
    verify: str = opt("size", "bundle files checked at load: size, or full (hash the weights too)",
                      choices=("size", "full"), group=BACKEND)
    allow_unverified: bool = opt(False, "load a bundle whose export-time parity check failed", group=BACKEND)
    batch_size: int = opt(8, "items per model micro-batch", low=1, group=BATCHING)
    max_batch_tokens: int = opt(16384, "padded tokens per micro-batch", low=1, group=BATCHING)
    max_vision_patches: int = opt(8192, "image patches per vision-graph call", low=1, group=BATCHING)
    prefetch: bool = opt(True, "decode the next micro-batch's media while the current one runs",
                         flag="--no-prefetch", group=BATCHING)
    loader_threads: int | None = opt(None, "media decoding threads (default 1: one source image decoded at a "
                                           "time, so peak memory stays one source's)", low=1, group=BATCHING)
    media_policy: MediaPolicy | None = opt(None, "what media may be read, and the per-item and per-call limits "
                                                 "(default MediaPolicy(): local files, data: URIs, public http(s))",
                                           cli=False)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.min_pixels > self.max_pixels:
            from q3vl.errors import ConfigError

            raise ConfigError(f"need min_pixels <= max_pixels, not {self.min_pixels} > {self.max_pixels}")
        if self.media_policy is not None and not isinstance(self.media_policy, MediaPolicy):
            from q3vl.errors import ConfigError

            raise ConfigError(f"media_policy must be a MediaPolicy, not {type(self.media_policy).__name__}")

    @classmethod
    def of(cls, positional: Sequence[Any] = (), keywords: Mapping[str, Any] | None = None,
           options: RuntimeOptions | None = None, where: str = "RuntimeOptions") -> RuntimeOptions:
        """From a model constructor's arguments: the wrapper's positional ones (in field order), keyword
        arguments (each a field; an unknown one raises naming the allowed ones), on top of `options`.
        """
        wrapper = [f.name for f in fields(cls)][:WRAPPER_ARGS]
        if len(positional) > len(wrapper):
            raise TypeError(f"{where} takes at most {len(wrapper)} positional options ({', '.join(wrapper)}), "
                            f"not {len(positional)}")
        given = dict(zip(wrapper, positional))
        twice = sorted(set(given) & set(keywords or {}))
        if twice:
            raise TypeError(f"{where} got {twice} both positionally and as keywords")
        return of(cls, {**given, **(keywords or {})}, where, options or cls())


WRAPPER_ARGS = 7  # max_length .. default_instruction: the published wrapper's constructor, in its order

__all__ = ["BACKEND_NAMES", "RuntimeOptions"]
