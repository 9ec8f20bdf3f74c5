"""From calibration activations and weights to an `Int8Plan`, one layer at a time (numpy only).

The calibrator (`q3vl.export.quantize.calibrate`) runs the checkpoint layer by layer and hands each layer's
projection inputs `x [tokens, K]` and graph-layout weights `w [K, N]` here; they are dropped as
soon as the layer's plan entries are made, so an 8B model is planned in one layer's memory.

Order inside a layer matters: o_proj's smoothing divides the v columns of qkv, and down_proj's
divides the up columns of gate_up, so those two are planned first and qkv / gate_up are planned
against the weights as the graph will hold them.
"""

from __future__ import annotations

import numpy as np

from q3vl.export.quantize.int8 import Fold, Int8Plan, Projection, simulated_error, smoothing_scales

SIM_ROWS = 512  # simulate the int8 error on at most this many rows (the largest ones always kept)


def _rows(x: np.ndarray) -> np.ndarray:
    """The rows the error is simulated on: all, or the quarter with the largest |x| plus an even sample."""
    if len(x) <= SIM_ROWS:
        return x
    peak = np.argsort(np.abs(x).max(1))[-SIM_ROWS // 4:]
    rest = np.linspace(0, len(x) - 1, SIM_ROWS - SIM_ROWS // 4).astype(int)
    return x[np.union1d(peak, rest)]


def _finish(plan: Int8Plan, name: str, x: np.ndarray, w: np.ndarray, s: np.ndarray | None,
            folds: list[Fold]) -> Projection:
    """Simulate the int8 error with smoothing `s` and decide the float fallback."""
    xs, ws = (x, w) if s is None else (x / s, w * s[:, None])
    err = simulated_error(_rows(xs), ws, plan.weight_bits, plan.activations, plan.activation_bits)
    keep = plan.max_error is not None and err > plan.max_error
    p = Projection(name, s, keep, err, folds if s is not None else [])
    plan.add(p)
    return p


def project(plan: Int8Plan, name: str, x: np.ndarray, w: np.ndarray, fold: list[tuple[str, int]] | None,
            tie: tuple[int, int] | None = None) -> Projection:
    """Plan one projection: smoothing folded into the `fold` targets ((initializer, offset) pairs; None
    when the input comes from a non-linear op and cannot be smoothed), then the error and the fallback.

    `tie` = (groups, copies): the input's channels are `copies` interleaved or tiled repeats that one
    scale must serve (GQA heads sharing a v head: (kv_heads, q_heads // kv_heads) over [kv, rep, hd];
    the final merger's 4 shuffled copies: (1, 4) over [4, D]); folds then get the shared scales.
    """
    if plan.alpha is None or fold is None:
        return _finish(plan, name, x, w, None, [])
    xmax, wmax = np.abs(x).max(0), np.abs(w).max(1)
    if tie is None:
        s = smoothing_scales(xmax, wmax, plan.alpha)
        shared = s
    else:
        groups, copies = tie
        shape = (groups, copies, -1)
        shared = smoothing_scales(xmax.reshape(shape).max(1).ravel(), wmax.reshape(shape).max(1).ravel(),
                                  plan.alpha)
        s = np.broadcast_to(shared.reshape(groups, 1, -1), (groups, copies, len(shared) // groups)).ravel()
    return _finish(plan, name, x, w, s.astype(np.float32), [Fold(t, off, shared) for t, off in fold])


def _divided(w: np.ndarray, p: Projection, offset: int) -> np.ndarray:
    """`w` with the fold `p` puts at its output columns from `offset` applied (as the graph will hold it)."""
    if p.smooth is None:
        return w
    d = next(f.divisor for f in p.folds if f.offset == offset)
    out = w.copy()
    out[:, offset:offset + len(d)] /= d
    return out


def text_layer(plan: Int8Plan, i: int, x: dict[str, np.ndarray], w: dict[str, np.ndarray],
               heads: tuple[int, int, int]) -> None:
    """A decoder layer: x and w keyed "qkv", "o_proj", "gate_up", "down_proj"; heads = (q, kv, head_dim)."""
    p = f"model.language_model.layers.{i}."
    nq, nkv, hd = heads
    v_off, up_off = (nq + nkv) * hd, w["gate_up"].shape[1] // 2
    o = project(plan, p + "o_proj", x["o_proj"], w["o_proj"], [(p + "qkv", v_off)], tie=(nkv, nq // nkv))
    down = project(plan, p + "down_proj", x["down_proj"], w["down_proj"], [(p + "gate_up", up_off)])
    project(plan, p + "qkv", x["qkv"], _divided(w["qkv"], o, v_off), [(p + "input_layernorm", 0)])
    project(plan, p + "gate_up", x["gate_up"], _divided(w["gate_up"], down, up_off),
            [(p + "post_attention_layernorm", 0)])


def vision_block(plan: Int8Plan, i: int, x: dict[str, np.ndarray], w: dict[str, np.ndarray]) -> None:
    """A ViT block: x and w keyed "qkv", "proj", "fc1", "fc2" (weights [K, N], without biases)."""
    p = f"model.visual.blocks.{i}."
    v_off = 2 * w["proj"].shape[0]
    proj = project(plan, p + "proj.w", x["proj"], w["proj"], [(p + "qkv.w", v_off), (p + "qkv.b", v_off)])
    project(plan, p + "qkv.w", x["qkv"], _divided(w["qkv"], proj, v_off), [(p + "norm1.g", 0), (p + "norm1.b", 0)])
    project(plan, p + "fc1.w", x["fc1"], w["fc1"], [(p + "norm2.g", 0), (p + "norm2.b", 0)])
    project(plan, p + "fc2.w", x["fc2"], w["fc2"], None)  # after GELU: nothing linear to fold into


def merger(plan: Int8Plan, prefix: str, x: dict[str, np.ndarray], w: dict[str, np.ndarray], postshuffle: bool,
           group: int = 4) -> None:
    """A patch merger: LayerNorm (after the merge_size x merge_size shuffle, or before it: then its
    `group` = merge_size**2 tiled copies share a scale).
    """
    norm = [(prefix + ".norm.g", 0), (prefix + ".norm.b", 0)]
    project(plan, prefix + ".fc1.w", x["fc1"], w["fc1"], norm, tie=None if postshuffle else (1, group))
    project(plan, prefix + ".fc2.w", x["fc2"], w["fc2"], None)
