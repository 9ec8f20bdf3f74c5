"""Real-length videos through every front end (issue 27's acceptance; heavy: `-m slow`, `-m ray`).

A 2-minute 1280x720 30 fps H.264 file (3,600 frames; encoded here, about a minute on 2 cores) is
refused with the wrapper's defaults (64 frames of 1152x640: ~23,000 tokens > 8192) with advice that
names max_frames and video_budget, and with `video_budget="fit"` embeds to the same vector through
`Embedder`, `q3vl embed`, `q3vl serve` and `q3vl embed-dataset`. A 30-minute file (the 2-minute
stream repeated by copying packets: 54,000 frames, ~300 MB) goes through `q3vl serve` with its
default limits within the media deadline, and the server's peak RSS is read from /proc.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from q3vl.errors import InputError
from q3vl.runtime import Embedder
from q3vl.testing.videos import repeat_video, write_long_video
from tests.serve_server import Server, request

ITEM = {"video": "v120.mp4", "video_budget": "fit"}
MEDIA_DEADLINE = 30.0  # q3vl serve's default --media-deadline


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("long-video")
    made = write_long_video(d / "v120.mp4", 120, 1280, 720, 30)
    sys.stdout.write(f"\n2-minute 720p file: {made}\n")
    return d


@pytest.fixture(scope="module")
def reference(tiny_embedding_bundle, videos) -> tuple[np.ndarray, int]:
    """The `Embedder` vector and token count of the budgeted 2-minute item."""
    with Embedder(tiny_embedding_bundle) as e:
        with pytest.raises(InputError) as refusal:
            e.process([{"video": str(videos / "v120.mp4")}])
        message = str(refusal.value)
        assert "max_length is 8192" in message and "max_frames" in message and "video_budget='fit'" in message
        assert "max_pixels" not in message and "total_pixels" not in message
        details = e.process_details([{**ITEM, "video": str(videos / "v120.mp4")}])
    assert details.tokens[0] <= 8192 and np.isfinite(details.values).all()
    return details.values, int(details.tokens[0])


def q3vl(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "q3vl", *args], capture_output=True, text=True, timeout=timeout)


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.mark.slow
def test_two_minute_720p_same_vector_from_embedder_cli_and_server(tiny_embedding_bundle, videos, reference,
                                                                  tmp_path):
    want, tokens = reference
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"id": "v", **ITEM, "video": str(videos / "v120.mp4")}) + "\n")
    run = q3vl("embed", str(tiny_embedding_bundle), str(items), "-o", str(tmp_path / "out.npy"), "--no-progress")
    assert run.returncode == 0, run.stderr
    assert np.abs(np.load(tmp_path / "out.npy") - want).max() <= 1e-5

    server = Server(["--embedding", str(tiny_embedding_bundle), "--media-root", str(videos)], tmp_path)
    try:
        server.wait_ready()
        part = {"role": "user", "content": [{"type": "video_url", "video_url": {"url": "v120.mp4"}}]}
        status, _, refused = request(server.base, "POST", "/v1/embeddings", {"messages": [part]})
        assert status == 400 and "video_budget='fit'" in json.dumps(refused), refused
        status, _, res = request(server.base, "POST", "/v1/embeddings", {"messages": [part], "video_budget": "fit"})
        assert status == 200, res
        assert np.abs(np.asarray([res["data"][0]["embedding"]]) - want).max() <= 1e-5
        assert res["usage"]["prompt_tokens"] == tokens
    finally:
        assert server.stop() == 0, server.log()


@pytest.mark.slow
def test_thirty_minute_file_through_the_server_within_the_deadline(tiny_embedding_bundle, videos, tmp_path):
    """Default serve limits (--media-root only, to name a local file): refused with the advice at once
    without the budget, embedded with it within the media deadline; the server's peak memory after the
    30-minute file is the one the 2-minute file at the same token count already reached (the peak is
    the text graph's attention over ~7,700 tokens, not the video: its cost does not follow the length)."""
    made = repeat_video(videos / "v120.mp4", videos / "v1800.mp4", 15)
    assert made["seconds"] >= 1800
    server = Server(["--embedding", str(tiny_embedding_bundle), "--media-root", str(videos)], tmp_path)

    def embed(name: str, **options: str) -> tuple[int, dict, float]:
        part = {"role": "user", "content": [{"type": "video_url", "video_url": {"url": name}}]}
        t = time.monotonic()
        status, _, body = request(server.base, "POST", "/v1/embeddings", {"messages": [part], **options})
        return status, body, time.monotonic() - t

    try:
        server.wait_ready()
        base_mb = peak_rss_mb(server.proc.pid)
        status, short, _ = embed("v120.mp4", video_budget="fit")
        assert status == 200, short
        short_mb = peak_rss_mb(server.proc.pid)
        status, refused, refused_s = embed("v1800.mp4")
        assert status == 400 and "video_budget='fit'" in json.dumps(refused), refused
        status, res, embedded_s = embed("v1800.mp4", video_budget="fit")
        assert status == 200, res
        peak = peak_rss_mb(server.proc.pid)
        sys.stdout.write(f"\n30-minute file ({made['bytes'] / 1e6:.0f} MB, {made['frames']} frames): refused in "
                         f"{refused_s:.1f} s, embedded with the budget in {embedded_s:.1f} s "
                         f"({res['usage']['prompt_tokens']} tokens); server peak RSS {peak:.0f} MB (after start-up "
                         f"{base_mb:.0f} MB, after the 2-minute file at {short['usage']['prompt_tokens']} tokens "
                         f"{short_mb:.0f} MB)\n")
        assert embedded_s < MEDIA_DEADLINE and peak <= short_mb + 128
    finally:
        assert server.stop() == 0, server.log()


@pytest.mark.ray
def test_two_minute_720p_same_vector_from_embed_dataset(tiny_embedding_bundle, videos, reference, tmp_path):
    pytest.importorskip("ray")
    from q3vl.ray.store import iter_shards

    want, tokens = reference
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"id": "v", **ITEM, "video": str(videos / "v120.mp4")}) + "\n"
                     + json.dumps({"id": "plain", "video": str(videos / "v120.mp4")}) + "\n")
    run = q3vl("embed-dataset", str(items), "-o", str(tmp_path / "out"), "--bundle", str(tiny_embedding_bundle),
               "--num-cpus", "2", "--no-progress")
    assert run.returncode == 0, run.stderr
    rows = {r["id"]: r for t in iter_shards(tmp_path / "out") for r in t.to_pylist()}
    assert np.abs(np.asarray([rows["v"]["embedding"]]) - want).max() <= 1e-5 and rows["v"]["tokens"] == tokens
    assert rows["plain"]["embedding"] is None and "video_budget='fit'" in rows["plain"]["error"]
