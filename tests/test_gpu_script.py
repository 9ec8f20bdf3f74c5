"""The GPU run, without a GPU: its targets' arithmetic, and (under -m slow) the whole script rehearsed on CPU.

`benchmarks/gpu_2b.py` is meant to run once, on a lent GPU, with no second try; so every line of it
runs here first on the tiny shape, CPU backend, with the same code path: export, parity against the
reference, the benchmark systems, the server load test and the Ray comparison, then the targets.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from q3vl.bench import targets as T
from q3vl.testing.shapes import SHAPES

ROOT = Path(__file__).resolve().parents[1]


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


@pytest.mark.slow  # about 3 minutes on 2 cores: the CPU rehearsal of the one-shot GPU run
def test_gpu_script_rehearses_end_to_end_on_cpu(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_2b.py"), "--shape", "tiny", "--device", "cpu",
                           "--out", str(out), "--workdir", str(tmp_path / "work"), "--budget-s", "600",
                           "--gpu-name", "NVIDIA H100 80GB HBM3"], capture_output=True, text=True, env=env,
                          timeout=900)
    wall = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-3000:]
    sys.stderr.write(f"gpu_2b.py rehearsal: {wall:.0f} s wall\n")
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and {"gpu-tiny.md", "gpu-tiny.json", "gpu-tiny-bench.json", "gpu-tiny-serve.json",
                                 "gpu-tiny.log"} <= set(files)
    res = json.loads((out / "gpu-tiny.json").read_text())
    for task in ("embedding", "reranker"):  # fp16 on CPU against the fp32 reference, every item
        assert res["parity"]["tasks"][task]["passed"] and len(res["parity"]["tasks"][task]["rows"]) >= 5
    bench = json.loads((out / "gpu-tiny-bench.json").read_text())
    assert all("error" not in r for r in bench["results"]), [r.get("error") for r in bench["results"]]
    assert {w["workload"] for r in bench["results"] for w in r["workloads"]} >= {"text-32", "text-512", "rerank 1x32"}
    assert res["serve"]["runs"] and "error" not in res["ray"] and res["ray"]["max_abs_diff"] < 1e-5
    assert len(res["targets"]) == 6 and all(t["figure"] is not None for t in res["targets"]), res["targets"]
    text = (out / "gpu-tiny.md").read_text()
    assert text.count("| MET |") + text.count("| MISSED |") == 6
