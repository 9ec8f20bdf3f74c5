"""The GPU run's targets (`q3vl.bench.targets`): their arithmetic, checked by hand."""

from __future__ import annotations

import pytest

from q3vl.bench import targets as T
from q3vl.testing.shapes import SHAPES


def test_text_flops_by_hand():
    """Tiny text (h 64, ffn 128, 4 x 32 query heads, 2 x 32 kv heads, 2 layers), sequences of 10 and 6 tokens."""
    qkv = 2 * 64 * (128 + 2 * 64)  # per token
    rest = 2 * (128 * 64 + 3 * 64 * 128)  # o, gate|up, down per token
    attention = 2 * 10 * 10 * 128 + 2 * 6 * 6 * 128  # causal: half of 4 L^2 d per layer
    want = 2 * 16 * qkv + 1 * 16 * rest + 2 * rest + 2 * attention  # last layer's rest on the 2 pooled rows
    assert T.text_flops(SHAPES["tiny"]["text"], [10, 6]) == want == 2_297_856


def test_datasheet_peaks_follow_the_card():
    assert T.dense_bf16_peak("NVIDIA H100 80GB HBM3")[0] == 989.4
    assert T.dense_bf16_peak("NVIDIA H100 PCIe")[0] == 756.5
    assert T.dense_bf16_peak("NVIDIA H200")[0] == 989.4
    assert T.dense_bf16_peak("Intel Xeon")[0] is None


def _bench(ref_ms: dict, ours_ms: dict, graph_ms: float) -> dict:
    def result(ms: dict, graph: float | None = None) -> dict:
        return {"workloads": [{"workload": w, "batch": b, "items": b, "tokens": 555 * b, "median_ms": v,
                               "graph_median_ms": graph or v} for (w, b), v in ms.items()]}
    return {"systems": [{"name": "ref"}, {"name": "ours"}], "results": [result(ref_ms), result(ours_ms, graph_ms)]}


def test_speed_targets_from_one_runs_figures():
    bench = _bench({("text-32", 1): 30.0, ("image-448", 8): 54.0, ("text-512", 64): 291.0},
                   {("text-32", 1): 9.0, ("image-448", 8): 30.0, ("text-512", 64): 160.0}, graph_ms=150.0)
    got = {t.name.split(":")[0]: t for t in T.speed_targets(bench, "ours", "ref", SHAPES["2b"]["text"], "NVIDIA H200")}
    assert got["text-32 x1"].figure == pytest.approx(30 / 9) and got["text-32 x1"].met
    assert got["image-448 x8"].figure == pytest.approx(1.8) and got["image-448 x8"].met is False
    flops = T.text_flops(SHAPES["2b"]["text"], [555.0] * 64)
    share = got["text-512 x64"]
    assert share.figure == pytest.approx(flops / 0.150 / 989.4e12) and share.met is (share.figure >= 0.6)
    assert "989.4 TFLOP/s" in share.basis and "H200 datasheet" in share.basis
    missing = T.speed_targets({"systems": [], "results": []}, "ours", "ref", SHAPES["2b"]["text"], "H100")
    assert [t.met for t in missing] == [None, None, None]


def test_serve_and_ray_targets():
    runs = [{"workload": "single-text", "mode": m, "clients": c, "rps": rps, "p50_ms": p50}
            for m, c, rps, p50 in (("on", 32, 420.0, 70.0), ("off", 32, 200.0, 150.0),
                                   ("on", 1, 60.0, 16.0), ("off", 1, 62.0, 15.0))]
    rps, lat = T.serve_targets({"runs": runs})
    assert rps.figure == pytest.approx(2.1) and rps.met
    assert lat.figure == pytest.approx(16 / 15) and lat.met
    assert [t.met for t in T.serve_targets({"error": "not run: time budget"})] == [None, None]
    ray = T.ray_target({"rows": 500, "embed_wall_s": 20.0, "ray_wall_s": 26.0, "ray_init_s": 4.0})
    assert ray.figure == pytest.approx(20 / 22) and ray.met
    assert T.ray_target({"error": "not run: the ray extra is not installed"}).met is None
    assert "| NOT MEASURED |" in T.table([T.ray_target(None)])
