"""The user's input dicts, validated and normalised the way the published wrappers read them.

`text` and `image` are a scalar or a list; `video` is one video (a path/URL/data URI, or a list of
frames whose first element is a PIL image, an image array, encoded image bytes, an image-file path
or an image data URI) or a list of videos. An image is a path, URL, data URI, PIL image, H x W x 3
uint8 RGB array or encoded bytes. Unknown keys are rejected (a typo like "images" would otherwise
embed the item as "NULL"); `fps` must be a finite positive number and `max_frames` an integer >= 2
(JSON parsers accept NaN and Infinity, and a fractional count must not be silently rounded).
`min_pixels` / `max_pixels` / `total_pixels` on an item (or a rerank request) override the
constructor's values for that item only, so one server process can honour each request's own limits;
so does `video_budget` ("off" or "fit": fit video files into max_length, docs/reference-behaviour.md#video-budget).
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import numpy as np
from PIL import Image

from q3vl.errors import InputError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tiff", ".svg"}
BUDGET_KEY = "video_budget"
VIDEO_BUDGETS = ("off", "fit")
Pixels = tuple[tuple[str, int | str], ...]  # (name, value) of the preprocessing limits an item sets itself


@dataclass(frozen=True)
class Content:
    """One side's content: texts, images, videos (each a path/URL or a frame list), in input order."""

    texts: tuple[str, ...]
    images: tuple[Any, ...]
    videos: tuple[Any, ...]

    @property
    def empty(self) -> bool:
        return not (self.texts or self.images or self.videos)


def _check_keys(obj: Any, allowed: tuple[str, ...], what: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise InputError(f"{what} must be a dict, not {type(obj).__name__}")
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        raise InputError(f"{what} has unknown keys {unknown}; allowed: {list(allowed)}")
    return obj


IN_MEMORY = (Image.Image, np.ndarray, bytes, bytearray, memoryview)


def _is_image_ref(x: Any) -> bool:
    if isinstance(x, IN_MEMORY):
        return True
    if isinstance(x, Path):
        x = str(x)
    if not isinstance(x, str):
        return False
    if x.startswith("data:image"):
        return True
    path = urlparse(x).path if x.startswith(("http://", "https://")) else x
    return os.path.splitext(path.lower())[1] in IMAGE_EXTENSIONS


def _image_like(x: Any) -> bool:
    return isinstance(x, (str, Path, *IN_MEMORY))


def _texts(value: Any) -> tuple[str, ...]:
    items = [] if value is None else [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(t, str) for t in items):
        raise InputError(f"text must be a str or a list of str, not {type(value).__name__}")
    return tuple(items)


def _images(value: Any) -> tuple[Any, ...]:
    items = [] if value is None else value if isinstance(value, list) else [value]
    bad = [type(x).__name__ for x in items if not _image_like(x)]
    if bad:
        raise InputError(f"image must be a path, URL, data URI or PIL.Image, an H x W x 3 uint8 array or encoded "
                         f"bytes, not {bad[0]}")
    return tuple(items)


def _videos(value: Any) -> tuple[Any, ...]:
    if value is None:
        return ()
    if isinstance(value, (str, Path)):
        return (str(value),)
    if not isinstance(value, list) or not value:
        raise InputError(f"video must be a path/URL, a list of frames or a list of videos, not {_show(value)}")
    if _is_image_ref(value[0]):  # one video given as frames
        return (_frames(value),)
    videos: list[Any] = []
    for v in value:
        if isinstance(v, (str, Path)):
            videos.append(str(v))
        elif isinstance(v, list) and v:
            videos.append(_frames(v))
        else:
            raise InputError(f"each video must be a path/URL or a non-empty frame list, not {type(v).__name__}")
    return tuple(videos)


def _frames(frames: list[Any]) -> tuple[Any, ...]:
    bad = [type(f).__name__ for f in frames if not _image_like(f)]
    if bad:
        raise InputError(f"video frames must be image paths, URLs, PIL images, arrays or bytes, not {bad[0]}")
    return tuple(frames)


def content(obj: dict[str, Any]) -> Content:
    """The text/image/video content of a dict, validated."""
    return Content(_texts(obj.get("text")), _images(obj.get("image")), _videos(obj.get("video")))


def _show(value: Any) -> str:
    """A short repr for a message; a user object whose repr raises must not escape as its own error."""
    try:
        return repr(value)[:60]
    except Exception:
        return f"a {type(value).__name__}"


def _fps(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < float(value) < math.inf:
        raise InputError(f"fps must be a finite number > 0, not {_show(value)}")
    return float(value)


def _max_frames(value: Any) -> int | None:
    if value is None:
        return None
    integral = isinstance(value, numbers.Integral) or (isinstance(value, numbers.Real) and float(value).is_integer())
    if isinstance(value, bool) or not integral or int(value) < 2:
        raise InputError(f"max_frames must be a whole number >= 2 (frames are sampled in pairs), not {_show(value)}")
    return int(value)


def _instruction(value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise InputError(f"instruction must be a str, not {type(value).__name__}")
    return value


def _video_budget(value: Any) -> str | None:
    if value is not None and value not in VIDEO_BUDGETS:
        raise InputError(f"{BUDGET_KEY} must be one of {list(VIDEO_BUDGETS)}, not {_show(value)}")
    return value


def _pixel_count(name: str) -> Callable[[Any], int | None]:
    def check(value: Any) -> int | None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InputError(f"{name} must be an integer >= 1, not {_show(value)}")
        return value
    return check


@dataclass(frozen=True)
class ItemKey:
    """One key of an item, declared once for every front end (dicts, JSONL, HTTP fields, dataset columns).

    `option`: False for content (text, image, video), True for a per-item setting. `check` validates
    a value (None: not given) and returns it normalised, raising the `InputError` every front end
    shows. `kind` and `bounds` are how a typed front end declares the field (the server's request
    schema: the Python type, and pydantic `Field` bounds it refuses before any work); `help` is its
    one-line description.
    """

    name: str
    option: bool
    check: Callable[[Any], Any]
    help: str
    kind: Any = str
    bounds: dict[str, Any] = field(default_factory=dict)


MAX_OPTION_PIXELS = 1 << 28
# Every item key, in the order items are shown. Adding a key is one line here: the dict, JSONL, HTTP
# and dataset front ends all take their keys from this table.
KEYS: tuple[ItemKey, ...] = (
    ItemKey("text", False, _texts, "a string or a list of strings"),
    ItemKey("image", False, _images, "a path, URL, data URI, PIL image, H x W x 3 uint8 array or encoded bytes, "
                                     "or a list of them"),
    ItemKey("video", False, _videos, "a video file (path or URL), a list of frames (one video), or a list of "
                                     "videos"),
    ItemKey("instruction", True, _instruction, "Instruction for this item (the system prompt).", str,
            {"max_length": 4 * 1024 * 1024}),
    ItemKey("fps", True, _fps, "Video sampling rate.", float, {"gt": 0, "le": 120, "allow_inf_nan": False}),
    ItemKey("max_frames", True, _max_frames, "Most frames sampled from a video.", int, {"ge": 2, "le": 1024}),
    ItemKey("min_pixels", True, _pixel_count("min_pixels"), "Smallest image area (pixels).", int,
            {"ge": 1, "le": MAX_OPTION_PIXELS}),
    ItemKey("max_pixels", True, _pixel_count("max_pixels"), "Largest image area (pixels).", int,
            {"ge": 1, "le": MAX_OPTION_PIXELS}),
    ItemKey("total_pixels", True, _pixel_count("total_pixels"), "Pixel budget of a frame-list video.", int,
            {"ge": 1, "le": MAX_OPTION_PIXELS}),
    ItemKey(BUDGET_KEY, True, _video_budget, "'fit': a video file too long for max_length gets smaller, then fewer "
                                             "frames until it fits; 'off': refused.", Literal["off", "fit"]),
)
KEY = {k.name: k for k in KEYS}
CONTENT_KEYS = tuple(k.name for k in KEYS if not k.option)
OPTION_KEYS = tuple(k.name for k in KEYS if k.option)
PIXEL_KEYS = ("min_pixels", "max_pixels", "total_pixels")  # the options that reconfigure the encoder
EMBED_KEYS = (*CONTENT_KEYS, *OPTION_KEYS)  # an `Embedder.process` item
RERANK_KEYS = ("query", "documents", *OPTION_KEYS)  # a `Reranker.process` request: the options apply to every pair


def pixel_limits(obj: dict[str, Any]) -> Pixels:
    """The preprocessing limits an item or request sets itself: pixel limits (integers >= 1), in
    `PIXEL_KEYS` order, then its `video_budget`.
    """
    return tuple((name, obj[name]) for name in (*PIXEL_KEYS, BUDGET_KEY) if KEY[name].check(obj.get(name)) is not None)


@dataclass(frozen=True)
class EmbedItem:
    """One validated embedding input."""

    content: Content
    instruction: str | None
    fps: float | None
    max_frames: int | None
    pixels: Pixels = ()


def embed_item(obj: Any) -> EmbedItem:
    """Validate one element of `Embedder.process(inputs)`."""
    obj = _check_keys(obj, EMBED_KEYS, "input")
    return EmbedItem(content(obj), _instruction(obj.get("instruction")), _fps(obj.get("fps")),
                     _max_frames(obj.get("max_frames")), pixel_limits(obj))


@dataclass(frozen=True)
class RerankRequest:
    """A validated `Reranker.process()` request; bad documents are reported per index."""

    query: Content
    query_instruction: str | None  # from a (instruction, text) tuple
    query_is_tuple: bool  # the tuple's instruction replaces the request's (even when empty)
    query_given: bool  # a non-empty query dict (an empty one means "no query": no scores)
    documents: tuple[Any, ...]  # raw dicts: each validated with `content` when encoded
    instruction: str | None
    fps: float | None
    max_frames: int | None
    pixels: Pixels = ()


def rerank_request(obj: Any) -> RerankRequest:
    """Validate the top level of a rerank request (query, documents list, options)."""
    obj = _check_keys(obj, RERANK_KEYS, "rerank request")
    query = obj.get("query") or {}
    _check_keys(query, CONTENT_KEYS, "query")
    given = bool(query)
    text: Any = query.get("text")
    query_instruction = None
    is_tuple = isinstance(text, tuple)
    if is_tuple:
        if len(text) != 2:
            raise InputError("query text tuple must be (instruction, text)")
        query_instruction, text = text
        query = {**query, "text": text}
    documents = obj.get("documents") or []
    if not isinstance(documents, (list, tuple)):
        raise InputError(f"documents must be a list, not {type(documents).__name__}")
    instruction = obj.get("instruction")
    for name, val in (("instruction", instruction), ("query instruction", query_instruction)):
        if val is not None and not isinstance(val, str):
            raise InputError(f"{name} must be a str, not {type(val).__name__}")
    return RerankRequest(content(query), query_instruction, is_tuple, given, tuple(documents), instruction,
                         _fps(obj.get("fps")), _max_frames(obj.get("max_frames")), pixel_limits(obj))
