"""Activation statistics of a checkpoint, measured with transformers hooks on ordinary inputs.

What quantization cares about, per layer: the residual stream (each decoder layer's / vision
block's output) and the input of every projection (text: q/k/v, o_proj, gate/up, down_proj;
vision: qkv, proj, fc1, fc2). For each tensor: max|x| / median|x|, the channels holding the
largest values, and how many tokens carry them. Padding tokens are excluded. Used by
`benchmarks/activation_stats.py` (default vs realistic checkpoints side by side) and by the tests
of the realistic generator (`q3vl.testing.outliers`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

TEXT = {"residual": "", "qkv in": "self_attn.q_proj", "o_proj in": "self_attn.o_proj",
        "gate_up in": "mlp.gate_proj", "down in": "mlp.down_proj"}
VISION = {"residual": "", "qkv in": "attn.qkv", "proj in": "attn.proj", "fc1 in": "mlp.linear_fc1",
          "fc2 in": "mlp.linear_fc2"}
CHANNEL_RATIO = 50.0  # a channel is an outlier channel when its max|x| is >= 50x the tensor's median
TOKEN_RATIOS = (100.0, 500.0)  # tokens per sequence carrying any |x| >= these multiples of the median


@dataclass
class TensorStats:
    """One hooked tensor: `tower` "text"/"vision", `layer`, `kind` (a key of TEXT/VISION)."""

    tower: str
    layer: int
    kind: str
    median: float
    ratio: float  # max|x| / median|x|
    top: list[tuple[int, float]]  # up to 3 channels by max|x|, with their max / median
    outlier_channels: int  # channels whose max is >= CHANNEL_RATIO x the median
    seq_tokens: dict[float, int]  # TOKEN_RATIOS -> most tokens of one sequence at or above it in the top channel
    top_share: float  # share of tokens with |x| >= 20x median in the top channel
    norm_ratio: float  # largest token L2 norm / median token norm
    high_norm_share: float  # share of tokens whose norm is >= 4x the median token norm (Darcet et al.)


def tensor_stats(tower: str, layer: int, kind: str, x: np.ndarray, seq: np.ndarray) -> TensorStats:
    """Statistics of `x [tokens, channels]` whose rows belong to sequences `seq [tokens]`."""
    a = np.abs(x.astype(np.float64))
    med = float(np.median(a))
    per_channel = a.max(0)
    order = np.argsort(per_channel)[::-1][:3]
    top_channel = a[:, order[0]]
    counts = {r: int(np.bincount(seq[top_channel >= r * med], minlength=1).max()) for r in TOKEN_RATIOS}
    norms = np.linalg.norm(a, axis=1)
    norm_med = float(np.median(norms))
    return TensorStats(tower, layer, kind, med, float(per_channel.max() / med),
                       [(int(c), float(per_channel[c] / med)) for c in order],
                       int((per_channel >= CHANNEL_RATIO * med).sum()), counts,
                       float((top_channel >= 20 * med).mean()), float(norms.max() / norm_med),
                       float((norms >= 4 * norm_med).mean()))


def default_items() -> list[dict[str, Any]]:
    """Ordinary inputs: short and long English text, non-Latin text, a photo-like image, a screenshot."""
    from q3vl.testing.inputs import MULTILINGUAL, gradient_image, screenshot_image

    return [{"text": "A woman playing with her dog on a beach at sunset."},
            {"text": "Retrieval systems embed queries and documents into one space. " * 6},
            {"text": MULTILINGUAL["chinese"] + " " + MULTILINGUAL["russian"]},
            {"image": gradient_image(448, 448, 3), "text": "a colourful gradient"},
            {"image": screenshot_image(720, 1280)}]


def _hooks(model: Any, batch: dict[str, Any], out: list[TensorStats]) -> list[Any]:
    """Register the forward (pre-)hooks that turn each hooked tensor into a TensorStats row."""
    mask = batch["attention_mask"].bool().numpy()
    text_seq = np.broadcast_to(np.arange(mask.shape[0])[:, None], mask.shape)[mask]
    grid = batch.get("image_grid_thw")
    vis_seq = np.repeat(np.arange(len(grid)), grid.prod(-1).numpy()) if grid is not None else np.zeros(0, int)

    def rows(t: Any, tower: str) -> np.ndarray:
        x = t.detach().float().numpy()
        return x[mask] if tower == "text" else x.reshape(-1, x.shape[-1])

    def record(tower: str, i: int, kind: str, seq: np.ndarray) -> Callable[..., None]:
        def hook(_m: Any, args: Any, output: Any = None) -> None:
            t = args[0] if output is None else (output[0] if isinstance(output, tuple) else output)
            out.append(tensor_stats(tower, i, kind, rows(t, tower), seq))
        return hook

    handles = []
    towers = (("text", model.model.language_model.layers, TEXT, text_seq),
              ("vision", model.model.visual.blocks, VISION, vis_seq))
    for tower, layers, kinds, seq in towers:
        for i, layer in enumerate(layers):
            for kind, sub in kinds.items():
                if not sub:
                    handles.append(layer.register_forward_hook(record(tower, i, kind, seq)))
                else:
                    handles.append(layer.get_submodule(sub).register_forward_pre_hook(record(tower, i, kind, seq)))
    return handles


def measure(checkpoint: str | Path, items: list[dict[str, Any]] | None = None) -> list[TensorStats]:
    """Run `items` (default: `default_items()`) through transformers in float32 with hooks.

    Inputs are prepared by the reference embedder (the published wrapper's preprocessing and chat
    template) for either task: the statistics belong to the shared Qwen3-VL backbone.
    """
    import torch

    from q3vl.reference import ReferenceEmbedder

    ref = ReferenceEmbedder(checkpoint)
    lm = ref.model  # Qwen3VLModel
    batch = dict(ref.preprocess(items or default_items()))
    out: list[TensorStats] = []
    handles = _hooks(_Wrap(lm), batch, out)
    try:
        with torch.no_grad():
            lm(**batch)
    finally:
        for h in handles:
            h.remove()
    order = {"vision": 0, "text": 1}
    kinds = {**{k: n for n, k in enumerate(VISION)}, **{k: n for n, k in enumerate(TEXT)}}
    return sorted(out, key=lambda s: (order[s.tower], s.layer, kinds[s.kind]))


class _Wrap:
    """Gives a bare Qwen3VLModel the `.model` attribute path the hooks walk."""

    def __init__(self, model: Any) -> None:
        self.model = model
