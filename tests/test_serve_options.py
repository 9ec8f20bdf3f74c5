"""Per-item preprocessing options the server forwards (fps, max_frames, min/max/total_pixels): the
runtime honours them per item exactly as the constructor's values (the oracle is `process()` on a
model constructed with those values).
"""

from __future__ import annotations

import numpy as np
import pytest

from q3vl.errors import InputError
from q3vl.runtime import Embedder, Reranker
from q3vl.testing.inputs import gradient_image, write_video

PIXELS = {"min_pixels": 8192, "max_pixels": 40_000, "total_pixels": 200_000}


@pytest.fixture(scope="module")
def default(tiny_embedding_bundle):
    with Embedder(tiny_embedding_bundle) as e:
        yield e


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("options")
    gradient_image(300, 500, seed=1).save(d / "wide.png")
    gradient_image(40, 40, seed=2).save(d / "small.png")
    write_video(d / "clip.mp4", frames=24, width=160, height=96, fps=8)
    return d


def test_item_pixel_limits_equal_constructor_values(tiny_embedding_bundle, default, media):
    items = [{"image": str(media / "wide.png")}, {"image": str(media / "small.png"), "text": "tiny"},
             {"video": [str(media / "wide.png")] * 3}, {"video": str(media / "clip.mp4")}]
    with Embedder(tiny_embedding_bundle, **PIXELS) as custom:
        want = custom.process_details(items)
    got = default.process_details([{**it, **PIXELS} for it in items])
    plain = default.process_details(items)
    assert np.abs(got.values - want.values).max() <= 1e-6
    assert got.tokens.tolist() == want.tokens.tolist()
    # the limits matter: the image items change size (the video file ignores total_pixels, as the wrapper)
    assert got.tokens[0] != plain.tokens[0] and got.tokens[1] != plain.tokens[1]
    assert got.tokens[2] != plain.tokens[2] and got.tokens[3] == plain.tokens[3]


def test_reranker_request_pixel_limits_equal_constructor_values(tiny_reranker_bundle, media):
    request = {"query": {"text": "a gradient", "image": str(media / "wide.png")},
               "documents": [{"image": str(media / "small.png")}, {"text": "words"}]}
    with Reranker(tiny_reranker_bundle) as default, Reranker(tiny_reranker_bundle, **PIXELS) as custom:
        want = custom.process_details(request)
        got = default.process_details({**request, **PIXELS})
        plain = default.process_details(request)
    assert np.abs(np.subtract(got.values, want.values)).max() <= 1e-6
    assert got.tokens.tolist() == want.tokens.tolist() != plain.tokens.tolist()


def test_fps_per_item_changes_frames_and_equals_process(tiny_embedding_bundle, default, media):
    clip = str(media / "clip.mp4")
    both = default.process_details([{"video": clip, "fps": 1}, {"video": clip, "fps": 4}])
    with Embedder(tiny_embedding_bundle, fps=4.0) as e4:
        alone = e4.process_details([{"video": clip}])
    assert both.vision_tokens[1] > both.vision_tokens[0]
    assert np.abs(both.values[1] - alone.values[0]).max() <= 1e-6


@pytest.mark.parametrize("bad", [{"max_pixels": 0}, {"min_pixels": 2.5}, {"max_pixels": True},
                                 {"min_pixels": 50_000, "max_pixels": 40_000}])
def test_bad_pixel_limits_are_the_items_error(default, bad):
    plans = default.plan([{"text": "fine"}, {"text": "x", **bad}])
    assert not isinstance(plans[0], InputError)
    assert isinstance(plans[1], InputError) and plans[1].index == 1 and "pixels" in plans[1].reason


def test_text_items_load_without_the_pool(default, media):
    """A plan without media is loaded at once (a server's text requests skip two thread switches)."""
    e = default
    plans = e.plan([{"text": "no media"}, {"image": str(media / "small.png")}])
    futures = e.submit_load(plans)
    assert futures[0].done() and futures[0].result().blocks == []
    loaded = [f.result() for f in futures]
    got = e.vectors(e.run_batch(loaded))
    want = e.process([{"text": "no media"}, {"image": str(media / "small.png")}])
    assert np.abs(got - want).max() <= 1e-6
