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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from q3vl.export.heads import heads_for
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

    def simulated(self, modules: dict[str, Any]) -> Iterator[int]:
        """Each candidate branch's key, with `modules` quantized as its plan says while the caller runs
        that branch's step (branch 0, float and recorded, is run by the caller).
        """
        from q3vl.export.quantize.fakequant import quantized

        for k in self.keys[1:]:
            with quantized(modules, self.plans[k - 1]):
                yield k

    def step(self, states: dict[int, Any], fn: Any, modules: dict[str, Any]) -> dict[int, Any]:
        """Apply `fn` (one layer) to each candidate branch's state with `modules` quantized as it plans."""
        return {k: fn(states[k]) for k in self.simulated(modules)}


def _vision(spec: Any, w: Any, blocks: list[Any], br: _Branches) -> dict[int, list[Any]]:
    """Per branch, the vision outputs (merged rows, deepstack) per block; every projection planned on the way.

    The walk of `modules.VisionEncoder` (its patch embedding, rotary and `vision_step`), one block at a
    time, on every group of same-sized blocks.
    """
    import torch

    from q3vl.export.model_math import vision_inv_freq
    from q3vl.export.modules import F32, PatchEmbed, final_merger, vision_layers, vision_rotary
    from q3vl.preprocess.vision import stack_blocks

    v = spec.vision
    sizes = sorted({b.num_patches for b in blocks})
    groups = [[i for i, b in enumerate(blocks) if b.num_patches == n] for n in sizes]
    feeds = [{k: torch.from_numpy(a) for k, a in stack_blocks([blocks[i] for i in g], v.spatial_merge_size,
                                                              v.num_position_embeddings).items()} for g in groups]
    embed = PatchEmbed(spec, w, F32)
    pv = torch.cat([f["pixel_values"].reshape(-1, v.patch_dim) for f in feeds]).numpy()
    for plan in br.plans:
        project(plan, "patch_embed.w", pv, embed.patch.weight.detach().numpy(), None)
    inv = torch.from_numpy(vision_inv_freq(v))
    rot = [vision_rotary(f["pos_ids"], inv) for f in feeds]
    with torch.no_grad():
        run = lambda _: [embed(f["pixel_values"], f["interp_idx"], f["interp_w"]) for f in feeds]  # noqa: E731
        xs = {0: run(None), **br.step(dict.fromkeys(br.keys), run, {"patch_embed.w": embed.patch})}
        deep: dict[int, list[list[Any]]] = {b: [[] for _ in feeds] for b in br.keys}
        for i, (blk, ds) in enumerate(vision_layers(spec, w, F32)):
            log.info("int8 calibration: vision block %d/%d", i + 1, v.depth)
            xs, feats = _vision_step(br, spec, i, blk, ds, xs, rot)
            for b in feats:
                for d, o in zip(deep[b], feats[b]):
                    d.append(o)
        merged = _merge(br, spec, final_merger(spec, w, F32), xs)
    result: dict[int, list[Any]] = {}
    for key in br.keys:
        result[key] = [None] * len(blocks)
        for g, m, d in zip(groups, merged[key], deep[key]):
            stacked = torch.stack(d, 2)
            for j, i in enumerate(g):
                result[key][i] = (m[j].numpy(), stacked[j].numpy())
    return result


_BLOCK_PROJECTIONS = ("qkv", "proj", "fc1", "fc2")


def _vision_step(br: _Branches, spec: Any, i: int, blk: Any, ds: Any, xs: dict[int, list[Any]],
                 rot: list[Any]) -> tuple[dict[int, list[Any]], dict[int, list[Any]]]:
    """`modules.vision_step` (block i, then its DeepStack merger if any) on every branch: (each branch's
    states, each branch's DeepStack maps, empty without a merger). The float branch's projection inputs
    plan the block, then the merger, before the simulated branches run.
    """
    from q3vl.export.modules import vision_step

    taps = _Taps()
    for n in _BLOCK_PROJECTIONS:
        taps.tap(n, getattr(blk, n))
    if ds is not None:
        taps.tap("merger.fc1", ds.fc1)
        taps.tap("merger.fc2", ds.fc2)
    steps = {0: [vision_step(blk, ds, x, c, s) for x, (c, s) in zip(xs[0], rot)]}
    x_in = taps.take()
    weights = {n: getattr(blk, n).weight.detach().numpy() for n in _BLOCK_PROJECTIONS}
    modules = {f"model.visual.blocks.{i}.{n}.w": getattr(blk, n) for n in _BLOCK_PROJECTIONS}
    for plan in br.plans:
        vision_block(plan, i, {n: x_in[n] for n in _BLOCK_PROJECTIONS}, weights)
    if ds is not None:
        _plan_merger(br, spec, ds, {n: x_in["merger." + n] for n in ("fc1", "fc2")})
        modules.update({ds.prefix + ".fc1.w": ds.fc1, ds.prefix + ".fc2.w": ds.fc2})
    run = lambda states: [vision_step(blk, ds, x, c, s) for x, (c, s) in zip(states, rot)]  # noqa: E731
    steps.update(br.step(xs, run, modules))
    states = {b: [x for x, _ in out] for b, out in steps.items()}
    feats = {} if ds is None else {b: [f for _, f in out] for b, out in steps.items()}
    return states, feats


def _plan_merger(br: _Branches, spec: Any, m: Any, x_in: dict[str, Any]) -> None:
    """Plan merger `m`'s two projections from the float branch's inputs `x_in`."""
    weights = {"fc1": m.fc1.weight.detach().numpy(), "fc2": m.fc2.weight.detach().numpy()}
    for plan in br.plans:
        merger(plan, m.prefix, x_in, weights, m.postshuffle, spec.vision.spatial_merge_size**2)


def _merge(br: _Branches, spec: Any, m: Any, xs: dict[int, list[Any]]) -> dict[int, list[Any]]:
    """The final merger on every branch, planned from the float branch's inputs."""
    taps = _Taps()
    taps.tap("fc1", m.fc1)
    taps.tap("fc2", m.fc2)
    out = {0: [m(x) for x in xs[0]]}
    _plan_merger(br, spec, m, taps.take())
    modules = {m.prefix + ".fc1.w": m.fc1, m.prefix + ".fc2.w": m.fc2}
    out.update(br.step(xs, lambda states: [m(x) for x in states], modules))
    return out


def _text(spec: Any, w: Any, feeds: dict[int, dict[str, np.ndarray]], br: _Branches, head: Any) -> dict[int, Any]:
    """The walk of `modules.TextEncoder` (its context, visual placement and `text_step`), one decoder layer
    at a time, on each branch's calibration batch, planning every layer's projections from the float
    branch; returns each branch's head output (`head(final_hidden)`).
    """
    import torch
    import torch.nn.functional as F

    from q3vl.export.model_math import text_inv_freq, text_mrope_axis
    from q3vl.export.modules import F32, place_visual, text_context, text_layers, text_step

    t, f0 = spec.text, feeds[0]
    ids, mask, pos = (torch.from_numpy(f0[k]) for k in ("input_ids", "attention_mask", "position_ids"))
    ctx = text_context(spec, ids, mask, pos, torch.from_numpy(text_inv_freq(t)), torch.from_numpy(text_mrope_axis(t)))
    table = w.get("model.language_model.embed_tokens.weight")
    tok = F.embedding(ids, table)  # cast to float32 by place_visual, as in TextEncoder
    del table
    xs = {k: place_visual(ctx, tok, torch.from_numpy(feeds[k]["visual_embeds"])) for k in br.keys}
    ds = {k: torch.from_numpy(feeds[k]["deepstack_embeds"]) for k in br.keys}
    with torch.no_grad():
        for i, layer in enumerate(text_layers(spec, w, F32)):
            log.info("int8 calibration: text layer %d/%d", i + 1, t.num_layers)
            p, taps = f"model.language_model.layers.{i}.", _Taps()
            for key, mod in (("qkv", layer.q), ("o_proj", layer.o), ("gate_up", layer.gate), ("down_proj", layer.down)):
                taps.tap(key, mod, mask.bool())
            xs[0] = text_step(layer, i, xs[0], ctx, ds[0], spec.num_deepstack)
            wt = {"qkv": torch.cat([layer.q.weight, layer.k.weight, layer.v.weight], 1),
                  "o_proj": layer.o.weight, "gate_up": torch.cat([layer.gate.weight, layer.up.weight], 1),
                  "down_proj": layer.down.weight}
            x_in, weights = taps.take(), {k: v.detach().numpy() for k, v in wt.items()}
            for plan in br.plans:
                text_layer(plan, i, x_in, weights, (t.num_heads, t.num_kv_heads, t.head_dim))
            mods = {p + "qkv": (layer.q, layer.k, layer.v), p + "o_proj": (layer.o,),
                    p + "gate_up": (layer.gate, layer.up), p + "down_proj": (layer.down,)}
            for k in br.simulated(mods):
                xs[k] = text_step(layer, i, xs[k], ctx, ds[k], spec.num_deepstack)
            del layer, wt
        return {k: head(x, mask) for k, x in xs.items()}


def _head(spec: Any, w: Any, task: Task, tokenizer: Any) -> Any:
    """The task's head as `modules.TextEncoder` ends (final norm, last valid token, the task's torch head)
    on a final hidden state [B, L, D]: the text graph's outputs by name (normalised and raw pooled
    vector, or the yes/no score).
    """
    from q3vl.export.modules import RMSNorm, last_valid

    norm = RMSNorm(w.get("model.language_model.norm.weight"), spec.text.rms_norm_eps)
    module = heads_for(task).torch_head(w, task.head_token_ids(tokenizer))

    def head(x: Any, mask: Any) -> dict[str, Any]:
        out = module(last_valid(norm(x), mask))
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
    from q3vl.export.quantize.fakequant import head_error
    from q3vl.export.weights import Weights, read_chat_template
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
    encoder = Encoder(tokenizer, ChatTemplate(read_chat_template(ckpt)), PreprocessConfig(max_length=8192),
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
