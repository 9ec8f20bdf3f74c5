"""Consistent bundles: a tampered, mismatched or malformed bundle is a BundleError naming what is wrong."""

from __future__ import annotations

import json
import shutil

import pytest

from q3vl.bundle import describe_files
from q3vl.errors import EXTRAS, BundleError, missing_extra
from q3vl.runtime import Embedder, Reranker


@pytest.fixture
def copy(tiny_embedding_bundle, tmp_path):
    return shutil.copytree(tiny_embedding_bundle, tmp_path / "bundle")


def edit_manifest(bundle, change):
    path = bundle / "q3vl.json"
    m = json.loads(path.read_text())
    change(m)
    path.write_text(json.dumps(m))


def refresh(bundle, name):
    """Record a deliberately changed file's new size and hash, so only the consistency checks can object."""
    edit_manifest(bundle, lambda m: m["files"].update(describe_files(bundle, [name])))


def test_swapped_tokenizer_ids_are_refused(copy):
    tok = json.loads((copy / "tokenizer.json").read_text())
    added = tok["added_tokens"]
    a, b = (next(k for k, t in enumerate(added) if t["content"] == c) for c in ("<|image_pad|>", "<|video_pad|>"))
    added[a], added[b] = added[b], added[a]  # the tokenizers library numbers added tokens by their order
    (copy / "tokenizer.json").write_text(json.dumps(tok))
    refresh(copy, "tokenizer.json")
    with pytest.raises(BundleError, match=r"tokenizer.json gives <\|\w+_pad\|> the id \d+, the manifest records"):
        Embedder(copy)


@pytest.mark.parametrize("change,message", [
    (lambda m: m.pop("task"), "manifest lacks the field task"),
    (lambda m: m.update(task=3), "manifest field task must be a str"),
    (lambda m: m["graphs"]["text"].update(precision=5), "graphs.text.precision must be a str"),
    (lambda m: m["graphs"]["text"].update(precision="fp8"), "graphs.text.precision"),
    (lambda m: m["graphs"].pop("vision"), r"graphs lacks \['vision'\]"),
    (lambda m: m["model"]["text"].update(hidden_size=0), r"hidden_size must be an integer in \[1, 65536\], not 0"),
    (lambda m: m["model"]["text"].update(num_layers=10**9), "num_layers must be an integer"),
    (lambda m: m["model"]["vision"].update(layer_norm_eps=float("nan")), "layer_norm_eps must be a finite positive"),
    (lambda m: m["model"].pop("text"), "manifest field model is malformed"),
    (lambda m: m["token_ids"].update(image_pad=-1), "token_ids.image_pad must be a non-negative integer"),
    (lambda m: m["token_ids"].update(image_pad=151656), "token_ids.image_pad is 151656 but model.image_pad_token_id"),
    (lambda m: m["preprocess"].update(patch_size=14), "preprocess.patch_size is 14 but the model's vision config"),
    (lambda m: m["preprocess"].update(image_mean=[0.48, 0.45, 0.4]), "mean = std = 0.5"),
    (lambda m: m["files"].update({"../escape.bin": {"size": 1, "sha256": "0" * 64}}), "resolves outside the bundle"),
    (lambda m: m["graphs"]["text"].update(file="/etc/passwd"), "bundle paths must be relative"),
    (lambda m: m["files"]["text.onnx"].update(size="big"), "files.text.onnx must hold an integer size"),
    (lambda m: m.update(format_version="2"), "format_version must be a int"),
])
def test_malformed_manifests_name_the_field(copy, change, message):
    edit_manifest(copy, change)
    with pytest.raises(BundleError, match=message):
        Embedder(copy)


def test_graph_shapes_are_checked_against_the_model_facts(copy):
    edit_manifest(copy, lambda m: m["model"]["text"].update(hidden_size=96, head_dim=16,
                                                             **{"mrope_section": [4, 2, 2]}))
    edit_manifest(copy, lambda m: m["model"]["vision"].update(out_hidden_size=96))
    with pytest.raises(BundleError, match="graph and manifest disagree|do not belong together"):
        Embedder(copy)


def test_a_broken_chat_template_is_a_bundle_error(copy):
    (copy / "chat_template.jinja").write_text("{% if messages %}unclosed")
    refresh(copy, "chat_template.jinja")
    with pytest.raises(BundleError, match="chat template does not parse"):
        Embedder(copy)


def test_wrong_task_and_checkpoint_directories_say_what_to_do(tiny_embedding_bundle, tiny_embedding):
    with pytest.raises(BundleError, match=r"is a embedding bundle; use q3vl.Embedder \(`q3vl embed`"):
        Reranker(tiny_embedding_bundle)
    with pytest.raises(BundleError, match=r"is a model checkpoint, not a q3vl bundle: export it first with `q3vl "
                                          r"export .* -o BUNDLE_DIR`"):
        Embedder(tiny_embedding)


def test_install_hints_name_extras_that_exist():
    import tomllib
    from pathlib import Path

    declared = set(tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
                   ["optional-dependencies"])
    assert set(EXTRAS) <= declared
    assert "pip install 'q3vl[export]'" in str(missing_extra("torch", "export"))
    assert "pip install onnxruntime" in str(missing_extra("onnxruntime", None))
    with pytest.raises(ValueError, match="no extra named 'runtime'"):
        missing_extra("onnxruntime", "runtime")
    # every call in the package names an existing extra (or a base dependency)
    import re

    root = Path(__file__).parents[1] / "src" / "q3vl"
    named = {m for f in root.rglob("*.py") for m in re.findall(r"missing_extra\([^)]*?, \"(\w+)\"\)", f.read_text())}
    assert named and named <= declared, named - declared
