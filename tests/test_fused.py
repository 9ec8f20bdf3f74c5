"""The hand-built fused graphs: the ops they emit, and the M-RoPE-through-RotaryEmbedding trick."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from q3vl.export.fused_text import mrope_axis


def op_counts(path) -> Counter:
    model = onnx.load(str(path), load_external_data=False)
    return Counter((n.domain or "ai.onnx", n.op_type) for n in model.graph.node)


def test_fused_text_graph_ops(tiny_embedding_bundle):
    ops = op_counts(tiny_embedding_bundle / "text.onnx")
    layers = 2
    assert ops[("com.microsoft", "GroupQueryAttention")] == layers
    assert ops[("ai.onnx", "RotaryEmbedding")] == 2 * layers  # q and k (ONNX 23, per-token cos/sin)
    assert ops[("com.microsoft", "SkipSimplifiedLayerNormalization")] == 2 * layers  # post-attn, next/final norm
    assert ops[("ai.onnx", "RMSNormalization")] == 1 + 2 * layers  # first input norm, q_norm, k_norm
    assert ops[("ai.onnx", "MatMul")] == 4 * layers  # q|k|v, o, gate|up, down: one GEMM each
    # (the plain graph has no com.microsoft op: tests/test_tensorrt.py, under -m slow)


def test_fused_vision_graph_ops(tiny_embedding_bundle):
    ops = op_counts(tiny_embedding_bundle / "vision.onnx")
    depth = 3
    assert ops[("com.microsoft", "MultiHeadAttention")] == depth
    assert ops[("ai.onnx", "RotaryEmbedding")] == 2 * depth
    assert ops[("com.microsoft", "SkipLayerNormalization")] == depth
    assert ops[("com.microsoft", "FastGelu")] == depth


def test_mrope_axis_selector():
    sel = mrope_axis((24, 20, 20), 64)
    assert sel[:7].tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert (sel == 1).sum() == 20 and (sel == 2).sum() == 20 and (sel == 0).sum() == 24
    assert sel[60:].tolist() == [0, 0, 0, 0]  # beyond 3 x 20 interleaved entries, t only


def test_per_token_rotary_rows_equal_transformers_mrope():
    """cos/sin rows built per token from 3-D positions reproduce transformers' interleaved M-RoPE."""
    from transformers import Qwen3VLTextConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    cfg = Qwen3VLTextConfig(head_dim=128, rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                                           "mrope_section": [24, 20, 20], "mrope_interleaved": True})
    rope = Qwen3VLTextRotaryEmbedding(cfg)
    pos = torch.stack([torch.arange(10), torch.arange(10) * 2 + 3, torch.arange(10) % 4]).unsqueeze(1)  # [3, 1, 10]
    cos_ref, sin_ref = rope(torch.zeros(1, 10, 8), pos)
    inv = 1.0 / (5e6 ** (np.arange(0, 128, 2, dtype=np.float32) / 128))
    chosen = pos.numpy().transpose(1, 2, 0)[..., mrope_axis((24, 20, 20), 64)]
    freqs = chosen.astype(np.float32) * inv
    assert np.allclose(np.cos(freqs), cos_ref.numpy()[..., :64], atol=1e-6)
    assert np.allclose(np.sin(freqs), sin_ref.numpy()[..., :64], atol=1e-6)


@pytest.mark.parametrize("lengths", [[7, 4], [3, 3, 1]])
def test_gqa_with_right_padding_equals_causal_attention(lengths):
    """The contract the fused text graph relies on: GroupQueryAttention + seqlens_k = right padding."""
    from onnx import TensorProto as T
    from onnx import helper as h

    b, seq, heads, kv, d = len(lengths), max(lengths), 4, 2, 16
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(b, seq, n * d)).astype(np.float32) for n in (heads, kv, kv))
    node = h.make_node("GroupQueryAttention", ["q", "k", "v", "", "", "lens", "total"], ["out"],
                       domain="com.microsoft", num_heads=heads, kv_num_heads=kv, scale=d**-0.5)
    inputs = [h.make_tensor_value_info(n, T.FLOAT, [None] * 3) for n in "qkv"]
    inputs += [h.make_tensor_value_info("lens", T.INT32, [None]), h.make_tensor_value_info("total", T.INT32, [])]
    model = h.make_model(h.make_graph([node], "g", inputs, [h.make_tensor_value_info("out", T.FLOAT, [None] * 3)]),
                         opset_imports=[h.make_opsetid("", 20), h.make_opsetid("com.microsoft", 1)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"q": q, "k": k, "v": v, "lens": np.array(lengths, np.int32) - 1,
                          "total": np.array(seq, np.int32)})[0].reshape(b, seq, heads, d)
    qq, kk, vv = (torch.from_numpy(x).reshape(b, seq, -1, d).transpose(1, 2) for x in (q, k, v))
    kk, vv = kk.repeat_interleave(heads // kv, 1), vv.repeat_interleave(heads // kv, 1)
    for i, n in enumerate(lengths):
        ref = torch.nn.functional.scaled_dot_product_attention(qq[i:i + 1, :, :n], kk[i:i + 1, :, :n],
                                                               vv[i:i + 1, :, :n], is_causal=True)
        assert np.abs(out[i, :n] - ref[0].transpose(0, 1).numpy()).max() < 1e-5
