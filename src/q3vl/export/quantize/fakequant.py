"""Simulated int8 projections in the torch modules: how the calibrator scores a candidate plan end to end.

A candidate plan (one smoothing strength) is judged by what it does to the model's output on the
calibration inputs, not by per-projection errors alone: a projection error that lands on the
attention-sink tokens moves every token's attention output, which a per-token mean hides. The
calibrator runs each candidate's own copy of the activations through the same layer modules with
their Linear forwards replaced by `quantized_forward`, which computes what the int8 graph computes
(per-token activation codes, per-column weight codes, smoothing applied to the input) in float.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from q3vl.export.quantize.int8 import Int8Plan, Projection, quantize_weight
from q3vl.tasks import Task


def quantized_forward(linear: Any, proj: Projection, plan: Int8Plan) -> Any:
    """A replacement `forward` for a `modules.Linear` quantized as `proj` says (float if it stays float)."""
    import torch

    original = linear.forward
    if proj.keep_float:
        return original
    s = None if proj.smooth is None else torch.from_numpy(np.asarray(proj.smooth, np.float32))
    w = linear.weight.detach()
    q, scale = quantize_weight((w if s is None else w * s[:, None]).numpy(), plan.weight_bits)
    wq = torch.from_numpy(q.astype(np.float32) * scale)
    amax = 2 ** (plan.activation_bits - 1) - 1

    def forward(x: Any) -> Any:
        x = x.float() if s is None else x.float() / s
        if plan.activations == "token":
            r = (x.abs().amax(-1, keepdim=True) / amax).clamp(min=1e-30)
            xq = torch.round(x / r) * r
        else:  # DynamicQuantizeLinear: uint8, one asymmetric scale for the whole tensor
            lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
            step = (hi - lo) / 255 or 1.0
            zp = round(-lo / step)
            xq = (torch.clamp(torch.round(x / step) + zp, 0, 255) - zp) * step
        y = torch.matmul(xq, wq)
        return y if linear.bias is None else y + linear.bias
    return forward


@contextlib.contextmanager
def quantized(modules: dict[str, Any], plan: Int8Plan) -> Iterator[None]:
    """Within the block, the Linear(s) `modules[name]` run as plan projection `name` quantizes them
    (q, k and v are one projection in the graphs, as are gate and up: one entry, several Linears).
    """
    saved: list[tuple[Any, Any]] = []
    try:
        for name, mods in modules.items():
            for lin in mods if isinstance(mods, tuple) else (mods,):
                saved.append((lin, lin.forward))
                lin.forward = quantized_forward(lin, plan.projections[name], plan)
        yield
    finally:
        for lin, fwd in saved:
            lin.forward = fwd


def head_error(task: Task, ref: dict[str, Any], got: dict[str, Any]) -> float:
    """How far a candidate's head outputs (torch tensors by output name) are from the float ones, by
    the task's parity figure as a distance: 1 - min cosine (embedding), max |score diff| (reranker).
    """
    worst = task.worst(task.compare({k: v.numpy() for k, v in got.items()}, {k: v.numpy() for k, v in ref.items()}))
    return 1.0 - worst if task.higher_is_better else worst
