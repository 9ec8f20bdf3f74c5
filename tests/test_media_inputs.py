"""Images as numpy arrays and encoded bytes (same pixels as the file), memory-saving paths that keep
the pixels, and files closed between planning and loading.
"""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from q3vl import Embedder
from q3vl.preprocess.encode import Encoder, PreprocessConfig
from q3vl.preprocess.image import resize_rgb, to_rgb
from q3vl.preprocess.items import embed_item
from q3vl.preprocess.prompt import ChatTemplate, TextTokenizer
from q3vl.testing.checkpoint import chat_template
from tests.conftest import noise_image


@pytest.fixture(scope="module")
def encoder(tiny_embedding) -> Encoder:
    return Encoder(TextTokenizer(tiny_embedding / "tokenizer.json"), ChatTemplate(chat_template()),
                   PreprocessConfig(max_length=8192))


def pixels(encoder: Encoder, item: dict) -> tuple[list[int], np.ndarray]:
    enc = encoder.embedding(embed_item(item), "d")
    return enc.ids.tolist(), np.concatenate([b.pixels for b in encoder.load(enc.media)])


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    img = noise_image(90, 130, 3)
    img.save(d / "a.png")
    img.save(d / "a.jpg", quality=90)
    for i in range(4):
        noise_image(50, 70, i).save(d / f"f{i}.png")
    return d


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_array_and_bytes_give_the_file_pixels(encoder, image_files, ext):
    path = image_files / f"a.{ext}"
    data = path.read_bytes()
    array = np.asarray(Image.open(path).convert("RGB"))
    uri = f"data:image/{ext};base64," + base64.b64encode(data).decode()
    ids, want = pixels(encoder, {"image": str(path)})
    for ref in (array, data, bytearray(data), memoryview(data), uri, Image.open(path)):
        got_ids, got = pixels(encoder, {"image": ref})
        assert got_ids == ids and np.array_equal(got, want)


def test_frame_lists_of_arrays_and_bytes(encoder, image_files):
    paths = [image_files / f"f{i}.png" for i in range(4)]
    ids, want = pixels(encoder, {"video": [str(p) for p in paths]})
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    for frames in (arrays, [p.read_bytes() for p in paths], [arrays[0], paths[1].read_bytes(), str(paths[2]),
                                                             Image.open(paths[3])]):
        got_ids, got = pixels(encoder, {"video": frames})
        assert got_ids == ids and np.array_equal(got, want)


def test_embeddings_equal_for_every_image_input_kind(tiny_embedding_bundle, image_files):
    emb = Embedder(tiny_embedding_bundle)
    path = image_files / "a.png"
    out = emb.process([{"image": str(path)}, {"image": np.asarray(Image.open(path))}, {"image": path.read_bytes()}])
    assert np.array_equal(out[0], out[1]) and np.array_equal(out[0], out[2])


@pytest.mark.parametrize("mode", ["L", "1", "RGB", "P", "LA", "RGBA", "I;16", "CMYK"])
@pytest.mark.parametrize("src,dst", [((97, 131), (64, 96)), ((40, 50), (160, 224)), ((333, 250), (96, 64))])
def test_lean_resize_keeps_the_pixels(mode, src, dst):
    """Grey and 1-bit images are resized as one channel, RGB without a copy: same bytes as convert + resize."""
    img = noise_image(*src, seed=sum(src)).convert(mode)
    want = np.asarray(to_rgb(img).resize(dst[::-1], Image.Resampling.BICUBIC))
    assert np.array_equal(resize_rgb(img, *dst), want)


def test_planning_holds_no_files(encoder, tmp_path):
    """1,100 planned image items hold no file descriptor between planning and loading."""
    noise_image(40, 40).save(tmp_path / "x.png")
    paths = []
    for i in range(1100):
        p = tmp_path / f"{i}.png"
        os.link(tmp_path / "x.png", p)
        paths.append(str(p))
    before = len(os.listdir("/proc/self/fd"))
    planned = [encoder.embedding(embed_item({"image": p}), "d") for p in paths]
    assert len(os.listdir("/proc/self/fd")) - before <= 2
    blocks = encoder.load(planned[-1].media)
    assert blocks and len(os.listdir("/proc/self/fd")) - before <= 2


def test_many_image_items_under_a_low_file_limit(tiny_embedding_bundle, tmp_path):
    """The full call: 1,100 image files embed in a process limited to 256 open files."""
    noise_image(32, 32).save(tmp_path / "x.png")
    for i in range(1100):
        os.link(tmp_path / "x.png", tmp_path / f"{i}.png")
    code = textwrap.dedent(f"""
        import resource, numpy as np
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
        from q3vl import Embedder
        emb = Embedder({str(tiny_embedding_bundle)!r}, batch_size=64, max_batch_tokens=65536)
        out = emb.process([{{"image": {str(tmp_path)!r} + f"/{{i}}.png"}} for i in range(1100)], on_error="skip")
        assert out.shape[0] == 1100 and not np.isnan(out).any()
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_jpeg_draft_would_change_the_pixels(image_files):
    """Why there is no decode-time JPEG downscaling: `draft` (DCT scaling) gives other pixels than a full
    decode + bicubic, even at the size draft picks itself.
    """
    big = io.BytesIO()
    noise_image(512, 768, 9).save(big, "JPEG", quality=92)
    full = Image.open(io.BytesIO(big.getvalue())).convert("RGB").resize((192, 128), Image.Resampling.BICUBIC)
    drafted = Image.open(io.BytesIO(big.getvalue()))
    drafted.draft("RGB", (192, 128))
    assert drafted.size != (768, 512)  # the decoder really scaled
    assert not np.array_equal(np.asarray(full), np.asarray(drafted.convert("RGB").resize((192, 128),
                                                                                         Image.Resampling.BICUBIC)))


def test_ffmpeg_scaling_would_change_the_pixels(tmp_path):
    """Why video frames are not scaled inside the decoder: FFmpeg's bicubic differs from torchvision's
    antialiased bicubic that the reference applies to the decoded frame.
    """
    import av

    from q3vl.preprocess.resample import resize_bicubic_aa
    from tests.hostile import encode_video

    with av.open(io.BytesIO(encode_video(2, 640, 360, 10))) as c:
        frame = next(c.decode(video=0))
        ours = resize_bicubic_aa(frame.to_ndarray(format="rgb24")[None], 192, 320)[0]
        scaled = frame.reformat(width=320, height=192, format="rgb24", interpolation="BICUBIC").to_ndarray()
    assert scaled.shape == ours.shape and not np.array_equal(scaled, ours)
