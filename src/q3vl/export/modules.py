"""The two exported graphs as plain torch modules, built from a checkpoint's tensors.

Written from the Qwen3-VL math rather than wrapping transformers' classes, so the exported graph
has only shape-polymorphic ops (every grid-dependent value comes from `q3vl.preprocess`), and the
reduced-precision variants can keep exactly the sensitive parts in float32:

- matmul weights are stored in the graph's precision (fp32 / fp16 / bf16);
- the residual stream, every LayerNorm/RMSNorm, rotary, softmax, the pooling head and the
  reranker head run in float32 (fp16 overflow in Qwen-VL vision towers is a known failure,
  transformers #33294); attention scores are formed from a pre-scaled query.

Vision graph  (S blocks of n patches; a block is an image or one video frame pair)
    pixel_values [S, n, 1536], pos_ids [S, n, 2], interp_idx [S, n, 4], interp_w [S, n, 4]
    -> visual_embeds [S, n/4, D], deepstack_embeds [S, n/4, K, D]
Text graph
    input_ids [B, L], attention_mask [B, L], position_ids [3, B, L],
    visual_embeds [V, D], deepstack_embeds [V, K, D]   (V rows in token order; 1 dummy row if none)

DeepStack is row-major by visual row on both sides, so the rows of several vision calls can be
written side by side into one text-graph input buffer (zero-copy on a GPU, see runtime/pipeline.py).
    -> embedding [B, D] (L2-normalised final-norm state at the last valid token), pooled [B, D] (raw)  or
    -> score [B] (sigmoid(h_last . (w_yes - w_no)))

The encoders' walks (`vision_layers` + `vision_step`, `text_layers` + `text_context` + `text_step`,
`last_valid`) are public so that int8 calibration runs exactly them, one layer built at a time; the
config-only math (rotary frequencies, M-RoPE axes, DeepStack slots) is `q3vl.export.model_math`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from q3vl.export.heads import heads_for
from q3vl.export.model_math import (
    deepstack_merger,
    deepstack_slot,
    injects_deepstack,
    text_inv_freq,
    text_mrope_axis,
    vision_inv_freq,
)
from q3vl.export.weights import Weights
from q3vl.spec import ModelSpec
from q3vl.tasks import Task

F32 = torch.float32


def _p(t: torch.Tensor, dtype: torch.dtype = F32) -> nn.Parameter:
    return nn.Parameter(t.to(dtype).contiguous(), requires_grad=False)


class Linear(nn.Module):
    """x @ W^T + b with W in the compute dtype; input cast in, float32 out."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = _p(w.t(), dtype)  # [in, out]: a plain MatMul in the graph
        self.bias = _p(b, dtype) if b is not None else None
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x.to(self.dtype), self.weight)
        if self.bias is not None:
            y = y + self.bias
        return y.to(F32)


class LayerNorm(nn.Module):
    """LayerNorm in float32 (vision blocks and mergers)."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight, self.bias, self.eps = _p(w), _p(b), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """RMSNorm in float32 (text layers, q/k norms, final norm)."""

    def __init__(self, w: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight, self.eps = _p(w), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(a, b) -> (-b, a) over the last dimension's halves, for rotary embeddings."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
              dtype: torch.dtype) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v with the scores' softmax in float32. q, k, v: [..., T, d]."""
    scale = q.shape[-1] ** -0.5
    scores = torch.matmul((q * scale).to(dtype), k.to(dtype).transpose(-1, -2)).to(F32)
    if bias is not None:
        scores = scores + bias
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs.to(dtype), v.to(dtype)).to(F32)


# ------------------------------------------------------------------------------------------ vision
class Merger(nn.Module):
    """2x2 patch merger: LayerNorm (before or after the shuffle), fc1, GELU, fc2."""

    def __init__(self, w: Weights, prefix: str, postshuffle: bool, dtype: torch.dtype, eps: float,
                 merge: int) -> None:
        super().__init__()
        t = w.many([f"{prefix}.{n}" for n in ("norm.weight", "norm.bias", "linear_fc1.weight",
                                              "linear_fc1.bias", "linear_fc2.weight", "linear_fc2.bias")])
        self.prefix = prefix  # the checkpoint's (and the quantization plan's) name for it
        self.postshuffle, self.group = postshuffle, merge * merge
        self.norm = LayerNorm(t[f"{prefix}.norm.weight"], t[f"{prefix}.norm.bias"], eps)
        self.fc1 = Linear(t[f"{prefix}.linear_fc1.weight"], t[f"{prefix}.linear_fc1.bias"], dtype)
        self.fc2 = Linear(t[f"{prefix}.linear_fc2.weight"], t[f"{prefix}.linear_fc2.bias"], dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, n, d = x.shape
        k = self.group
        x = self.norm(x.reshape(s, n // k, k * d)) if self.postshuffle else self.norm(x).reshape(s, n // k, k * d)
        return self.fc2(F.gelu(self.fc1(x)))


class VisionBlock(nn.Module):
    """Pre-norm ViT block: 2-D rotary attention (per block of patches), tanh-GELU MLP."""

    def __init__(self, w: Weights, prefix: str, heads: int, dtype: torch.dtype, eps: float) -> None:
        super().__init__()
        t = w.many(w.names(prefix + "."))
        g = lambda n: t[f"{prefix}.{n}"]  # noqa: E731
        self.norm1 = LayerNorm(g("norm1.weight"), g("norm1.bias"), eps)
        self.norm2 = LayerNorm(g("norm2.weight"), g("norm2.bias"), eps)
        self.qkv = Linear(g("attn.qkv.weight"), g("attn.qkv.bias"), dtype)
        self.proj = Linear(g("attn.proj.weight"), g("attn.proj.bias"), dtype)
        self.fc1 = Linear(g("mlp.linear_fc1.weight"), g("mlp.linear_fc1.bias"), dtype)
        self.fc2 = Linear(g("mlp.linear_fc2.weight"), g("mlp.linear_fc2.bias"), dtype)
        self.heads, self.dtype = heads, dtype

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        s, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(s, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin  # [S, H, n, hd]
        o = attention(q, k, v, None, self.dtype).transpose(1, 2).reshape(s, n, d)
        x = x + self.proj(o)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate="tanh"))


class PatchEmbed(nn.Module):
    """Patch embedding (the Conv3d as one MatMul) plus the learned position embeddings, read at each
    patch's four interpolation taps (indices and weights from `q3vl.preprocess`).
    """

    def __init__(self, spec: ModelSpec, w: Weights, dtype: torch.dtype) -> None:
        super().__init__()
        pe = w.many(["model.visual.patch_embed.proj.weight", "model.visual.patch_embed.proj.bias",
                     "model.visual.pos_embed.weight"])
        conv = pe["model.visual.patch_embed.proj.weight"]
        self.patch = Linear(conv.reshape(conv.shape[0], -1), pe["model.visual.patch_embed.proj.bias"], dtype)
        self.pos_table = _p(pe["model.visual.pos_embed.weight"])

    def forward(self, pixel_values: torch.Tensor, interp_idx: torch.Tensor, interp_w: torch.Tensor) -> torch.Tensor:
        taps = (F.embedding(interp_idx, self.pos_table) * interp_w.unsqueeze(-1)).sum(-2)
        return self.patch(pixel_values) + taps


def _cos_sin(freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [..., 1, T, hd] (a head axis to broadcast over) from per-token angles [..., T, hd/2]."""
    emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(-3)
    return emb.cos(), emb.sin()


def vision_rotary(pos_ids: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D rotary cos/sin [S, 1, n, hd] from (row, column) patch positions [S, n, 2]."""
    return _cos_sin((pos_ids.unsqueeze(-1).to(F32) * inv_freq).flatten(-2))  # [S, n, hd/2]: h freqs, w freqs


def vision_layers(spec: ModelSpec, w: Weights, dtype: torch.dtype) -> Iterator[tuple[VisionBlock, Merger | None]]:
    """The tower's blocks in order, each with the DeepStack merger its output feeds (or None), built on
    demand: the whole tower (`VisionEncoder`) or one block at a time (calibration).
    """
    v = spec.vision
    for i in range(v.depth):
        slot = deepstack_slot(v, i)
        yield (VisionBlock(w, f"model.visual.blocks.{i}", v.num_heads, dtype, v.layer_norm_eps),
               None if slot is None else Merger(w, deepstack_merger(slot), True, dtype, v.layer_norm_eps,
                                                v.spatial_merge_size))


def final_merger(spec: ModelSpec, w: Weights, dtype: torch.dtype) -> Merger:
    """The merger after the last block (LayerNorm before the 2x2 shuffle)."""
    v = spec.vision
    return Merger(w, "model.visual.merger", False, dtype, v.layer_norm_eps, v.spatial_merge_size)


def vision_step(block: nn.Module, ds_merger: nn.Module | None, x: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One step of the tower's walk: the block's output, and its DeepStack feature map if it feeds one."""
    x = block(x, cos, sin)
    return x, None if ds_merger is None else ds_merger(x)


class VisionEncoder(nn.Module):
    """Patch embed, position taps, 2-D rotary, blocks (DeepStack mergers on the way), final merger."""

    def __init__(self, spec: ModelSpec, w: Weights, dtype: torch.dtype = F32) -> None:
        super().__init__()
        self.embed = PatchEmbed(spec, w, dtype)
        self.inv_freq = _p(torch.from_numpy(vision_inv_freq(spec.vision)))
        layers = list(vision_layers(spec, w, dtype))
        self.blocks = nn.ModuleList(b for b, _ in layers)
        self.ds_slot = [deepstack_slot(spec.vision, i) for i in range(len(layers))]
        by_slot = {k: m for k, (_, m) in zip(self.ds_slot, layers) if k is not None and m is not None}
        self.ds_mergers = nn.ModuleList(by_slot[k] for k in range(len(by_slot)))
        self.merger = final_merger(spec, w, dtype)

    def forward(self, pixel_values: torch.Tensor, pos_ids: torch.Tensor, interp_idx: torch.Tensor,
                interp_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.embed(pixel_values, interp_idx, interp_w)
        cos, sin = vision_rotary(pos_ids, self.inv_freq)
        deepstack = []
        for blk, k in zip(self.blocks, self.ds_slot):
            x, feat = vision_step(blk, None if k is None else self.ds_mergers[k], x, cos, sin)
            if feat is not None:
                deepstack.append(feat)
        return self.merger(x), torch.stack(deepstack, 2)


# ------------------------------------------------------------------------------------------ text
class DecoderLayer(nn.Module):
    """Qwen3 decoder layer: RMSNorm, GQA with q/k RMSNorm and M-RoPE, SwiGLU MLP."""

    def __init__(self, spec: ModelSpec, w: Weights, prefix: str, dtype: torch.dtype) -> None:
        super().__init__()
        t, eps = w.many(w.names(prefix + ".")), spec.text.rms_norm_eps
        g = lambda n: t[f"{prefix}.{n}"]  # noqa: E731
        self.in_norm, self.post_norm = RMSNorm(g("input_layernorm.weight"), eps), RMSNorm(
            g("post_attention_layernorm.weight"), eps)
        self.q, self.k, self.v, self.o = (Linear(g(f"self_attn.{n}_proj.weight"), None, dtype) for n in "qkvo")
        self.q_norm, self.k_norm = RMSNorm(g("self_attn.q_norm.weight"), eps), RMSNorm(g("self_attn.k_norm.weight"),
                                                                                        eps)
        self.gate, self.up, self.down = (Linear(g(f"mlp.{n}_proj.weight"), None, dtype) for n in ("gate", "up", "down"))
        self.heads, self.kv_heads, self.head_dim = spec.text.num_heads, spec.text.num_kv_heads, spec.text.head_dim
        self.dtype = dtype

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, seq, _ = x.shape
        h = self.in_norm(x)
        q = self.q_norm(self.q(h).reshape(b, seq, self.heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k(h).reshape(b, seq, self.kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v(h).reshape(b, seq, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        o = attention(q, k, v, bias, self.dtype).transpose(1, 2).reshape(b, seq, self.heads * self.head_dim)
        x = x + self.o(o)
        h = self.post_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


def text_layers(spec: ModelSpec, w: Weights, dtype: torch.dtype) -> Iterator[DecoderLayer]:
    """The decoder layers in order, built on demand: all of them (`TextEncoder`) or one at a time (calibration)."""
    for i in range(spec.text.num_layers):
        yield DecoderLayer(spec, w, f"model.language_model.layers.{i}", dtype)


class TextContext(NamedTuple):
    """What every decoder layer of one batch reads besides the residual stream."""

    cos: torch.Tensor  # [B, 1, L, hd] M-RoPE
    sin: torch.Tensor
    bias: torch.Tensor  # [B, 1, L, L] causal + padding, additive
    is_vis: torch.Tensor  # [B, L, 1] visual-row tokens
    row: torch.Tensor  # [B, L] each token's row in visual_embeds / deepstack_embeds (0 elsewhere)


def text_context(spec: ModelSpec, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                 inv_freq: torch.Tensor, axis: torch.Tensor) -> TextContext:
    """Rotary tables, attention bias and the visual-row map of one batch (`axis`: `model_math.text_mrope_axis`)."""
    pos = position_ids.permute(1, 2, 0)[..., axis]  # [B, L, hd/2]: each frequency's axis
    cos, sin = _cos_sin(pos.to(F32) * inv_freq)
    is_vis = (input_ids == spec.image_token_id) | (input_ids == spec.video_token_id)
    # float cumsum/clip: TensorRT 10 implements CumSum and Clip for float types only (exact below 2^24 rows)
    row = (torch.cumsum(is_vis.reshape(-1).to(F32), 0) - 1).clamp(min=0).to(torch.int64).reshape(is_vis.shape)
    seq = input_ids.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=input_ids.device).tril()
    allowed = causal.unsqueeze(0) & attention_mask.bool().unsqueeze(1)  # [B, L, L]
    bias = torch.where(allowed, 0.0, -1e9).to(F32).unsqueeze(1)
    return TextContext(cos, sin, bias, is_vis.unsqueeze(-1), row)


def place_visual(ctx: TextContext, tokens: torch.Tensor, visual_embeds: torch.Tensor) -> torch.Tensor:
    """The first residual stream: token embeddings [B, L, D] with the visual rows written in token order."""
    return torch.where(ctx.is_vis, F.embedding(ctx.row, visual_embeds), tokens.to(F32))


def text_step(layer: nn.Module, i: int, x: torch.Tensor, ctx: TextContext, deepstack_embeds: torch.Tensor,
              num_deepstack: int) -> torch.Tensor:
    """One step of the decoder's walk: layer `i`, then DeepStack map `i` added at the visual rows if it has one."""
    x = layer(x, ctx.cos, ctx.sin, ctx.bias)
    if injects_deepstack(i, num_deepstack):
        x = x + torch.where(ctx.is_vis, F.embedding(ctx.row, deepstack_embeds[:, i]), 0.0)
    return x


def last_valid(x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Each row's state at its last valid token: [B, L, D] -> [B, D] (right or left padding)."""
    last = x.shape[1] - 1 - torch.argmax(attention_mask.flip(-1).to(torch.int64), dim=-1)
    return x[torch.arange(x.shape[0], device=x.device), last]


class TextEncoder(nn.Module):
    """Token embedding, visual row placement, DeepStack, decoder layers, final norm, fused head."""

    def __init__(self, spec: ModelSpec, w: Weights, task: Task, token_ids: dict[str, int],
                 dtype: torch.dtype = F32) -> None:
        super().__init__()
        self.spec = spec
        self.embed = _p(w.get("model.language_model.embed_tokens.weight"), dtype)
        self.layers = nn.ModuleList(text_layers(spec, w, dtype))
        self.norm = RMSNorm(w.get("model.language_model.norm.weight"), spec.text.rms_norm_eps)
        self.inv_freq = _p(torch.from_numpy(text_inv_freq(spec.text)))
        self.axis: torch.Tensor
        self.register_buffer("axis", torch.from_numpy(text_mrope_axis(spec.text)), persistent=False)
        self.head = heads_for(task).torch_head(w, token_ids)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                visual_embeds: torch.Tensor, deepstack_embeds: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        ctx = text_context(self.spec, input_ids, attention_mask, position_ids, self.inv_freq, self.axis)
        x = place_visual(ctx, F.embedding(input_ids, self.embed), visual_embeds)
        for i, layer in enumerate(self.layers):
            x = text_step(layer, i, x, ctx, deepstack_embeds, self.spec.num_deepstack)
        return self.head(last_valid(self.norm(x), attention_mask))
