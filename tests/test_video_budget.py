"""`video_budget="fit"` and the advice of a too-long prompt.

- The budget's arithmetic: the plan it picks fits, is the largest the wrapper's resize can give under
  the budget, and never exceeds the wrapper's own default.
- Its output is the wrapper's (PyTorch reference + qwen-vl-utils) at the frame count and size it
  picked: same ids, pixels and positions.
- Off by default; a no-op on an item that fits; per item and per constructor alike.
- A refusal names only options that act on that item's media, and following each one works.
"""

from __future__ import annotations

import numpy as np
import pytest

from q3vl.errors import ConfigError, InputError
from q3vl.preprocess.image import smart_resize
from q3vl.preprocess.items import embed_item
from q3vl.preprocess.video import VideoFile, fit_frames, frame_bounds
from q3vl.runtime import Embedder
from tests.conftest import make_video, noise_image
from tests.test_preprocess import assert_same_as_reference, make_encoder

DEFAULT_TOTAL = 128000 * 0.9 * 32**2  # qwen-vl-utils' total_pixels for video files


@pytest.fixture(scope="module")
def clip(media_dir):
    """40 frames at 10 fps, 120x200: at fps=8 the wrapper samples 32 frames, 16 pairs of 135 tokens."""
    return str(make_video(media_dir / "budget.mp4", frames=40, width=200, height=120, fps=10))


@pytest.mark.parametrize("hw", [(720, 1280), (1080, 1920), (1920, 1080), (480, 640), (120, 200)])
@pytest.mark.parametrize("frames", [4, 30, 64, 120, 480])
@pytest.mark.parametrize("tokens", [100, 1000, 7800, 30000])
def test_fit_frames_is_the_largest_wrapper_plan_that_fits(hw, frames, tokens):
    """By hand: per-frame cap = tokens per pair x 32^2, within the wrapper's bounds for that frame count,
    through qwen-vl-utils' own smart_resize; frames drop (in pairs) only when the smallest frames overflow."""
    from qwen_vl_utils.vision_process import smart_resize as qwen_smart_resize

    n, h, w = fit_frames(*hw, frames, tokens)
    lo, hi = frame_bounds(n, DEFAULT_TOTAL)
    pairs, least = n // 2, int(lo * 1.05)
    smallest = qwen_smart_resize(*hw, 32, lo, least)
    assert n % 2 == 0 and min(4, frames) <= n <= frames
    assert (h, w) == qwen_smart_resize(*hw, 32, lo, max(least, min(hi, tokens // pairs * 1024)))
    if n < frames:  # frames were dropped: the smallest frames, and one more pair would not fit
        assert (h, w) == smallest and ((pairs + 1) * h * w // 1024 > tokens or n == min(4, frames))
    fits = pairs * (h * w // 1024) <= tokens
    assert fits or (n == min(4, frames) and (h, w) == smallest)  # only the smallest plan may overflow
    default = wrapper_size(*hw, frames)
    assert h * w <= default[0] * default[1]  # never larger than the wrapper's own plan


def wrapper_size(height: int, width: int, frames: int) -> tuple[int, int]:
    lo, hi = frame_bounds(frames, DEFAULT_TOTAL)
    return smart_resize(height, width, 32, lo, hi)


def test_budget_plan_is_the_wrappers_at_that_plan(ref_embedder, tiny_embedding, clip, monkeypatch):
    """Ids, pixels and M-RoPE positions equal the reference fed the same frame count and size (what
    qwen-vl-utils does with `max_frames` and `resized_height`/`resized_width`)."""
    import q3vl.reference._common as common

    encoder = make_encoder(tiny_embedding, max_length=1200)
    item = {"video": clip, "fps": 8, "video_budget": "fit"}
    enc = encoder.embedding(embed_item(item), "Represent the user's input.")
    video = enc.media[0]
    assert isinstance(video, VideoFile) and len(enc.ids) <= 1200
    full = VideoFile.probe(clip, 8, 64)
    assert full.tokens > 1200 and video.plan.num_frames < full.plan.num_frames  # it had to drop frames
    original = common.media_content

    def sized(*args, **kwargs):
        out = original(*args, **kwargs)
        for ele in out:
            if ele["type"] == "video":
                ele.update(resized_height=video.plan.height, resized_width=video.plan.width)
        return out

    monkeypatch.setattr(common, "media_content", sized)
    reference_item = {"video": clip, "fps": 8, "max_frames": video.plan.num_frames}
    monkeypatch.setattr(encoder, "embedding", lambda *_: enc)  # ours: the budget's plan, as computed above
    assert_same_as_reference(ref_embedder, encoder, reference_item)


@pytest.fixture(scope="module")
def short(tiny_embedding_bundle):
    with Embedder(tiny_embedding_bundle, max_length=800) as e:
        yield e


def test_budget_off_by_default_and_a_no_op_when_the_item_fits(tiny_embedding_bundle, short, clip):
    plain = short.process_details([{"video": clip, "fps": 2}])
    fit = short.process_details([{"video": clip, "fps": 2, "video_budget": "fit"}])
    assert plain.tokens.tolist() == fit.tokens.tolist() and np.array_equal(plain.values, fit.values)
    with pytest.raises(ConfigError, match="video_budget"):
        Embedder(tiny_embedding_bundle, video_budget="shrink")
    with pytest.raises(InputError, match="video_budget must be one of"):
        embed_item({"video": clip, "video_budget": True})


def test_item_key_equals_constructor_option(tiny_embedding_bundle, short, clip):
    by_item = short.process_details([{"video": clip, "fps": 8, "video_budget": "fit", "text": "a clip"}])
    with Embedder(tiny_embedding_bundle, max_length=800, video_budget="fit") as fit:
        by_constructor = fit.process_details([{"video": clip, "fps": 8, "text": "a clip"}])
        with pytest.raises(InputError):  # the item's own "off" wins over the constructor's "fit"
            fit.process([{"video": clip, "fps": 8, "video_budget": "off"}])
    assert by_item.tokens.tolist() == by_constructor.tokens.tolist() and by_item.tokens[0] <= 800
    assert np.abs(by_item.values - by_constructor.values).max() <= 1e-6


def test_refusals_name_options_that_work(short, clip, tmp_path):
    """For each kind of medium: the refusal names its options, each named option makes the item fit, and
    the options that do nothing for it (max_pixels on a video file) are not named."""
    frames = []
    for i in range(8):
        path = tmp_path / f"f{i}.png"
        noise_image(480, 640, i).save(path)
        frames.append(str(path))
    big = tmp_path / "big.png"
    noise_image(1000, 1000, 9).save(big)
    cases = [  # (item, named, not named, options that work, options that do not)
        ({"video": clip, "fps": 8}, ["max_frames", "video_budget='fit'"], ["max_pixels", "total_pixels"],
         [{"max_frames": 4}, {"fps": 2}, {"video_budget": "fit"}], [{"max_pixels": 50_000}, {"total_pixels": 100_000}]),
        ({"video": frames}, ["total_pixels"], ["max_frames or fps"],
         [{"total_pixels": 600_000}], [{"max_pixels": 50_000}, {"video_budget": "fit"}]),
        ({"image": str(big)}, ["max_pixels"], ["max_frames", "total_pixels"], [{"max_pixels": 200_000}], []),
    ]
    for item, named, not_named, working, idle in cases:
        with pytest.raises(InputError) as refusal:
            short.process([item])
        message = str(refusal.value)
        assert "too many vision tokens" in message and "raise max_length" in message
        assert all(n in message for n in named) and not any(n in message for n in not_named), message
        for extra in idle:
            with pytest.raises(InputError, match="too many vision tokens"):
                short.process([{**item, **extra}])
        assert np.isfinite(short.process([{**item, **extra} for extra in working])).all()


def test_every_front_end_reads_the_key(tmp_path):
    """Where each front end declares its item keys: CLI JSONL, the server's request fields, Ray columns
    (the Ray row id and recorded column map of a row without the key stay what they were)."""
    pytest.importorskip("pydantic")
    from pydantic import ValidationError

    from q3vl.ray.rows import ColumnMap, content_id, item_of
    from q3vl.runtime.inputs import parse_item
    from q3vl.serve.schemas import EmbeddingRequest

    assert parse_item({"video": "a.mp4", "video_budget": "fit"}, base=tmp_path).item["video_budget"] == "fit"
    assert EmbeddingRequest(input="x", video_budget="fit").options() == {"video_budget": "fit"}
    with pytest.raises(ValidationError):
        EmbeddingRequest(input="x", video_budget="shrink")
    cmap = ColumnMap()
    assert item_of({"video": "/v.mp4", "video_budget": "fit"}, cmap) == {"video": "/v.mp4", "video_budget": "fit"}
    without = {"video": "/v.mp4", "fps": 2}
    assert content_id(without, cmap) == content_id(without, ColumnMap(video_budget=None))
    assert content_id({**without, "video_budget": "fit"}, cmap) != content_id(without, cmap)
    assert "video_budget" not in cmap.as_dict() and ColumnMap(**cmap.as_dict()) == cmap


def test_reranker_request_budget_fits_query_and_document_videos(tiny_reranker_bundle, clip):
    """A rerank request's `video_budget`: the query's video files fit in half of max_length, each
    document's in what is left; without it the pair is refused with the advice."""
    from q3vl.runtime import Reranker

    request = {"query": {"video": clip, "text": "a gradient"}, "documents": [{"video": clip}, {"text": "words"}],
               "fps": 8}
    with Reranker(tiny_reranker_bundle, max_length=1200) as rr:
        with pytest.raises(InputError, match="video_budget='fit'"):
            rr.process(request)
        got = rr.process_details({**request, "video_budget": "fit"})
        plans = rr.plan({**request, "video_budget": "fit"})
    assert np.isfinite(got.values).all() and max(got.tokens) <= 1200
    query_video = plans[0].encoded.media[0]
    assert isinstance(query_video, VideoFile) and query_video.tokens <= 600
    doc_video = plans[0].encoded.media[1]
    assert doc_video.tokens <= 1200 - query_video.tokens and plans[0].tokens <= 1200  # the document got the rest
