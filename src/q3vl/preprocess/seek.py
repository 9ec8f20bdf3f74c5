"""Frame-exact sampling: decode only the frames a sampled video needs, the same frames a full decode gives.

The wrapper's sampling names frames by their position in display order (`linspace` over the frame
count). A full decode finds frame `i` by counting decoder outputs; this module finds it by time:

1. `build_index` demuxes the stream once (packets only, no decoding: a few milliseconds per thousand
   frames) and keeps every packet's presentation timestamp and keyframe flag. Frame `i` is the packet
   with the `i`-th smallest timestamp (decoders output frames in presentation order).
2. `decode_frames` seeks to the last keyframe at or before each wanted frame and decodes forward to it,
   continuing without a seek when the next wanted frame lies in the same stretch. Packets that no
   wanted frame depends on are still decoded (references), but an H.264 frame that no other frame
   references and that is not wanted is skipped by the decoder (`skip_frame`), which cannot change
   any other frame's pixels.
3. Every decoded frame is checked against the index (its timestamp, strictly increasing, not flagged
   corrupt, the wanted timestamp reached exactly). Any doubt, and any index that cannot name frames
   uniquely (missing or repeated timestamps, a packet count other than the frame count, a first frame
   that is not a keyframe), falls back to one sequential decode from the start, the behaviour before
   seeking existed; the choice and its reason are logged.

Time and memory then follow the frames kept (each costs at most one keyframe interval of decoding)
and the pixels per frame, not the length of the file; the demux pass reads the file's packets once.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from q3vl.errors import InputError
from q3vl.preprocess.media import Deadline, MediaPolicy

log = logging.getLogger(__name__)
CHECK_EVERY = 64  # packets between deadline checks while indexing
SKIP_NONREF_CODECS = ("h264",)  # codecs whose "non-reference" flag means no frame refers to it, at any layer


@dataclass(frozen=True)
class FrameIndex:
    """Presentation timestamps of a video stream's frames, in display order, and where seeking may land.

    `pts[i]` is frame `i`'s timestamp; `key_pts` the keyframes' timestamps (ascending) and `key_seek`
    the timestamp to hand the demuxer to land on each (its decoding timestamp where the container has
    one). `sequential` is None when the index names every frame uniquely, else why seeking is off.
    """

    packets: int  # packets with data: the frame count when the header has none
    pts: np.ndarray  # int64 [frames], ascending
    key_pts: np.ndarray  # int64 [keyframes], ascending
    key_seek: np.ndarray  # int64 [keyframes]
    sequential: str | None = None

    def keyframe_for(self, target: int) -> int:
        """Position in `key_pts` of the last keyframe at or before timestamp `target`."""
        return int(np.searchsorted(self.key_pts, target, side="right")) - 1


def build_index(container: Any, stream: Any, policy: MediaPolicy, deadline: Deadline, name: str) -> FrameIndex:
    """Demux `stream` once (no decoding) and index its frames; over `policy.max_video_frames` is an error."""
    pts: list[int] = []
    keys: list[tuple[int, int]] = []
    packets = 0
    for k, packet in enumerate(container.demux(stream)):
        if k % CHECK_EVERY == 0:
            deadline.check(f"indexing the frames of video {name}")
        if not packet.size:
            continue
        packets += 1
        if packets > policy.max_video_frames:
            raise InputError(f"video {name} has more than {policy.max_video_frames} frames "
                             "(MediaPolicy.max_video_frames); cut it or raise the limit")
        if packet.pts is None:
            continue
        pts.append(int(packet.pts))
        if packet.is_keyframe:
            keys.append((int(packet.pts), int(packet.pts if packet.dts is None else packet.dts)))
    keys.sort()
    index = FrameIndex(packets, np.sort(np.asarray(pts, np.int64)), np.asarray([p for p, _ in keys], np.int64),
                       np.asarray([d for _, d in keys], np.int64))
    return dataclasses.replace(index, sequential=_why_sequential(index))


def _why_sequential(index: FrameIndex) -> str | None:
    if len(index.pts) != index.packets:
        return f"{index.packets - len(index.pts)} of {index.packets} packets have no timestamp"
    if not index.packets:
        return "no frames"
    if len(np.unique(index.pts)) != index.packets:
        return "timestamps repeat"
    if not len(index.key_pts) or index.key_pts[0] != index.pts[0]:
        return "the first frame is not a keyframe"
    return None


class SeekFailed(Exception):
    """Decoding after a seek did not give the frames the index promised: decode sequentially instead."""


def decode_frames(open_container: Callable[[], Any], indices: list[int], total: int, take: Callable[[int, Any], None],
                  policy: MediaPolicy, deadline: Deadline, name: str, index: FrameIndex | None = None) -> int:
    """Call `take(i, frame)` once for each distinct wanted display index `i`, ascending; returns how many
    were found (fewer than wanted: the stream ended early).

    `open_container()` gives a fresh PyAV input container (a context manager). The stream is indexed
    (unless `index` is given) and sampled by seeking when the index names exactly `total` frames;
    otherwise, or if seeking misbehaves, by one sequential decode up to the last wanted frame.
    """
    wanted = sorted(set(indices))
    with open_container() as container:
        index = index or build_index(container, container.streams.video[0], policy, deadline, name)
        reason = index.sequential
        if reason is None and index.packets != total:
            reason = f"{index.packets} packets for {total} frames in the header"
        if reason is None:
            import av

            try:
                return _seeking(container, index, wanted, deadline, take, name)
            except SeekFailed as e:
                reason = f"seeking was unreliable: {e}"
            except av.FFmpegError as e:  # e.g. a keyframe flag that lies: the decoder lacks a reference
                reason = f"decoding after a seek failed: {e}"
    log.info("video %s: decoding sequentially (%s)", name, reason)
    with open_container() as container:
        return _sequential(container, wanted, deadline, take, name)


def _configure(stream: Any) -> None:
    """Frame-parallel decoding (FFmpeg's frame threads give the same pixels as one thread)."""
    stream.codec_context.thread_type = "AUTO"


def _sequential(container: Any, wanted: list[int], deadline: Deadline, take: Callable[[int, Any], None],
                name: str) -> int:
    """Decode from the start, counting frames, up to the last wanted one (the behaviour before seeking)."""
    stream = container.streams.video[0]
    _configure(stream)
    left, found = set(wanted), 0
    for pos, frame in enumerate(container.decode(stream)):
        deadline.check(f"decoding video {name}")
        if pos in left:
            take(pos, frame)
            found += 1
        if pos >= wanted[-1]:
            break
    return found


def _decoded(stream: Any, packets: Iterator[Any], skippable: Callable[[Any], bool]) -> Iterator[Any]:
    """Decoded frames of `packets` (the demuxer drains the decoder with an empty packet at the end)."""
    cc = stream.codec_context
    for packet in packets:
        if packet.size:
            cc.skip_frame = "NONREF" if skippable(packet) else "DEFAULT"
        yield from cc.decode(packet)


def _seeking(container: Any, index: FrameIndex, wanted: list[int], deadline: Deadline,
             take: Callable[[int, Any], None], name: str) -> int:
    """The seek path of `decode_frames`; raises `SeekFailed` when a decoded frame contradicts the index."""
    stream = container.streams.video[0]
    _configure(stream)
    targets = {int(index.pts[i]): i for i in wanted}
    can_skip = stream.codec_context.name in SKIP_NONREF_CODECS
    frames: Iterator[Any] | None = None
    last = None  # timestamp of the last frame decoded since the last seek
    seeks = decoded = 0
    for i in wanted:
        t = int(index.pts[i])
        k = index.keyframe_for(t)
        if frames is None or last is None or int(index.key_pts[k]) > last:
            frames, last = _seek(container, stream, index, k, can_skip, targets), None
            seeks += 1
        for frame in frames:
            deadline.check(f"decoding video {name}")
            decoded += 1
            p = frame.pts
            if p is None or (last is not None and p <= last) or frame.is_corrupt:
                raise SeekFailed(f"frame after {last} has timestamp {p}" + (", corrupt" if frame.is_corrupt else ""))
            if p < int(index.key_pts[k]):
                continue  # a leading frame of the keyframe we landed on (open GOP): not ours to judge
            last = p
            if p == t:
                take(i, frame)
                break
            if p > t:
                raise SeekFailed(f"frame {i} (timestamp {t}) was not produced after seeking")
        else:
            raise SeekFailed(f"the stream ended before frame {i}")
    log.debug("video %s: %d frames by seeking: %d seeks, %d of %d frames decoded", name, len(wanted), seeks,
              decoded, index.packets)
    return len(wanted)


def _seek(container: Any, stream: Any, index: FrameIndex, k: int, can_skip: bool, targets: dict[int, int]
          ) -> Iterator[Any]:
    """Land on keyframe `k` (or an earlier one) and return the frames decoded from there.

    Demuxers differ in what a seek timestamp means (MP4 and Matroska: presentation time, others:
    decoding time), so the keyframe's presentation timestamp is tried first, then its decoding one;
    a landing after the keyframe, or on a packet that is not a keyframe, is a failure.
    """
    key = int(index.key_pts[k])
    for ts in dict.fromkeys((key, int(index.key_seek[k]))):
        container.seek(ts, stream=stream, backward=True)
        stream.codec_context.flush_buffers()
        packets = container.demux(stream)
        first = next((p for p in packets if p.size), None)
        if first is not None and first.is_keyframe and first.pts is not None and int(first.pts) <= key:
            def skippable(packet: Any) -> bool:
                return can_skip and packet.pts is not None and int(packet.pts) not in targets

            return _decoded(stream, itertools.chain([first], packets), skippable)
    raise SeekFailed(f"no seek landed on or before keyframe {key}")
