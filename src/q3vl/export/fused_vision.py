"""The fused vision graph: ONNX Runtime contrib ops, built node by node from checkpoint tensors.

Same inputs/outputs as the plain graph (S blocks of n patches), with LayerNormalization /
SkipLayerNormalization, ONNX's RotaryEmbedding for the 2-D rotary (per-token cos/sin [S, n, hd/2]
without position ids, as in the text graph), MultiHeadAttention over `[S, n, D]` (each block attends
to itself; no mask), FastGelu with the bias folded in, and the Conv3d patch embedding as one MatMul.
No shape math: every node runs on the CUDA provider (`q3vl.export.cuda_support`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import TensorProto as T

from q3vl.export.fused_text import _np
from q3vl.export.onnx_writer import MS, GraphWriter
from q3vl.export.quantize.quantized import QuantHook
from q3vl.export.weights import Weights
from q3vl.spec import ModelSpec


class VisionGraph:
    """Builds vision.onnx; `precision` "fp32" or "fp16" (fp16 matmuls/attention, fp32 norms/residual).

    `quant` (fp32 only) writes every constant-weight MatMul in a quantized weight format; `data=False`
    writes a skeleton without weights (`GraphWriter`).
    """

    def __init__(self, spec: ModelSpec, weights: Weights, path: Path, precision: str = "fp32",
                 quant: QuantHook | None = None, data: bool = True) -> None:
        self.spec, self.wts, self.quant = spec, weights, quant
        self.g = GraphWriter(path, quant.transform if quant is not None else None, data=data)
        self.half = precision == "fp16"
        self.wdt = np.float16 if self.half else np.float32

    def linear(self, x: str, w: np.ndarray, b: np.ndarray | None, name: str) -> str:
        g = self.g
        if self.quant is not None:
            y = self.quant.matmul(g, x, w.T.astype(np.float32), name + ".w")
        else:
            weight = g.weight(name + ".w", w.T.astype(self.wdt))
            y = g.op("MatMul", [g.op("Cast", [x], to=T.FLOAT16) if self.half else x, weight])
            if self.half:
                y = g.op("Cast", [y], to=T.FLOAT)
        return y if b is None else g.op("Add", [y, g.weight(name + ".b", b.astype(np.float32))])

    def layer_norm(self, x: str, w: np.ndarray, b: np.ndarray, name: str) -> str:
        g = self.g
        return g.op("LayerNormalization", [x, g.weight(name + ".g", w), g.weight(name + ".b", b)], axis=-1,
                    epsilon=self.spec.vision.layer_norm_eps)

    def build(self) -> Path:
        g, v = self.g, self.spec.vision
        pv = g.add_input("pixel_values", T.FLOAT, ["blocks", "patches", v.patch_dim])
        pos = g.add_input("pos_ids", T.INT64, ["blocks", "patches", 2])
        taps = g.add_input("interp_idx", T.INT64, ["blocks", "patches", 4])
        tap_w = g.add_input("interp_w", T.FLOAT, ["blocks", "patches", 4])
        w = {k: _np(t) for k, t in self.wts.many(["model.visual.patch_embed.proj.weight",
                                                  "model.visual.patch_embed.proj.bias",
                                                  "model.visual.pos_embed.weight"]).items()}
        conv = w["model.visual.patch_embed.proj.weight"]
        x = self.linear(pv, conv.reshape(conv.shape[0], -1), w["model.visual.patch_embed.proj.bias"], "patch_embed")
        table = g.weight("pos_embed", w["model.visual.pos_embed.weight"])
        weights_4 = g.op("Unsqueeze", [tap_w, g.const([-1], dtype=np.int64)])
        weighted = g.op("Mul", [g.op("Gather", [table, taps]), weights_4])
        x = g.op("Add", [x, g.op("ReduceSum", [weighted, g.const([-2], dtype=np.int64)], keepdims=0)])
        cos, sin = self.rotary(pos)
        deepstack = []
        for i in range(v.depth):
            x = self.block(x, i, cos, sin)
            if i in v.deepstack_visual_indexes:
                k = v.deepstack_visual_indexes.index(i)
                deepstack.append(self.merger(x, f"model.visual.deepstack_merger_list.{k}", postshuffle=True))
        out = self.merger(x, "model.visual.merger", postshuffle=False)
        d = v.out_hidden_size
        g.add_output(out, "visual_embeds", T.FLOAT, ["blocks", "merged", d])
        stacked = g.op("Concat", [g.op("Unsqueeze", [f, g.const([2], dtype=np.int64)]) for f in deepstack], axis=2)
        g.add_output(stacked, "deepstack_embeds", T.FLOAT, ["blocks", "merged", len(deepstack), d])
        return g.save("q3vl_vision", opset=23)

    def rotary(self, pos: str) -> tuple[str, str]:
        """Per-token cos/sin [S, n, hd/2] (h frequencies then w frequencies)."""
        g, v = self.g, self.spec.vision
        half = (v.hidden_size // v.num_heads) // 2  # h frequencies then w frequencies, hd/4 each
        inv = (1.0 / (v.rope_theta ** (np.arange(0, half, 2, dtype=np.float32) / half))).astype(np.float32)
        freqs = g.op("Mul", [g.op("Unsqueeze", [g.op("Cast", [pos], to=T.FLOAT), g.const([-1], dtype=np.int64)]),
                             g.const(inv)])  # [S, n, 2, hd/4]
        per_token = g.const([0, 0, half], dtype=np.int64)
        return (g.op("Reshape", [g.op("Cos", [freqs]), per_token]),
                g.op("Reshape", [g.op("Sin", [freqs]), per_token]))

    def block(self, x: str, i: int, cos: str, sin: str) -> str:
        g, v = self.g, self.spec.vision
        p = f"model.visual.blocks.{i}."
        w = {k[len(p):]: _np(t) for k, t in self.wts.many(self.wts.names(p)).items()}
        d, heads = v.hidden_size, v.num_heads
        h = self.layer_norm(x, w["norm1.weight"], w["norm1.bias"], p + "norm1")
        q, k, val = g.op("Split", [self.linear(h, w["attn.qkv.weight"], w["attn.qkv.bias"], p + "qkv"),
                                   g.const([d, d, d], dtype=np.int64)], n_out=3, axis=-1)
        q = g.op("RotaryEmbedding", [q, cos, sin], num_heads=heads)  # ONNX 23, no position ids
        k = g.op("RotaryEmbedding", [k, cos, sin], num_heads=heads)
        if self.half:
            q, k, val = (g.op("Cast", [t], to=T.FLOAT16) for t in (q, k, val))
        attn = g.op("MultiHeadAttention", [q, k, val], domain=MS, num_heads=heads,
                    scale=float((d // heads) ** -0.5))
        if self.half:
            attn = g.op("Cast", [attn], to=T.FLOAT)
        o = self.linear(attn, w["attn.proj.weight"], None, p + "proj")
        out = g.op("SkipLayerNormalization", [o, x, g.weight(p + "norm2.g", w["norm2.weight"]),
                                              g.weight(p + "norm2.b", w["norm2.bias"]),
                                              g.weight(p + "proj.b", w["attn.proj.bias"])],
                   n_out=4, domain=MS, epsilon=self.spec.vision.layer_norm_eps)
        h2, x2 = out[0], out[3]
        fc1 = self.linear(h2, w["mlp.linear_fc1.weight"], None, p + "fc1")
        act = g.op("FastGelu", [fc1, g.weight(p + "fc1.b", w["mlp.linear_fc1.bias"])], domain=MS)
        return g.op("Add", [x2, self.linear(act, w["mlp.linear_fc2.weight"], w["mlp.linear_fc2.bias"], p + "fc2")])

    def merger(self, x: str, p: str, postshuffle: bool) -> str:
        g = self.g
        w = {k[len(p) + 1:]: _np(t) for k, t in self.wts.many(self.wts.names(p + ".")).items()}
        d4 = self.spec.vision.spatial_merge_size**2 * self.spec.vision.hidden_size
        shuffle = g.const([0, -1, d4], dtype=np.int64)
        if postshuffle:
            h = self.layer_norm(g.op("Reshape", [x, shuffle]), w["norm.weight"], w["norm.bias"], p + ".norm")
        else:
            h = g.op("Reshape", [self.layer_norm(x, w["norm.weight"], w["norm.bias"], p + ".norm"), shuffle])
        h = g.op("Gelu", [self.linear(h, w["linear_fc1.weight"], w["linear_fc1.bias"], p + ".fc1")])
        return self.linear(h, w["linear_fc2.weight"], w["linear_fc2.bias"], p + ".fc2")
