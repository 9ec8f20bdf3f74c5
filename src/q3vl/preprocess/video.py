"""Videos: files/URLs decoded with PyAV, and frame lists, sampled and sized as qwen-vl-utils 0.0.14 does.

Video files (the wrapper read them with decord; PyAV decodes the same frames, tested):
`max_frames` rounds down to even; n = duration x fps clamped to [4, max_frames] and to the frame
count, then down to even; indices `linspace(0, total - 1, n).round()`. Per-frame pixels: min
128*32^2, max max(min(768*32^2, total_pixels / n * 2), 137,625) where the wrapper passes NO
total_pixels for files, so qwen-vl-utils' default (128000 * 32^2 * 0.9) applies.

Frame lists carry the released 0.0.14 quirk: each frame first goes through the *image* path with
factor 64 (qwen-vl-utils passes the merged factor where the patch size is expected) and min 16,384 /
max 67,108,864 pixels; frames are padded to an even count by repeating the last; then the video
resize applies with the embedder's total_pixels. Timestamps assume 2 fps over indices 0..n-1, so
frame pair k renders as `<k.2 seconds>` (k + 0.25 formatted `.1f`, ties to even).

Frames are resized with torchvision's arithmetic (see `resample.py`), not PIL's, one frame at a
time as soon as it is decoded: memory holds the sampled frames at their target size, never a
full-resolution stack (FFmpeg's own scaler would be cheaper but gives different pixels).
Sources are read under the item's `MediaPolicy` (see `media.py`, `container.py`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from q3vl.errors import InputError
from q3vl.preprocess.container import check_stream, open_video
from q3vl.preprocess.image import DEFAULT_TIMEOUT, ImageSource, probe_image, release_free_memory, smart_resize
from q3vl.preprocess.media import Deadline, MediaAccess, MediaPolicy, Source, media_errors
from q3vl.preprocess.resample import resize_bicubic_aa
from q3vl.preprocess.seek import FrameIndex, build_index, decode_frames
from q3vl.preprocess.vision import Geometry

FRAME_FACTOR = 2
MIN_FRAMES = 4
# qwen-vl-utils' video bounds, in merged tokens; in pixels they scale with the image factor
# (patch x merge: 32), e.g. VIDEO_MIN_PIXELS = 128 * 32 * 32 for the published models.
VIDEO_MIN_TOKENS, VIDEO_MAX_TOKENS, DEFAULT_TOTAL_TOKENS = 128, 768, 128000 * 0.9
LIST_FPS = 2.0
FIT_ROUNDS = 6  # prompt measurements video_budget="fit" may take to find the largest plan that fits
DEFAULT_GEOMETRY = Geometry()


@dataclass(frozen=True)
class VideoPlan:
    """What a video will become, known before decoding its pixels."""

    num_frames: int  # even
    height: int
    width: int
    timestamps: tuple[float, ...]  # one per frame pair
    geometry: Geometry = DEFAULT_GEOMETRY

    @property
    def grid(self) -> tuple[int, int, int]:
        """(t, h, w) in patch units (frames per temporal patch, patch side)."""
        g = self.geometry
        return self.num_frames // g.temporal, self.height // g.patch, self.width // g.patch


def frame_bounds(num_frames: int, total_pixels: float, factor: int = 32) -> tuple[float, float]:
    """qwen-vl-utils' (min, max) pixels per frame for a clip of `num_frames` frames, image factor `factor`."""
    lo, hi = VIDEO_MIN_TOKENS * factor**2, VIDEO_MAX_TOKENS * factor**2
    return lo, max(min(hi, total_pixels / num_frames * FRAME_FACTOR), int(lo * 1.05))


def pair_times(indices: list[int], fps: float) -> tuple[float, ...]:
    """Mean time of each frame pair (the processor's timestamps)."""
    t = [i / fps for i in indices]
    return tuple((t[k] + t[k + 1]) / 2 for k in range(0, len(t), 2))


def sample_count(total: int, video_fps: float, fps: float, max_frames: int) -> int:
    """qwen-vl-utils' smart_nframes for the fps path."""
    lo = math.ceil(MIN_FRAMES / FRAME_FACTOR) * FRAME_FACTOR
    hi = math.floor(max_frames / FRAME_FACTOR) * FRAME_FACTOR
    n = min(min(max(total / video_fps * fps, lo), hi), total)
    n = math.floor(n / FRAME_FACTOR) * FRAME_FACTOR
    if not FRAME_FACTOR <= n <= total:
        raise InputError(f"video has {total} frames; at least {FRAME_FACTOR} are needed (got {n} to sample)")
    return n


def fit_frames(height: int, width: int, frames: int, tokens: int, geometry: Geometry = DEFAULT_GEOMETRY
               ) -> tuple[int, int, int]:
    """`video_budget="fit"`: (frames, h, w) for a video file planned at `frames` frames of `height` x
    `width` whose frame pairs must fit in `tokens` vision tokens (docs/reference-behaviour.md#video-budget).

    The per-frame pixel cap comes down first, through the wrapper's own `smart_resize` and bounds
    (never above its default cap, never below its 131,072-pixel floor); only when the smallest frames
    still do not fit does the frame count come down (even, at least 4 or the video's own count).
    """
    g, n = geometry, frames
    floor = min(MIN_FRAMES, frames)
    while True:
        lo, hi = frame_bounds(n, DEFAULT_TOTAL_TOKENS * g.factor**2, g.factor)
        least = int(lo * 1.05)  # the wrapper's lowest per-frame cap (frame_bounds)
        cap = max(least, min(hi, tokens // (n // g.temporal) * g.factor**2))
        h, w = smart_resize(height, width, g.factor, lo, cap)
        if n // g.temporal * (h * w // g.factor**2) <= tokens or n <= floor:
            return n, h, w
        sh, sw = smart_resize(height, width, g.factor, lo, least)
        fewer = tokens // (sh * sw // g.factor**2) * g.temporal
        n = max(floor, min(n - FRAME_FACTOR, fewer // FRAME_FACTOR * FRAME_FACTOR))


# ---------------------------------------------------------------- video files
@dataclass(frozen=True, eq=False)
class VideoFile:
    """A video file, URL, data URI or encoded bytes: probed at plan time, decoded at load time."""

    source: Source
    total: int
    video_fps: float
    src_height: int
    src_width: int
    indices: tuple[int, ...]
    plan: VideoPlan
    timeout: float = DEFAULT_TIMEOUT
    seconds: float = 60.0  # what planning left of the item's deadline
    policy: MediaPolicy = field(default_factory=MediaPolicy)
    index: FrameIndex | None = None  # built at plan time only when the header has no frame count

    @classmethod
    def probe(cls, source: Any, fps: float, max_frames: int, timeout: float = DEFAULT_TIMEOUT, *,
              access: MediaAccess | None = None, geometry: Geometry = DEFAULT_GEOMETRY) -> VideoFile:
        """Read the container's frame count, rate and size and decide the sampling (no decoding)."""
        access = access or MediaAccess.current(MediaPolicy(), timeout)
        policy, deadline = access.policy, Deadline(access.policy.deadline)
        src = access.source(source, "video", deadline)
        with media_errors(f"video {src.name}"), open_video(src, deadline, access.timeout) as container:
            if not container.streams.video:
                raise InputError(f"{src.name} has no video stream")
            stream = container.streams.video[0]
            rate, height, width = stream.average_rate, stream.codec_context.height, stream.codec_context.width
            check_stream(max(stream.frames, 0), float(rate or 0), width, height, policy, src.name)
            index = None if stream.frames > 0 else build_index(container, stream, policy, deadline, src.name)
            total = int(stream.frames) if index is None else index.packets
        if not rate or not total or not height:
            raise InputError(f"unsupported or broken video {src.name}: no frame rate, frames or size")
        check_stream(total, float(rate), width, height, policy, src.name)
        n = sample_count(total, float(rate), fps, max_frames)
        indices = tuple(int(i) for i in np.linspace(0, total - 1, n).round())
        factor = geometry.factor  # the wrapper passes no total_pixels for files: qwen-vl-utils' default applies
        h, w = smart_resize(height, width, factor, *frame_bounds(n, DEFAULT_TOTAL_TOKENS * factor**2, factor))
        plan = VideoPlan(n, h, w, pair_times(list(indices), float(rate)), geometry)
        return cls(src, total, float(rate), height, width, indices, plan, access.timeout, deadline.left(), policy,
                   index)

    @property
    def tokens(self) -> int:
        """Vision tokens of this video as planned (all frame pairs)."""
        t, h, w = self.plan.grid
        return t * h * w // self.plan.geometry.merge**2

    def fitted(self, tokens: int) -> VideoFile:
        """The video re-planned to at most `tokens` vision tokens by `fit_frames` (itself if it fits)."""
        if self.tokens <= tokens:
            return self
        g = self.plan.geometry
        n, h, w = fit_frames(self.src_height, self.src_width, self.plan.num_frames, max(tokens, 0), g)
        indices = tuple(int(i) for i in np.linspace(0, self.total - 1, n).round())
        plan = VideoPlan(n, h, w, pair_times(list(indices), self.video_fps), g)
        return dataclasses.replace(self, indices=indices, plan=plan)

    def load(self, timeout: float | None = None) -> np.ndarray:
        """Decode the sampled frames (seeking, see `seek.py`), resizing each as soon as it is decoded:
        uint8 `[n, H, W, 3]`.
        """
        deadline = Deadline(self.seconds)
        slots: dict[int, list[int]] = {}
        for k, i in enumerate(self.indices):
            slots.setdefault(i, []).append(k)
        out = np.empty((len(self.indices), self.plan.height, self.plan.width, 3), np.uint8)
        name = f"video {self.source.name}"
        limit = self.policy.max_image_pixels

        def take(i: int, frame: Any) -> None:
            if frame.width * frame.height > limit:
                raise InputError(f"{name} has a {frame.width}x{frame.height} frame, over the {limit}-pixel limit "
                                 "(MediaPolicy.max_image_pixels)")
            small = resize_bicubic_aa(frame.to_ndarray(format="rgb24")[None], self.plan.height, self.plan.width)[0]
            out[slots[i]] = small

        with media_errors(name):
            found = decode_frames(lambda: open_video(self.source, deadline, timeout or self.timeout),
                                  list(slots), self.total, take, self.policy, deadline, self.source.name, self.index)
        release_free_memory()  # decoded frames were freed one by one; hand the pages back now
        if found < len(slots):
            raise InputError(f"broken video {self.source.name}: fewer decodable frames than its header's {self.total}")
        return out


def fit_video_files(media: list[Any], measure: Callable[[list[Any]], Any], limit: int) -> list[Any]:
    """`video_budget="fit"`: `media` with its video files re-planned so that `len(measure(media))`, the
    prompt's length, fits `limit`; unchanged if it already fits (docs/reference-behaviour.md#video-budget).

    Each video file gets an equal share of the vision tokens the prompt can hold and is re-planned
    from its wrapper plan (`VideoFile.fitted`: smaller frames first, then fewer). Fewer frames also
    drop timestamps, so the prompt is measured again and the share moves up or down (a few rounds)
    to the largest that fits; if none fits, the smallest tried is returned (the caller refuses it).
    """
    videos = {k: m for k, m in enumerate(media) if isinstance(m, VideoFile)}
    over = len(measure(media)) - limit
    if not videos or over <= 0:
        return media
    share = (sum(v.tokens for v in videos.values()) - over) // len(videos)
    best, tried = None, set()
    for _ in range(FIT_ROUNDS):
        tried.add(share)
        candidate = [videos[k].fitted(share) if k in videos else m for k, m in enumerate(media)]
        length = len(measure(candidate))
        if length <= limit:
            best = candidate
        step = (limit - length) // len(videos)
        share = share + step if length <= limit else share + min(step, -1)
        if share in tried or step == 0:
            break
    return best or candidate


# ---------------------------------------------------------------- frame lists
def sample_frame_list(frames: list[Any], max_frames: int) -> list[Any]:
    """The wrapper's subsampling of long frame lists: linspace(...).astype(int)."""
    if len(frames) <= max_frames:
        return list(frames)
    return [frames[i] for i in np.linspace(0, len(frames) - 1, max_frames, dtype=int).tolist()]


@dataclass(frozen=True, eq=False)
class FrameList:
    """A video given as a list of images (any input `probe_image` accepts)."""

    images: tuple[ImageSource, ...]  # after subsampling and even padding; headers read, files closed
    frame_size: tuple[int, int]  # (h, w) after the factor-64 image step
    plan: VideoPlan
    seconds: float = 60.0  # what planning left of the video's deadline

    @classmethod
    def probe(cls, frames: list[Any], max_frames: int, total_pixels: float, timeout: float = DEFAULT_TIMEOUT, *,
              access: MediaAccess | None = None, geometry: Geometry = DEFAULT_GEOMETRY) -> FrameList:
        """Read every sampled frame's header, check they agree in size, and decide the target size."""
        if not frames:
            raise InputError("empty frame list")
        access = access or MediaAccess.current(MediaPolicy(), timeout)
        deadline = Deadline(access.policy.deadline)
        opened = [probe_image(f, access, deadline) for f in sample_frame_list(frames, max_frames)]
        quirk = 2 * geometry.factor  # the 0.0.14 frame-list quirk: the image path with twice the factor
        sizes = {smart_resize(im.height, im.width, quirk, 4 * quirk**2, 16384 * quirk**2) for im in opened}
        if len(sizes) > 1:
            raise InputError(f"frames of one video must share a size after resizing, got {sorted(sizes)}")
        if len(opened) % FRAME_FACTOR:
            opened.append(opened[-1])
        (fh, fw), n = sizes.pop(), len(opened)
        h, w = smart_resize(fh, fw, geometry.factor, *frame_bounds(n, total_pixels, geometry.factor))
        plan = VideoPlan(n, h, w, pair_times(list(range(n)), LIST_FPS), geometry)
        return cls(tuple(opened), (fh, fw), plan, deadline.left())

    def load(self) -> np.ndarray:
        """Resize each frame (PIL, factor 64) then to the clip size (torchvision arithmetic), one frame at a
        time: uint8 `[n, H, W, 3]`.
        """
        deadline = Deadline(self.seconds)
        fh, fw = self.frame_size
        out = np.empty((len(self.images), self.plan.height, self.plan.width, 3), np.uint8)
        for k, im in enumerate(self.images):
            if k and im is self.images[k - 1]:  # the even-count padding repeats the last frame
                out[k] = out[k - 1]
                continue
            frame = im.resized(fh, fw, deadline)
            out[k] = resize_bicubic_aa(frame[None], self.plan.height, self.plan.width)[0]
        release_free_memory()
        return out
