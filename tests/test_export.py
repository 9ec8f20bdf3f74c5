"""ONNX export: bundle contents, graph-level parity on unseen shapes, precision, clear errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from q3vl.bundle import FORMAT_VERSION, Manifest
from q3vl.errors import CheckpointError
from q3vl.export.exporter import export_bundle
from q3vl.preprocess.items import embed_item
from q3vl.runtime import Embedder, Reranker
from tests.conftest import noise_image


def cos_rows(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_bundle_contents_and_manifest(embedding_bundles, tiny_embedding):
    tiny_embedding_bundle = embedding_bundles
    m = Manifest.read(tiny_embedding_bundle)
    assert m.task == "embedding" and m.format_version == FORMAT_VERSION
    assert m.graphs["text"].precision == m.graphs["vision"].precision == "fp32"
    assert m.graphs["text"].kind in ("fused", "plain")
    assert m.source["path"] == str(tiny_embedding.resolve()) and len(m.source["sha256"]) == 64
    assert m.parity["passed"] is True and set(m.parity["cases"]) == {"images", "video", "text_only", "mixed"}
    assert m.spec.num_deepstack == 2 and m.token_ids["image_pad"] == 151655
    assert set(m.files) == {"vision.onnx", "vision.onnx.data", "text.onnx", "text.onnx.data", "tokenizer.json",
                            "chat_template.jinja"}
    for name in ("vision.onnx", "text.onnx"):
        onnx.checker.check_model(str(tiny_embedding_bundle / name))
        model = onnx.load(str(tiny_embedding_bundle / name), load_external_data=False)
        assert all(not init.raw_data for init in model.graph.initializer if init.data_location == 1)
        assert not any("checkpoints" in t.name for t in model.graph.initializer)  # no path leaks


def test_reranker_bundle_has_no_lm_head(reranker_bundles):
    model = onnx.load(str(reranker_bundles / "text.onnx"), load_external_data=False)
    vocab_rows = [i.name for i in model.graph.initializer if i.dims and i.dims[0] == 151936]
    assert len(vocab_rows) == 1  # the token embedding table only; the head is one [hidden] vector
    outputs = [o.name for o in model.graph.output]
    assert outputs == ["relevance_score"]
    m = Manifest.read(reranker_bundles)
    assert (m.token_ids["yes"], m.token_ids["no"]) == (9693, 2152)


@pytest.mark.parametrize("sizes", [[(64, 96)], [(224, 160), (224, 160)], [(32, 480), (128, 128), (96, 320)]])
def test_vision_graph_matches_transformers(embedding_bundles, ref_embedder, sizes):
    """Shapes other than the export-time dummy (2 blocks of 16 patches), one call each."""
    emb = Embedder(embedding_bundles)
    items = [{"image": noise_image(h, w, i)} for i, (h, w) in enumerate(sizes)]
    blocks = [b for it in items for b in emb.encoder.load(emb.encoder.embedding(embed_item(it), "d").media)]
    got = emb.runner.vision(blocks)
    pv = torch.from_numpy(np.concatenate([b.pixels for b in blocks]))
    grid = torch.tensor([[1, *b.grid] for b in blocks])
    with torch.no_grad():
        ref = ref_embedder.model.visual(pv, grid_thw=grid, return_dict=True)
    merged = np.concatenate([g[0] for g in got])
    deep = np.concatenate([g[1] for g in got])
    assert cos_rows(merged, ref.pooler_output.numpy()).min() >= 0.99999
    assert cos_rows(deep, torch.stack(list(ref.deepstack_features), 1).numpy()).min() >= 0.99999


@pytest.mark.parametrize("items", [
    [{"text": "one"}],
    [{"text": "a"}, {"text": "a much longer text than the first " * 5}, {"image": noise_image(96, 64)}],
    [{"video": [noise_image(40, 60, i) for i in range(4)], "text": "v"}, {"text": "t", "image": noise_image(64, 200)}],
])
def test_embedding_graph_matches_reference(embedding_bundles, ref_embedder, items):
    got = Embedder(embedding_bundles).process(items)
    ref = ref_embedder.process(items).numpy()
    assert cos_rows(got, ref).min() >= 0.9999


@pytest.mark.parametrize("docs", [
    [{"text": "a"}],
    [{"text": "short"}, {"text": "a longer document " * 8}, {"image": noise_image(64, 128)}],
    [{"video": [noise_image(40, 60, i) for i in range(4)]}, {}, {"text": "", "image": noise_image(200, 64)}],
])
def test_reranker_graph_matches_reference(reranker_bundles, ref_reranker, docs):
    query = {"text": "find the gradient"}
    got = Reranker(reranker_bundles).process({"query": query, "documents": docs})
    ref = ref_reranker.process({"query": query, "documents": docs})
    assert np.abs(np.array(got) - np.array(ref)).max() <= 1e-4


def test_bundle_is_relocatable(tiny_embedding_bundle, tmp_path):
    moved = shutil.copytree(tiny_embedding_bundle, tmp_path / "elsewhere")
    text = json.dumps(Manifest.read(moved).to_dict()["graphs"])
    assert "tiny-embedding" not in text
    a = Embedder(moved).process([{"text": "x"}])
    b = Embedder(tiny_embedding_bundle).process([{"text": "x"}])
    assert np.array_equal(a, b)


@pytest.mark.parametrize("graph", ["fused", pytest.param("plain", marks=pytest.mark.slow)])  # plain: CI time
def test_fp16_bundle_within_stated_tolerance(tiny_embedding, tmp_path, ref_embedder, graph):
    out = export_bundle(tiny_embedding, tmp_path / "fp16", precision="fp16", graph=graph, progress=False)
    m = Manifest.read(out)
    assert m.parity["passed"] and m.parity["tolerance"]["embed_cos"] == 0.999
    init = onnx.load(str(out / "text.onnx"), load_external_data=False).graph.initializer
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in init)
    items = [{"text": "hello"}, {"image": noise_image(640, 480)}]
    got = Embedder(out).process(items)
    assert np.isfinite(got).all()
    assert cos_rows(got, ref_embedder.process(items).numpy()).min() >= 0.999


def test_rejects_qwen2_vl_checkpoint(tiny_embedding, tmp_path):
    bad = shutil.copytree(tiny_embedding, tmp_path / "qwen2")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "qwen2_vl"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model_type is 'qwen2_vl'"):
        export_bundle(bad, tmp_path / "out", task="embedding", progress=False)


def test_missing_files_and_bad_output_dir(tiny_embedding, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        export_bundle(tmp_path / "nope", tmp_path / "out", progress=False)
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copyfile(tiny_embedding / "config.json", partial / "config.json")
    with pytest.raises(CheckpointError, match=r"missing \['tokenizer.json', 'model.safetensors"):
        export_bundle(partial, tmp_path / "out", progress=False)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        export_bundle(tiny_embedding, busy, progress=False)
    with pytest.raises(FileExistsError, match="does not look like a q3vl bundle"):
        export_bundle(tiny_embedding, busy, overwrite=True, progress=False)
    assert (busy / "notes.txt").exists()


def test_task_detection_and_precision_errors(tiny_embedding, tmp_path):
    odd = shutil.copytree(tiny_embedding, tmp_path / "model")
    cfg = json.loads((odd / "config.json").read_text())
    cfg["_name_or_path"] = "some/model"
    (odd / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="pass task="):
        export_bundle(odd, tmp_path / "o1", progress=False)
    with pytest.raises(ValueError, match="precision must be one of"):
        export_bundle(tiny_embedding, tmp_path / "o2", precision="int3", progress=False)
    with pytest.raises(ValueError, match="fused graphs are built in fp32 or fp16"):
        export_bundle(tiny_embedding, tmp_path / "o3", precision="bf16", progress=False)
    with pytest.raises(ValueError, match="bf16 graphs need"):
        export_bundle(tiny_embedding, tmp_path / "o4", precision="bf16", graph="plain", progress=False)
    with pytest.raises(ValueError, match="graph must be one of"):
        export_bundle(tiny_embedding, tmp_path / "o5", graph="fast", progress=False)
