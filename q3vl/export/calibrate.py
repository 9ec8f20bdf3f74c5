"""Calibration for int8 bundles: stream a checkpoint layer by layer and plan every projection.

The plain torch modules of `q3vl.export.modules` (the parity baseline of the exported graphs) are
built one layer at a time from the checkpoint tensors, run on generated calibration inputs, and
each projection's input rows are handed to `q3vl.quantization.planner` with the layer's weights;
then the layer is dropped. Peak memory is one layer plus the calibration activations, so the 8B
shape calibrates in a few GB. The inputs are prepared by the runtime's own preprocessing and are
distinct from the export parity cases that judge the result.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from q3vl.quantization.int8 import Int8Plan
from q3vl.quantization.planner import merger, project, text_layer, vision_block

log = logging.getLogger(__name__)


class _Taps:
    """Input rows of hooked modules, keyed; text rows are restricted to valid (unpadded) tokens."""

    def __init__(self) -> None:
        self.rows: dict[str, list[np.ndarray]] = defaultdict(list)
        self.handles: list[Any] = []

    def tap(self, key: str, module: Any, mask: Any = None) -> None:
        def pre(_m: Any, args: Any) -> None:
            x = args[0].detach()
            x = x[mask] if mask is not None else x.reshape(-1, x.shape[-1])
            self.rows[key].append(x.float().numpy())
        self.handles.append(module.register_forward_pre_hook(pre))

    def take(self) -> dict[str, np.ndarray]:
        for h in self.handles:
            h.remove()
        out = {k: np.concatenate(v) for k, v in self.rows.items()}
        self.rows, self.handles = defaultdict(list), []
        return out


def calibration_items(encoder: Any, task: str) -> tuple[list[Any], list[list[Any]]]:
    """(sequences, vision blocks) of generated inputs: texts in several scripts and lengths, a photo-like
    image, a screenshot, a 4-frame video, mixes; as embedding items or (query, document) pairs.
    """
    from q3vl.preprocess.items import Content, EmbedItem
    from q3vl.testing.inputs import MULTILINGUAL, gradient_image, screenshot_image

    frames = tuple(gradient_image(120, 160, 40 + k) for k in range(4))
    docs = [Content(("Calibration text about the retrieval of documents, images and videos.",), (), ()),
            Content((" ".join(MULTILINGUAL[k] for k in ("english", "japanese", "arabic", "hindi")),), (), ()),
            Content(("The committee approved the budget. " * 12,), (), ()),
            Content(("a colourful picture",), (gradient_image(448, 448, 21),), ()),
            Content((), (screenshot_image(360, 640),), ()),
            Content(("a short clip",), (), (frames,)),
            Content((MULTILINGUAL["korean"],), (gradient_image(256, 384, 22),), ())]
    if task == "embedding":
        seqs = [encoder.embedding(EmbedItem(c, None, None, None), "Represent the user's input.") for c in docs]
    else:
        query = Content(("which document answers the question about budgets?",), (), ())
        seqs = [encoder.rerank_pair(query, c, "Given a search query, retrieve relevant candidates that answer "
                                    "the query.", None, None) for c in docs]
    return seqs, [encoder.load(s.media) for s in seqs]


def _vision(spec: Any, w: Any, blocks: list[Any], plan: Int8Plan) -> list[tuple[np.ndarray, np.ndarray]]:
    """Vision outputs (merged rows, deepstack) per block, planning every projection on the way."""
    import torch
    import torch.nn.functional as F

    from q3vl.export.modules import F32, Linear, VisionBlock
    from q3vl.preprocess.vision import stack_blocks

    v = spec.vision
    sizes = sorted({b.num_patches for b in blocks})
    groups = [[i for i, b in enumerate(blocks) if b.num_patches == n] for n in sizes]
    feeds = [{k: torch.from_numpy(a) for k, a in stack_blocks([blocks[i] for i in g], v.spatial_merge_size,
                                                              v.num_position_embeddings).items()} for g in groups]
    pe = w.many(["model.visual.patch_embed.proj.weight", "model.visual.patch_embed.proj.bias",
                 "model.visual.pos_embed.weight"])
    conv = pe["model.visual.patch_embed.proj.weight"]
    patch = Linear(conv.reshape(conv.shape[0], -1), pe["model.visual.patch_embed.proj.bias"], F32)
    pv = torch.cat([f["pixel_values"].reshape(-1, v.patch_dim) for f in feeds]).numpy()
    project(plan, "patch_embed.w", pv, patch.weight.detach().numpy(), None)
    table = pe["model.visual.pos_embed.weight"]
    half = (v.hidden_size // v.num_heads) // 2
    inv = 1.0 / (v.rope_theta ** (torch.arange(0, half, 2, dtype=F32) / half))
    xs, rot = [], []
    with torch.no_grad():
        for f in feeds:
            xs.append(patch(f["pixel_values"]) + (F.embedding(f["interp_idx"], table)
                                                  * f["interp_w"].unsqueeze(-1)).sum(-2))
            emb = (f["pos_ids"].unsqueeze(-1).to(F32) * inv).flatten(-2)
            emb = torch.cat((emb, emb), dim=-1).unsqueeze(1)
            rot.append((emb.cos(), emb.sin()))
        deep: list[list[Any]] = [[] for _ in feeds]
        for i in range(v.depth):
            blk, taps = VisionBlock(w, f"model.visual.blocks.{i}", v.num_heads, F32), _Taps()
            for key in ("qkv", "proj", "fc1", "fc2"):
                taps.tap(key, getattr(blk, key))
            xs = [blk(x, c, s) for x, (c, s) in zip(xs, rot)]
            weights = {k: getattr(blk, k).weight.detach().numpy() for k in ("qkv", "proj", "fc1", "fc2")}
            vision_block(plan, i, taps.take(), weights)
            if i in v.deepstack_visual_indexes:
                k = v.deepstack_visual_indexes.index(i)
                out = _merge(plan, w, f"model.visual.deepstack_merger_list.{k}", True, xs)
                for d, o in zip(deep, out):
                    d.append(o)
        merged = _merge(plan, w, "model.visual.merger", False, xs)
    result: list[Any] = [None] * len(blocks)
    for g, m, d in zip(groups, merged, deep):
        stacked = torch.stack(d, 2)
        for j, i in enumerate(g):
            result[i] = (m[j].numpy(), stacked[j].numpy())
    return result


def _merge(plan: Int8Plan, w: Any, prefix: str, postshuffle: bool, xs: list[Any]) -> list[Any]:
    from q3vl.export.modules import F32, Merger

    m, taps = Merger(w, prefix, postshuffle, F32), _Taps()
    taps.tap("fc1", m.fc1)
    taps.tap("fc2", m.fc2)
    out = [m(x) for x in xs]
    weights = {"fc1": m.fc1.weight.detach().numpy(), "fc2": m.fc2.weight.detach().numpy()}
    merger(plan, prefix, taps.take(), weights, postshuffle)
    return out


def _text(spec: Any, w: Any, feeds: dict[str, np.ndarray], plan: Int8Plan) -> None:
    """Run the decoder layers one at a time on the calibration batch, planning each layer's projections."""
    import torch
    import torch.nn.functional as F

    from q3vl.export.modules import F32, DecoderLayer, mrope_selector

    t = spec.text
    ids, mask, pos = (torch.from_numpy(feeds[k]) for k in ("input_ids", "attention_mask", "position_ids"))
    vis, ds = torch.from_numpy(feeds["visual_embeds"]), torch.from_numpy(feeds["deepstack_embeds"])
    is_vis = (ids == spec.image_token_id) | (ids == spec.video_token_id)
    row = (torch.cumsum(is_vis.reshape(-1).to(torch.int64), 0) - 1).clamp(min=0).reshape(is_vis.shape)
    m = is_vis.unsqueeze(-1)
    table = w.get("model.language_model.embed_tokens.weight")
    x = torch.where(m, F.embedding(row, vis), F.embedding(ids, table))
    del table
    inv = 1.0 / (t.rope_theta ** (torch.arange(0, t.head_dim, 2, dtype=F32) / t.head_dim))
    freqs = pos.permute(1, 2, 0)[..., mrope_selector(t.mrope_section, t.head_dim // 2)].to(F32) * inv
    emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)
    cos, sin = emb.cos(), emb.sin()
    seq = ids.shape[1]
    allowed = torch.ones(seq, seq, dtype=torch.bool).tril().unsqueeze(0) & mask.bool().unsqueeze(1)
    bias = torch.where(allowed, 0.0, -1e9).to(F32).unsqueeze(1)
    valid = mask.bool()
    with torch.no_grad():
        for i in range(t.num_layers):
            layer, taps = DecoderLayer(spec, w, f"model.language_model.layers.{i}", F32), _Taps()
            for key, mod in (("qkv", layer.q), ("o_proj", layer.o), ("gate_up", layer.gate), ("down_proj", layer.down)):
                taps.tap(key, mod, valid)
            x = layer(x, cos, sin, bias)
            if i < spec.num_deepstack:
                x = x + torch.where(m, F.embedding(row, ds[:, i]), 0.0)
            wt = {"qkv": torch.cat([layer.q.weight, layer.k.weight, layer.v.weight], 1),
                  "o_proj": layer.o.weight, "gate_up": torch.cat([layer.gate.weight, layer.up.weight], 1),
                  "down_proj": layer.down.weight}
            text_layer(plan, i, taps.take(), {k: v.detach().numpy() for k, v in wt.items()},
                       (t.num_heads, t.num_kv_heads, t.head_dim))
            del layer, wt


def calibrate(checkpoint: str | Path, task: str, plan: Int8Plan | None = None) -> Int8Plan:
    """Plan the int8 projections of a checkpoint's fused graphs for `task` ("embedding" | "reranker").

    `plan` carries the settings (activations, weight bits, alpha, max_error); its projections are
    filled in and it is returned.
    """
    from q3vl.export.exporter import _chat_template
    from q3vl.export.weights import Weights
    from q3vl.preprocess.encode import Encoder, PreprocessConfig
    from q3vl.preprocess.prompt import ChatTemplate, TextTokenizer
    from q3vl.runtime.pipeline import GraphRunner
    from q3vl.spec import ModelSpec

    ckpt = Path(checkpoint)
    plan = plan or Int8Plan()
    spec = ModelSpec.from_checkpoint(ckpt)
    tokenizer = TextTokenizer(ckpt / "tokenizer.json")
    encoder = Encoder(tokenizer, ChatTemplate(_chat_template(ckpt)), PreprocessConfig(max_length=8192))
    seqs, blocks = calibration_items(encoder, task)
    w = Weights(ckpt)
    flat = [b for per in blocks for b in per]
    outs = _vision(spec, w, flat, plan)
    visual, k = [], 0
    for per in blocks:
        visual.append(outs[k:k + len(per)])
        k += len(per)
    feeds = GraphRunner(None, spec, tokenizer.special.endoftext).text_feeds(seqs, visual)  # type: ignore[arg-type]
    _text(spec, w, feeds, plan)
    log.info("int8 plan: %s", plan.summary())
    return plan
