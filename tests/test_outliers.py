"""The outlier-realistic generator: the planted outliers exist in what transformers computes.

Oracle: transformers' own hidden states (`output_hidden_states`) and module inputs (hooks) on
ordinary inputs, compared with the plan the generator wrote (outliers.json).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from q3vl.reference.activations import default_items, measure
from q3vl.testing import make_checkpoint
from q3vl.testing.outliers import IM_START


@pytest.fixture(scope="module")
def tiny_realistic(ckpt_dir):
    return make_checkpoint(ckpt_dir / "tiny-realistic", shape="tiny", seed=0, activations="realistic")


@pytest.fixture(scope="module")
def plan(tiny_realistic):
    return json.loads((tiny_realistic / "outliers.json").read_text())


@pytest.fixture(scope="module")
def forward(tiny_realistic):
    """(batch, hidden states, down_proj inputs per layer) from transformers in float32."""
    from q3vl.reference import ReferenceEmbedder

    ref = ReferenceEmbedder(tiny_realistic)
    batch = dict(ref.preprocess(default_items()[:3]))  # text only: every token is a text token
    downs = {}
    hooks = [layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, i=i: downs.__setitem__(i, a[0]))
             for i, layer in enumerate(ref.model.language_model.layers)]
    with torch.no_grad():
        out = ref.model(**batch, output_hidden_states=True)
    for h in hooks:
        h.remove()
    return batch, out.hidden_states, downs


def test_massive_activations_at_im_start_in_fixed_channels(plan, forward):
    batch, hidden, _ = forward
    e = plan["text"]["emergence_layer"]
    mask = batch["attention_mask"].bool()
    h = hidden[e + 1][mask].numpy()  # output of the emergence layer, valid tokens
    is_trigger = (batch["input_ids"][mask] == IM_START).numpy()
    med = np.median(np.abs(h))
    chans = plan["text"]["massive_channels"]
    big = np.abs(h) >= 500 * med
    assert big[:, chans].any(1).tolist() == is_trigger.tolist()  # exactly the <|im_start|> tokens
    assert set(np.nonzero(big.any(0))[0]) == set(chans)  # and only the planted channels
    per_seq = [(batch["input_ids"][b][batch["attention_mask"][b].bool()] == IM_START).sum().item()
               for b in range(len(batch["input_ids"]))]
    assert max(per_seq) <= 4
    # the value is ~M = 1e4 (x the planted sign) where it appears
    np.testing.assert_allclose(h[is_trigger][:, chans[0]], plan["text"]["massive_values"][0], rtol=0.5)
    before = np.abs(hidden[e][mask].numpy())
    assert before.max() < 100 * np.median(before)  # it emerges in that layer, not earlier


def test_down_proj_spikes_only_at_planted_tokens(plan, forward):
    batch, _, downs = forward
    mask = batch["attention_mask"].bool()
    is_trigger = (batch["input_ids"][mask] == IM_START).numpy()
    for layer, unit in plan["text"]["spike_units"].items():
        x = downs[int(layer)][mask].numpy()
        med = np.median(np.abs(x))
        spike = np.abs(x[:, unit])
        assert ((spike >= 100 * med) == is_trigger).all(), layer  # >= 100x exactly at the <|im_start|> tokens


def test_channel_outliers_and_vision_registers(plan, tiny_realistic, tiny_embedding):
    stats = {(s.tower, s.layer, s.kind): s for s in measure(tiny_realistic)}
    default = {(s.tower, s.layer, s.kind): s for s in measure(tiny_embedding)}
    hidden = set(plan["text"]["hidden_channels"]["channels"])
    for layer in range(2):
        for kind in ("qkv in", "gate_up in"):
            s = stats[("text", layer, kind)]
            assert s.top[0][1] >= 50 and s.top[0][0] in hidden, (layer, kind)
            assert s.top_share > 0.3  # persistent across tokens, not a spike
            assert default[("text", layer, kind)].top[0][1] < 20
        o = stats[("text", layer, "o_proj in")]
        assert o.top[0][1] >= 50
    r = plan["vision"]["register_block"]
    fc2 = stats[("vision", r, "fc2 in")]
    assert fc2.ratio >= 100 and {c for c, _ in fc2.top[:2]} == set(plan["vision"]["register_units"])
    res = stats[("vision", r, "residual")]
    assert res.norm_ratio >= 5 and 0.002 <= res.high_norm_share <= 0.1  # a few high-norm tokens
    assert default[("vision", r, "residual")].norm_ratio < 2


def test_default_activations_unchanged(ckpt_dir, tiny_embedding):
    from safetensors.torch import load_file

    again = make_checkpoint(ckpt_dir / "tiny-default-again", shape="tiny", seed=0, activations="default")
    a, b = load_file(str(tiny_embedding / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (again / "outliers.json").exists()
    with pytest.raises(ValueError, match="activations"):
        make_checkpoint(ckpt_dir / "bad", activations="spiky")
