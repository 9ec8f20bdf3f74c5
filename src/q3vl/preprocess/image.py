"""Images: reading them from every source the runtime accepts, smart_resize, and patch rows.

The arithmetic is qwen-vl-utils 0.0.14 + the transformers Qwen2-VL processor
(docs/reference-behaviour.md#images), re-done in numpy and PIL: Python's `round` (ties to even) in
smart_resize, PIL's default bicubic for the resize, `(x - 127.5) / 127.5` in float32 (the processor's
fused rescale+normalise), and the processor's patch order. `pixel_values` come out bit-identical (tested).

No decode-time downscaling (`Image.draft`, `reduce`): JPEG DCT scaling and Pillow's reducing
pass give different pixels from a full decode + bicubic resize, so memory is bounded instead by
decoding one source image at a time and dropping it as soon as its resized pixels exist.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from q3vl.errors import InputError
from q3vl.preprocess.media import Deadline, MediaAccess, MediaPolicy, Source, media_errors

MAX_RATIO = 200
DEFAULT_TIMEOUT = 10.0
TRIM_PIXELS = 16_000_000  # sources this large hand their freed pages back to the OS right away


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None  # not glibc: nothing to do


def release_free_memory() -> None:
    """Return freed heap pages to the OS (glibc `malloc_trim`).

    A decoded source image is freed as soon as it is resized, but glibc keeps freed blocks, and in a
    helper thread's arena they fragment: without this, eight 12000x12000 PNGs decoded on the prefetch
    thread held 1.2 GB at the peak instead of one image's worth.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


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


@dataclass(frozen=True, eq=False)
class ImageSource:
    """An image whose size is known from its header; pixels are decoded only in `resized()`.

    Encoded sources (files, URLs, data URIs, bytes) keep no open file and no decoded pixels between
    planning and loading: a batch of thousands of images holds no file descriptors, and a source
    image's full-resolution pixels live only while its own resize runs.
    """

    name: str
    width: int
    height: int
    source: Source | None = None  # encoded input, reopened at load
    image: Any = None  # a caller's PIL image or H x W x 3 uint8 array
    formats: tuple[str, ...] | None = None
    seconds: float = 60.0  # what planning left of the item's deadline

    def resized(self, height: int, width: int, deadline: Deadline | None = None) -> np.ndarray:
        """Decode, convert to RGB and resize (PIL bicubic): uint8 `[height, width, 3]`.

        Pillow decodes in one C call that cannot be interrupted, so the deadline is checked after it;
        `max_image_pixels` is what bounds that call's time and memory.
        """
        deadline = deadline or Deadline(self.seconds)
        with media_errors(f"image {self.name}"):
            if self.source is None:
                image = Image.fromarray(self.image, "RGB") if isinstance(self.image, np.ndarray) else self.image
                return resize_rgb(image, height, width)
            with self.source.open() as f:
                image = _open_pil(f, self.formats, self.name)
                if image.size != (self.width, self.height):
                    raise InputError(f"image {self.name} changed after it was planned "
                                     f"({self.width}x{self.height} -> {image.width}x{image.height})")
                out = resize_rgb(image, height, width, self.name)
            del image
        if self.width * self.height >= TRIM_PIXELS:
            release_free_memory()
        deadline.check(f"decoding image {self.name}")
        return out


def probe_image(ref: Any, access: MediaAccess, deadline: Deadline | None = None) -> ImageSource:
    """Read an image's size (header only, file closed after) from any accepted input, under the policy.

    Accepted: a path, `file://`, `http(s)://` or `data:image/...` URI, encoded bytes, a PIL image, or
    an H x W x 3 uint8 RGB array (the same pixels as that image saved losslessly and read from a file).
    """
    policy = access.policy
    deadline = deadline or Deadline(policy.deadline)
    if isinstance(ref, Image.Image):
        return ImageSource("PIL image", *_check_size(ref.width, ref.height, "PIL image", policy), image=ref,
                           seconds=deadline.left())
    if isinstance(ref, np.ndarray):
        if ref.ndim != 3 or ref.shape[2] != 3 or ref.dtype != np.uint8:
            raise InputError(f"an image array must be H x W x 3 uint8 RGB, not {ref.dtype} of shape {ref.shape}")
        w, h = _check_size(ref.shape[1], ref.shape[0], "image array", policy)
        return ImageSource("image array", w, h, image=ref, seconds=deadline.left())
    if not isinstance(ref, (str, Path, bytes, bytearray, memoryview)):
        raise InputError(f"image must be a path, URL, data URI or PIL.Image, an H x W x 3 uint8 array or encoded "
                         f"bytes, not {type(ref).__name__}")
    src = access.source(ref, "image", deadline)
    with media_errors(f"image {src.name}"), src.open() as f:
        w, h = _open_pil(f, policy.image_formats, src.name).size
    _check_size(w, h, f"image {src.name}", policy)
    deadline.check(f"reading image {src.name}")
    return ImageSource(src.name, w, h, source=src, formats=policy.image_formats, seconds=deadline.left())


def _check_size(width: int, height: int, name: str, policy: MediaPolicy) -> tuple[int, int]:
    if width * height > policy.max_image_pixels:
        raise InputError(f"{name} is {width}x{height} = {width * height} pixels, over the {policy.max_image_pixels}"
                         "-pixel limit (a decompression bomb?); downscale it or raise MediaPolicy.max_image_pixels")
    return width, height


@functools.lru_cache(maxsize=16)
def _registered(formats: tuple[str, ...] | None) -> list[str] | None:
    """The policy's formats that this Pillow can open (Pillow raises KeyError on a name it lacks)."""
    if formats is None:
        return None
    Image.init()
    return [f for f in formats if f in Image.OPEN]


def _open_pil(fp: Any, formats: tuple[str, ...] | None, name: str) -> Image.Image:
    """`Image.open` restricted to `formats`; every failure is this image's `InputError`."""
    try:
        return Image.open(fp, formats=_registered(formats))
    except Image.DecompressionBombError as e:
        raise InputError(f"image {name} is over Pillow's decompression-bomb limit ({e}); downscale it") from e
    except UnidentifiedImageError as e:
        allowed = f" (accepted formats: {', '.join(formats)})" if formats else ""
        raise InputError(f"unreadable or corrupt image {name}: not an image Pillow can open{allowed}") from e
    except Exception as e:  # truncated headers, text-chunk bombs, plugin bugs: all "this image is bad"
        raise InputError(f"unreadable or corrupt image {name}: {type(e).__name__}: {e}") from e


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


def resize_rgb(image: Image.Image, height: int, width: int, name: str = "") -> np.ndarray:
    """RGB conversion + PIL bicubic resize to (height, width): uint8 `[H, W, 3]`.

    Same pixels as `to_rgb(image).resize(...)` with less memory: an RGB image is resized as is (no
    full-size copy), and a grey or 1-bit one is resized as one channel and converted after (its three
    channels are equal, and Pillow resizes each channel with the same arithmetic; tested). `name` goes
    into the error of an image that turns out truncated or corrupt only now, when its pixels are decoded.
    """
    try:
        if image.mode in ("1", "L"):
            grey = image.convert("L") if image.mode == "1" else image
            return np.asarray(grey.resize((width, height), Image.Resampling.BICUBIC).convert("RGB"))
        rgb = image if image.mode == "RGB" else to_rgb(image)
        return np.asarray(rgb.resize((width, height), Image.Resampling.BICUBIC))
    except (OSError, ValueError, SyntaxError) as e:
        raise InputError(f"unreadable or corrupt image{' ' + name if name else ''}: {e}") from e


def normalize(frames: np.ndarray) -> np.ndarray:
    """uint8 -> float32 `(x - 127.5) / 127.5`: the processor's fused rescale (1/255) + mean/std 0.5."""
    out = frames.astype(np.float32)
    out -= np.float32(127.5)  # in place: the same float32 operations, no full-size temporaries
    out /= np.float32(127.5)
    return out


def patch_rows(frames: np.ndarray, patch: int = 16, temporal: int = 2, merge: int = 2) -> np.ndarray:
    """uint8 frames `[T, H, W, 3]` (T a multiple of `temporal`) -> uint8 rows `[T/t * H/p * W/p, 3*t*p*p]`.

    Rows follow the processor: frame group, then 2x2 merge blocks in raster order, then the patches
    of a block; each row is (channel, time, y, x). An image is passed as two identical frames. Rows
    stay uint8 (a quarter of float32's bytes) until a vision call normalises them (`normalize`),
    which gives the same values as normalising first.
    """
    t_total, height, width, channels = frames.shape
    gt, gh, gw = t_total // temporal, height // patch, width // patch
    x = frames.reshape(gt, temporal, gh // merge, merge, patch, gw // merge, merge, patch, channels)
    x = x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)  # group, block y, block x, in-block y, x, C, t, py, px
    return np.ascontiguousarray(x).reshape(gt * gh * gw, channels * temporal * patch * patch)


def patchify(frames: np.ndarray, patch: int = 16, temporal: int = 2, merge: int = 2) -> np.ndarray:
    """`patch_rows` normalised: float32 rows, the processor's `pixel_values`."""
    return normalize(patch_rows(frames, patch, temporal, merge))
