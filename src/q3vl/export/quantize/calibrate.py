"""Calibration for int8 bundles: stream a checkpoint layer by layer and plan every projection.

The plain torch modules of `q3vl.export.modules` (the parity baseline of the exported graphs) are
built one layer at a time from the checkpoint tensors, run on generated calibration inputs, and
each projection's input rows are handed to `q3vl.export.quantize.planner` with the layer's weights;
then the layer is dropped. Peak memory is one layer plus the calibration activations, so the 8B
shape calibrates in a few GB. The inputs are prepared by the runtime's own preprocessing and are
distinct from the export parity cases that judge the result.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from q3vl.export.quantize.int8 import Int8Plan
from q3vl.export.quantize.planner import merger, project, text_layer, vision_block
from q3vl.tasks import Task, task_for

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


def calibration_items(encoder: Any, task: Task) -> tuple[list[Any], list[list[Any]]]:
    """(sequences, vision blocks) of generated inputs: texts in several scripts and lengths, a photo-like
    image, a screenshot, a 4-frame video, mixes; as embedding items or (query, document) pairs, with
    the task's default instruction.
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
    if task.name == "embedding":  # the encoder's two entry points: one item, or one (query, document) pair
        seqs = [encoder.embedding(EmbedItem(c, None, None, None), task.default_instruction) for c in docs]
    else:
        query = Content(("which document answers the question about budgets?",), (), ())
        seqs = [encoder.rerank_pair(query, c, task.default_instruction, None, None) for c in docs]
    return seqs, [encoder.load(s.media) for s in seqs]


class _Branches:
    """The float model (branch 0, whose projection inputs are recorded) and one simulated-int8 copy of
    the activations per candidate plan (branches 1..n; run only when there is a choice to make).
    """

    def __init__(self, candidates: list[Int8Plan], simulate: bool) -> None:
        self.plans = candidates
        self.keys = [0, *range(1, len(candidates) + 1)] if simulate else [0]

    def step(self, states: dict[int, Any], fn: Any, modules: dict[str, Any]) -> dict[int, Any]:
        """Apply `fn` (one layer) to each candidate branch's state with `modules` quantized as it plans.

        Branch 0 (float, recorded) is run by the caller.
        """
        from q3vl.export.quantize.fakequant import quantized

        out = {}
        for k in self.keys[1:]:
            with quantized(modules, self.plans[k - 1]):
                out[k] = fn(states[k])
        return out


def _vision(spec: Any, w: Any, blocks: list[Any], br: _Branches) -> dict[int, list[Any]]:
    """Per branch, the vision outputs (merged rows, deepstack) per block; every projection planned on the way."""
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
    for plan in br.plans:
        project(plan, "patch_embed.w", pv, patch.weight.detach().numpy(), None)
    table = pe["model.visual.pos_embed.weight"]
    half = (v.hidden_size // v.num_heads) // 2
    inv = 1.0 / (v.rope_theta ** (torch.arange(0, half, 2, dtype=F32) / half))
    rot = []
    for f in feeds:
        emb = (f["pos_ids"].unsqueeze(-1).to(F32) * inv).flatten(-2)
        emb = torch.cat((emb, emb), dim=-1).unsqueeze(1)
        rot.append((emb.cos(), emb.sin()))
    with torch.no_grad():
        embed = lambda _: [patch(f["pixel_values"]) + (F.embedding(f["interp_idx"], table)  # noqa: E731
                                                       * f["interp_w"].unsqueeze(-1)).sum(-2) for f in feeds]
        xs = {0: embed(None), **br.step(dict.fromkeys(br.keys), embed, {"patch_embed.w": patch})}
        deep: dict[int, list[list[Any]]] = {b: [[] for _ in feeds] for b in br.keys}
        for i in range(v.depth):
            log.info("int8 calibration: vision block %d/%d", i + 1, v.depth)
            xs = _vision_block(br, VisionBlock(w, f"model.visual.blocks.{i}", v.num_heads, F32, v.layer_norm_eps),
                               i, xs, rot)
            if i in v.deepstack_visual_indexes:
                out = _merge(br, w, f"model.visual.deepstack_merger_list.{v.deepstack_visual_indexes.index(i)}", True,
                             xs, v)
                for b in br.keys:
                    for d, o in zip(deep[b], out[b]):
                        d.append(o)
        merged = _merge(br, w, "model.visual.merger", False, xs, v)
    result: dict[int, list[Any]] = {}
    for key in br.keys:
        result[key] = [None] * len(blocks)
        for g, m, d in zip(groups, merged[key], deep[key]):
            stacked = torch.stack(d, 2)
            for j, i in enumerate(g):
                result[key][i] = (m[j].numpy(), stacked[j].numpy())
    return result


def _vision_block(br: _Branches, blk: Any, i: int, xs: dict[int, list[Any]], rot: list[Any]) -> dict[int, list[Any]]:
    """One ViT block on every branch; the float branch's projection inputs plan the block."""
    names = ("qkv", "proj", "fc1", "fc2")
    taps = _Taps()
    for n in names:
        taps.tap(n, getattr(blk, n))
    out = {0: [blk(x, c, s) for x, (c, s) in zip(xs[0], rot)]}
    x_in, weights = taps.take(), {n: getattr(blk, n).weight.detach().numpy() for n in names}
    for plan in br.plans:
        vision_block(plan, i, x_in, weights)
    run = lambda states: [blk(x, c, s) for x, (c, s) in zip(states, rot)]  # noqa: E731
    out.update(br.step(xs, run, {f"model.visual.blocks.{i}.{n}.w": getattr(blk, n) for n in names}))
    return out


def _merge(br: _Branches, w: Any, prefix: str, postshuffle: bool, xs: dict[int, list[Any]],
           v: Any) -> dict[int, list[Any]]:
    from q3vl.export.modules import F32, Merger

    m, taps = Merger(w, prefix, postshuffle, F32, v.layer_norm_eps, v.spatial_merge_size), _Taps()
    taps.tap("fc1", m.fc1)
    taps.tap("fc2", m.fc2)
    out = {0: [m(x) for x in xs[0]]}
    x_in, weights = taps.take(), {"fc1": m.fc1.weight.detach().numpy(), "fc2": m.fc2.weight.detach().numpy()}
    for plan in br.plans:
        merger(plan, prefix, x_in, weights, postshuffle, v.spatial_merge_size**2)
    out.update(br.step(xs, lambda states: [m(x) for x in states], {prefix + ".fc1.w": m.fc1, prefix + ".fc2.w": m.fc2}))
    return out


def _text(spec: Any, w: Any, feeds: dict[int, dict[str, np.ndarray]], br: _Branches, head: Any) -> dict[int, Any]:
    """Run the decoder layers one at a time on each branch's calibration batch, planning every layer's
    projections from the float branch; returns each branch's head output (`head(final_hidden)`).
    """
    import torch
    import torch.nn.functional as F

    from q3vl.export.modules import F32, DecoderLayer, mrope_selector

    t, f0 = spec.text, feeds[0]
    ids, mask, pos = (torch.from_numpy(f0[k]) for k in ("input_ids", "attention_mask", "position_ids"))
    is_vis = (ids == spec.image_token_id) | (ids == spec.video_token_id)
    row = (torch.cumsum(is_vis.reshape(-1).to(torch.int64), 0) - 1).clamp(min=0).reshape(is_vis.shape)
    m = is_vis.unsqueeze(-1)
    table = w.get("model.language_model.embed_tokens.weight")
    tok = F.embedding(ids, table)
    del table
    xs = {k: torch.where(m, F.embedding(row, torch.from_numpy(feeds[k]["visual_embeds"])), tok) for k in br.keys}
    ds = {k: torch.from_numpy(feeds[k]["deepstack_embeds"]) for k in br.keys}
    inv = 1.0 / (t.rope_theta ** (torch.arange(0, t.head_dim, 2, dtype=F32) / t.head_dim))
    freqs = pos.permute(1, 2, 0)[..., mrope_selector(t.mrope_section, t.head_dim // 2)].to(F32) * inv
    emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)
    cos, sin = emb.cos(), emb.sin()
    seq = ids.shape[1]
    allowed = torch.ones(seq, seq, dtype=torch.bool).tril().unsqueeze(0) & mask.bool().unsqueeze(1)
    bias = torch.where(allowed, 0.0, -1e9).to(F32).unsqueeze(1)
    with torch.no_grad():
        for i in range(t.num_layers):
            log.info("int8 calibration: text layer %d/%d", i + 1, t.num_layers)
            p = f"model.language_model.layers.{i}."
            layer, taps = DecoderLayer(spec, w, p[:-1], F32), _Taps()
            for key, mod in (("qkv", layer.q), ("o_proj", layer.o), ("gate_up", layer.gate), ("down_proj", layer.down)):
                taps.tap(key, mod, mask.bool())
            xs[0] = layer(xs[0], cos, sin, bias)
            wt = {"qkv": torch.cat([layer.q.weight, layer.k.weight, layer.v.weight], 1),
                  "o_proj": layer.o.weight, "gate_up": torch.cat([layer.gate.weight, layer.up.weight], 1),
                  "down_proj": layer.down.weight}
            x_in, weights = taps.take(), {k: v.detach().numpy() for k, v in wt.items()}
            for plan in br.plans:
                text_layer(plan, i, x_in, weights, (t.num_heads, t.num_kv_heads, t.head_dim))
            mods = {p + "qkv": (layer.q, layer.k, layer.v), p + "o_proj": (layer.o,),
                    p + "gate_up": (layer.gate, layer.up), p + "down_proj": (layer.down,)}
            xs.update(br.step(xs, lambda x, layer=layer: layer(x, cos, sin, bias), mods))
            if i < spec.num_deepstack:
                for k in br.keys:
                    xs[k] = xs[k] + torch.where(m, F.embedding(row, ds[k][:, i]), 0.0)
            del layer, wt
        return {k: head(x, mask) for k, x in xs.items()}


def _head(spec: Any, w: Any, task: Task, tokenizer: Any) -> Any:
    """The task's head (the plain graph's torch module) on a final hidden state [B, L, D]: the text
    graph's outputs by name (normalised and raw pooled vector, or the yes/no score).
    """
    import torch

    from q3vl.export.modules import RMSNorm

    norm = RMSNorm(w.get("model.language_model.norm.weight"), spec.text.rms_norm_eps)
    module = task.torch_head(w, task.head_token_ids(tokenizer))

    def head(x: Any, mask: Any) -> dict[str, Any]:
        last = mask.sum(1) - 1
        out = module(norm(x)[torch.arange(x.shape[0]), last])
        return dict(zip(task.outputs, out if isinstance(out, tuple) else (out,)))
    return head


def _candidates(plan: Int8Plan) -> list[Int8Plan]:
    """One plan per smoothing strength to try (a single one when there is nothing to choose)."""
    if plan.alphas is None:
        return [dataclasses.replace(plan, alpha=None, projections={}, _divisors={})]
    return [dataclasses.replace(plan, alpha=a, alphas=(a,), projections={}, _divisors={}) for a in plan.alphas]


def calibrate(checkpoint: str | Path, task: str, plan: Int8Plan | None = None) -> Int8Plan:
    """Plan the int8 projections of a checkpoint's fused graphs for `task` ("embedding" | "reranker").

    `plan` carries the settings (activations, bits, the smoothing strengths to try, max_error). With
    several strengths, each candidate's simulated int8 model runs beside the float one and the
    candidate whose head output (pooled embedding / score) stays closest on the calibration inputs
    is returned, with every candidate's figure in `search`.
    """
    from q3vl.export.exporter import _chat_template
    from q3vl.export.quantize.fakequant import head_error
    from q3vl.export.weights import Weights
    from q3vl.preprocess.encode import Encoder, PreprocessConfig
    from q3vl.preprocess.prompt import ChatTemplate, TextTokenizer
    from q3vl.preprocess.vision import Geometry
    from q3vl.runtime.pipeline import text_feeds
    from q3vl.spec import ModelSpec

    ckpt = Path(checkpoint)
    kind = task_for(task)
    cands = _candidates(plan or Int8Plan())
    br = _Branches(cands, simulate=len(cands) > 1)
    spec = ModelSpec.from_checkpoint(ckpt)
    tokenizer = TextTokenizer(ckpt / "tokenizer.json")
    encoder = Encoder(tokenizer, ChatTemplate(_chat_template(ckpt)), PreprocessConfig(max_length=8192),
                      Geometry.from_spec(spec.vision))
    seqs, blocks = calibration_items(encoder, kind)
    w = Weights(ckpt)
    vision = _vision(spec, w, [b for per in blocks for b in per], br)
    feeds = {}
    for key, outs in vision.items():
        visual, k = [], 0
        for per in blocks:
            visual.append(outs[k:k + len(per)])
            k += len(per)
        feeds[key] = text_feeds(spec, tokenizer.special.endoftext, seqs, visual)
    heads = _text(spec, w, feeds, br, _head(spec, w, kind, tokenizer))
    search = {str(c.alpha): head_error(kind, heads[0], heads[k]) for k, c in zip(br.keys[1:], cands)}
    best = cands[0] if not search else min(cands, key=lambda c: search[str(c.alpha)])
    best.alphas, best.search = (plan or Int8Plan()).alphas, search
    log.info("int8 plan: %s", best.summary())
    return best
