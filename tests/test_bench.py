"""The benchmark in --quick form: it runs and writes well-formed results (no speed asserted).

CI's smoke test runs `q3vl bench --quick` for the embedding task on one workload, reusing the tiny
models the other tests made (put in its work directory). Under `-m slow` (about two minutes on 2
cores): the same command from scratch in an empty directory with all four workloads and both tasks,
and the harness with 2 pooled rounds. Every CI run also rebuilds the committed report from its JSON.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import pytest

from q3vl.bench.run import benchmark
from q3vl.bench.workloads import standard


@pytest.mark.slow  # CI time: the CLI test below runs the same harness from scratch
def test_quick_benchmark_pools_rounds(tiny_embedding, tiny_embedding_bundle, tmp_path):
    """The harness with 2 rounds (the second in reverse order) on the embedding pair; the CLI test
    below covers the reranker pair."""
    systems = [
        {"name": "reference float32 (embedding)", "kind": "reference", "task": "embedding",
         "checkpoint": str(tiny_embedding)},
        {"name": "q3vl fp32 (embedding)", "kind": "runtime", "task": "embedding", "bundle": str(tiny_embedding_bundle)},
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
    table = (tmp_path / "quick.md").read_text()
    assert "| q3vl fp32 (embedding) | text-32 | 8 |" in table and "Speed-up over the PyTorch reference" in table
    assert (tmp_path / "quick.png").stat().st_size > 1000
    # the summary table of benchmarks/README.md: each cell is the runtime's median and reference / runtime, by hand
    rows = {line.split(" | ")[0].lstrip("| ") + "/" + line.split(" | ")[1]: line for line in table.splitlines()
            if line.startswith("| ") and line.count(" ms (") >= 1}
    ref = {(w["workload"], w["batch"]): w["median_ms"] for w in saved["results"][0]["workloads"]}
    for w in saved["results"][1]["workloads"]:
        ms = w["median_ms"]
        cell = f"{ms:.0f} ms ({ref[(w['workload'], w['batch'])] / ms:.2f}x)"
        assert cell in rows[f"{w['workload']}/{w['batch']}"], (cell, rows)
    assert "| workload | batch | tokens | reference ms | q3vl fp32 |" in table


def test_quick_cli_reuses_the_models_in_its_work_directory(tiny_embedding, tiny_embedding_bundle, tmp_path):
    from tests.test_cli import q3vl

    work, cwd = tmp_path / "work", tmp_path / "cwd"
    (work / "bundles").mkdir(parents=True)
    cwd.mkdir()
    (work / "tiny-embedding").symlink_to(tiny_embedding)
    (work / "bundles" / "tiny-embedding-fp32").symlink_to(tiny_embedding_bundle)
    r = q3vl("bench", "--quick", "--tasks", "embedding", "--workloads", "text-32", "--workdir", str(work),
             "--out", "results", cwd=cwd, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in (work / "bundles").iterdir()) == ["tiny-embedding-fp32"]  # reused, none made
    assert sorted(str(p.relative_to(cwd)) for p in cwd.rglob("*")) == [
        "results", "results/quick-tiny.json", "results/quick-tiny.md", "results/quick-tiny.png"]
    data = json.loads((cwd / "results" / "quick-tiny.json").read_text())
    assert [s["name"] for s in data["systems"]] == ["reference float32 (embedding)", "q3vl fp32 (embedding)"]
    assert not [x for x in data["results"] if "error" in x]
    ref, ours = ([(w["workload"], w["batch"], w["tokens"]) for w in x["workloads"]] for x in data["results"])
    assert ref == ours == [("text-32", 8, ref[0][2])] and ref[0][2] > 0  # same tokens on both sides
    assert "| text-32 | 8 |" in r.stdout and "bench: 2/2 systems in" in r.stderr
    assert "\r" not in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow  # CI time: a minute on 2 cores (makes and exports both tiny models, 4 workers)
def test_quick_cli_from_scratch_writes_only_where_asked(tmp_path):
    from tests.test_cli import q3vl

    cwd, cache = tmp_path / "cwd", tmp_path / "cache"
    cwd.mkdir()
    before, started = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    r = q3vl("bench", "--quick", "--out", "results", cwd=cwd, env={"XDG_CACHE_HOME": str(cache)}, timeout=1200)
    wall, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert r.returncode == 0, r.stderr[-3000:]
    # results where asked, models in the cache, nothing else anywhere near the current directory
    assert sorted(str(p.relative_to(cwd)) for p in cwd.rglob("*")) == [
        "results", "results/quick-tiny.json", "results/quick-tiny.md", "results/quick-tiny.png"]
    work = cache / "q3vl" / "bench"
    assert sorted(p.name for p in work.iterdir()) == ["bundles", "tiny-embedding", "tiny-reranker"]
    assert sorted(p.name for p in (work / "bundles").iterdir()) == ["tiny-embedding-fp32", "tiny-reranker-fp32"]
    data = json.loads((cwd / "results" / "quick-tiny.json").read_text())
    names = [s["name"] for s in data["systems"]]
    assert names == ["reference float32 (embedding)", "q3vl fp32 (embedding)", "reference float32 (reranker)",
                     "q3vl fp32 (reranker)"] and not [x for x in data["results"] if "error" in x]
    tokens = {x["system"]: [w["tokens"] for w in x["workloads"]] for x in data["results"]}
    assert tokens[names[0]] == tokens[names[1]] and tokens[names[2]] == tokens[names[3]]
    assert "| rerank 1x32 | 32 |" in r.stdout and "| text-32 | 8 |" in r.stdout
    # progress: export steps, each worker's lines, the systems with an ETA; as lines, not a bar
    for line in ("export: step 1/3: vision graph", "q3vl fp32 (reranker): rerank 1x32 x32:", "bench: 1/4 systems",
                 "bench: 4/4 systems in"):
        assert line in r.stderr, line
    assert "\r" not in r.stderr and "Traceback" not in r.stderr
    print(f"q3vl bench --quick from scratch: {wall:.0f} s wall, {cpu:.0f} s CPU")
    assert cpu < 120  # the tiny shape stays a smoke test: 2 cores x 1 minute


RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


@pytest.mark.parametrize(("name", "columns"), [
    ("cpu-small", {"q3vl fp32", "q3vl int8"}), ("cpu-small-realistic-avx512", {"q3vl fp32", "q3vl int8"}),
    ("cpu-2b-realistic-latency", {"q3vl fp32", "q3vl int8"}),
    ("int8-2b-before-after", {"q3vl int8-before", "q3vl int8-after"})])
def test_committed_report_is_rebuilt_from_its_json(name, columns):
    from q3vl.bench.report import markdown, speedups

    data = json.loads((RESULTS / f"{name}.json").read_text())
    assert markdown(data) == (RESULTS / f"{name}.md").read_text()
    refs = [r for s, r in zip(data["systems"], data["results"])
            if s["kind"] == "reference" and s["task"] == "embedding"]
    ref_ms: dict[tuple[str, int], float] = {}
    for ref in refs:  # the fastest reference setting per workload (float32, bfloat16 where the CPU has it)
        for w in ref["workloads"]:
            key = (w["workload"], w["batch"])
            ref_ms[key] = min(ref_ms.get(key, w["median_ms"]), w["median_ms"])
    rows = speedups(data)
    assert rows and {r["column"] for r in rows} >= columns
    for row in rows:
        if row["system"].endswith("(embedding)"):  # speed-up = reference ms / system ms, same workload
            assert row["e2e"] == pytest.approx(ref_ms[(row["workload"], row["batch"])] / row["median_ms"])


def _run(name: str, kind: str, ms: dict[tuple[str, int], float]) -> tuple[dict, dict]:
    system = {"name": f"{name} (embedding)", "kind": kind, "task": "embedding"}
    works = [{"workload": w, "batch": b, "items": b, "tokens": 40 * b, "median_ms": v, "p95_ms": v,
              "graph_median_ms": v * 0.9, "items_per_s": b / v * 1e3, "tokens_per_s": 40 * b / v * 1e3}
             for (w, b), v in ms.items()]
    return system, {"system": system["name"], "load_s": 1.0, "peak_rss_mb": 100.0, "workloads": works}


def test_report_leads_with_the_fastest_reference_per_workload():
    """With a float32 and a bfloat16 reference, each cell's speed-up is over the faster of the two on
    that workload (checked by hand), and the last table gives the speed-up over each."""
    from q3vl.bench.report import markdown, speedups

    runs = [_run("reference float32", "reference", {("text-32", 1): 600.0, ("image-448", 1): 4000.0}),
            _run("reference bfloat16", "reference", {("text-32", 1): 500.0, ("image-448", 1): 4400.0}),
            _run("q3vl int8", "runtime", {("text-32", 1): 200.0, ("image-448", 1): 1600.0})]
    data = {"machine": {"cpu": "x", "cores": 2, "memory_gib": 1.0, "versions": {}, "date": "d",
                        "simd": ["avx512_bf16", "avx512f"], "native_bf16": ["avx512_bf16"]},
            "repeats": 1, "rounds": 1, "systems": [s for s, _ in runs], "results": [r for _, r in runs]}
    rows = {(r["workload"], r["batch"]): r for r in speedups(data)}
    assert rows[("text-32", 1)]["e2e"] == pytest.approx(500 / 200)  # bf16 is faster on text
    assert rows[("text-32", 1)]["baseline"] == "reference bfloat16 (embedding)"
    assert rows[("image-448", 1)]["e2e"] == pytest.approx(4000 / 1600)  # fp32 is faster on the image
    assert rows[("text-32", 1)]["vs"] == {"reference float32 (embedding)": pytest.approx(3.0),
                                          "reference bfloat16 (embedding)": pytest.approx(2.5)}
    md = markdown(data)
    assert "native bf16: avx512_bf16" in md and "fastest PyTorch reference setting" in md
    assert "| workload | batch | tokens | reference float32 ms | reference bfloat16 ms | q3vl int8 |" in md
    assert "| text-32 | 1 | 40 | 600 | 500 | 200 ms (2.50x) |" in md
    assert "| image-448 | 1 | 40 | 4000 | 4400 | 1600 ms (2.50x) |" in md
    assert "| q3vl int8 (embedding) | text-32 | 1 | 3.00x | 2.50x | reference bfloat16 (embedding) |" in md


def test_reference_dtypes_follow_the_cpu(monkeypatch):
    from q3vl.bench import run
    from q3vl.cli import bench as cli
    from q3vl.errors import ConfigError

    native = run.native_bf16
    assert native(["avx2", "fma"]) == [] and native(["avx512_bf16", "amx_bf16"]) == ["avx512_bf16", "amx_bf16"]
    monkeypatch.setattr(run, "native_bf16", lambda simd=None: ["avx512_bf16"])
    assert cli.reference_dtypes("auto") == ["float32", "bfloat16"]
    assert cli.reference_dtypes("auto", quick=True) == ["float32"]
    assert cli.reference_dtypes("auto", device="cuda") == ["float32"]
    assert cli.reference_dtypes("fp32,bf16,float32") == ["float32", "bfloat16"]
    monkeypatch.setattr(run, "native_bf16", lambda simd=None: [])
    assert cli.reference_dtypes("auto") == ["float32"]
    assert cli.reference_dtypes("bf16") == ["bfloat16"]  # asked for: runs (emulated), with a warning
    with pytest.raises(ConfigError, match="--reference-dtype"):
        cli.reference_dtypes("fp32,int8")
