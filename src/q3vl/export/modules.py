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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from q3vl.export.heads import heads_for
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


class VisionEncoder(nn.Module):
    """Patch embed (Conv3d as MatMul), learned position taps, 2-D rotary, blocks, mergers."""

    def __init__(self, spec: ModelSpec, w: Weights, dtype: torch.dtype = F32) -> None:
        super().__init__()
        v = spec.vision
        pe = w.many(["model.visual.patch_embed.proj.weight", "model.visual.patch_embed.proj.bias",
                     "model.visual.pos_embed.weight"])
        conv = pe["model.visual.patch_embed.proj.weight"]
        self.patch = Linear(conv.reshape(conv.shape[0], -1), pe["model.visual.patch_embed.proj.bias"], dtype)
        self.pos_table = _p(pe["model.visual.pos_embed.weight"])
        head_dim = v.hidden_size // v.num_heads
        quarter = head_dim // 2
        self.inv_freq = _p(1.0 / (v.rope_theta ** (torch.arange(0, quarter, 2, dtype=F32) / quarter)))
        eps, merge = v.layer_norm_eps, v.spatial_merge_size
        self.blocks = nn.ModuleList(VisionBlock(w, f"model.visual.blocks.{i}", v.num_heads, dtype, eps)
                                    for i in range(v.depth))
        self.ds_index = list(v.deepstack_visual_indexes)
        self.ds_mergers = nn.ModuleList(Merger(w, f"model.visual.deepstack_merger_list.{i}", True, dtype, eps, merge)
                                        for i in range(len(self.ds_index)))
        self.merger = Merger(w, "model.visual.merger", False, dtype, eps, merge)

    def forward(self, pixel_values: torch.Tensor, pos_ids: torch.Tensor, interp_idx: torch.Tensor,
                interp_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.patch(pixel_values)
        x = x + (F.embedding(interp_idx, self.pos_table) * interp_w.unsqueeze(-1)).sum(-2)
        freqs = (pos_ids.unsqueeze(-1).to(F32) * self.inv_freq).flatten(-2)  # [S, n, hd/2]: h freqs, w freqs
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)  # [S, 1, n, hd]
        cos, sin = emb.cos(), emb.sin()
        deepstack = []
        for i, blk in enumerate(self.blocks):
            x = blk(x, cos, sin)
            if i in self.ds_index:
                deepstack.append(self.ds_mergers[self.ds_index.index(i)](x))
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


def mrope_selector(section: tuple[int, int, int], half: int) -> torch.Tensor:
    """Which position axis (t=0, h=1, w=2) drives each rotary frequency (interleaved M-RoPE)."""
    sel = torch.zeros(half, dtype=torch.long)
    sel[1:section[1] * 3:3] = 1
    sel[2:section[2] * 3:3] = 2
    return sel


class TextEncoder(nn.Module):
    """Token embedding, visual row placement, DeepStack, decoder layers, final norm, fused head."""

    def __init__(self, spec: ModelSpec, w: Weights, task: Task, token_ids: dict[str, int],
                 dtype: torch.dtype = F32) -> None:
        super().__init__()
        t = spec.text
        emb_name = "model.language_model.embed_tokens.weight"
        self.embed = _p(w.get(emb_name), dtype)
        self.layers = nn.ModuleList(DecoderLayer(spec, w, f"model.language_model.layers.{i}", dtype)
                                    for i in range(t.num_layers))
        self.norm = RMSNorm(w.get("model.language_model.norm.weight"), t.rms_norm_eps)
        half = t.head_dim // 2
        self.inv_freq = _p(1.0 / (t.rope_theta ** (torch.arange(0, t.head_dim, 2, dtype=F32) / t.head_dim)))
        self.axis: torch.Tensor
        self.register_buffer("axis", mrope_selector(t.mrope_section, half), persistent=False)
        self.vision_ids = (spec.image_token_id, spec.video_token_id)
        self.num_deepstack = spec.num_deepstack
        self.head = heads_for(task).torch_head(w, token_ids)

    def rotary(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = position_ids.permute(1, 2, 0)[..., self.axis]  # [B, L, hd/2]: each frequency's axis
        freqs = pos.to(F32) * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)  # [B, 1, L, hd]
        return emb.cos(), emb.sin()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                visual_embeds: torch.Tensor, deepstack_embeds: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        is_vis = (input_ids == self.vision_ids[0]) | (input_ids == self.vision_ids[1])
        # float cumsum/clip: TensorRT 10 implements CumSum and Clip for float types only (exact below 2^24 rows)
        row = (torch.cumsum(is_vis.reshape(-1).to(F32), 0) - 1).clamp(min=0).to(torch.int64).reshape(is_vis.shape)
        m = is_vis.unsqueeze(-1)
        x = torch.where(m, F.embedding(row, visual_embeds), F.embedding(input_ids, self.embed).to(F32))
        cos, sin = self.rotary(position_ids)
        seq = input_ids.shape[1]
        causal = torch.ones(seq, seq, dtype=torch.bool, device=input_ids.device).tril()
        allowed = causal.unsqueeze(0) & attention_mask.bool().unsqueeze(1)  # [B, L, L]
        bias = torch.where(allowed, 0.0, -1e9).to(F32).unsqueeze(1)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, bias)
            if i < self.num_deepstack:
                x = x + torch.where(m, F.embedding(row, deepstack_embeds[:, i]), 0.0)
        x = self.norm(x)
        last = seq - 1 - torch.argmax(attention_mask.flip(-1).to(torch.int64), dim=-1)
        return self.head(x[torch.arange(x.shape[0], device=x.device), last])
