"""The export side's model math, written once: rotary frequencies, M-RoPE axes, DeepStack taps.

The fused ONNX builders (`fused_text`, `fused_vision`) write these values into their graphs as
constants, and the traced torch modules (`modules`), which calibration walks layer by layer, read the
same arrays, so the three cannot drift apart. Every value depends on the checkpoint's config only;
everything that depends on an input's grid comes from `q3vl.preprocess` (the vision position taps'
indices and weights, the 3-D position ids).
"""

from __future__ import annotations

import numpy as np

from q3vl.spec import TextSpec, VisionSpec


def rope_inv_freq(theta: float, dim: int) -> np.ndarray:
    """The rotary frequencies of a `dim`-wide rotation, 1 / theta^(2i/dim) for i < dim/2, float32.

    Computed as transformers computes them (float32 torch pow), so the traced graph's angles are
    transformers' to the bit; numpy's pow differs from torch's in the last place for some entries.
    """
    import torch

    exponent = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
    return (1.0 / (theta**exponent)).numpy()


def text_inv_freq(t: TextSpec) -> np.ndarray:
    """The text decoder's frequencies [head_dim/2]; M-RoPE picks a position axis per frequency."""
    return rope_inv_freq(t.rope_theta, t.head_dim)


def vision_inv_freq(v: VisionSpec) -> np.ndarray:
    """The vision tower's 2-D rotary frequencies [head_dim/4], applied to the row and then the column
    position, so each axis takes half of a head's rotated pairs.
    """
    return rope_inv_freq(v.rope_theta, (v.hidden_size // v.num_heads) // 2)


def mrope_axis(section: tuple[int, int, int], half: int) -> np.ndarray:
    """Which position axis (t=0, h=1, w=2) drives each of `half` text rotary frequencies (interleaved
    M-RoPE: t, h, w cycling over 3 x section[1] entries, t beyond), int64.
    """
    sel = np.zeros(half, np.int64)
    sel[1:section[1] * 3:3] = 1
    sel[2:section[2] * 3:3] = 2
    return sel


def text_mrope_axis(t: TextSpec) -> np.ndarray:
    """`mrope_axis` for the text decoder's frequencies [head_dim/2]."""
    return mrope_axis(t.mrope_section, t.head_dim // 2)


def deepstack_slot(v: VisionSpec, block: int) -> int | None:
    """The DeepStack merger that vision block `block`'s output feeds (its row in deepstack_embeds), or None."""
    idx = v.deepstack_visual_indexes
    return idx.index(block) if block in idx else None


def deepstack_merger(slot: int) -> str:
    """The checkpoint prefix of DeepStack merger `slot`."""
    return f"model.visual.deepstack_merger_list.{slot}"


def injects_deepstack(layer: int, num_deepstack: int) -> bool:
    """Whether text layer `layer`'s output gets DeepStack feature map `layer` added at the visual rows."""
    return layer < num_deepstack
