"""The fused text graph: ONNX Runtime contrib ops, built node by node from checkpoint tensors.

Same inputs, outputs and math as the plain (traced) graph in `modules.py`, with the hot paths on
ORT's fused kernels, as onnxruntime-genai's model builder emits them:

    RMSNormalization (ONNX 23) / SkipSimplifiedLayerNormalization   (RMSNorm, residual add fused)
    one MatMul for q|k|v, one for gate|up                              (fewer, larger GEMMs)
    RotaryEmbedding (ONNX 23)                                          (M-RoPE, see below)
    GroupQueryAttention                                                (GQA, causal, right padding)

M-RoPE through a 1-D rotary op: the cos/sin "caches" are built per token from the 3-D position ids
([B, L, d/2], each frequency taking its t/h/w axis) and handed to ONNX's RotaryEmbedding without
position ids, which then rotates each token by its own row: exactly the interleaved multimodal
rotation. GroupQueryAttention needs right padding (its `seqlens_k` are per-row lengths), which is
what the runtime sends; the pooled token of each row is then at `length - 1` (a batched GatherND).

Every node has a CUDA kernel in the pinned onnxruntime-gpu and no tensor crosses between host and
device inside the graph (`q3vl.export.cuda_support`, tests/test_cuda_support.py), so CUDA graphs
can be captured; the one exception is fp32 GroupQueryAttention, whose CUDA kernel is fp16/bf16 only
(fp32 bundles are the CPU product; export fp16 for the GPU).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import TensorProto as T

from q3vl.export.onnx_writer import MS, GraphWriter
from q3vl.export.quantize.quantized import QuantHook
from q3vl.export.weights import Weights
from q3vl.spec import ModelSpec
from q3vl.tasks import Task


def _np(t: object) -> np.ndarray:
    return t.numpy()  # type: ignore[attr-defined]


def mrope_axis(section: tuple[int, int, int], half: int) -> np.ndarray:
    """Which position axis (t=0, h=1, w=2) drives each rotary frequency (interleaved M-RoPE)."""
    sel = np.zeros(half, np.int64)
    sel[1:section[1] * 3:3] = 1
    sel[2:section[2] * 3:3] = 2
    return sel


class TextGraph:
    """Builds text.onnx; `precision` "fp32" or "fp16" (fp16 matmuls/attention, fp32 norms and residual).

    `quant` (fp32 only) writes every constant-weight MatMul in a quantized weight format; `data=False`
    writes a skeleton without weights (`GraphWriter`).
    """

    def __init__(self, spec: ModelSpec, weights: Weights, path: Path, task: Task, token_ids: dict[str, int],
                 precision: str = "fp32", quant: QuantHook | None = None, data: bool = True) -> None:
        self.spec, self.wts, self.task, self.token_ids = spec, weights, task, token_ids
        self.quant = quant
        self.g = GraphWriter(path, quant.transform if quant is not None else None, data=data)
        self.half = precision == "fp16"
        self.wdt = np.float16 if self.half else np.float32

    # ------------------------------------------------------------ helpers
    def matmul(self, x: str, w: np.ndarray, name: str) -> str:
        g = self.g
        if self.quant is not None:
            return self.quant.matmul(g, x, w, name)
        weight = g.weight(name, w.astype(self.wdt))
        if not self.half:
            return g.op("MatMul", [x, weight])
        return g.op("Cast", [g.op("MatMul", [g.op("Cast", [x], to=T.FLOAT16), weight])], to=T.FLOAT)

    def rms(self, x: str, w: np.ndarray, name: str) -> str:
        return self.g.op("RMSNormalization", [x, self.g.weight(name, w.astype(np.float32))], axis=-1,
                         epsilon=self.spec.text.rms_norm_eps)

    def skip_rms(self, x: str, skip: str, w: np.ndarray, name: str) -> tuple[str, str]:
        """(RMSNorm(x + skip), x + skip)."""
        out = self.g.op("SkipSimplifiedLayerNormalization", [x, skip, self.g.weight(name, w.astype(np.float32))],
                        n_out=4, domain=MS, epsilon=self.spec.text.rms_norm_eps)
        return out[0], out[3]

    # ------------------------------------------------------------ graph
    def build(self) -> Path:
        g, t, sp = self.g, self.spec.text, self.spec
        ids = g.add_input("input_ids", T.INT64, ["batch", "sequence"])
        mask = g.add_input("attention_mask", T.INT64, ["batch", "sequence"])
        pos = g.add_input("position_ids", T.INT64, [3, "batch", "sequence"])
        vis = g.add_input("visual_embeds", T.FLOAT, ["visual_rows", t.hidden_size])
        ds = g.add_input("deepstack_embeds", T.FLOAT, ["visual_rows", sp.num_deepstack, t.hidden_size])
        shape = g.op("Shape", [ids])
        x, is_vis, row = self.embed(ids, shape, vis)
        cos, sin = self.rotary(pos)
        lengths = g.op("ReduceSum", [mask, g.const([1], dtype=np.int64)], keepdims=0)
        seqlens_k = g.op("Cast", [g.op("Sub", [lengths, g.const(1, dtype=np.int64)])], to=T.INT32)
        total = g.op("Cast", [g.op("Squeeze", [g.op("Slice", [shape, g.const([1], dtype=np.int64),
                                                              g.const([2], dtype=np.int64)])])], to=T.INT32)
        last = g.op("Unsqueeze", [g.op("Sub", [lengths, g.const(1, dtype=np.int64)]),
                                  g.const([-1], dtype=np.int64)])  # [B, 1]: each row's last valid token
        resid, pending = x, ""
        for i in range(t.num_layers):
            p = f"model.language_model.layers.{i}."
            lw = {k[len(p):]: _np(v) for k, v in self.wts.many(self.wts.names(p)).items()}
            if not pending:
                h = self.rms(resid, lw["input_layernorm.weight"], p + "input_layernorm")
            else:
                h, resid = self.skip_rms(pending, resid, lw["input_layernorm.weight"], p + "input_layernorm")
            attn = self.attention(h, lw, p, cos, sin, seqlens_k, total)
            if i == t.num_layers - 1 and i >= sp.num_deepstack:
                # Only the pooled token's state is read: the last layer's o_proj, MLP and final norm
                # run on one row per sequence ([B, D]) instead of [B, L, D].
                attn, resid = self.take(attn, last), self.take(resid, last)
            attn = self.matmul(attn, lw["self_attn.o_proj.weight"].T, p + "o_proj")
            h, resid = self.skip_rms(attn, resid, lw["post_attention_layernorm.weight"], p + "post_attention_layernorm")
            pending = self.mlp(h, lw, p)
            if i < sp.num_deepstack:
                pending = g.op("Add", [pending, self.deepstack_rows(ds, i, is_vis, row)])
        final, _ = self.skip_rms(pending, resid, _np(self.wts.get("model.language_model.norm.weight")), "final_norm")
        if t.num_layers - 1 < sp.num_deepstack:
            final = self.take(final, last)
        # with a quant hook, the head's constant-weight MatMul (the reranker's yes-minus-no row) goes through
        # it too, as `q3vl quantize` rewrites every constant-weight MatMul of the fp32 graph
        self.task.fused_head(g, final, t.hidden_size, self.wts, self.token_ids,
                             matmul=self.matmul if self.quant is not None else None)
        return g.save("q3vl_text", opset=23)

    def take(self, x: str, last: str) -> str:
        """[B, L, C] -> [B, C]: each row's token at `last` [B, 1] (on the device, no host-side index math)."""
        return self.g.op("GatherND", [x, last], batch_dims=1)

    def embed(self, ids: str, shape: str, vis: str) -> tuple[str, str, str]:
        """Token embeddings with visual rows placed by a cumsum over the vision-token mask."""
        g, sp = self.g, self.spec
        table = g.weight("embed_tokens", _np(self.wts.get("model.language_model.embed_tokens.weight")).astype(self.wdt))
        tok = g.op("Gather", [table, ids])
        if self.half:
            tok = g.op("Cast", [tok], to=T.FLOAT)
        is_vis = g.op("Or", [g.op("Equal", [ids, g.const(sp.image_token_id, dtype=np.int64)]),
                             g.op("Equal", [ids, g.const(sp.video_token_id, dtype=np.int64)])])
        flat = g.op("Reshape", [g.op("Cast", [is_vis], to=T.INT64), g.const([-1], dtype=np.int64)])
        row = g.op("Max", [g.op("Sub", [g.op("CumSum", [flat, g.const(0, dtype=np.int64)]),
                                        g.const(1, dtype=np.int64)]), g.const(0, dtype=np.int64)])
        row = g.op("Reshape", [row, shape])
        is_vis3 = g.op("Unsqueeze", [is_vis, g.const([-1], dtype=np.int64)])
        return g.op("Where", [is_vis3, g.op("Gather", [vis, row]), tok]), is_vis3, row

    def deepstack_rows(self, ds: str, k: int, is_vis3: str, row: str) -> str:
        g = self.g
        feat = g.op("Gather", [ds, g.const(k, dtype=np.int64)], axis=1)
        return g.op("Where", [is_vis3, g.op("Gather", [feat, row]), g.const(0.0, dtype=np.float32)])

    def rotary(self, pos: str) -> tuple[str, str]:
        """Per-token cos/sin [B, L, d/2] from 3-D positions (each frequency on its t/h/w axis)."""
        g, t = self.g, self.spec.text
        half = t.head_dim // 2
        inv_freq = 1.0 / (t.rope_theta ** (np.arange(0, t.head_dim, 2, dtype=np.float32) / t.head_dim))
        per_token = g.op("Transpose", [pos], perm=[1, 2, 0])  # [B, L, 3]
        chosen = g.op("Gather", [per_token, g.const(mrope_axis(t.mrope_section, half))], axis=2)
        freqs = g.op("Mul", [g.op("Cast", [chosen], to=T.FLOAT), g.const(inv_freq.astype(np.float32))])
        return g.op("Cos", [freqs]), g.op("Sin", [freqs])

    def attention(self, h: str, lw: dict[str, np.ndarray], p: str, cos: str, sin: str,
                  seqlens_k: str, total: str) -> str:
        g, t = self.g, self.spec.text
        hd, nq, nkv = t.head_dim, t.num_heads, t.num_kv_heads
        wqkv = np.concatenate([lw[f"self_attn.{n}_proj.weight"] for n in "qkv"]).T
        q, k, v = g.op("Split", [self.matmul(h, wqkv, p + "qkv"), g.const([nq * hd, nkv * hd, nkv * hd],
                                                                            dtype=np.int64)], n_out=3, axis=-1)

        def norm_rotate(x: str, heads: int, name: str) -> str:
            x = g.op("Reshape", [x, g.const([0, 0, heads, hd], dtype=np.int64)])
            x = self.rms(x, lw[f"self_attn.{name}_norm.weight"], p + name + "_norm")
            x = g.op("Reshape", [x, g.const([0, 0, heads * hd], dtype=np.int64)])
            return g.op("RotaryEmbedding", [x, cos, sin], num_heads=heads)  # ONNX 23, no position ids

        q, k = norm_rotate(q, nq, "q"), norm_rotate(k, nkv, "k")
        if self.half:
            q, k, v = (g.op("Cast", [x], to=T.FLOAT16) for x in (q, k, v))
        out = g.op("GroupQueryAttention", [q, k, v, "", "", seqlens_k, total], domain=MS, num_heads=nq,
                   kv_num_heads=nkv, scale=float(hd**-0.5))
        return g.op("Cast", [out], to=T.FLOAT) if self.half else out

    def mlp(self, h: str, lw: dict[str, np.ndarray], p: str) -> str:
        g, f = self.g, self.spec.text.intermediate_size
        gate_up = np.concatenate([lw["mlp.gate_proj.weight"], lw["mlp.up_proj.weight"]]).T
        gate, up = g.op("Split", [self.matmul(h, gate_up, p + "gate_up"), g.const([f, f], dtype=np.int64)], n_out=2,
                        axis=-1)
        act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])
        return self.matmul(act, lw["mlp.down_proj.weight"].T, p + "down_proj")
