"""Hostile media, one class per case: each, inside a batch of good items, fails only itself, quickly.

For every case: `on_error="raise"` raises that item's `InputError` (index 1, a message naming the
problem), `on_error="skip"` gives it a NaN row while the good items' rows equal a run of the good
items alone, and both calls finish within the case's time bound.
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from q3vl import Embedder, MediaPolicy, Reranker
from q3vl.preprocess.video import VideoFile
from q3vl.testing.hostile import (
    HostileServer,
    encode_video,
    endless,
    gzip_bomb,
    hls_playlist,
    lying_avi,
    png_bomb,
    png_chunk_bomb,
    serve,
)
from tests.conftest import noise_image

GOOD = [{"text": "fine"}, {"image": noise_image(64, 64)}]


class Hostile:
    """An object whose repr and str raise."""

    def __repr__(self):
        raise RuntimeError("repr bomb")

    __str__ = __repr__
LOOP2 = "127.0.0.2"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("hostile")
    (d / "bomb.png").write_bytes(png_bomb())
    (d / "ztxt.png").write_bytes(png_chunk_bomb(b"zTXt"))
    (d / "iccp.png").write_bytes(png_chunk_bomb(b"iCCP"))
    (d / "text.mp4").write_text("this is a text file, not a video\n" * 50)
    (d / "empty.png").write_bytes(b"")
    (d / "empty.mp4").write_bytes(b"")
    noise_image(64, 64).save(d / "ok.jpg")
    (d / "truncated.jpg").write_bytes((d / "ok.jpg").read_bytes()[:300])
    Image.new("L", (100_000, 1)).save(d / "line.png")
    Image.new("RGB", (3000, 3000), (10, 20, 30)).save(d / "big.png")
    (d / "clip.ts").write_bytes(encode_video(30, 200, 120, 10, fmt="mpegts"))
    (d / "clip.mkv").write_bytes(encode_video(30, 200, 120, 10, fmt="matroska"))
    (d / "clip.mp4").write_bytes(encode_video(30, 200, 120, 10))
    (d / "lying.avi").write_bytes(lying_avi(1000))
    (d / "lying-huge.avi").write_bytes(lying_avi(10**7))
    os.mkfifo(d / "fifo.png")
    os.mkfifo(d / "fifo.mp4")
    return d


@pytest.fixture(scope="module")
def models(tiny_embedding_bundle):
    cache: dict[MediaPolicy, Embedder] = {}

    def get(policy: MediaPolicy | None = None) -> Embedder:
        policy = policy or MediaPolicy()
        if policy not in cache:
            cache[policy] = Embedder(tiny_embedding_bundle, media_policy=policy)
        return cache[policy]
    return get


@pytest.fixture(scope="module")
def clean(models):
    return models().process(GOOD)


def only_that_item_fails(model, bad, clean, match: str, bound_s: float = 8.0) -> str:
    items = [GOOD[0], bad, GOOD[1]]
    t = time.monotonic()
    with pytest.raises(Exception) as err:
        model.process(items)
    from q3vl.errors import InputError

    assert isinstance(err.value, InputError), f"{type(err.value).__name__} escaped: {err.value}"
    assert err.value.index == 1 and match in str(err.value), str(err.value)
    got = model.process(items, on_error="skip")
    assert time.monotonic() - t < bound_s
    assert np.isnan(got[1]).all() and np.abs(got[[0, 2]] - clean).max() <= 1e-6
    return str(err.value)


CASES = [
    ("30000x30000 1-bit PNG (109 KB)", lambda d: {"image": str(d / "bomb.png")}, "decompression-bomb limit"),
    ("zTXt chunk bomb", lambda d: {"image": str(d / "ztxt.png")}, "unreadable or corrupt image"),
    ("iCCP chunk bomb", lambda d: {"image": str(d / "iccp.png")}, "unreadable or corrupt image"),
    ("text file as a video", lambda d: {"video": str(d / "text.mp4")}, "unreadable video"),
    ("zero-byte image", lambda d: {"image": str(d / "empty.png")}, "unreadable or corrupt image"),
    ("zero-byte video", lambda d: {"video": str(d / "empty.mp4")}, "unreadable video"),
    ("truncated JPEG", lambda d: {"image": str(d / "truncated.jpg")}, "unreadable or corrupt image"),
    ("1 x 100000 image", lambda d: {"image": str(d / "line.png")}, "aspect ratio"),
    ("FIFO as an image", lambda d: {"image": str(d / "fifo.png")}, "not a regular file"),
    ("FIFO as a video", lambda d: {"video": str(d / "fifo.mp4")}, "not a regular file"),
    ("/dev/zero as a video", lambda d: {"video": "/dev/zero"}, "not a regular file"),
    ("directory as an image", lambda d: {"image": str(d)}, "not a regular file"),
    ("header claims 1000 frames, has 10", lambda d: {"video": str(d / "lying.avi")}, "fewer decodable frames"),
    ("header claims 10^7 frames", lambda d: {"video": str(d / "lying-huge.avi")}, "216000-frame limit"),
    ("frame list with a bomb", lambda d: {"video": [str(d / "ok.jpg"), str(d / "bomb.png")]}, "decompression"),
    ("fps NaN", lambda d: {"video": str(d / "clip.mp4"), "fps": float("nan")}, "fps must be a finite number"),
    ("fps inf", lambda d: {"video": str(d / "clip.mp4"), "fps": float("inf")}, "fps must be a finite number"),
    ("fps negative", lambda d: {"video": str(d / "clip.mp4"), "fps": -2}, "fps must be a finite number"),
    ("fps bool", lambda d: {"video": str(d / "clip.mp4"), "fps": True}, "fps must be a finite number"),
    ("max_frames 2.5", lambda d: {"video": str(d / "clip.mp4"), "max_frames": 2.5}, "max_frames must be a whole"),
    ("max_frames NaN", lambda d: {"video": str(d / "clip.mp4"), "max_frames": float("nan")}, "max_frames must"),
    ("max_frames inf", lambda d: {"video": str(d / "clip.mp4"), "max_frames": float("inf")}, "max_frames must"),
    ("max_frames 1", lambda d: {"video": str(d / "clip.mp4"), "max_frames": 1}, "max_frames must be a whole"),
    ("max_frames '8'", lambda d: {"video": str(d / "clip.mp4"), "max_frames": "8"}, "max_frames must be a whole"),
    ("bad array", lambda d: {"image": np.zeros((8, 8, 4), np.uint8)}, "H x W x 3 uint8"),
    ("float array", lambda d: {"image": np.zeros((8, 8, 3), np.float32)}, "H x W x 3 uint8"),
    ("garbage bytes", lambda d: {"image": b"\x00garbage" * 10}, "unreadable or corrupt image"),
    ("fps whose repr raises", lambda d: {"video": str(d / "clip.mp4"), "fps": Hostile()}, "fps must be"),
    ("video whose repr raises", lambda d: {"video": Hostile()}, "video must be a path/URL"),
    ("image whose repr raises", lambda d: {"image": Hostile()}, "image must be a path"),
]


@pytest.mark.parametrize("name,make,match", CASES, ids=[c[0] for c in CASES])
def test_hostile_item_fails_alone(models, clean, files, name, make, match):
    only_that_item_fails(models(), make(files), clean, match)


def test_policy_limits_on_media(models, clean, files):
    cases = [
        (MediaPolicy(max_image_pixels=1_000_000), {"image": str(files / "big.png")}, "1000000-pixel limit"),
        (MediaPolicy(max_image_pixels=10_000), {"video": str(files / "clip.mp4")}, "10000-pixel limit"),
        (MediaPolicy(max_video_frames=20), {"video": str(files / "clip.mkv")}, "more than 20 frames"),
        (MediaPolicy(max_video_frames=20), {"video": str(files / "clip.mp4")}, "30 frames, over the 20-frame"),
        (MediaPolicy(max_video_seconds=1), {"video": str(files / "clip.ts")}, "over the 1 s limit"),
        (MediaPolicy(image_formats=("PNG",)), {"image": str(files / "ok.jpg")}, "accepted formats: PNG"),
    ]
    for policy, bad, match in cases:
        only_that_item_fails(models(policy), bad, clean, match)


def test_hls_playlist_cannot_reach_anything(models, clean, files, tmp_path):
    """A playlist pointing at a local segment and an internal URL: refused, and no request is made."""
    with HostileServer({"/seg.ts": serve((files / "clip.ts").read_bytes())}) as internal:
        playlist = tmp_path / "list.m3u8"
        playlist.write_bytes(hls_playlist([str(files / "clip.ts"), internal.url("/seg.ts")]))
        only_that_item_fails(models(MediaPolicy.trusted()), {"video": str(playlist)}, clean, "unreadable video")
        named_ts = tmp_path / "list.ts"  # a playlist with a video's extension: the content decides
        named_ts.write_bytes(playlist.read_bytes())
        only_that_item_fails(models(MediaPolicy.trusted()), {"video": str(named_ts)}, clean, "unreadable video")
        assert internal.hits == []


def test_hostile_servers_for_videos(models, clean, files):
    """A never-ending MPEG-TS URL ends at the byte cap or the deadline; a gzip bomb is never inflated."""
    ts = (files / "clip.ts").read_bytes()
    routes = {"/live.ts": endless(ts), "/slow-live.ts": endless(ts[:18800], 0.05), "/gz.png": gzip_bomb(64 << 20)}
    allow = {"allowed_networks": (f"{LOOP2}/32",)}
    with HostileServer(routes, host=LOOP2) as srv:
        capped = models(MediaPolicy(**allow, max_item_bytes=4 << 20))
        only_that_item_fails(capped, {"video": srv.url("/live.ts")}, clean, "larger than the byte limit")
        timed = models(MediaPolicy(**allow, deadline=1.5))  # 376 KB/s stays under the 64 MiB cap
        only_that_item_fails(timed, {"video": srv.url("/slow-live.ts")}, clean, "media deadline")
        only_that_item_fails(capped, {"image": srv.url("/gz.png")}, clean, "unreadable or corrupt image")


def test_frame_count_never_decodes_the_stream(files):
    """Containers without a frame count are counted by packets: a stream whose packets cannot be decoded
    still probes (30 frames), and the count equals the decoded count of a sound stream.
    """
    sound = VideoFile.probe(files / "clip.mkv", fps=2, max_frames=64)
    with av.open(str(files / "clip.mkv")) as c:
        assert c.streams.video[0].frames == 0 and sound.total == sum(1 for _ in c.decode(video=0)) == 30
    assert VideoFile.probe(files / "clip.ts", fps=2, max_frames=64).indices == sound.indices
    garbled = io.BytesIO()
    with av.open(str(files / "clip.mkv")) as src, av.open(garbled, "w", format="matroska") as dst:
        out = dst.add_stream_from_template(src.streams.video[0])
        for k, pkt in enumerate(src.demux(video=0)):
            if pkt.dts is None:
                continue
            bad = av.Packet(bytes(pkt) if k == 0 else b"\x00\x00\x01" + b"\xff" * pkt.size)
            bad.pts, bad.dts, bad.time_base, bad.stream = pkt.pts, pkt.dts, pkt.time_base, out
            dst.mux(bad)
    assert VideoFile.probe(garbled.getvalue(), fps=2, max_frames=64).total == 30


def test_many_frame_images_use_the_first_frame_quickly(models):
    from q3vl.testing.hostile import animated_png, many_frame_gif

    gif = many_frame_gif(10_000)
    t = time.monotonic()
    got = models().process([{"image": gif}, {"image": Image.open(io.BytesIO(gif)).convert("RGB")},
                            {"image": animated_png(300)}])
    assert time.monotonic() - t < 5 and np.array_equal(got[0], got[1]) and not np.isnan(got).any()


def test_reranker_hostile_document(tiny_reranker_bundle, files):
    rr = Reranker(tiny_reranker_bundle)
    docs = [{"text": "ok"}, {"image": str(files / "bomb.png")}, {"video": str(files / "text.mp4")}, {"text": "b"}]
    got = rr.process({"query": {"text": "q"}, "documents": docs}, on_error="skip")
    clean = rr.process({"query": {"text": "q"}, "documents": [docs[0], docs[3]]})
    assert np.isnan(got[1]) and np.isnan(got[2]) and np.allclose([got[0], got[3]], clean, atol=1e-6)
