"""The layouts real Qwen3-VL repos come in, each exported from a loopback Hub (item 2 of the Hub issue).

Variants are built from the tiny random-weight checkpoint (the published layout, tests/conftest.py)
by editing copies: sharded safetensors with an index; fp16 weights with `torch_dtype` (the
transformers 4.x key) or `dtype` (5.x); an untied LM head; the chat template in only one of
chat_template.jinja / chat_template.json / tokenizer_config.json; Sentence-Transformers files;
processor configs absent, or asking for other preprocessing; another architecture.

The default suite exports one variant that combines every layout change that must not change the
bundle (with `validate=False`) and compares its files with the fixture bundle, which passed parity:
the same bytes pass the same check. Under `-m slow` every variant is exported with the parity check.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from q3vl.errors import CheckpointError
from tests.hub_server import LoopbackHub, point_client_at

ST_FILES = {"modules.json": '[{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}, '
                            '{"idx": 1, "name": "1", "path": "1_Pooling", '
                            '"type": "sentence_transformers.models.Pooling"}]',
            "config_sentence_transformers.json": '{"similarity_fn_name": "cosine"}',
            "1_Pooling/config.json": '{"word_embedding_dimension": 64, "pooling_mode_lasttoken": true}'}


def variant(base: Path, dest: Path, *, shards: int = 0, dtype: str | None = None, dtype_key: str = "torch_dtype",
            untie: bool = False, stray_head: bool = False, template: str | None = None, st: bool = False,
            processor: bool = True, model_type: str | None = None, image_mean: list[float] | None = None) -> Path:
    """A copy of the checkpoint `base` in another layout (module docstring)."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(base, dest)
    config = json.loads((dest / "config.json").read_text())
    tensors = load_file(str(dest / "model.safetensors"))
    if dtype:
        torch_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
        tensors = {k: v.to(torch_dtype) for k, v in tensors.items()}
        config["text_config"].pop("dtype", None)
        config[dtype_key] = dtype
    # untied: the head reads lm_head.weight. A tied config whose file also holds a different lm_head.weight:
    # transformers 5 does not tie them (it warns) and scores with lm_head.weight, and so does q3vl.
    if untie or stray_head:
        config["tie_word_embeddings"] = config["text_config"]["tie_word_embeddings"] = not untie
        embed = tensors["model.language_model.embed_tokens.weight"]
        gen = torch.Generator().manual_seed(7)
        tensors["lm_head.weight"] = torch.randn(embed.shape, generator=gen).to(embed.dtype)
    if model_type:
        config["model_type"], config["architectures"] = model_type, ["Qwen2VLForConditionalGeneration"]
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    _write_weights(dest, tensors, shards, save_file)
    if template:
        _only_template(dest, template)
    for name, text in (ST_FILES.items() if st else ()):
        (dest / name).parent.mkdir(exist_ok=True)
        (dest / name).write_text(text)
    if not processor:
        for name in ("preprocessor_config.json", "video_preprocessor_config.json"):
            (dest / name).unlink()
    if image_mean:
        cfg = json.loads((dest / "preprocessor_config.json").read_text())
        (dest / "preprocessor_config.json").write_text(json.dumps({**cfg, "image_mean": image_mean}))
    return dest


def _write_weights(dest: Path, tensors: dict, shards: int, save_file) -> None:
    (dest / "model.safetensors").unlink()
    if not shards:
        save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
        return
    names, weight_map = sorted(tensors), {}
    for k in range(shards):
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[k::shards]}
        save_file(part, str(dest / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (dest / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))


def _only_template(dest: Path, where: str) -> None:
    """Keep the chat template in `where` only ("jinja", "json" or "tokenizer_config")."""
    tok = json.loads((dest / "tokenizer_config.json").read_text())
    text = tok.pop("chat_template")
    (dest / "tokenizer_config.json").write_text(json.dumps(tok if where != "tokenizer_config" else
                                                           {**tok, "chat_template": text}))
    if where != "json":
        (dest / "chat_template.json").unlink()
    if where == "jinja":
        (dest / "chat_template.jinja").write_text(text)


@pytest.fixture
def hub():
    with LoopbackHub() as server:
        yield server


def _export(hub, monkeypatch, tmp_path, folder: Path, repo: str, validate: bool):
    from q3vl.export.exporter import export_bundle

    sha = hub.add_folder(repo, folder)
    point_client_at(hub, tmp_path / "hf", monkeypatch)
    return export_bundle(f"{repo}@{sha}", tmp_path / "bundle", validate=validate, progress=False), sha


def _files(bundle: Path) -> dict:
    return {n: f["sha256"] for n, f in json.loads((bundle / "q3vl.json").read_text())["files"].items()}


def test_layouts_that_change_nothing_give_the_same_bundle(hub, tiny_embedding, tiny_embedding_bundle, tmp_path,
                                                          monkeypatch):
    """Sharded + index, the template only in tokenizer_config.json, no processor configs, ST files present:
    the same bytes as the fixture bundle (which passed parity)."""
    folder = variant(tiny_embedding, tmp_path / "v", shards=3, template="tokenizer_config", processor=False, st=True)
    bundle, sha = _export(hub, monkeypatch, tmp_path, folder, "org/layouts", validate=False)
    assert _files(bundle) == _files(tiny_embedding_bundle)
    fetched = set(hub.downloads())
    assert {"model-00001-of-00003.safetensors", "model-00003-of-00003.safetensors",
            "model.safetensors.index.json"} <= fetched
    assert not fetched & {"modules.json", "1_Pooling/config.json", "config_sentence_transformers.json"}
    assert json.loads((bundle / "q3vl.json").read_text())["source"]["sha"] == sha


@pytest.mark.parametrize("edit, message", [
    ({"model_type": "qwen2_vl"}, "not a Qwen3-VL checkpoint: model_type is 'qwen2_vl' (architectures "
                                 "['Qwen2VLForConditionalGeneration'])"),
    ({"image_mean": [0.48145466, 0.4578275, 0.40821073]},
     "preprocessor_config.json sets image_mean = [0.48145466, 0.4578275, 0.40821073], but q3vl's preprocessing "
     "implements image_mean = [0.5, 0.5, 0.5]"),
])
def test_layouts_q3vl_cannot_export_are_refused_before_the_weights_are_fetched(
        hub, tiny_embedding, tmp_path, monkeypatch, edit, message):
    from q3vl.export.exporter import export_bundle

    folder = variant(tiny_embedding, tmp_path / "v", **edit)
    sha = hub.add_folder("org/other", folder)
    point_client_at(hub, tmp_path / "hf", monkeypatch)
    with pytest.raises(CheckpointError) as e:
        export_bundle(f"org/other@{sha}", tmp_path / "bundle", progress=False)
    assert message in str(e.value)
    assert "model.safetensors" not in hub.downloads() and not (tmp_path / "bundle").exists()


SLOW_VARIANTS = {
    "sharded": dict(shards=3),
    "fp16-torch_dtype": dict(dtype="float16", dtype_key="torch_dtype"),
    "bf16-dtype": dict(dtype="bfloat16", dtype_key="dtype"),
    "template-jinja": dict(template="jinja"),
    "template-json": dict(template="json"),
    "template-tokenizer_config": dict(template="tokenizer_config"),
    "sentence-transformers": dict(st=True),
    "no-processor-configs": dict(processor=False),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SLOW_VARIANTS))
def test_each_layout_exports_with_parity(hub, tiny_embedding, tmp_path, monkeypatch, name):
    folder = variant(tiny_embedding, tmp_path / "v", **SLOW_VARIANTS[name])
    bundle, _ = _export(hub, monkeypatch, tmp_path, folder, "org/layout", validate=True)
    parity = json.loads((bundle / "q3vl.json").read_text())["parity"]
    assert parity["passed"] is True, parity["summary"]


@pytest.mark.slow
@pytest.mark.parametrize("head", ["tied", "untied", "tied-with-a-stray-lm_head"])
def test_tied_and_untied_reranker_heads_export_with_parity(hub, tiny_reranker, tmp_path, monkeypatch, head):
    folder = variant(tiny_reranker, tmp_path / "v", untie=head == "untied", stray_head=head.endswith("lm_head"))
    bundle, _ = _export(hub, monkeypatch, tmp_path, folder, "org/reranker", validate=True)
    parity = json.loads((bundle / "q3vl.json").read_text())["parity"]
    assert parity["passed"] is True, parity["summary"]
    assert parity["score_max_abs_diff"] <= 1e-4
