"""`q3vl serve` through the official clients and raw HTTP, against the offline runtime.

One real server (a `q3vl serve` subprocess on a free loopback port, tiny bundles) for the module.
Every vector and score is compared with `Embedder.process` / `Reranker.process` of the same items
(cos >= 0.999999, |diff| <= 1e-6), and token usage with `process_details`.
"""

from __future__ import annotations

import base64
import http.server
import io
import threading

import numpy as np
import pytest
from PIL import Image

from q3vl.codes import Calibration, quantize_embeddings
from q3vl.runtime import Embedder, Reranker
from q3vl.testing.inputs import gradient_image, write_video
from tests.conftest import noise_image
from tests.serve_server import Server, data_uri, metric, request

openai = pytest.importorskip("openai")
cohere = pytest.importorskip("cohere")

TEXTS = ["a dog on a beach", "quarterly revenue grew 12%", "Быстрая бурая лиса", "短い文章"]


def close(got, want, tol=1e-6):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    cos = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
    assert np.abs(got - want).max() <= tol and cos.min() >= 0.999999, (np.abs(got - want).max(), cos.min())


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve-media")
    write_video(d / "clip.mp4", frames=24, width=160, height=96, fps=8)
    gradient_image(96, 128, seed=4).save(d / "photo.png")
    return d


@pytest.fixture(scope="module")
def offline(tiny_embedding_bundle, tiny_reranker_bundle):
    with Embedder(tiny_embedding_bundle) as emb, Reranker(tiny_reranker_bundle) as rr:
        yield emb, rr


@pytest.fixture(scope="module")
def calibration(offline, tmp_path_factory):
    sample = offline[0].process([{"text": f"calibration sample {i}"} for i in range(16)])
    path = tmp_path_factory.mktemp("calib") / "calibration.json"
    Calibration.fit(sample).save(path)
    return path


@pytest.fixture(scope="module")
def server(tiny_embedding_bundle, tiny_reranker_bundle, media, calibration, tmp_path_factory):
    srv = Server(["--embedding", str(tiny_embedding_bundle), "--reranker", str(tiny_reranker_bundle),
                  "--embedding-name", "emb", "--reranker-name", "rr", "--media-root", str(media),
                  "--calibration", str(calibration), "--allow-private-urls", "--allowed-hosts", "127.0.0.1"],
                 tmp_path_factory.mktemp("serve-log"))
    srv.wait_ready()
    yield srv
    assert srv.stop() == 0, srv.log()


def test_openai_client_float_dimensions_and_base64(server, offline):
    client = openai.OpenAI(api_key="unused", base_url=server.base + "/v1", max_retries=0)
    want = offline[0].process([{"text": t} for t in TEXTS])
    res = client.embeddings.create(model="emb", input=TEXTS, encoding_format="float")
    close([d.embedding for d in res.data], want)
    assert [d.index for d in res.data] == list(range(len(TEXTS))) and res.model == "emb"
    tokens = offline[0].process_details([{"text": t} for t in TEXTS]).total_tokens
    assert res.usage.prompt_tokens == res.usage.total_tokens == tokens
    small = client.embeddings.create(model="emb", input=TEXTS, dimensions=16, encoding_format="float")
    close([d.embedding for d in small.data], offline[0].process([{"text": t} for t in TEXTS], dim=16))
    raw = client.embeddings.create(model="emb", input=TEXTS[0], encoding_format="base64")
    decoded = np.frombuffer(base64.b64decode(raw.data[0].embedding), "<f4")
    close(decoded[None], want[:1])
    default = client.embeddings.create(model="emb", input=TEXTS[:2], dimensions=8)  # the client asks for base64
    close([d.embedding for d in default.data], offline[0].process([{"text": t} for t in TEXTS[:2]], dim=8))


def test_vllm_messages_form_is_one_multimodal_item(server, offline, media):
    img = noise_image(80, 112, seed=3)
    body = {"model": "emb", "messages": [
        {"role": "system", "content": "Find the matching photo"},
        {"role": "user", "content": [{"type": "text", "text": "a noisy gradient"},
                                     {"type": "image_url", "image_url": {"url": data_uri(img)}},
                                     {"type": "video_url", "video_url": {"url": "clip.mp4"}}]}]}
    status, _, res = request(server.base, "POST", "/v1/embeddings", body)
    assert status == 200, res
    item = {"text": ["a noisy gradient"], "image": [img], "video": str(media / "clip.mp4"),
            "instruction": "Find the matching photo"}
    details = offline[0].process_details([item])
    close([res["data"][0]["embedding"]], details.values)
    assert res["usage"]["prompt_tokens"] == details.total_tokens and details.vision_tokens[0] > 0


def test_cohere_embed_mixed_inputs_and_types(server, offline, calibration):
    images = [noise_image(64, 96, seed=i) for i in range(2)]
    co = cohere.ClientV2(api_key="unused", base_url=server.base)
    inputs = [{"content": [{"type": "text", "text": "a caption"},
                           {"type": "image_url", "image_url": {"url": data_uri(images[0])}}]},
              {"content": [{"type": "text", "text": "text only"}]},
              {"content": [{"type": "image_url", "image_url": {"url": data_uri(images[1], "JPEG")}}]}]
    types = ["float", "int8", "uint8", "binary", "ubinary", "base64"]
    res = co.embed(model="emb", input_type="search_document", inputs=inputs, embedding_types=types)
    jpeg = Image.open(io.BytesIO(base64.b64decode(data_uri(images[1], "JPEG").split(",")[1])))
    items = [{"text": ["a caption"], "image": [images[0]]}, {"text": ["text only"]}, {"image": [jpeg]}]
    details = offline[0].process_details(items)
    floats = np.asarray(res.embeddings.float_, np.float32)
    close(floats, details.values)
    calib = Calibration.load(calibration)
    for kind in ("int8", "uint8", "binary", "ubinary"):  # the codes of the returned floats, exactly
        assert np.array_equal(getattr(res.embeddings, kind), quantize_embeddings(floats, kind, calib)), kind
    close([np.frombuffer(base64.b64decode(s), "<f4") for s in res.embeddings.base64], details.values)
    assert res.meta.billed_units.input_tokens == details.total_tokens


def test_cohere_texts_and_output_dimension(server, offline):
    co = cohere.ClientV2(api_key="unused", base_url=server.base)
    res = co.embed(model="emb", input_type="search_query", texts=TEXTS, output_dimension=32,
                   embedding_types=["float"])
    close(res.embeddings.float_, offline[0].process([{"text": t} for t in TEXTS], dim=32))
    assert res.texts == TEXTS


def test_cohere_rerank_and_raw_multimodal_rerank(server, offline, media):
    co = cohere.ClientV2(api_key="unused", base_url=server.base)
    docs = ["a puppy playing", "stock market report", "a beach at sunset", "tax forms"]
    res = co.rerank(model="rr", query="a dog on a beach", documents=docs, top_n=3)
    want = offline[1].process({"query": {"text": "a dog on a beach"}, "documents": [{"text": d} for d in docs]})
    order = sorted(range(len(docs)), key=lambda i: -want[i])[:3]
    assert [r.index for r in res.results] == order
    close([r.relevance_score for r in res.results], [want[i] for i in order])
    img = noise_image(72, 72, seed=9)
    body = {"model": "rr", "query": {"content": [{"type": "text", "text": "a clip"}]}, "return_documents": True,
            "documents": ["plain text", {"content": [{"type": "image_url", "image_url": {"url": data_uri(img)}}]},
                          {"content": [{"type": "video_url", "video_url": {"url": "clip.mp4"}},
                                       {"type": "text", "text": "with words"}]}], "instruction": "Match the video"}
    status, _, out = request(server.base, "POST", "/v2/rerank", body)
    assert status == 200, out
    details = offline[1].process_details({"query": {"text": ["a clip"]}, "instruction": "Match the video",
                                          "documents": [{"text": "plain text"}, {"image": [img]},
                                                        {"video": str(media / "clip.mp4"), "text": ["with words"]}]})
    scores = {r["index"]: r["relevance_score"] for r in out["results"]}
    close([scores[i] for i in range(3)], details.values)
    assert [r["relevance_score"] for r in out["results"]] == sorted(scores.values(), reverse=True)
    assert out["usage"]["total_tokens"] == details.total_tokens
    assert out["results"][0]["document"] is not None
    for path in ("/v1/rerank", "/rerank"):
        status, _, same = request(server.base, "POST", path, {**body, "top_n": 1, "return_documents": False})
        assert status == 200 and len(same["results"]) == 1 and "document" not in same["results"][0]


def test_item_options_over_http_equal_process(server, offline, media):
    """The same video item with fps 1 and 4: different frame counts, each equal to process() with that fps
    (per-item values equal constructor values: tests/test_serve_options.py).
    """
    inputs = [{"content": [{"type": "video_url", "video_url": {"url": "clip.mp4"}}], "fps": fps} for fps in (1, 4)]
    status, _, res = request(server.base, "POST", "/v2/embed", {"model": "emb", "inputs": inputs,
                                                                "input_type": "search_document"})
    assert status == 200, res
    clip = str(media / "clip.mp4")
    want = offline[0].process_details([{"video": clip, "fps": 1}, {"video": clip, "fps": 4}])
    close(res["embeddings"]["float"], want.values)
    assert want.vision_tokens[1] > want.vision_tokens[0]
    assert res["meta"]["billed_units"]["input_tokens"] == want.total_tokens
    pixels = {"min_pixels": 32768, "max_pixels": 65536}  # photo.png (96x128) grows
    part = {"type": "image_url", "image_url": {"url": "photo.png"}}
    want = offline[0].process_details([{"image": str(media / "photo.png"), **pixels}])
    assert want.tokens[0] != offline[0].process_details([{"image": str(media / "photo.png")}]).tokens[0]
    for body in ({"inputs": [{"content": [part], **pixels}]}, {"inputs": [{"content": [part]}], **pixels}):
        status, _, res = request(server.base, "POST", "/v2/embed", {"model": "emb", **body})  # item or request level
        assert status == 200, res
        close(res["embeddings"]["float"], want.values)


def test_media_sources_under_the_policy(server, offline, media):
    """With --media-root, --allow-private-urls and --allowed-hosts 127.0.0.1: a loopback URL, a path and
    file:// inside the root and a video data URI are read (and equal process()); outside the root or
    another host is refused.
    """
    photo = (media / "photo.png").read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(photo)))
            self.end_headers()
            self.wfile.write(photo)

        def log_message(self, *args):
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    (media / "escape.png").unlink(missing_ok=True)
    (media / "escape.png").symlink_to("/etc/hostname")
    video = "data:video/mp4;base64," + base64.b64encode((media / "clip.mp4").read_bytes()).decode()
    try:
        good = [f"http://127.0.0.1:{httpd.server_port}/photo.png", "photo.png", f"file://{media}/photo.png"]
        body = {"inputs": [{"content": [{"type": "image_url", "image_url": {"url": u}}]} for u in good]
                + [{"content": [{"type": "video_url", "video_url": {"url": video}}]}]}
        status, _, res = request(server.base, "POST", "/v2/embed", body)
        assert status == 200, res
        want = offline[0].process([{"image": str(media / "photo.png")}] * 3 + [{"video": str(media / "clip.mp4")}])
        close(res["embeddings"]["float"], want)
        for ref, param in ((f"http://localhost:{httpd.server_port}/photo.png", "inputs[0]"),
                           ("../outside.png", "inputs[0].content[0].image_url.url"),
                           ("escape.png", "inputs[0].content[0].image_url.url"),
                           ("file:///etc/hostname", "inputs[0].content[0].image_url.url")):
            body = {"inputs": [{"content": [{"type": "image_url", "image_url": {"url": ref}}]}]}
            status, _, res = request(server.base, "POST", "/v2/embed", body)
            assert status == 400 and res["error"]["param"] == param, (ref, res)
    finally:
        httpd.shutdown()
        (media / "escape.png").unlink()


def test_models_health_metrics(server):
    status, _, models = request(server.base, "GET", "/v1/models")
    assert status == 200 and {m["id"] for m in models["data"]} == {"emb", "rr"}
    assert request(server.base, "GET", "/health")[:3:2] == (200, {"status": "ok"})
    status, headers, text = request(server.base, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert metric(text, "q3vl_requests_total", route="/v1/embeddings", status="200") >= 1
    assert metric(text, "q3vl_inference_duration_seconds_count", model="embedding") >= 1
    status, headers, _ = request(server.base, "POST", "/v1/embeddings", {"model": "emb", "input": "timed"})
    assert status == 200 and float(headers["x-inference-time"]) > 0 and float(headers["x-queue-time"]) >= 0
    status, _, schema = request(server.base, "GET", "/openapi.json")
    assert status == 200 and {"/v1/embeddings", "/v2/embed", "/v1/rerank", "/rerank", "/v2/rerank"} <= set(
        schema["paths"])


def run_schemathesis(base: str, examples: int) -> int:
    """Positive and negative cases for every operation of the server's own OpenAPI document; each
    response must pass schemathesis' `not_a_server_error`. Returns the number of calls made.
    """
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.checks import not_a_server_error

    schema = schemathesis.openapi.from_url(base + "/openapi.json")
    calls = 0
    for result in schema.get_all_operations():
        op = result.ok()
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def check(case):
                nonlocal calls
                calls += 1
                response = case.call(base_url=base, timeout=60)
                case.validate_response(response, checks=[not_a_server_error])

            try:
                check()
            except Unsatisfiable:  # no invalid request exists for an operation without inputs (GET /health)
                assert mode == schemathesis.GenerationMode.NEGATIVE and op.method.upper() == "GET"
    return calls


def test_schemathesis_finds_no_server_error(server):
    calls = run_schemathesis(server.base, examples=6)
    assert calls >= 60 and server.proc.poll() is None  # every operation exercised, the server still up


@pytest.mark.slow
def test_schemathesis_long_run(server):
    assert run_schemathesis(server.base, examples=200) >= 1000 and server.proc.poll() is None
