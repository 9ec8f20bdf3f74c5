"""The GPU run's targets, judged from its own figures (`benchmarks/gpu_2b.py`).

Each target is a ratio or a rate measured in the same run, never an absolute from elsewhere:

- text 1 x 32 tokens: q3vl fp16 (IO binding) end to end >= 3x the PyTorch reference (bf16, sdpa);
- image 448 x 8: >= 2x the reference;
- text 64 x 512: the text graph's FLOP rate (its FLOPs over its median graph time) >= 60% of the
  GPU's dense bf16 peak (the datasheet figure for the card found; fp16 has the same peak);
- the server: requests/s with cross-request batching >= 2x without it at 32 clients (single-text
  requests), and p50 latency with it <= 1.15x without it at 1 client;
- Ray Data with 1 worker >= 0.9x the rows/s of `q3vl embed` on the same images and GPU (Ray's
  wall time without `ray.init`, as benchmarks/corpus_scale.py counts it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from NVIDIA's datasheets; most specific name first.
DENSE_BF16_TFLOPS = (("H200", 989.4), ("H100 NVL", 835.5), ("H100 PCIe", 756.5), ("H100", 989.4),
                     ("A100", 312.0), ("L40S", 362.1), ("RTX 6000 Ada", 364.2), ("L4", 121.0))
SPEEDUP = {("text-32", 1): 3.0, ("image-448", 8): 2.0}
MFU_WORKLOAD, MFU_FLOOR = ("text-512", 64), 0.60
SERVE_RPS, SERVE_LATENCY, RAY_RATIO = 2.0, 1.15, 0.9


@dataclass
class Target:
    """One target: its figure (None when the run could not measure it) against its threshold."""

    name: str
    figure: float | None
    threshold: float
    higher_is_better: bool
    basis: str

    @property
    def met(self) -> bool | None:
        if self.figure is None:
            return None
        return self.figure >= self.threshold if self.higher_is_better else self.figure <= self.threshold

    def line(self) -> str:
        verdict = {True: "MET", False: "MISSED", None: "NOT MEASURED"}[self.met]
        sign = ">=" if self.higher_is_better else "<="
        figure = "-" if self.figure is None else f"{self.figure:.3g}"
        return f"| {self.name} | {figure} | {sign} {self.threshold:g} | {verdict} | {self.basis} |"


def dense_bf16_peak(gpu: str) -> tuple[float | None, str]:
    """(TFLOP/s, where the figure comes from) for a GPU name as nvidia-smi or torch reports it."""
    for key, tflops in DENSE_BF16_TFLOPS:
        if key.lower() in gpu.lower():
            return tflops, f"{key} datasheet, dense bf16"
    return None, f"no datasheet peak known for {gpu!r}"


def text_flops(text: dict[str, Any], lengths: list[float]) -> float:
    """Matmul and attention FLOPs of the fused text graph for sequences of these lengths.

    Every layer's q|k|v, o, gate|up and down projections on every token, except the last layer's
    o, gate|up and down, which the graph runs on each sequence's pooled token only; causal attention
    counted as computed (half of the L x L scores and of the weighted sum).
    """
    h, i, hd, layers = text["hidden_size"], text["intermediate_size"], text["head_dim"], text["num_hidden_layers"]
    q, kv = text["num_attention_heads"] * hd, text["num_key_value_heads"] * hd
    tokens, rows = sum(lengths), len(lengths)
    qkv, rest = 2 * h * (q + 2 * kv), 2 * (q * h + 3 * h * i)
    attention = sum(2 * length * length * q for length in lengths)
    return float(layers * tokens * qkv + (layers - 1) * tokens * rest + rows * rest + layers * attention)


def _row(bench: dict[str, Any], system: str, key: tuple[str, int]) -> dict[str, Any] | None:
    for s, r in zip(bench["systems"], bench["results"]):
        if s["name"] == system and "error" not in r:
            return next((w for w in r["workloads"] if (w["workload"], w["batch"]) == key), None)
    return None


def speed_targets(bench: dict[str, Any], system: str, reference: str, text: dict[str, Any],
                  gpu: str) -> list[Target]:
    """The two speed-ups and the FLOP-rate target from `q3vl.bench` data (one run, both systems)."""
    out = []
    for key, floor in SPEEDUP.items():
        ours, ref = _row(bench, system, key), _row(bench, reference, key)
        figure = ref["median_ms"] / ours["median_ms"] if ours and ref else None
        basis = (f"{ref['median_ms']:.1f} ms reference / {ours['median_ms']:.1f} ms q3vl, end to end"
                 if ours and ref else "not measured")
        out.append(Target(f"{key[0]} x{key[1]}: speed-up over the reference", figure, floor, True, basis))
    peak, source = dense_bf16_peak(gpu)
    ours = _row(bench, system, MFU_WORKLOAD)
    figure, basis = None, f"peak: {source}"
    if ours and peak:
        flops = text_flops(text, [ours["tokens"] / ours["items"]] * ours["items"])
        rate = flops / (ours["graph_median_ms"] / 1e3)
        figure = rate / (peak * 1e12)
        basis = (f"{flops / 1e12:.1f} TFLOP in {ours['graph_median_ms']:.1f} ms of graph time = "
                 f"{rate / 1e12:.0f} TFLOP/s; peak {peak:g} TFLOP/s ({source})")
    out.append(Target(f"{MFU_WORKLOAD[0]} x{MFU_WORKLOAD[1]}: share of the dense bf16 peak", figure, MFU_FLOOR,
                      True, basis))
    return out


def serve_targets(serve: dict[str, Any] | None, workload: str = "single-text") -> list[Target]:
    """Batching on/off at 32 clients (req/s) and at 1 client (p50) from serve_load.py's JSON."""
    runs = {(r["mode"], r["clients"]): r for r in (serve or {}).get("runs", []) if r["workload"] == workload}
    out = []
    for clients, key, floor, better, unit in ((32, "rps", SERVE_RPS, True, "req/s"),
                                              (1, "p50_ms", SERVE_LATENCY, False, "ms p50")):
        on, off = runs.get(("on", clients)), runs.get(("off", clients))
        what = "req/s" if key == "rps" else "p50"
        name = f"server: {what} with batching / without, {clients} client{'s' if clients > 1 else ''}"
        if on is None or off is None:
            out.append(Target(name, None, floor, better, (serve or {}).get("error", "not measured")))
        else:
            out.append(Target(name, on[key] / off[key], floor, better, f"{on[key]} / {off[key]} {unit} ({workload})"))
    return out


def ray_target(ray: dict[str, Any] | None) -> Target:
    """Ray (1 worker) rows/s without `ray.init` over `q3vl embed`'s rows/s, same rows, same device."""
    if not ray or "embed_wall_s" not in ray or "ray_wall_s" not in ray:
        return Target("Ray 1 worker / q3vl embed, rows/s", None, RAY_RATIO, True, (ray or {}).get("error", "not run"))
    steady = ray["ray_wall_s"] - ray["ray_init_s"]
    figure = ray["embed_wall_s"] / steady
    return Target("Ray 1 worker / q3vl embed, rows/s", figure, RAY_RATIO, True,
                  f"{ray['rows']} rows: q3vl embed {ray['embed_wall_s']:.1f} s, Ray {ray['ray_wall_s']:.1f} s "
                  f"of which ray.init {ray['ray_init_s']:.1f} s")


def table(targets: list[Target]) -> str:
    """The targets as a Markdown table, one row each."""
    return "\n".join(["| target | figure | threshold | verdict | basis |", "|---|---|---|---|---|",
                      *(t.line() for t in targets)])
