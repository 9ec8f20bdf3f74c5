"""Calibration walks the traced modules: every projection input it records, and its head outputs,
equal what the whole `VisionEncoder` / `TextEncoder` (the parity-tested traced graphs) compute on the
same inputs, on the tiny checkpoint.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

torch = pytest.importorskip("torch")

TOL = 1e-6


def _calibration_record(ckpt, monkeypatch):
    """Run one-branch calibration; returns (projection inputs by plan name, head outputs)."""
    from q3vl.export.quantize import calibrate as cal
    from q3vl.export.quantize.int8 import plan_for_alpha

    rows: dict[str, np.ndarray] = {}

    def vision_block(plan, i, x, w):
        rows.update({f"model.visual.blocks.{i}.{n}": a for n, a in x.items()})
        return orig["vision_block"](plan, i, x, w)

    def merger(plan, prefix, x, w, *rest):
        rows.update({f"{prefix}.{n}": a for n, a in x.items()})
        return orig["merger"](plan, prefix, x, w, *rest)

    def text_layer(plan, i, x, w, heads):
        rows.update({f"model.language_model.layers.{i}.{n}": a for n, a in x.items()})
        return orig["text_layer"](plan, i, x, w, heads)

    def project(plan, name, x, w, fold):
        rows[name] = x
        return orig["project"](plan, name, x, w, fold)

    heads = {}

    def text(*args):
        heads.update(out := orig["_text"](*args))
        return out

    orig = {n: getattr(cal, n) for n in ("vision_block", "merger", "text_layer", "project", "_text")}
    for n, f in (("vision_block", vision_block), ("merger", merger), ("text_layer", text_layer),
                 ("project", project), ("_text", text)):
        monkeypatch.setattr(cal, n, f)
    cal.calibrate(ckpt, "embedding", plan_for_alpha(0.5))
    return rows, heads[0]


def _traced_record(ckpt):
    """The same inputs through the whole traced modules, projection inputs taken by forward hooks."""
    from q3vl.export.modules import TextEncoder, VisionEncoder
    from q3vl.export.quantize.calibrate import calibration_items
    from q3vl.export.weights import Weights
    from q3vl.export.weights import read_chat_template as _chat_template
    from q3vl.preprocess.encode import Encoder, PreprocessConfig
    from q3vl.preprocess.prompt import ChatTemplate, TextTokenizer
    from q3vl.preprocess.vision import Geometry, stack_blocks
    from q3vl.runtime.pipeline import text_feeds
    from q3vl.spec import ModelSpec
    from q3vl.tasks import task_for

    spec, task = ModelSpec.from_checkpoint(ckpt), task_for("embedding")
    tokenizer = TextTokenizer(ckpt / "tokenizer.json")
    encoder = Encoder(tokenizer, ChatTemplate(_chat_template(ckpt)), PreprocessConfig(max_length=8192),
                      Geometry.from_spec(spec.vision))
    seqs, per_seq = calibration_items(encoder, task)
    w = Weights(ckpt)
    vision, text = VisionEncoder(spec, w).eval(), TextEncoder(spec, w, task, task.head_token_ids(tokenizer)).eval()
    rows: dict[str, list[np.ndarray]] = defaultdict(list)
    valid: list[torch.Tensor] = []

    def tap(name, module, text_rows=False):
        def pre(_m, args):
            x = args[0].detach()
            rows[name].append((x[valid[0]] if text_rows else x.reshape(-1, x.shape[-1])).numpy())
        module.register_forward_pre_hook(pre)

    tap("patch_embed.w", vision.embed.patch)
    for i, blk in enumerate(vision.blocks):
        for n in ("qkv", "proj", "fc1", "fc2"):
            tap(f"model.visual.blocks.{i}.{n}", getattr(blk, n))
    for k, m in enumerate(vision.ds_mergers):
        for n in ("fc1", "fc2"):
            tap(f"model.visual.deepstack_merger_list.{k}.{n}", getattr(m, n))
    for n in ("fc1", "fc2"):
        tap(f"model.visual.merger.{n}", getattr(vision.merger, n))
    for i, layer in enumerate(text.layers):
        for n, mod in (("qkv", layer.q), ("o_proj", layer.o), ("gate_up", layer.gate), ("down_proj", layer.down)):
            tap(f"model.language_model.layers.{i}.{n}", mod, text_rows=True)

    blocks = [b for per in per_seq for b in per]
    out: list = [None] * len(blocks)
    with torch.no_grad():
        for n in sorted({b.num_patches for b in blocks}):  # one call per block size, as calibration groups them
            idx = [i for i, b in enumerate(blocks) if b.num_patches == n]
            feeds = stack_blocks([blocks[i] for i in idx], spec.vision.spatial_merge_size,
                                 spec.vision.num_position_embeddings)
            merged, deep = vision(*(torch.from_numpy(feeds[k]) for k in ("pixel_values", "pos_ids", "interp_idx",
                                                                          "interp_w")))
            for j, i in enumerate(idx):
                out[i] = (merged[j].numpy(), deep[j].numpy())
        visual, k = [], 0
        for per in per_seq:
            visual.append(out[k:k + len(per)])
            k += len(per)
        feeds = text_feeds(spec, tokenizer.special.endoftext, seqs, visual)
        valid.append(torch.from_numpy(feeds["attention_mask"]).bool())
        heads = text(*(torch.from_numpy(feeds[k]) for k in ("input_ids", "attention_mask", "position_ids",
                                                            "visual_embeds", "deepstack_embeds")))
    return {k: np.concatenate(v) for k, v in rows.items()}, dict(zip(task.outputs, heads))


def test_calibration_records_the_traced_modules_activations(tiny_embedding, monkeypatch):
    from q3vl.spec import ModelSpec

    calibrated, cal_heads = _calibration_record(tiny_embedding, monkeypatch)
    traced, traced_heads = _traced_record(tiny_embedding)
    assert set(calibrated) == set(traced)
    spec = ModelSpec.from_checkpoint(tiny_embedding)  # patch embed, blocks, DeepStack + final mergers, layers
    assert len(traced) == 1 + 4 * spec.vision.depth + 2 * (spec.num_deepstack + 1) + 4 * spec.text.num_layers
    worst = 0.0
    for name, x in traced.items():
        assert calibrated[name].shape == x.shape, name
        worst = max(worst, float(np.abs(calibrated[name] - x).max()))
    for name, y in traced_heads.items():
        worst = max(worst, float((cal_heads[name] - y).abs().max()))
    print(f"max |calibration - traced| over every projection input and head output: {worst:.3g}")
    assert worst <= TOL
