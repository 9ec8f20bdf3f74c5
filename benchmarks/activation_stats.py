"""Activation outliers of checkpoints, measured with transformers hooks, side by side.

    python benchmarks/activation_stats.py CHECKPOINT [CHECKPOINT ...] [--out FILE.md]

For each checkpoint (e.g. a default and a realistic one from `q3vl testing make-checkpoint`), runs
ordinary inputs (texts, a photo-like image, a screenshot) through transformers in float32 and
prints, per layer and per tensor (residual stream and every projection input): max|x| / median|x|,
the top channels with their max / median, and the most tokens of one sequence at >= 100x and
>= 500x the median; then the acceptance checks of issue 14 for each checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from q3vl.reference.activations import TensorStats, measure


def cell(s: TensorStats) -> str:
    top = ",".join(f"{c}:{r:.0f}" for c, r in s.top[:2])
    norm = f" norm {s.norm_ratio:.1f}x/{s.high_norm_share:.1%}" if s.kind == "residual" else ""
    return (f"{s.ratio:,.0f}x; ch {top}; {s.outlier_channels} ch>=50x ({s.top_share:.0%} tok); "
            f"seq tok>=100x/500x {s.seq_tokens[100.0]}/{s.seq_tokens[500.0]}{norm}")


def table(labels: list[str], runs: list[list[TensorStats]]) -> list[str]:
    lines = ["| tower | layer | tensor | " + " | ".join(labels) + " |", "|---|---|---|" + "---|" * len(labels)]
    keyed = [{(s.tower, s.layer, s.kind): s for s in run} for run in runs]
    for s in runs[0]:
        key = (s.tower, s.layer, s.kind)
        lines.append(f"| {s.tower} | {s.layer} | {s.kind} | "
                     + " | ".join(cell(k[key]) if key in k else "-" for k in keyed) + " |")
    return lines


def acceptance(stats: list[TensorStats], plan: dict | None) -> list[str]:
    """The issue-14 checks: residual >= 500x at <= 4 tokens/seq in fixed channels, projection-input
    channels >= 50x, down-projection input spikes >= 100x in early and late layers.
    """
    text = [s for s in stats if s.tower == "text"]
    res = [s for s in text if s.kind == "residual"]
    massive = [s for s in res if s.ratio >= 500]
    out = [f"- residual stream: max/median up to {max(s.ratio for s in res):,.0f}x; "
           f"{len(massive)}/{len(res)} layers >= 500x"]
    if massive:
        chans = sorted({s.top[0][0] for s in massive})
        out.append(f"  - in those layers: at most {max(s.seq_tokens[500.0] for s in massive)} tokens per sequence "
                   f">= 500x, top channel(s) {chans}")
    for kind in ("qkv in", "gate_up in", "o_proj in", "down in"):
        rows = [s for s in text if s.kind == kind]
        hit = [s for s in rows if s.top[0][1] >= 50]
        out.append(f"- {kind}: {len(hit)}/{len(rows)} layers with a channel >= 50x the median "
                   f"(weakest layer's top channel {min(s.top[0][1] for s in rows):,.0f}x)")
    down = {s.layer: s for s in text if s.kind == "down in"}
    layers = ([plan["text"]["emergence_layer"]] + [k for k, _ in plan["text"]["late_layers"]]) if plan else []
    for layer in layers:
        s = down[layer]
        out.append(f"- down_proj input spike, layer {layer}: {s.ratio:,.0f}x the median, "
                   f"{s.seq_tokens[100.0]} tokens per sequence >= 100x")
    vres = [s for s in stats if s.tower == "vision" and s.kind == "residual"]
    if vres:
        top = max(vres, key=lambda s: s.norm_ratio)
        out.append(f"- vision residual: largest token norm {top.norm_ratio:.1f}x the median (block {top.layer}), "
                   f"{top.high_norm_share:.1%} of tokens >= 4x; max/median {max(s.ratio for s in vres):,.0f}x")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+", type=Path)
    p.add_argument("--out", type=Path, help="also write the report here (Markdown)")
    a = p.parse_args()
    labels, runs = [c.name for c in a.checkpoints], [measure(c) for c in a.checkpoints]
    lines = ["`python benchmarks/activation_stats.py " + " ".join(sys.argv[1:]) + "`", "",
             "Per tensor: max|x|/median|x|; top channels (channel:max/median); channels >= 50x the median "
             "(share of tokens >= 20x in the top channel); most tokens of one sequence >= 100x / >= 500x "
             "the median; residual rows also: largest token norm / median norm and share of tokens >= 4x.",
             "", *table(labels, runs), ""]
    for label, ckpt, run in zip(labels, a.checkpoints, runs):
        plan_file = ckpt / "outliers.json"
        plan = json.loads(plan_file.read_text()) if plan_file.is_file() else None
        lines += [f"Acceptance checks, {label}:", *acceptance(run, plan), ""]
    text = "\n".join(lines)
    sys.stdout.write(text)
    if a.out:
        a.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
