"""Opening video containers with PyAV so that a media file cannot make FFmpeg reach anything else.

FFmpeg given a path or URL picks a protocol and a demuxer from the bytes it finds: an HLS or DASH
playlist, a `concat` script or an image-sequence pattern then opens further files and URLs on its
own (seen: an HLS playlist made the decoder fetch from a second internal server). Here FFmpeg only
ever reads a Python file object that the media policy produced, every nested open goes through an
`io_open` callback that refuses it, and only ordinary single-file video demuxers are allowed. The
item's deadline bounds each blocking read (PyAV's interrupt callback) and the Python loops below.
Frame counts come from the header or from indexing packets (`seek.py`), never from decoding a whole stream.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from q3vl.errors import InputError
from q3vl.preprocess.media import Deadline, MediaPolicy, Source

# Single-file containers (FFmpeg demuxer names). Not here on purpose: hls, dash, concat, image2,
# tee, segment lists and other demuxers that open more inputs, raw elementary streams without timing.
VIDEO_DEMUXERS = ("mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "avi", "mpegts", "mpeg", "flv", "ogg", "asf",
                  "ivf", "gif", "nut")
DEMUX_OPTIONS = {"format_whitelist": ",".join(VIDEO_DEMUXERS), "protocol_whitelist": "", "enable_drefs": "0"}


def _refuse_nested(url: str, flags: int, options: dict[str, Any]) -> Any:
    raise InputError(f"the video refers to another file or URL ({url[:100]!r}); q3vl reads only the one "
                     "file it was given (playlists, concat lists and references are refused)")


@contextlib.contextmanager
def open_video(src: Source, deadline: Deadline, timeout: float) -> Iterator[Any]:
    """A PyAV input container over `src` that cannot open anything else; closed (file too) on exit."""
    import av

    with src.open() as f:
        left = max(0.01, min(timeout, deadline.left()))
        try:
            container = av.open(f, "r", options=dict(DEMUX_OPTIONS), timeout=(left, left), io_open=_refuse_nested)
        except InputError:
            raise
        except Exception as e:  # FFmpeg errors, OSError, ValueError: a file FFmpeg cannot read as a video
            raise InputError(f"unreadable video {src.name}: not a video container q3vl accepts (mp4/mov, "
                             f"mkv/webm, avi, mpeg-ts/ps, flv, ogg, asf, ivf, gif, nut) or corrupt "
                             f"({getattr(e, 'strerror', None) or e})") from e
        try:
            yield container
        finally:
            container.close()


def check_stream(total: int, rate: float, width: int, height: int, policy: MediaPolicy, name: str) -> None:
    """Refuse streams whose header alone is over the policy's frame, duration or frame-size limits."""
    if total > policy.max_video_frames:
        raise InputError(f"video {name} has {total} frames, over the {policy.max_video_frames}-frame limit "
                         "(MediaPolicy.max_video_frames); cut it or raise the limit")
    if rate and total / rate > policy.max_video_seconds:
        raise InputError(f"video {name} lasts {total / rate:.0f} s, over the {policy.max_video_seconds:g} s limit "
                         "(MediaPolicy.max_video_seconds); cut it or raise the limit")
    if width * height > policy.max_image_pixels:
        raise InputError(f"video {name} has {width}x{height} frames, over the {policy.max_image_pixels}-pixel "
                         "limit (MediaPolicy.max_image_pixels)")
