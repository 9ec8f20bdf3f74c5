"""Turning benchmark JSON into a Markdown table and a PNG plot."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _by_key(result: dict[str, Any]) -> dict[tuple[str, int], dict[str, Any]]:
    return {(w["workload"], w["batch"]): w for w in result.get("workloads", [])}


def _baseline(data: dict[str, Any], task: str) -> dict[str, Any] | None:
    for system, result in zip(data["systems"], data["results"]):
        if system["kind"] == "reference" and system["task"] == task and "error" not in result:
            return result
    return None


def speedups(data: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (system, workload): end-to-end and graph-only speed-up over the same-task reference."""
    rows = []
    for system, result in zip(data["systems"], data["results"]):
        base = _baseline(data, system["task"])
        if system["kind"] == "reference" or base is None or "error" in result:
            continue
        ref = _by_key(base)
        for key, w in _by_key(result).items():
            if key in ref:
                rows.append({"system": system["name"], "column": _column(system), "workload": key[0],
                             "batch": key[1], "median_ms": w["median_ms"],
                             "e2e": ref[key]["median_ms"] / w["median_ms"],
                             "graph": ref[key]["graph_median_ms"] / w["graph_median_ms"]})
    return rows


def _column(system: dict[str, Any]) -> str:
    """The summary column a system goes in: its name without the task, e.g. 'q3vl fp32'."""
    name = system["name"]
    suffix = f" ({system['task']})"
    return name[: -len(suffix)] if name.endswith(suffix) else name


def summary(data: dict[str, Any]) -> str:
    """The summary table (benchmarks/README.md): one row per workload, the reference's median ms, then
    each runtime system's median ms with its end-to-end speed-up over the same-task reference of the same run.
    """
    columns: list[str] = []
    refs: dict[tuple[str, int], tuple[float, int]] = {}
    for system, result in zip(data["systems"], data["results"]):
        if "error" in result:
            continue
        if system["kind"] == "reference":
            refs.update({k: (w["median_ms"], w["tokens"]) for k, w in _by_key(result).items()})
        elif _baseline(data, system["task"]) is not None and _column(system) not in columns:
            columns.append(_column(system))
    cells: dict[tuple[str, int], dict[str, str]] = {}
    for r in speedups(data):
        cells.setdefault((r["workload"], r["batch"]), {})[r["column"]] = f"{r['median_ms']:.0f} ms ({r['e2e']:.2f}x)"
    lines = ["| workload | batch | tokens | reference ms | " + " | ".join(columns) + " |",
             "|---|---|---|---|" + "---|" * len(columns)]
    for key, (ref_ms, tokens) in refs.items():
        row = cells.get(key, {})
        lines.append(f"| {key[0]} | {key[1]} | {tokens} | {ref_ms:.0f} | "
                     + " | ".join(row.get(c, "-") for c in columns) + " |")
    return "\n".join(lines) + "\n"


def markdown(data: dict[str, Any]) -> str:
    """Machine line, the summary table (benchmarks/README.md's), a latency table per system, and the speed-up table."""
    m = data["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; {versions}; {m['date']}; "
             f"repeats {data['repeats']} x rounds {data.get('rounds', 1)}",
             "", "Median end-to-end ms; in parentheses the speed-up over the PyTorch reference of the same run:",
             "", *summary(data).splitlines(),
             "", "| system | load s | peak RSS MB | workload | batch | tokens | median ms | p95 ms | graph ms "
             "| items/s | tokens/s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for result in data["results"]:
        if "error" in result:
            lines.append(f"| {result['system']} | failed: {result['error']} | | | | | | | | | |")
            continue
        for w in result["workloads"]:
            lines.append(f"| {result['system']} | {result['load_s']:.1f} | {result['peak_rss_mb']:.0f} | "
                         f"{w['workload']} | {w['batch']} | {w['tokens']} | {w['median_ms']:.1f} | {w['p95_ms']:.1f} | "
                         f"{w['graph_median_ms']:.1f} | {w['items_per_s']:.2f} | {w['tokens_per_s']:.0f} |")
    rows = speedups(data)
    if rows:
        lines += ["", "Speed-up over the PyTorch reference, same run (x = reference time / system time):", "",
                  "| system | workload | batch | end-to-end | graph only |", "|---|---|---|---|---|"]
        lines += [f"| {r['system']} | {r['workload']} | {r['batch']} | {r['e2e']:.2f}x | {r['graph']:.2f}x |"
                  for r in rows]
    return "\n".join(lines) + "\n"


def plot(data: dict[str, Any], path: Path) -> None:
    """Grouped bars of end-to-end speed-up per workload; skipped (logged) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot written")
        return
    rows = speedups(data)
    if not rows:
        return
    systems = sorted({r["system"] for r in rows})
    labels = sorted({f"{r['workload']} x{r['batch']}" for r in rows}, key=lambda s: (s.split(" x")[0],
                                                                                       int(s.split(" x")[1])))
    fig, ax = plt.subplots(figsize=(max(8, len(labels) * 0.7), 4.5))
    width = 0.8 / len(systems)
    for k, s in enumerate(systems):
        vals = {f"{r['workload']} x{r['batch']}": r["e2e"] for r in rows if r["system"] == s}
        ax.bar([i + k * width for i in range(len(labels))], [vals.get(lb, 0) for lb in labels], width, label=s)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([i + width * (len(systems) - 1) / 2 for i in range(len(labels))], labels, rotation=45, ha="right")
    ax.set_ylabel("speed-up vs PyTorch reference (end to end)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
