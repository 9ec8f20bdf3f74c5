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

Frames are resized with torchvision's arithmetic (see `resample.py`), not PIL's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from q3vl.errors import InputError
from q3vl.preprocess.image import open_image, resize_rgb, smart_resize
from q3vl.preprocess.resample import resize_bicubic_aa

FRAME_FACTOR = 2
MIN_FRAMES = 4
VIDEO_MIN_PIXELS = 128 * 32 * 32
VIDEO_MAX_PIXELS = 768 * 32 * 32
DEFAULT_TOTAL_PIXELS = 128000 * 32 * 32 * 0.9
LIST_FACTOR = 64  # the 0.0.14 frame-list quirk
LIST_MIN_PIXELS = 4 * LIST_FACTOR**2
LIST_MAX_PIXELS = 16384 * LIST_FACTOR**2
LIST_FPS = 2.0


@dataclass(frozen=True)
class VideoPlan:
    """What a video will become, known before decoding its pixels."""

    num_frames: int  # even
    height: int
    width: int
    timestamps: tuple[float, ...]  # one per frame pair

    @property
    def grid(self) -> tuple[int, int, int]:
        """(t, h, w) in patch units (patch 16, temporal 2)."""
        return self.num_frames // 2, self.height // 16, self.width // 16


def frame_budget(num_frames: int, total_pixels: float) -> float:
    """qwen-vl-utils' per-frame max pixels for a clip of `num_frames` frames."""
    return max(min(VIDEO_MAX_PIXELS, total_pixels / num_frames * FRAME_FACTOR), int(VIDEO_MIN_PIXELS * 1.05))


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


# ---------------------------------------------------------------- video files
def _open(source: str, timeout: float) -> Any:
    import av

    try:
        return av.open(source, timeout=timeout)
    except FileNotFoundError as e:
        raise InputError(f"video file not found: {source}") from e
    except (av.error.FFmpegError, OSError) as e:
        msg = "unreachable video URL" if source.startswith(("http://", "https://")) else "unreadable video"
        raise InputError(f"{msg} {source}: {e}") from e


@dataclass(frozen=True)
class VideoFile:
    """A video file or URL: probed at plan time, decoded at load time."""

    source: str
    total: int
    video_fps: float
    src_height: int
    src_width: int
    indices: tuple[int, ...]
    plan: VideoPlan

    @classmethod
    def probe(cls, source: str | Path, fps: float, max_frames: int, timeout: float = 10.0) -> VideoFile:
        """Read the container's frame count, rate and size and decide the sampling (no decoding)."""
        src = str(source)
        src = src[7:] if src.startswith("file://") else src
        if not src.startswith(("http://", "https://")) and not Path(src).is_file():
            raise InputError(f"video file not found: {src}")
        with _open(src, timeout) as container:
            if not container.streams.video:
                raise InputError(f"{src} has no video stream")
            stream = container.streams.video[0]
            total, rate = stream.frames, stream.average_rate
            height, width = stream.codec_context.height, stream.codec_context.width
            if total <= 0:
                total = sum(1 for _ in container.decode(stream))
        if not rate or not total or not height:
            raise InputError(f"unsupported or broken video {src}: no frame rate, frames or size")
        n = sample_count(total, float(rate), fps, max_frames)
        indices = tuple(int(i) for i in np.linspace(0, total - 1, n).round())
        h, w = smart_resize(height, width, 32, VIDEO_MIN_PIXELS, frame_budget(n, DEFAULT_TOTAL_PIXELS))
        plan = VideoPlan(n, h, w, pair_times(list(indices), float(rate)))
        return cls(src, total, float(rate), height, width, indices, plan)

    def load(self, timeout: float = 10.0) -> np.ndarray:
        """Decode the sampled frames and resize them: uint8 `[n, H, W, 3]`."""
        import av

        wanted: dict[int, int] = {}
        for k, i in enumerate(self.indices):
            wanted.setdefault(i, k)
        frames: list[np.ndarray | None] = [None] * len(self.indices)
        try:
            with _open(self.source, timeout) as container:
                for pos, frame in enumerate(container.decode(video=0)):
                    if pos in wanted:
                        arr = frame.to_ndarray(format="rgb24")
                        for k, i in enumerate(self.indices):
                            if i == pos:
                                frames[k] = arr
                    if pos >= self.indices[-1]:
                        break
        except av.error.FFmpegError as e:
            raise InputError(f"broken video {self.source}: {e}") from e
        if any(f is None for f in frames):
            raise InputError(f"broken video {self.source}: fewer decodable frames than its header's {self.total}")
        stack = np.stack(frames)  # type: ignore[arg-type]
        return resize_bicubic_aa(stack, self.plan.height, self.plan.width)


# ---------------------------------------------------------------- frame lists
def sample_frame_list(frames: list[Any], max_frames: int) -> list[Any]:
    """The wrapper's subsampling of long frame lists: linspace(...).astype(int)."""
    if len(frames) <= max_frames:
        return list(frames)
    return [frames[i] for i in np.linspace(0, len(frames) - 1, max_frames, dtype=int).tolist()]


@dataclass(frozen=True)
class FrameList:
    """A video given as a list of images (paths, URLs, data URIs or PIL images)."""

    images: tuple[Any, ...]  # opened PIL images, after subsampling and even padding
    frame_size: tuple[int, int]  # (h, w) after the factor-64 image step
    plan: VideoPlan

    @classmethod
    def probe(cls, frames: list[Any], max_frames: int, total_pixels: float, timeout: float = 10.0) -> FrameList:
        """Open every frame's header, check they agree in size, and decide the target size."""
        if not frames:
            raise InputError("empty frame list")
        opened = [open_image(f, timeout=timeout) for f in sample_frame_list(frames, max_frames)]
        sizes = {smart_resize(im.height, im.width, LIST_FACTOR, LIST_MIN_PIXELS, LIST_MAX_PIXELS) for im in opened}
        if len(sizes) > 1:
            raise InputError(f"frames of one video must share a size after resizing, got {sorted(sizes)}")
        if len(opened) % FRAME_FACTOR:
            opened.append(opened[-1])
        (fh, fw), n = sizes.pop(), len(opened)
        h, w = smart_resize(fh, fw, 32, VIDEO_MIN_PIXELS, frame_budget(n, total_pixels))
        return cls(tuple(opened), (fh, fw), VideoPlan(n, h, w, pair_times(list(range(n)), LIST_FPS)))

    def load(self) -> np.ndarray:
        """Resize each frame (PIL, factor 64) then the clip (torchvision arithmetic): uint8 `[n, H, W, 3]`."""
        fh, fw = self.frame_size
        stack = np.stack([resize_rgb(im, fh, fw) for im in self.images])
        return resize_bicubic_aa(stack, self.plan.height, self.plan.width)
