"""The torch-free preprocessing against the reference (transformers + qwen-vl-utils) and by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from q3vl.errors import InputError
from q3vl.preprocess.encode import Encoder, PreprocessConfig
from q3vl.preprocess.image import smart_resize
from q3vl.preprocess.items import Content, embed_item
from q3vl.preprocess.prompt import ChatTemplate, TextTokenizer
from q3vl.preprocess.resample import resize_bicubic_aa
from q3vl.preprocess.vision import grid_inputs
from q3vl.testing.checkpoint import chat_template
from tests.conftest import make_video, noise_image


def make_encoder(ckpt, **kw) -> Encoder:
    cfg = PreprocessConfig(**{"max_length": 8192, **kw})
    return Encoder(TextTokenizer(ckpt / "tokenizer.json"), ChatTemplate(chat_template()), cfg)


@pytest.fixture(scope="module")
def encoder(tiny_embedding) -> Encoder:
    return make_encoder(tiny_embedding)


@pytest.mark.parametrize("h,w,expected", [
    (80, 208, (64, 192)),        # round half to even at both sides
    (20, 20, (64, 64)),          # below min_pixels: scale up, ceil
    (3000, 2000, (1632, 1088)),  # above max_pixels: scale down, floor
    (33, 6600, (32, 6592)),      # ratio exactly 200 is allowed
])
def test_smart_resize(h, w, expected):
    from qwen_vl_utils.vision_process import smart_resize as qwen_smart_resize

    assert smart_resize(h, w, 32, 4096, 1_843_200) == expected == qwen_smart_resize(h, w, 32, 4096, 1_843_200)


def test_smart_resize_rejects_extreme_aspect():
    with pytest.raises(InputError, match="aspect ratio 300.0 is over 200"):
        smart_resize(1, 300, 32, 4096, 1_843_200)


def pixel_values(pre) -> np.ndarray | None:
    parts = [pre[k] for k in ("pixel_values_videos", "pixel_values") if k in pre]
    return torch.cat(parts).numpy() if parts else None


def assert_same_as_reference(ref, encoder, item, exact_pixels=True):
    pre = ref.preprocess([item])
    enc = encoder.embedding(embed_item(item), "Represent the user's input.")
    assert enc.ids.tolist() == pre["input_ids"][0].tolist()
    blocks = encoder.load(enc.media)
    ours = np.concatenate([b.pixels for b in blocks]) if blocks else None
    theirs = pixel_values(pre)
    if theirs is None:
        assert ours is None
    elif exact_pixels:
        assert np.array_equal(ours, theirs)
    else:  # torchvision's shrinking path: at most one uint8 level on a handful of values
        diff = np.abs(ours - theirs)
        assert diff.max() <= 2 / 255 + 1e-6 and (diff > 0).mean() < 1e-4
    grids = {k: pre[k] for k in ("image_grid_thw", "video_grid_thw") if k in pre}
    pos, _ = ref.model.get_rope_index(pre["input_ids"], pre["mm_token_type_ids"], attention_mask=pre["attention_mask"],
                                      **grids)
    assert np.array_equal(pos[:, 0].numpy(), enc.positions)


@pytest.mark.parametrize("name,item", [
    ("text", {"text": "Multilingual 你好 мир مرحبا \n\n tabs\t!"}),
    ("instruction", {"text": "x", "instruction": "  Retrieve  "}),
    ("null", {}),
    ("empty text", {"text": ""}),
    ("square", {"image": noise_image(224, 224, 1)}),
    ("wide", {"image": noise_image(90, 700, 2)}),
    ("tiny", {"image": noise_image(12, 30, 3)}),
    ("rgba", {"image": noise_image(64, 96, 4, mode="RGBA")}),
    ("la", {"image": noise_image(64, 64, 5, mode="LA")}),
    ("palette", {"image": noise_image(70, 50, 6, mode="P")}),
    ("grayscale", {"image": noise_image(100, 40, 7, mode="L")}),
    ("two images + texts", {"image": [noise_image(64, 64, 8), noise_image(96, 32, 9)], "text": ["a", "b"]}),
    ("frame list", {"video": [noise_image(50, 70, i) for i in range(5)]}),
])
def test_matches_reference(ref_embedder, encoder, name, item):
    assert_same_as_reference(ref_embedder, encoder, item)


def test_rgba_is_composited_on_white():
    img = noise_image(8, 8, 0, mode="RGBA")
    assert img.getchannel("A").getextrema() == (255, 255)  # our fixture: opaque; make it translucent below
    arr = np.asarray(img).copy()
    arr[..., 3] = 100
    from PIL import Image

    from q3vl.preprocess.image import to_rgb

    out = np.asarray(to_rgb(Image.fromarray(arr, "RGBA"))).astype(int)
    expected = np.round(arr[..., :3].astype(float) * 100 / 255 + 255 * (1 - 100 / 255))
    assert np.abs(out - expected).max() <= 1  # composited on white


def test_video_file_matches_reference(ref_embedder, encoder, video_file):
    assert_same_as_reference(ref_embedder, encoder, {"video": str(video_file), "text": "clip"})
    assert_same_as_reference(ref_embedder, encoder, {"video": str(video_file), "fps": 3, "max_frames": 7})


def test_video_file_downscaled_matches_reference(ref_embedder, encoder, media_dir):
    big = make_video(media_dir / "big.mp4", frames=8, width=1280, height=720, fps=4)
    assert_same_as_reference(ref_embedder, encoder, {"video": str(big)}, exact_pixels=False)


def test_mixed_media_order(ref_embedder, encoder, video_file):
    item = {"video": [str(video_file), [noise_image(40, 60, i) for i in range(3)]], "image": noise_image(64, 64),
            "text": "t"}
    assert_same_as_reference(ref_embedder, encoder, item)


def test_pyav_frames_equal_decord(video_file):
    decord = pytest.importorskip("decord")
    from q3vl.preprocess.video import VideoFile

    vf = VideoFile.probe(video_file, fps=2, max_frames=64)
    vr = decord.VideoReader(str(video_file))
    assert (vf.total, vf.video_fps) == (len(vr), vr.get_avg_fps())
    import av

    with av.open(str(video_file)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    ours = np.stack([frames[i] for i in vf.indices])
    assert np.array_equal(ours, vr.get_batch(list(vf.indices)).asnumpy())


@pytest.mark.parametrize("src,dst", [((50, 70), (320, 448)), ((120, 200), (288, 480)), ((33, 47), (96, 128)),
                                     ((240, 320), (256, 320)), ((64, 64), (64, 64))])
def test_aa_resize_exact_when_enlarging(src, dst):
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as tvf

    frames = np.random.default_rng(0).integers(0, 256, (3, *src, 3), dtype=np.uint8)
    ref = tvf.resize(torch.from_numpy(frames).permute(0, 3, 1, 2), list(dst), InterpolationMode.BICUBIC,
                     antialias=True).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(resize_bicubic_aa(frames, *dst), ref)


@pytest.mark.parametrize("src,dst", [((120, 200), (96, 160)), ((720, 1280), (352, 640)), ((100, 100), (64, 64))])
def test_aa_resize_close_when_shrinking(src, dst):
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as tvf

    frames = np.random.default_rng(1).integers(0, 256, (2, *src, 3), dtype=np.uint8)
    ref = tvf.resize(torch.from_numpy(frames).permute(0, 3, 1, 2), list(dst), InterpolationMode.BICUBIC,
                     antialias=True).permute(0, 2, 3, 1).numpy()
    diff = np.abs(resize_bicubic_aa(frames, *dst).astype(int) - ref)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-4


@pytest.mark.parametrize("h,w", [(4, 4), (6, 10), (20, 8), (48, 64)])
def test_vision_host_inputs_match_transformers(h, w):
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights, get_vision_position_ids

    grid = torch.tensor([[1, h, w]])
    coords, taps, weights = grid_inputs(h, w, 2, 2304)
    assert np.array_equal(coords, get_vision_position_ids(grid, 2).numpy())
    ref_taps, ref_w = get_vision_interpolation_indices_and_weights(grid, num_grid_per_side=48, mode="bilinear",
                                                                   align_corners=True, spatial_merge_size=2)
    assert np.array_equal(taps, ref_taps.numpy())
    assert np.abs(weights - ref_w.numpy()).max() < 1e-6


def test_default_truncation_keeps_tail_and_vision(tiny_embedding):
    enc = make_encoder(tiny_embedding, max_length=60)
    item = embed_item({"text": ["first " * 30, "second " * 30], "image": noise_image(64, 64)})
    out = enc.embedding(item, "Represent the user's input.")
    assert len(out.ids) == 60
    assert out.ids[-5:].tolist() == [151645, 198, 151644, 77091, 198]
    assert int((out.ids == 151655).sum()) == 4
    text = enc.tokenizer.decode(out.ids.tolist())
    assert "first first" in text and text.count("second") < 30  # the last text is cut first


def test_reference_truncation_mirrors_wrapper(tiny_embedding, ref_embedder):
    enc = make_encoder(tiny_embedding, max_length=40, truncation="reference")
    item = {"text": "word " * 80}
    out = enc.embedding(embed_item(item), "Represent the user's input.")
    old = ref_embedder.max_length
    ref_embedder.max_length = 40
    try:
        ref_ids = ref_embedder.preprocess([item])["input_ids"][0].tolist()
    finally:
        ref_embedder.max_length = old
    assert out.ids.tolist() == ref_ids and len(ref_ids) == 40
    with pytest.raises(InputError, match="cuts a vision block"):
        enc.embedding(embed_item({"image": noise_image(320, 320), "text": "x"}), "d")


def test_vision_alone_over_budget_is_a_clear_error(tiny_embedding):
    enc = make_encoder(tiny_embedding, max_length=50)
    with pytest.raises(InputError, match="without any user text"):
        enc.embedding(embed_item({"image": noise_image(320, 320)}), "d")


def test_reranker_reference_truncation_equals_wrapper(tiny_reranker, ref_reranker):
    enc = make_encoder(tiny_reranker, max_length=60, truncation="reference")
    query, doc = {"text": "q " * 30}, {"text": "long document " * 40, "image": noise_image(64, 64)}
    out = enc.rerank_pair(Content(("q " * 30,), (), ()), Content(("long document " * 40,), (doc["image"],), ()),
                          ref_reranker.default_instruction, None, None)
    old = ref_reranker.max_length
    ref_reranker.max_length = 60
    try:
        pair = ref_reranker.tokenize_pair(ref_reranker.format_pair(query, doc, None, None, None))
    finally:
        ref_reranker.max_length = old
    assert out.ids.tolist() == pair["input_ids"]


def test_reranker_default_truncation_cuts_document_first(tiny_reranker):
    enc = make_encoder(tiny_reranker, max_length=120)
    out = enc.rerank_pair(Content(("query words " * 10,), (), ()), Content(("doc words " * 100,), (), ()),
                          "Judge.", None, None)
    text = enc.tokenizer.decode(out.ids.tolist())
    assert len(out.ids) == 120 and text.count("query words") == 10 and text.endswith("<|im_start|>assistant\n")


def test_pyav_fallback_reader_equals_decord(video_file):
    pytest.importorskip("decord")
    from qwen_vl_utils import vision_process as vp

    from q3vl.reference._pyav_reader import read_video_pyav

    ele = {"video": "file://" + str(video_file), "fps": 2, "max_frames": 64}
    ours, meta, fps = read_video_pyav(ele)
    theirs, ref_meta, ref_fps = vp._read_video_decord({**ele, "video": str(video_file)})
    assert torch.equal(ours, theirs) and fps == ref_fps
    assert meta["frames_indices"] == ref_meta["frames_indices"] and meta["fps"] == ref_meta["fps"]
