"""Synthetic video files for the seek tests and the video benchmark (torch-free: PyAV and numpy).

Two kinds:
- `write_clip`: a tiny clip in any codec PyAV's FFmpeg can encode (H.264, H.265, VP9, AV1), with a
  chosen keyframe interval and optionally variable frame timing, for bit-exact decoding tests;
- `write_long_video`: minutes of 720p/1080p H.264 with real motion everywhere (a pan over a texture
  built directly in yuv420p, a moving box, a noisy patch), so the decoder has real work (B-frames,
  motion, residuals) between keyframes, which is what a seek-based reader saves; `repeat_video`
  makes a long file from it by copying its packets several times, without encoding again.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# codec name -> container that carries it with per-packet timestamps and keyframe flags
CLIP_CONTAINERS = {"libx264": "mp4", "libx265": "mp4", "libvpx-vp9": "webm", "libsvtav1": "matroska"}


def _texture(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth colourful texture with some fine detail, twice as wide as the frame (for panning)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:2 * width].astype(np.float32)
    img = np.stack([128 + 90 * np.sin(xx / (37 + 13 * c) + yy / (53 - 7 * c) + c) for c in range(3)], -1)
    img += rng.normal(0, 6, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _moving_frame(tex: np.ndarray, i: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Frame `i` of a pan across `tex`, with a moving box and a small noisy patch."""
    off = (i * 3) % width
    img = np.ascontiguousarray(tex[:, off:off + width])
    bh, bw = max(2, height // 6), max(2, width // 8)
    y, x = (i * 2) % (height - bh), (i * 5) % (width - bw)
    img[y:y + bh, x:x + bw] = ((i * 7) % 256, 255 - (i * 3) % 256, 90)
    ph, pw = max(2, height // 10), max(2, width // 10)
    img[:ph, :pw] = rng.integers(0, 255, (ph, pw, 3), dtype=np.uint8)
    return img


def write_clip(path: Path, codec: str = "libx264", frames: int = 60, width: int = 64, height: int = 48,
               fps: int = 25, gop: int = 12, vfr: bool = False, bframes: bool = True) -> Path:
    """A tiny clip of distinct frames (each differs from its neighbours) in `codec`.

    `gop`: frames between keyframes. `vfr`: frame durations vary (1, 2 or 3 ticks of 1/(3*fps) s,
    irregularly), written with real per-frame timestamps, so the frame rate is not constant.
    """
    import av

    with av.open(str(path), "w", format=CLIP_CONTAINERS.get(codec)) as container:
        rate = fps * 3 if vfr else fps
        stream: Any = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = gop
        stream.options = _clip_options(codec, gop, bframes)
        rng = np.random.default_rng(7)
        tex = _texture(height, width, 3)
        pts = 0
        steps = [1, 3, 2, 1, 1, 3, 2, 2]
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(_moving_frame(tex, i * 4, height, width, rng), format="rgb24")
            frame.pts = pts
            pts += steps[i % len(steps)] if vfr else 1
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _clip_options(codec: str, gop: int, bframes: bool) -> dict[str, str]:
    """Encoder options that pin the keyframe interval (no scene-cut keyframes) and keep it quick."""
    if codec == "libx264":
        return {"preset": "veryfast", "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:"
                f"bframes={3 if bframes else 0}"}
    if codec == "libx265":
        return {"preset": "ultrafast", "x265-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:"
                f"bframes={3 if bframes else 0}:log-level=error"}
    if codec == "libvpx-vp9":
        return {"deadline": "good", "cpu-used": "8", "g": str(gop), "auto-alt-ref": "1", "lag-in-frames": "16"}
    if codec == "libsvtav1":
        return {"preset": "12", "svtav1-params": f"keyint={gop}:scd=0"}
    return {}


class _PanningYUV:
    """Frames of a slow back-and-forth pan over a wide texture, built directly in yuv420p (no colour
    conversion per frame: a 1080p frame costs a few slice copies), with a moving box and a small
    noisy patch. No jumps, so x264 places keyframes by its own interval, not at scene cuts.
    """

    def __init__(self, height: int, width: int, seed: int = 5) -> None:
        self.h, self.w = height, width
        rgb = _texture(height, width, seed).astype(np.float32)
        r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
        self.y = np.clip(0.257 * r + 0.504 * g + 0.098 * b + 16, 0, 255).astype(np.uint8)
        u = np.clip(-0.148 * r - 0.291 * g + 0.439 * b + 128, 0, 255)
        v = np.clip(0.439 * r - 0.368 * g - 0.071 * b + 128, 0, 255)
        self.u, self.v = (c[::2, ::2].astype(np.uint8) for c in (u, v))
        self.rng = np.random.default_rng(seed)

    def frame(self, i: int) -> Any:
        import av

        h, w = self.h, self.w
        span = w // 2  # pan offsets 0..w in steps of 2 pixels, then back
        off = 2 * (i % (2 * span) if i % (2 * span) < span else 2 * span - i % (2 * span))
        arr = np.empty((h * 3 // 2, w), np.uint8)
        y = arr[:h]
        y[:] = self.y[:, off:off + w]
        uv = [self.u[:, off // 2:off // 2 + w // 2], self.v[:, off // 2:off // 2 + w // 2]]
        bh, bw = max(2, h // 6) & ~1, max(2, w // 8) & ~1
        by, bx = (i * 2) % (h - bh) & ~1, (i * 6) % (w - bw) & ~1
        y[by:by + bh, bx:bx + bw] = 200 - (i % 64)
        ph, pw = max(2, h // 12) & ~1, max(2, w // 12) & ~1
        y[:ph, :pw] = self.rng.integers(16, 235, (ph, pw), dtype=np.uint8)
        for k, plane in enumerate(uv):
            plane = plane.copy()
            plane[by // 2:(by + bh) // 2, bx // 2:(bx + bw) // 2] = 90 + 70 * k
            arr[h + k * h // 4:h + (k + 1) * h // 4] = plane.reshape(h // 4, w)
        return av.VideoFrame.from_ndarray(arr, format="yuv420p")


def write_long_video(path: Path, seconds: float, width: int = 1280, height: int = 720, fps: int = 30,
                     crf: int = 23, preset: str = "veryfast") -> dict[str, Any]:
    """Encode an H.264 MP4 of `seconds` at `width` x `height`, `fps`, with x264's defaults for `preset`
    (B-frames, keyframes at most 250 frames apart); returns what was made and how long encoding took.
    """
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    source = _PanningYUV(height, width)
    total = int(seconds * fps)
    tmp = path.with_suffix(".part.mp4")
    with av.open(str(tmp), "w") as container:
        stream: Any = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": preset, "crf": str(crf)}
        for i in range(total):
            frame = source.frame(i)
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.replace(path)
    return _made(path, t0, seconds=seconds, width=width, height=height, fps=fps, frames=total, crf=crf,
                 preset=preset)


def repeat_video(src: Path, path: Path, times: int) -> dict[str, Any]:
    """`src`'s video stream `times` times in a row in one MP4, by copying packets (no re-encoding).

    x264 starts every encode with an IDR frame and closes its GOPs, so the copies join into one valid
    stream that decodes exactly like `src` repeated: a 30-minute file with the decoding cost profile of
    the 2-minute one, made in seconds instead of the half hour encoding 54,000 frames would take.
    """
    import av

    path = Path(path)
    t0 = time.perf_counter()
    tmp = path.with_suffix(".part.mp4")
    with av.open(str(src)) as inp, av.open(str(tmp), "w") as out:
        ins = inp.streams.video[0]
        outs = out.add_stream_from_template(ins)
        packets = [p for p in inp.demux(ins) if p.size]
        if any(p.pts is None or p.dts is None or not p.duration for p in packets):
            raise ValueError(f"{src}: packets without timestamps or durations cannot be repeated")
        pts = [int(p.pts) for p in packets]  # type: ignore[arg-type]
        step = max(pts) - min(pts) + int(packets[0].duration or 0)
        for r in range(times):
            for p in packets:
                q = av.Packet(bytes(p))
                q.pts, q.dts = int(p.pts) + r * step, int(p.dts) + r * step  # type: ignore[arg-type]
                q.duration, q.is_keyframe, q.time_base, q.stream = p.duration, p.is_keyframe, p.time_base, outs
                out.mux(q)
        frames = len(packets) * times
    tmp.replace(path)
    with av.open(str(path)) as check:
        st = check.streams.video[0]
        seconds = float(st.frames / (st.average_rate or 1))
    return _made(path, t0, seconds=seconds, frames=frames, repeats=times, source=str(src))


def _made(path: Path, t0: float, **facts: Any) -> dict[str, Any]:
    info = {"path": str(path), **facts, "bytes": path.stat().st_size, "make_s": round(time.perf_counter() - t0, 1)}
    log.info("wrote %s", info)
    return info


def mark_all_keyframes(src: Path, path: Path) -> Path:
    """`src` remuxed with every packet flagged as a keyframe (a container whose keyframe flags lie)."""
    import av

    with av.open(str(src)) as inp, av.open(str(path), "w", format=inp.format.name.split(",")[0]) as out:
        ins = inp.streams.video[0]
        outs = out.add_stream_from_template(ins)
        for p in inp.demux(ins):
            if p.size:
                p.is_keyframe, p.stream = True, outs
                out.mux(p)
    return path
