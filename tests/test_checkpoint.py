"""Random-weight checkpoints: layout, loadability, shapes, determinism."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from q3vl.spec import ModelSpec
from q3vl.testing.checkpoint import parameter_shapes
from q3vl.testing.shapes import config_dict


def test_config_is_published_layout(tiny_embedding):
    cfg = json.loads((tiny_embedding / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3VLForConditionalGeneration"]
    text = cfg["text_config"]
    assert "rope_parameters" not in text
    assert text["rope_scaling"] == {"mrope_interleaved": True, "mrope_section": [6, 5, 5], "rope_type": "default"}
    assert text["rope_theta"] == 5000000
    assert cfg["tie_word_embeddings"] is True and text["tie_word_embeddings"] is True
    assert text["vocab_size"] == 151936
    assert cfg["vision_config"]["num_position_embeddings"] == 2304


def test_processor_configs(tiny_embedding):
    image = json.loads((tiny_embedding / "preprocessor_config.json").read_text())
    video = json.loads((tiny_embedding / "video_preprocessor_config.json").read_text())
    for c in (image, video):
        assert (c["patch_size"], c["temporal_patch_size"], c["merge_size"]) == (16, 2, 2)
        assert c["image_mean"] == c["image_std"] == [0.5, 0.5, 0.5]
    assert image["size"] == {"longest_edge": 16777216, "shortest_edge": 65536}
    assert video["size"] == {"longest_edge": 25165824, "shortest_edge": 4096}


def test_tiny_loads_offline_with_transformers(tiny_embedding):
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny_embedding)
    processor = AutoProcessor.from_pretrained(tiny_embedding)
    assert model.config.text_config.rope_parameters["mrope_section"] == [6, 5, 5]
    assert type(processor).__name__ == "Qwen3VLProcessor"
    weights = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n) * 2
    assert weights < 20e6  # tiny: under 20 MB of bf16 weights apart from the embedding table


def test_tokenizer_special_ids(tiny_embedding):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_embedding / "tokenizer.json"))
    expected = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
                "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|image_pad|>": 151655,
                "<|video_pad|>": 151656}
    assert {k: tok.token_to_id(k) for k in expected} == expected
    assert tok.token_to_id("yes") == 9693 and tok.token_to_id("no") == 2152


@pytest.mark.parametrize("shape,expected", [("2b", 2.13e9), ("8b", None)])
def test_published_shapes_parameter_count(shape, expected):
    """Counted on transformers' own model built on the meta device: the real layout."""
    cfg = config_dict(shape, "embedding")
    shapes = parameter_shapes(cfg)
    backbone = sum(int(np.prod(s)) for name, s in shapes.items() if name.startswith("model."))
    spec = ModelSpec.from_config(cfg)
    if expected:
        assert abs(backbone - expected) / expected < 0.01
    else:
        assert spec.text.hidden_size == 4096 and "lm_head.weight" in shapes  # 8B: untied head
    assert spec.vision.deepstack_visual_indexes == tuple(cfg["vision_config"]["deepstack_visual_indexes"])


def test_weights_are_seeded(ckpt_dir, tiny_embedding):
    from safetensors.torch import load_file

    from q3vl.testing import make_checkpoint

    again = make_checkpoint(ckpt_dir / "again", shape="tiny", seed=0, shard_bytes=8 * 1024**2)
    other = make_checkpoint(ckpt_dir / "other", shape="tiny", seed=5)
    a = load_file(str(tiny_embedding / "model.safetensors"))
    index = json.loads((again / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1  # sharded with an index
    b = {}
    for f in set(index.values()):
        b.update(load_file(str(again / f)))
    c = load_file(str(other / "model.safetensors"))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # sharding does not change values
    assert not torch.equal(a["model.visual.blocks.0.attn.qkv.weight"], c["model.visual.blocks.0.attn.qkv.weight"])


def test_spec_reads_both_config_layouts():
    old = config_dict("2b", "embedding")
    new = json.loads(json.dumps(old))
    t = new["text_config"]
    t["rope_parameters"] = {**t.pop("rope_scaling"), "rope_theta": t.pop("rope_theta")}
    assert ModelSpec.from_config(old) == ModelSpec.from_config(new)


def test_spec_rejects_other_models():
    from q3vl.errors import CheckpointError

    with pytest.raises(CheckpointError, match=r"not a Qwen3-VL checkpoint.*qwen2_vl"):
        ModelSpec.from_config({"model_type": "qwen2_vl", "architectures": ["Qwen2VLForConditionalGeneration"]})


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["small", "2b"])
def test_large_shapes_load(tmp_path, shape):
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    from q3vl.testing import make_checkpoint

    path = make_checkpoint(tmp_path / shape, shape=shape)
    model = Qwen3VLForConditionalGeneration.from_pretrained(path)
    AutoProcessor.from_pretrained(path)
    n = sum(p.numel() for p in model.model.parameters())
    if shape == "2b":
        assert abs(n - 2.13e9) / 2.13e9 < 0.01
    else:
        assert 100e6 <= n <= 250e6
