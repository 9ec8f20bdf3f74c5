"""The torch-free runtime: parity with the reference, batching, Matryoshka, bad input, bad bundles."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from q3vl.errors import BundleError, InputError
from q3vl.runtime import Embedder, Reranker
from q3vl.testing.inputs import default_inputs
from tests.conftest import noise_image

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def parity_items(tmp_path_factory):
    return default_inputs(tmp_path_factory.mktemp("parity"))


@pytest.fixture(scope="module")
def embedder(tiny_embedding_bundle):
    return Embedder(tiny_embedding_bundle)


def cos_rows(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_embedder_parity_on_default_set(embedder, ref_embedder, parity_items):
    items = [it for _, it in parity_items]
    got = embedder.process(items)
    ref = np.concatenate([ref_embedder.process([it]).numpy() for it in items])
    cos = cos_rows(got, ref)
    assert cos.min() >= 0.9999, {n: c for (n, _), c in zip(parity_items, cos) if c < 0.9999}
    assert got.dtype == np.float32 and got.shape == (len(items), 64)


def test_reranker_parity_on_default_set(tiny_reranker_bundle, ref_reranker, parity_items):
    docs = [{k: v for k, v in it.items() if k in ("text", "image", "video")} for _, it in parity_items]
    request = {"query": {"text": "a red box", "image": noise_image(64, 64)}, "documents": docs,
               "instruction": "Find the matching item"}
    got = Reranker(tiny_reranker_bundle).process(request)
    ref = ref_reranker.process(request)
    assert all(isinstance(s, float) for s in got)
    assert np.abs(np.array(got) - np.array(ref)).max() <= 1e-4


def test_batched_equals_unbatched(tiny_embedding_bundle, tiny_reranker_bundle, parity_items):
    items = [it for _, it in parity_items]
    one = Embedder(tiny_embedding_bundle, batch_size=1).process(items)
    many = Embedder(tiny_embedding_bundle, batch_size=16).process(items)
    assert np.abs(one - many).max() <= 1e-5
    docs = [{"text": "x"}, {"text": "longer " * 40}, {"image": noise_image(96, 64)}, {}]
    req = {"query": {"text": "q"}, "documents": docs}
    s1 = Reranker(tiny_reranker_bundle, batch_size=1).process(req)
    s4 = Reranker(tiny_reranker_bundle, batch_size=4).process(req)
    assert np.abs(np.array(s1) - np.array(s4)).max() <= 1e-5


def test_concurrent_calls_share_one_model(embedder, tiny_embedding_bundle, tiny_reranker_bundle):
    """A service calls one loaded model from many request threads: results equal sequential calls
    (host path and the IO-binding path, whose buffers are per call)."""
    from concurrent.futures import ThreadPoolExecutor

    jobs = [[{"text": f"request {k} " * (k + 1)}, {"image": noise_image(64 + 16 * k, 96, seed=k)}] for k in range(6)]
    sequential = [embedder.process(j) for j in jobs]
    bound = Embedder(tiny_embedding_bundle, backend_options={"io_binding": True})
    for model in (embedder, bound):
        with ThreadPoolExecutor(4) as pool:
            threaded = list(pool.map(model.process, jobs))
        for a, b in zip(sequential, threaded, strict=True):
            assert np.abs(a - b).max() <= 1e-6
    rr = Reranker(tiny_reranker_bundle)
    reqs = [{"query": {"text": f"q{k}"}, "documents": [{"text": "d " * k}, {"image": noise_image(64, 64, seed=k)}]}
            for k in range(6)]
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(rr.process, reqs)) == [rr.process(r) for r in reqs]


def test_memory_arena_option_same_vectors(embedder, tiny_embedding_bundle):
    """ONNX Runtime's host arena (its default: on) can be turned off, as `q3vl serve` does; the vectors match."""
    from q3vl.serve.config import ServeConfig

    items = [{"text": "alpha"}, {"image": noise_image(96, 64)}]
    assert all(s.get_session_options().enable_cpu_mem_arena for s in embedder.backend.sessions.values())
    served = ServeConfig(embedding=tiny_embedding_bundle).runtime()
    assert served.backend_options == {"memory_arena": False}
    off = Embedder(tiny_embedding_bundle, options=served)
    assert not any(s.get_session_options().enable_cpu_mem_arena for s in off.backend.sessions.values())
    assert np.abs(off.process(items) - embedder.process(items)).max() <= 1e-6


def test_matryoshka_and_unnormalized(embedder, ref_embedder):
    items = [{"text": "alpha"}, {"image": noise_image(64, 96)}]
    full = embedder.process(items)
    small = embedder.process(items, dim=16)
    expected = full[:, :16] / np.linalg.norm(full[:, :16], axis=1, keepdims=True)
    assert np.allclose(small, expected, atol=1e-6) and small.shape == (2, 16)
    raw = embedder.process(items, normalize=False)
    ref_raw = ref_embedder.process(items, normalize=False).numpy()
    assert np.allclose(raw, ref_raw, rtol=1e-4, atol=1e-4)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1)
    with pytest.raises(ValueError, match="dim must be in 1..64"):
        embedder.process(items, dim=65)


def test_order_is_restored(embedder):
    items = [{"text": "x" * n} for n in (300, 5, 80, 1)]
    batched = embedder.process(items)
    single = np.concatenate([embedder.process([it]) for it in items])
    assert np.abs(batched - single).max() <= 1e-5


# ---------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    noise_image(64, 64).save(d / "ok.jpg")
    data = (d / "ok.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (d / "notavideo.mp4").write_text("this is not a video")
    from tests.conftest import make_video

    clip = make_video(d / "clip.mp4").read_bytes()
    (d / "broken.mp4").write_bytes(clip[: len(clip) // 4])
    return d


BAD_CASES = [
    ("corrupt image", lambda d: {"image": str(d / "corrupt.png")}, "unreadable or corrupt image"),
    ("truncated image", lambda d: {"image": str(d / "truncated.jpg")}, "unreadable or corrupt image"),
    ("missing file", lambda d: {"image": str(d / "nope.png")}, "image file not found"),
    ("missing video", lambda d: {"video": str(d / "nope.mp4")}, "video file not found"),
    ("unsupported video", lambda d: {"video": str(d / "notavideo.mp4")}, "unreadable video"),
    ("broken video", lambda d: {"video": str(d / "broken.mp4")}, "video"),
    ("unreachable url", lambda d: {"image": "http://127.0.0.1:9/cat.png"}, "unreachable URL"),
    ("aspect ratio", lambda d: {"image": noise_image(2, 600)}, "aspect ratio 300.0 is over 200"),
    ("wrong text type", lambda d: {"text": 5}, "text must be a str or a list of str"),
    ("wrong image type", lambda d: {"image": 3.5}, "image must be a path, URL, data URI or PIL.Image"),
    ("not a dict", lambda d: "just a string", "input must be a dict"),
    ("unknown key", lambda d: {"images": "x.png"}, "unknown keys ['images']"),
    ("bad data uri", lambda d: {"image": "data:image/png;base64,!!!"}, "invalid base64"),
    ("lone surrogate", lambda d: {"text": "hi \ud800 there"}, "text is not valid Unicode"),
]


@pytest.mark.parametrize("name,make,message", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_input_raises_with_index(embedder, bad_files, name, make, message):
    items = [{"text": "fine"}, make(bad_files), {"text": "also fine"}]
    with pytest.raises(InputError) as err:
        embedder.process(items)
    assert err.value.index == 1 and message in str(err.value) and str(err.value).startswith("input 1: ")


@pytest.mark.parametrize("name,make,message", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_input_skip_keeps_the_rest(embedder, bad_files, name, make, message):
    good = [{"text": "fine"}, {"image": noise_image(64, 64)}]
    items = [good[0], make(bad_files), good[1]]
    got = embedder.process(items, on_error="skip")
    clean = embedder.process(good)
    assert np.isnan(got[1]).all()
    assert np.abs(got[[0, 2]] - clean).max() <= 1e-6


def test_prefetch_keeps_order_errors_and_values(tiny_embedding_bundle, bad_files):
    """Media of the next micro-batch load on a helper thread: same results, same errors, same indices."""
    items = [{"text": "a"}, {"image": str(bad_files / "ok.jpg")}, {"image": noise_image(96, 64)},
             {"image": str(bad_files / "truncated.jpg")}, {"text": "b " * 30}, {"image": noise_image(64, 128)}]
    plain = Embedder(tiny_embedding_bundle, batch_size=1, prefetch=False)
    ahead = Embedder(tiny_embedding_bundle, batch_size=1, prefetch=True)
    want = plain.process(items, on_error="skip")
    got = ahead.process(items, on_error="skip")
    assert np.isnan(got[3]).all() and np.isnan(want[3]).all()
    keep = [0, 1, 2, 4, 5]
    assert np.array_equal(got[keep], want[keep])
    with pytest.raises(InputError, match="input 3: unreadable or corrupt image"):
        ahead.process(items)


def test_reranker_bad_document_skip(tiny_reranker_bundle, bad_files):
    rr = Reranker(tiny_reranker_bundle)
    docs = [{"text": "ok"}, {"image": str(bad_files / "corrupt.png")}, {"text": "also ok"}]
    with pytest.raises(InputError, match="input 1: unreadable or corrupt image"):
        rr.process({"query": {"text": "q"}, "documents": docs})
    got = rr.process({"query": {"text": "q"}, "documents": docs}, on_error="skip")
    clean = rr.process({"query": {"text": "q"}, "documents": [docs[0], docs[2]]})
    assert np.isnan(got[1]) and np.allclose([got[0], got[2]], clean, atol=1e-6)
    assert rr.process({"query": {}, "documents": docs}) == []
    with pytest.raises(InputError, match="rerank request has unknown keys"):
        rr.process({"query": {"text": "q"}, "docs": []})


def test_empty_input(embedder):
    with pytest.raises(InputError, match="non-empty list"):
        embedder.process([])
    with pytest.raises(ValueError, match="on_error must be one of"):
        embedder.process([{"text": "x"}], on_error="ignore")


def test_file_and_data_uri_images(embedder, bad_files):
    import base64

    uri = "data:image/jpeg;base64," + base64.b64encode((bad_files / "ok.jpg").read_bytes()).decode()
    a = embedder.process([{"image": str(bad_files / "ok.jpg")}, {"image": "file://" + str(bad_files / "ok.jpg")},
                          {"image": uri}])
    assert np.abs(a - a[0]).max() == 0


# ---------------------------------------------------------------- bad bundles
def _copy(src, dst):
    import shutil

    return Path(shutil.copytree(src, dst))


def test_truncated_bundle_is_rejected_at_load(tiny_embedding_bundle, tmp_path):
    b = _copy(tiny_embedding_bundle, tmp_path / "b")
    data = (b / "text.onnx.data").read_bytes()
    (b / "text.onnx.data").write_bytes(data[:-1000])
    with pytest.raises(BundleError, match="text.onnx.data is .* bytes, the manifest says .*truncated"):
        Embedder(b)


def test_corrupt_bundle_is_rejected_at_load(tiny_embedding_bundle, tmp_path):
    b = _copy(tiny_embedding_bundle, tmp_path / "b")
    raw = bytearray((b / "vision.onnx").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (b / "vision.onnx").write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="vision.onnx is corrupt: sha256"):
        Embedder(b)
    c = _copy(tiny_embedding_bundle, tmp_path / "c")
    raw = bytearray((c / "text.onnx.data").read_bytes())
    raw[100] ^= 0xFF
    (c / "text.onnx.data").write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="text.onnx.data is corrupt"):
        Embedder(c, verify="full")


def test_newer_format_and_wrong_task(tiny_embedding_bundle, tmp_path):
    b = _copy(tiny_embedding_bundle, tmp_path / "b")
    m = json.loads((b / "q3vl.json").read_text())
    m["format_version"] = 99
    (b / "q3vl.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="bundle format 99 is newer"):
        Embedder(b)
    m["format_version"] = 1
    (b / "q3vl.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="bundle format 1 is older .* export it again"):
        Embedder(b)
    with pytest.raises(BundleError, match="is a embedding bundle; use q3vl.Embedder"):
        Reranker(tiny_embedding_bundle)
    (b / "q3vl.json").write_text("{not json")
    with pytest.raises(BundleError, match="corrupt JSON"):
        Embedder(b)
    with pytest.raises(BundleError, match="bundle directory not found"):
        Embedder(tmp_path / "missing")


# ---------------------------------------------------------------- torch-free
BLOCKER = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'transformers', 'torchvision', 'qwen_vl_utils'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
"""


def test_runtime_runs_without_torch(tiny_embedding_bundle, tiny_reranker_bundle):
    code = BLOCKER + f"""
import numpy as np, q3vl
from PIL import Image
img = Image.fromarray(np.full((64, 64, 3), 128, np.uint8))
e = q3vl.Embedder({str(tiny_embedding_bundle)!r}).process([{{'text': 'hi'}}, {{'image': img}}])
s = q3vl.Reranker({str(tiny_reranker_bundle)!r}).process({{'query': {{'text': 'q'}}, 'documents': [{{'image': img}}]}})
assert e.shape == (2, 64) and len(s) == 1
assert not any(m.split('.')[0] in ('torch', 'transformers') for m in sys.modules)
print('ok')
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_cli_embed_and_rerank(tiny_embedding_bundle, tiny_reranker_bundle, tmp_path, bad_files):
    items = tmp_path / "items.jsonl"
    items.write_text("\n".join(json.dumps(x) for x in [{"text": "a"}, {"image": str(bad_files / "ok.jpg")}]))
    env = {**os.environ}
    run = lambda *a: subprocess.run([sys.executable, "-m", "q3vl", *a], capture_output=True, text=True,  # noqa: E731
                                    cwd=ROOT, env=env)
    r = run("embed", str(tiny_embedding_bundle), str(items), "-o", str(tmp_path / "e.npy"), "--dim", "32")
    assert r.returncode == 0, r.stderr
    arr = np.load(tmp_path / "e.npy")
    assert arr.shape == (2, 32)
    expected = Embedder(tiny_embedding_bundle).process([{"text": "a"}, {"image": str(bad_files / "ok.jpg")}], dim=32)
    assert np.allclose(arr, expected, atol=1e-6)
    (tmp_path / "q.json").write_text(json.dumps({"text": "a query"}))
    r = run("rerank", str(tiny_reranker_bundle), str(tmp_path / "q.json"), str(items))
    assert r.returncode == 0, r.stderr
    scores = [json.loads(line)["score"] for line in r.stdout.splitlines()]
    assert len(scores) == 2 and all(0 <= s <= 1 for s in scores)


def test_io_binding_path_equals_host_path(tiny_embedding_bundle, tiny_reranker_bundle, video_file):
    """The device-resident pipeline (CUDA's default), exercised with CPU buffers: same numbers."""
    items = [{"text": "t"}, {"image": [noise_image(64, 96, 1), noise_image(64, 96, 2)], "text": "two"},
             {"video": str(video_file)}, {"image": noise_image(128, 64, 3)},
             {"video": [noise_image(40, 60, i) for i in range(4)], "image": noise_image(64, 96, 4)}]
    host = Embedder(tiny_embedding_bundle).process(items)
    bound_emb = Embedder(tiny_embedding_bundle, max_vision_patches=64, backend_options={"io_binding": True})
    assert bound_emb.backend.io_binding
    assert np.abs(bound_emb.process(items) - host).max() <= 1e-5
    req = {"query": {"text": "q", "image": noise_image(64, 64)}, "documents": [{"text": "a"}, items[1], items[2]]}
    a = Reranker(tiny_reranker_bundle).process(req)
    b = Reranker(tiny_reranker_bundle, backend_options={"io_binding": True}).process(req)
    assert np.abs(np.array(a) - np.array(b)).max() <= 1e-5


def test_cli_index_and_quantized_embeddings(tiny_embedding_bundle, tmp_path):
    items = tmp_path / "items.jsonl"
    texts = [f"document number {i} about topic {i % 5}" for i in range(40)]
    items.write_text("\n".join(json.dumps({"id": f"doc-{i}", "text": t}) for i, t in enumerate(texts)))
    run = lambda *a: subprocess.run([sys.executable, "-m", "q3vl", *a], capture_output=True, text=True,  # noqa: E731
                                    cwd=ROOT)
    r = run("index", "build", str(tiny_embedding_bundle), str(items), "-o", str(tmp_path / "idx"))
    assert r.returncode == 0, r.stderr
    r = run("index", "search", str(tmp_path / "idx"), texts[7], "-k", "3", "--exact")
    assert r.returncode == 0, r.stderr
    hits = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(hits) == 3 and hits[0]["id"] == "doc-7"  # a document finds itself first
    plain = tmp_path / "plain.jsonl"
    plain.write_text("\n".join(json.dumps({"text": t}) for t in texts))
    r = run("embed", str(tiny_embedding_bundle), str(plain), "-o", str(tmp_path / "f.npy"))
    assert r.returncode == 0, r.stderr
    r = run("calibrate", str(tmp_path / "f.npy"), "-o", str(tmp_path / "c.json"))
    assert r.returncode == 0, r.stderr
    r = run("embed", str(tiny_embedding_bundle), str(plain), "-o", str(tmp_path / "q.npy"), "--quantize", "int8",
            "--calibration", str(tmp_path / "c.json"))
    assert r.returncode == 0, r.stderr
    from q3vl.codes import Calibration, quantize_embeddings

    expected = quantize_embeddings(np.load(tmp_path / "f.npy"), "int8", Calibration.load(tmp_path / "c.json"))
    assert np.array_equal(np.load(tmp_path / "q.npy"), expected)
    r = run("embed", str(tiny_embedding_bundle), str(plain), "-o", str(tmp_path / "b.npy"), "--quantize", "ubinary")
    assert r.returncode == 0 and np.load(tmp_path / "b.npy").shape == (40, 8)
