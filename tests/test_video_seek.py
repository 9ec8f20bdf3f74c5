"""Seek-based frame sampling gives exactly the frames of a full sequential decode, and only costs the frames kept.

The oracle is a plain PyAV decode of the whole stream, counting frames: what q3vl did before seeking
existed (tests/test_preprocess.py shows those frames equal decord's, the wrapper's reader). Clips are
tiny (64x48) and generated here with the encoders PyAV's FFmpeg ships: libx264 (H.264), libx265
(H.265, open GOPs with leading pictures), libvpx-vp9 (VP9 with hidden alt-ref frames), libsvtav1 (AV1),
plus a variable-frame-rate H.264 file and sparse keyframes (GOP 300).
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest

from q3vl.preprocess import seek
from q3vl.preprocess.media import Deadline, MediaPolicy
from q3vl.preprocess.video import VideoFile
from q3vl.testing.videos import mark_all_keyframes, write_clip

os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints its whole configuration otherwise

CASES = {
    "h264": dict(codec="libx264"),
    "h265": dict(codec="libx265"),
    "vp9": dict(codec="libvpx-vp9"),
    "av1": dict(codec="libsvtav1"),
    "h264-vfr": dict(codec="libx264", vfr=True),
    "h264-gop300": dict(codec="libx264", gop=300, frames=330),
    "h265-gop300": dict(codec="libx265", gop=300, frames=330),
}


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("seek")
    return {name: write_clip(d / name, **{"frames": 60, "gop": 12, **kw}) for name, kw in CASES.items()}


def full_decode(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def sample(path: Path, indices: list[int], total: int) -> dict[int, np.ndarray]:
    got: dict[int, np.ndarray] = {}
    n = seek.decode_frames(lambda: av.open(str(path)), indices, total,
                           lambda i, f: got.__setitem__(i, f.to_ndarray(format="rgb24")), MediaPolicy(),
                           Deadline(60), path.name)
    assert n == len(set(indices)) == len(got)
    return got


def sample_sets(total: int) -> list[list[int]]:
    rng = random.Random(total)
    step = 1 if total <= 60 else 11
    return [list(range(total)), *(sorted(rng.sample(range(total), k)) for k in (2, 3, 5, 9)),
            *([i] for i in range(0, total, step)), [total - 1], [0, total - 1]]


@pytest.mark.parametrize("case", list(CASES))
def test_seeking_equals_sequential_decode(clips, case, caplog):
    path = clips[case]
    ref = full_decode(path)
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        index = seek.build_index(c, stream, MediaPolicy(), Deadline(10), case)
        assert (stream.frames or len(ref)) == len(ref) == index.packets
    assert index.sequential is None, index.sequential
    assert len(index.key_pts) >= 2  # there is something to seek to
    if case.endswith("vfr"):
        assert len(set(np.diff(index.pts).tolist())) >= 3  # really variable frame durations
    with caplog.at_level(logging.INFO, logger="q3vl.preprocess.seek"):
        for indices in sample_sets(len(ref)):
            got = sample(path, indices, len(ref))
            bad = [i for i in indices if not np.array_equal(got[i], ref[i])]
            assert not bad, f"{case}: frames {bad} differ from the sequential decode"
    assert "sequentially" not in caplog.text  # every sample came from the seek path


@pytest.mark.parametrize("case", ["h264", "h264-vfr", "h265-gop300"])
def test_video_file_load_equals_sequential_frames(clips, case):
    """The whole VideoFile path (probe: the wrapper's sampling; load: seek + torchvision-exact resize)."""
    from q3vl.preprocess.resample import resize_bicubic_aa

    path = clips[case]
    ref = full_decode(path)
    for fps, max_frames in ((1.0, 64), (8.0, 12), (40.0, 64)):
        vf = VideoFile.probe(str(path), fps, max_frames)
        expected = resize_bicubic_aa(np.stack([ref[i] for i in vf.indices]), vf.plan.height, vf.plan.width)
        assert np.array_equal(vf.load(), expected)


def count_decoded(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count the frames the seek path pulls out of the decoder."""
    seen = {"frames": 0}
    original = seek._decoded

    def counting(stream: Any, packets: Any, skippable: Any) -> Any:
        for frame in original(stream, packets, skippable):
            seen["frames"] += 1
            yield frame

    monkeypatch.setattr(seek, "_decoded", counting)
    return seen


def test_decoding_work_follows_the_frames_kept(clips, monkeypatch):
    """The last frame of a 330-frame GOP-300 file costs its own keyframe interval, not the whole file."""
    seen = count_decoded(monkeypatch)
    path = clips["h264-gop300"]
    sample(path, [329], 330)
    assert seen["frames"] <= 30  # from the keyframe at 300 (non-reference B-frames are skipped)
    seen["frames"] = 0
    sample(path, [3, 310], 330)
    assert seen["frames"] <= 4 + 11


def test_lying_keyframe_flags_fall_back_to_sequential(clips, tmp_path, caplog):
    """Every packet flagged as a keyframe: seeking lands on frames that cannot start decoding; the result
    is still the sequential decode's, and the fallback is logged with its reason.
    """
    path = mark_all_keyframes(clips["h265"], tmp_path / "allkey.mp4")
    ref = full_decode(path)
    with caplog.at_level(logging.INFO, logger="q3vl.preprocess.seek"):
        got = sample(path, [5, 30, 47], len(ref))
    assert all(np.array_equal(got[i], ref[i]) for i in (5, 30, 47))
    assert "decoding sequentially (seeking was unreliable" in caplog.text


def index_of(pts: list[int], keys: list[int], packets: int | None = None) -> seek.FrameIndex:
    index = seek.FrameIndex(packets or len(pts), np.sort(np.asarray(pts, np.int64)), np.asarray(keys, np.int64),
                            np.asarray(keys, np.int64))
    return index.__class__(index.packets, index.pts, index.key_pts, index.key_seek, seek._why_sequential(index))


def test_indexes_that_cannot_name_frames_are_not_seeked():
    assert index_of([0, 1, 2, 3], [0, 2]).sequential is None
    assert "no timestamp" in index_of([0, 1, 2], [0], packets=4).sequential
    assert "repeat" in index_of([0, 1, 1, 3], [0]).sequential
    assert "first frame is not a keyframe" in index_of([0, 1, 2, 3], [2]).sequential


def test_video_urls_seek_in_memory_and_say_they_are_read_whole(clips):
    """A video URL is fetched whole (under the byte cap) and sampled by seeking in memory, with the same
    frames as the file; over the cap, the refusal says the whole file counts and what to send instead."""
    from q3vl.preprocess.media import MediaAccess
    from q3vl.testing.hostile import HostileServer, serve

    path = clips["h264-gop300"]
    data = path.read_bytes()
    with HostileServer({"/v.mp4": serve(data, "video/mp4")}) as srv:
        trusted = MediaAccess(MediaPolicy.trusted(), 5)
        by_url = VideoFile.probe(srv.url("/v.mp4"), 8.0, 16, access=trusted)
        assert np.array_equal(by_url.load(), VideoFile.probe(str(path), 8.0, 16).load())
        capped = MediaAccess(MediaPolicy.trusted(max_item_bytes=len(data) - 1), 5)
        with pytest.raises(Exception, match="downloaded whole before it is decoded") as refusal:
            VideoFile.probe(srv.url("/v.mp4"), 8.0, 16, access=capped)
        assert "max_item_bytes" in str(refusal.value)
