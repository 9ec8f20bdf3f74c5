"""The benchmark harness in --quick form: it runs and writes well-formed results (no speed asserted)."""

from __future__ import annotations

import json

import pytest

from q3vl.bench.run import benchmark
from q3vl.bench.workloads import standard


def test_quick_benchmark_writes_results(tiny_embedding, tiny_embedding_bundle, tiny_reranker, tiny_reranker_bundle,
                                        tmp_path):
    systems = [
        {"name": "reference float32 (embedding)", "kind": "reference", "task": "embedding",
         "checkpoint": str(tiny_embedding)},
        {"name": "q3vl fp32 (embedding)", "kind": "runtime", "task": "embedding", "bundle": str(tiny_embedding_bundle)},
        {"name": "reference float32 (reranker)", "kind": "reference", "task": "reranker",
         "checkpoint": str(tiny_reranker)},
        {"name": "q3vl fp32 (reranker)", "kind": "runtime", "task": "reranker", "bundle": str(tiny_reranker_bundle)},
    ]
    data = benchmark(systems, standard(quick=True), 1, tmp_path, "quick", rounds=2)
    saved = json.loads((tmp_path / "quick.json").read_text())
    assert saved["rounds"] == 2 and all(r["rounds"] == 2 for r in saved["results"])
    assert saved["machine"]["cores"] >= 1 and "onnxruntime" in saved["machine"]["versions"]
    assert [r["system"] for r in data["results"]] == [s["name"] for s in systems]
    for result in saved["results"]:
        assert "error" not in result, result
        assert result["load_s"] > 0 and result["peak_rss_mb"] > 0
        for w in result["workloads"]:
            assert w["median_ms"] > 0 and w["p95_ms"] >= w["median_ms"] and w["tokens"] > 0
            # two rounds (the second in reverse order) of one timed run each, pooled
            assert len(w["runs_s"]) == 2 and len(w["graph_runs_s"]) == 2 and w["graph_median_ms"] <= w["median_ms"]
            assert w["median_ms"] == pytest.approx(1e3 * sum(w["runs_s"]) / 2)
    # the reference and the runtime count the same tokens for the same inputs
    by = {r["system"]: {(w["workload"], w["batch"]): w["tokens"] for w in r["workloads"]} for r in saved["results"]}
    assert by["reference float32 (embedding)"] == by["q3vl fp32 (embedding)"]
    assert by["reference float32 (reranker)"] == by["q3vl fp32 (reranker)"]
    table = (tmp_path / "quick.md").read_text()
    assert "| q3vl fp32 (embedding) | text-32 | 8 |" in table and "Speed-up over the PyTorch reference" in table
    assert (tmp_path / "quick.png").stat().st_size > 1000
    # the README's summary table: each cell is the runtime's median and reference / runtime, by hand
    rows = {line.split(" | ")[0].lstrip("| ") + "/" + line.split(" | ")[1]: line for line in table.splitlines()
            if line.startswith("| ") and line.count(" ms (") >= 1}
    ref = {(w["workload"], w["batch"]): w["median_ms"] for w in saved["results"][0]["workloads"]}
    for w in saved["results"][1]["workloads"]:
        ms = w["median_ms"]
        cell = f"{ms:.0f} ms ({ref[(w['workload'], w['batch'])] / ms:.2f}x)"
        assert cell in rows[f"{w['workload']}/{w['batch']}"], (cell, rows)
    assert "| workload | batch | tokens | reference ms | q3vl fp32 |" in table
