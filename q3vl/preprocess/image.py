"""Images: loading from every source the runtime accepts, smart_resize, and patchify.

The arithmetic is qwen-vl-utils 0.0.14 + the transformers Qwen2-VL processor (REFERENCE.md
section 3), re-done in numpy and PIL: Python's `round` (ties to even) in smart_resize, PIL's default
bicubic for the resize, `(x - 127.5) / 127.5` in float32 (the processor's fused rescale+normalise),
and the processor's patch order. `pixel_values` come out bit-identical (tested).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from q3vl.errors import InputError

MAX_RATIO = 200
DEFAULT_TIMEOUT = 10.0
DEFAULT_MAX_BYTES = 64 * 1024**2


def smart_resize(height: int, width: int, factor: int, min_pixels: float, max_pixels: float) -> tuple[int, int]:
    """(h, w): multiples of `factor`, area within [min, max], aspect kept (qwen-vl-utils' rule)."""
    if min(height, width) <= 0:
        raise InputError(f"image has an empty side ({width}x{height})")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_RATIO:
        raise InputError(f"aspect ratio {ratio:.1f} is over {MAX_RATIO} ({width}x{height})")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = math.floor(height / beta / factor) * factor
        w = math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    if h <= 0 or w <= 0:
        raise InputError(f"image {width}x{height} resizes to an empty grid")
    return h, w


def read_bytes(url: str, timeout: float, max_bytes: int) -> bytes:
    """Fetch an http(s) URL with a timeout and a size cap; failures are `InputError`s."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            data = resp.read(max_bytes + 1)
    except (urllib.error.URLError, TimeoutError, OSError, ValueError) as e:
        raise InputError(f"unreachable URL {url}: {e}") from e
    if len(data) > max_bytes:
        raise InputError(f"{url} is larger than the {max_bytes}-byte limit")
    return data


def open_image(source: Any, *, timeout: float = DEFAULT_TIMEOUT, max_bytes: int = DEFAULT_MAX_BYTES) -> Image.Image:
    """A PIL image from a PIL image, a path, `file://`, `http(s)://` or a `data:` URI (headers only).

    The pixels are decoded later (`to_rgb`), so planning a batch reads sizes without decoding.
    """
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, Path):
        source = str(source)
    if not isinstance(source, str):
        raise InputError(f"image must be a path, URL, data URI or PIL.Image, not {type(source).__name__}")
    if source.startswith(("http://", "https://")):
        return _decode(io.BytesIO(read_bytes(source, timeout, max_bytes)), source)
    if source.startswith("data:"):
        return _decode(io.BytesIO(_data_uri(source)), "data URI")
    path = source[7:] if source.startswith("file://") else source
    if not Path(path).is_file():
        raise InputError(f"image file not found: {path}")
    return _decode(path, path)


def _data_uri(uri: str) -> bytes:
    head, sep, payload = uri.partition(",")
    if not sep or not head.startswith("data:image") or not head.endswith(";base64"):
        raise InputError("data URI must look like data:image/<type>;base64,<payload>")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InputError(f"data URI has invalid base64: {e}") from e


def _decode(fp: Any, name: str) -> Image.Image:
    try:
        return Image.open(fp)
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"unreadable or corrupt image {name}: {e}") from e


def to_rgb(image: Image.Image) -> Image.Image:
    """RGBA is composited on white; every other mode goes through convert("RGB") (alpha dropped)."""
    try:
        if image.mode == "RGBA":
            white = Image.new("RGB", image.size, (255, 255, 255))
            white.paste(image, mask=image.split()[3])
            return white
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:
        raise InputError(f"unreadable or corrupt image: {e}") from e


def resize_rgb(image: Image.Image, height: int, width: int) -> np.ndarray:
    """RGB conversion + PIL bicubic resize to (height, width): uint8 `[H, W, 3]`."""
    rgb = to_rgb(image)
    try:
        return np.asarray(rgb.resize((width, height), Image.Resampling.BICUBIC))
    except (OSError, ValueError) as e:
        raise InputError(f"unreadable or corrupt image: {e}") from e


def normalize(frames: np.ndarray) -> np.ndarray:
    """uint8 -> float32 `(x - 127.5) / 127.5`: the processor's fused rescale (1/255) + mean/std 0.5."""
    out = frames.astype(np.float32)
    out -= np.float32(127.5)  # in place: the same float32 operations, no full-size temporaries
    out /= np.float32(127.5)
    return out


def patchify(frames: np.ndarray, patch: int = 16, temporal: int = 2, merge: int = 2) -> np.ndarray:
    """uint8 frames `[T, H, W, 3]` (T a multiple of `temporal`) -> float32 rows `[T/t * H/p * W/p, 3*t*p*p]`.

    Rows follow the processor: frame group, then 2x2 merge blocks in raster order, then the patches
    of a block; each row is (channel, time, y, x). An image is passed as two identical frames. The
    reordering runs on the uint8 pixels (a quarter of the bytes) and the per-element normalisation
    after it, which gives the same values as normalising first.
    """
    t_total, height, width, channels = frames.shape
    gt, gh, gw = t_total // temporal, height // patch, width // patch
    x = frames.reshape(gt, temporal, gh // merge, merge, patch, gw // merge, merge, patch, channels)
    x = x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)  # group, block y, block x, in-block y, x, C, t, py, px
    return normalize(np.ascontiguousarray(x).reshape(gt * gh * gw, channels * temporal * patch * patch))
