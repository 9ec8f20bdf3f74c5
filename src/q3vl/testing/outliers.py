"""Outlier-realistic random weights: `make_checkpoint(..., activations="realistic")`.

Plain Gaussian weights have none of the activation outliers of trained LLMs and ViTs, and those
outliers are what breaks activation quantization. This module edits the freshly drawn tensors,
one tensor at a time (the writer streams shards), so that transformers, on ordinary inputs,
computes the outlier patterns the literature measured on trained models of this family. Every
edit is a weight: nothing is special-cased at run time, the exported graphs carry it.

Text model (Qwen3 decoder), figures and sources:

- **Massive activations** (Sun et al. 2024, arXiv 2402.17762: a few fixed residual channels,
  at the starting token and delimiter tokens, 10^3-10^5 x the median, emerging abruptly in an early
  layer's MLP and carried unchanged by the residual). Measured on the Qwen3 LLMs that Qwen3-VL
  builds on (Chen et al. 2026, arXiv 2605.15572, logs in github.com/clx1415926/Max_act_llm):
  Qwen3-1.7B reaches 14,016 in the residual stream at layer 2 of 28 (mean |h| 0.36 there, ~1.5 at
  mid-depth: 4e4 down to 6e3 x the mean), unchanged to layer 26, and its last layer's MLP removes
  ~47% of it; Qwen3-8B reaches 15,360 at layer 6 of 36, and layers 34 and 35 remove 28% and 20%.
  Here: two fixed channels, +M and -0.6 M with M = 1e4 (the embeddings have unit std, so this is
  ~1e4 x the median where it appears), at every `<|im_start|>` token (the first token of every
  sequence, and the turn delimiters: 3 per embedding or reranking prompt), emerging in the layer
  `MASSIVE_LAYERS` gives for the shape and partly removed by the late layers it lists.
- **Down-projection input spikes** (Yang et al. 2024, arXiv 2405.14428: GLU activations in early
  and late layers, dedicated to a couple of tokens; Qwen3-1.7B's gate pre-activation reaches 121.5
  at layer 2 where the mean |gate| is 3.0). They are what writes the massive activations: in the
  emergence layer one SwiGLU unit reads a direction planted in the `<|im_start|>` embedding and
  fires there at ~0.65 d (2e3-1e4 x the median unit), and one large down-projection weight (a
  "super weight", Yu et al. 2024, arXiv 2411.07191) carries it into the massive channels; in the
  late layers one unit reads the massive channels and writes the partial cancellation back.
  Gate and up both read the direction (a product), and the gate also subtracts a shared direction
  that every embedding and visual token carries (residual-stream anisotropy; the negative gate
  offset trained units show, Qwen3-1.7B's early gates averaging -3), so ordinary tokens leave the
  unit at zero and only the planted tokens fire.
- **Channel-wise outliers at projection inputs** (Xiao et al. 2023 SmoothQuant, arXiv 2211.10438:
  a few fixed channels ~100 x the others, persistent across tokens; Dettmers et al. 2022,
  arXiv 2208.07339: the same few dimensions in every layer). Planted by function-preserving
  migration: a channel of a norm's gain (or of v_proj / up_proj's output) is multiplied by s and
  the consuming projection's input column divided by s, s log-uniform in [16, 48] ([24, 64] for
  o_proj, [3, 8] for down_proj whose SwiGLU inputs are heavy-tailed already): the model computes
  the same function, but the projection inputs carry those channels at ~60-300 x the median.
  Hidden-size channels (q/k/v and gate/up inputs) are shared by all layers; o_proj and down_proj
  input channels are drawn per layer.

Vision tower (Qwen3-VL's ViT): Darcet et al. 2024 (arXiv 2309.16588) find high-norm tokens in
large ViTs from about a third of the depth on, ~2% of the patches, ~10x the norm of the others,
and Jiang et al. 2025 (arXiv 2506.08010) trace them to a few "register neurons" whose MLP
activations fire only on those tokens and write fixed channels; Sun et al. (section 6) show the
fixed channels. Here: two register neurons in block depth // 3 (a thresholded GELU unit reading a
direction planted in 2% of the learned position-table rows, so the outlier patches are chosen by
position rather than content) write two fixed channels with ~10x the typical token norm; the
norm1/norm2 gains and the v -> proj path get the same channel migration as the text model.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

IM_START = 151644  # <|im_start|> in the Qwen tokenizer
MASSIVE = 1.0e4  # residual units; embeddings have std 1
# shape -> (emergence layer, ((late layer, fraction of the massive value it removes), ...))
MASSIVE_LAYERS: dict[str, tuple[int, tuple[tuple[int, float], ...]]] = {
    "tiny": (0, ((1, 0.47),)),
    "small": (1, ((6, 0.28), (7, 0.2))),  # the 8B pattern on 8 layers
    "2b": (2, ((27, 0.47),)),  # Qwen3-1.7B
    "8b": (6, ((34, 0.28), (35, 0.2))),  # Qwen3-8B
}
GAIN = 0.806  # sqrt(0.65): a spike unit's gate/up weight along its (unit) trigger direction
TRIGGER_GAIN = 4.0  # the <|im_start|> embedding gets 4 sqrt(d) along the trigger direction
MEAN_GAIN = 0.75  # every embedding gets 0.75 sqrt(d) along one shared direction (anisotropy)
GATE_OFFSET = 6.0  # spike units' gates sit this many standard deviations below zero on ordinary tokens
SCALE_RANGE = (16.0, 48.0)  # channel migration factors (log-uniform)
O_SCALE_RANGE = (24.0, 64.0)  # o_proj inputs: attention averages, lighter-tailed than the norms' outputs
DOWN_SCALE_RANGE = (3.0, 8.0)  # down_proj inputs (SwiGLU products) are heavy-tailed already: ~45x max/median
REGISTER_FRACTION = 0.02  # of the position-table rows
REGISTER_INPUT_GAIN = 2.5  # planted position rows get 2.5 sqrt(d) along the register direction
REGISTER_THRESHOLD = 0.4  # x sqrt(d): register neurons fire above it
REGISTER_SPIKE = 150.0  # register-neuron activation (fc2 input) at a fully planted position
REGISTER_TYPICAL = 75.0  # ... and its typical value where it fires (measured: positions blend 4 table rows)
HIGH_NORM = 10.0  # high-norm tokens: ~10x the typical token norm (Darcet et al.)


@dataclass
class _Migration:
    """Channels scaled up by s at a projection input (and down by s in its weight columns)."""

    channels: np.ndarray
    scales: np.ndarray


@dataclass
class OutlierPlan:
    """Everything the edits need, drawn once from the seed; `edit` applies it tensor by tensor."""

    shape: str
    d: int
    head_dim: int
    kv_heads: int
    q_heads: int
    massive_channels: np.ndarray
    massive_values: np.ndarray
    trigger: np.ndarray  # unit direction planted in <|im_start|>
    mean_dir: np.ndarray  # unit direction shared by every embedding (orthogonal to the trigger)
    early: int
    late: tuple[tuple[int, float], ...]
    spike_units: dict[int, int]
    hidden: _Migration
    o_proj: dict[int, _Migration]
    down: dict[int, _Migration]
    vd: int
    register_block: int
    register_units: np.ndarray
    register_dir: np.ndarray
    register_rows: np.ndarray
    register_channels: np.ndarray
    vision_hidden: _Migration
    vision_proj: dict[int, _Migration]


def _rng(seed: int, what: str) -> np.random.Generator:
    return np.random.default_rng(int.from_bytes(hashlib.sha256(f"{seed}:outliers:{what}".encode()).digest()[:8],
                                                "little"))


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal(n)
    return v / np.linalg.norm(v)


def _migration(rng: np.random.Generator, size: int, count: int, exclude: np.ndarray,
               scale_range: tuple[float, float] = SCALE_RANGE) -> _Migration:
    pool = np.setdiff1d(np.arange(size), exclude)
    channels = np.sort(rng.choice(pool, count, replace=False))
    lo, hi = np.log(scale_range[0]), np.log(scale_range[1])
    return _Migration(channels, np.exp(rng.uniform(lo, hi, count)))


def make_plan(config: dict[str, Any], shape: str, seed: int) -> OutlierPlan:
    """Draw the outlier plan for a checkpoint config (the layout `q3vl.testing.shapes.config_dict` writes)."""
    t, v = config["text_config"], config["vision_config"]
    d, f, layers = t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"]
    early, late = MASSIVE_LAYERS.get(shape, (max(0, layers // 12), ((layers - 1, 0.47),)))
    rng = _rng(seed, "text")
    massive = np.sort(rng.choice(d, 2, replace=False))
    trigger, mean_dir = _unit(rng, d), _unit(rng, d)
    mean_dir -= (mean_dir @ trigger) * trigger
    mean_dir /= np.linalg.norm(mean_dir)
    spike_units = {i: int(rng.integers(f)) for i in (early, *[k for k, _ in late])}
    hidden = _migration(rng, d, max(2, d // 384), massive)
    hd, nkv, nq = t["head_dim"], t["num_key_value_heads"], t["num_attention_heads"]
    o_proj = {i: _migration(rng, nkv * hd, 2, np.array([], int), O_SCALE_RANGE) for i in range(layers)}
    down = {i: _migration(rng, f, max(2, f // 1024), np.array([spike_units.get(i, -1)]), DOWN_SCALE_RANGE)
            for i in range(layers)}
    vr = _rng(seed, "vision")
    vd, depth, vf = v["hidden_size"], v["depth"], v["intermediate_size"]
    reg_channels = np.sort(vr.choice(vd, 2, replace=False))
    table = v["num_position_embeddings"]
    return OutlierPlan(
        shape=shape, d=d, head_dim=hd, kv_heads=nkv, q_heads=nq, massive_channels=massive,
        massive_values=np.array([MASSIVE, -0.6 * MASSIVE]), trigger=trigger, mean_dir=mean_dir, early=early,
        late=tuple(late),
        spike_units=spike_units, hidden=hidden, o_proj=o_proj, down=down, vd=vd,
        register_block=max(1, depth // 3), register_units=np.sort(vr.choice(vf, 2, replace=False)),
        register_dir=_unit(vr, vd),
        register_rows=np.sort(vr.choice(table, max(1, round(REGISTER_FRACTION * table)), replace=False)),
        register_channels=reg_channels,
        vision_hidden=_migration(vr, vd, max(2, vd // 256), reg_channels),
        vision_proj={i: _migration(vr, vd, 2, np.array([], int)) for i in range(depth)})


def _residual_growth(layers: int) -> float:
    """Squared norm of a token's residual state after `layers` layers, in units of d.

    Unit-std embeddings (1) plus the shared direction (MEAN_GAIN^2), plus ~1.25 d added by each
    layer's attention and MLP outputs (measured on default checkpoints).
    """
    return 1 + MEAN_GAIN**2 + 1.25 * layers


def _offset(plan: OutlierPlan, layer: int) -> float:
    """Weight of the shared direction subtracted in a spike unit's gate: GATE_OFFSET standard
    deviations at the ordinary tokens of `layer`, whose normed state has sqrt(d) * MEAN_GAIN /
    sqrt(growth) along it. This is the negative gate bias trained SwiGLU units show (Qwen3-1.7B's
    early-layer gates average -3), made from the residual stream's shared direction.
    """
    return GATE_OFFSET * math.sqrt(_residual_growth(layer)) / (math.sqrt(plan.d) * MEAN_GAIN)


def _spike(plan: OutlierPlan, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(gate row, up row, residual vector the down-projection column adds per unit of act) of a spike layer.

    Emergence layer: the unit reads the trigger direction, strongest at <|im_start|> (its planted
    4 sqrt(d), diluted by the rest of the state), and writes the massive values. Late layers: it
    reads the massive direction (the normed state there is ~sqrt(d) along it) and writes back a
    fraction of what remains.
    """
    sd = math.sqrt(plan.d)
    lam = _offset(plan, layer)
    write = np.zeros(plan.d)
    if layer == plan.early:
        growth = _residual_growth(layer) + TRIGGER_GAIN**2
        z = sd * TRIGGER_GAIN / math.sqrt(growth)
        act = GAIN**2 * z * (z - lam * sd * MEAN_GAIN / math.sqrt(growth))
        write[plan.massive_channels] = plan.massive_values / act
        return GAIN * (plan.trigger - lam * plan.mean_dir), GAIN * plan.trigger, write
    direction = np.zeros(plan.d)
    direction[plan.massive_channels] = plan.massive_values / np.linalg.norm(plan.massive_values)
    remaining = 1.0
    for k, frac in plan.late:
        if k == layer:
            write[plan.massive_channels] = -frac * remaining * plan.massive_values / (GAIN**2 * plan.d)
            break
        remaining *= 1 - frac
    return GAIN * (direction - lam * plan.mean_dir), GAIN * direction, write


def _o_proj_columns(plan: OutlierPlan, kv_channel: int) -> list[int]:
    """o_proj input columns fed by one v channel: the same head dim of every query head in its KV group."""
    group, dim = divmod(int(kv_channel), plan.head_dim)
    rep = plan.q_heads // plan.kv_heads
    return [(group * rep + r) * plan.head_dim + dim for r in range(rep)]


def _edit_layer(plan: OutlierPlan, i: int, rest: str, w: np.ndarray) -> None:
    h = plan.hidden
    if rest in ("input_layernorm.weight", "post_attention_layernorm.weight"):
        w[h.channels] *= h.scales
        return
    if rest == "self_attn.o_proj.weight":
        for c, s in zip(plan.o_proj[i].channels, plan.o_proj[i].scales):
            w[:, _o_proj_columns(plan, c)] /= s
        return
    if rest == "mlp.down_proj.weight":
        w[:, plan.down[i].channels] /= plan.down[i].scales
        if i in plan.spike_units:
            w[:, plan.spike_units[i]] += _spike(plan, i)[2]
        return
    if rest not in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                    "mlp.gate_proj.weight", "mlp.up_proj.weight"):
        return
    if rest == "self_attn.v_proj.weight":
        w[plan.o_proj[i].channels] *= plan.o_proj[i].scales[:, None]
    if rest.startswith("mlp.") and i in plan.spike_units:
        w[plan.spike_units[i]] = _spike(plan, i)[0 if rest == "mlp.gate_proj.weight" else 1]
    if rest == "mlp.up_proj.weight":
        w[plan.down[i].channels] *= plan.down[i].scales[:, None]
    w[:, h.channels] /= h.scales  # last: a planted row keeps its meaning on the migrated input channels


def _edit_block(plan: OutlierPlan, i: int, rest: str, w: np.ndarray) -> None:
    h, p, vd = plan.vision_hidden, plan.vision_proj[i], plan.vd
    reg = i == plan.register_block
    gain = REGISTER_SPIKE / ((0.87 - REGISTER_THRESHOLD) * math.sqrt(vd))
    if rest in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias"):
        w[h.channels] *= h.scales
    elif rest == "attn.qkv.weight":
        w[2 * vd + p.channels] *= p.scales[:, None]
        w[:, h.channels] /= h.scales
    elif rest == "attn.qkv.bias":
        w[2 * vd + p.channels] *= p.scales
    elif rest == "attn.proj.weight":
        w[:, p.channels] /= p.scales
    elif rest == "mlp.linear_fc1.weight":
        if reg:
            w[plan.register_units] = gain * plan.register_dir
        w[:, h.channels] /= h.scales
    elif rest == "mlp.linear_fc1.bias" and reg:
        w[plan.register_units] = -gain * REGISTER_THRESHOLD * math.sqrt(vd)
    elif rest == "mlp.linear_fc2.weight" and reg:
        # typical token norm after block i: ~sqrt(1.5 + 1.9 (i + 1)) sqrt(d) (measured on default checkpoints)
        norm = math.sqrt((1.5 + 1.9 * (i + 1)) * vd)
        target = HIGH_NORM * norm * np.array([1.0, -0.7]) / math.hypot(1.0, 0.7)
        w[:, plan.register_units] = 0.0
        for unit in plan.register_units:
            w[plan.register_channels, unit] = target / (len(plan.register_units) * REGISTER_TYPICAL)


def edit(plan: OutlierPlan, name: str, w: np.ndarray) -> None:
    """Apply the plan to one freshly drawn float32 tensor, in place (tensors not named are left alone)."""
    if name == "model.language_model.embed_tokens.weight":
        w += MEAN_GAIN * math.sqrt(plan.d) * plan.mean_dir
        w[IM_START] += TRIGGER_GAIN * math.sqrt(plan.d) * plan.trigger
    elif name == "model.visual.merger.linear_fc2.bias":  # visual tokens share the embeddings' direction too
        w += MEAN_GAIN * math.sqrt(plan.d) * plan.mean_dir
    elif name == "model.visual.pos_embed.weight":
        w[plan.register_rows] += REGISTER_INPUT_GAIN * math.sqrt(plan.vd) * plan.register_dir
    for prefix, fn in (("model.language_model.layers.", _edit_layer), ("model.visual.blocks.", _edit_block)):
        if name.startswith(prefix):
            index, _, rest = name[len(prefix):].partition(".")
            fn(plan, int(index), rest, w)


def describe(plan: OutlierPlan) -> dict[str, Any]:
    """The plan as JSON-ready facts (written beside the checkpoint as outliers.json)."""
    def mig(m: _Migration) -> dict[str, list[Any]]:
        return {"channels": m.channels.tolist(), "scales": np.round(m.scales, 3).tolist()}

    return {
        "text": {"massive_channels": plan.massive_channels.tolist(), "massive_values": plan.massive_values.tolist(),
                 "trigger_token_id": IM_START, "emergence_layer": plan.early,
                 "late_layers": [[k, f] for k, f in plan.late],
                 "spike_units": {str(k): u for k, u in plan.spike_units.items()},
                 "hidden_channels": mig(plan.hidden),
                 "o_proj_channels": {str(k): mig(m) for k, m in plan.o_proj.items()},
                 "down_proj_channels": {str(k): mig(m) for k, m in plan.down.items()}},
        "vision": {"register_block": plan.register_block, "register_units": plan.register_units.tolist(),
                   "register_channels": plan.register_channels.tolist(),
                   "register_rows": len(plan.register_rows), "hidden_channels": mig(plan.vision_hidden),
                   "proj_channels": {str(k): mig(m) for k, m in plan.vision_proj.items()}},
    }
