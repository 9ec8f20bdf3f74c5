"""Turning benchmark JSON into a Markdown table and a PNG plot."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _by_key(result: dict[str, Any]) -> dict[tuple[str, int], dict[str, Any]]:
    return {(w["workload"], w["batch"]): w for w in result.get("workloads", [])}


def _references(data: dict[str, Any], task: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(system, result) of every reference of `task` that ran (one per dtype)."""
    return [(s, r) for s, r in zip(data["systems"], data["results"])
            if s["kind"] == "reference" and s["task"] == task and "error" not in r]


def _fastest(refs: list[tuple[dict[str, Any], dict[str, Any]]], key: tuple[str, int]) -> dict[str, Any] | None:
    """The reference system with the lowest median on workload `key`: the baseline to beat there."""
    timed = [(r_by[key]["median_ms"], s) for s, r_by in ((s, _by_key(r)) for s, r in refs) if key in r_by]
    return min(timed, key=lambda t: t[0])[1] if timed else None


def speedups(data: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (system, workload): end-to-end and graph-only speed-up over the fastest reference of
    the same task on that workload (`baseline` names it; with one reference dtype, that reference),
    and `vs`: the end-to-end speed-up over each reference by name.
    """
    rows = []
    for system, result in zip(data["systems"], data["results"]):
        refs = _references(data, system["task"])
        if system["kind"] == "reference" or not refs or "error" in result:
            continue
        for key, w in _by_key(result).items():
            base = _fastest(refs, key)
            if base is None:
                continue
            by_ref = {s["name"]: _by_key(r)[key] for s, r in refs if key in _by_key(r)}
            ref = by_ref[base["name"]]
            rows.append({"system": system["name"], "column": _column(system), "workload": key[0],
                         "batch": key[1], "median_ms": w["median_ms"], "baseline": base["name"],
                         "e2e": ref["median_ms"] / w["median_ms"],
                         "graph": ref["graph_median_ms"] / w["graph_median_ms"],
                         "vs": {n: x["median_ms"] / w["median_ms"] for n, x in by_ref.items()}})
    return rows


def _column(system: dict[str, Any]) -> str:
    """The summary column a system goes in: its name without the task, e.g. 'q3vl fp32'."""
    name = system["name"]
    suffix = f" ({system['task']})"
    return name[: -len(suffix)] if name.endswith(suffix) else name


def _reference_columns(data: dict[str, Any]) -> list[str]:
    """The reference columns, e.g. ['reference float32', 'reference bfloat16'] (one: 'reference')."""
    cols = list(dict.fromkeys(_column(s) for s, r in zip(data["systems"], data["results"])
                              if s["kind"] == "reference" and "error" not in r))
    return cols if len(cols) > 1 else ["reference"]


def summary(data: dict[str, Any]) -> str:
    """The summary table (benchmarks/README.md): one row per workload, the reference's median ms (one
    column per reference dtype), then each runtime system's median ms with its end-to-end speed-up over the fastest
    reference of the same task and workload, measured in the same run.
    """
    columns: list[str] = []
    ref_cols = _reference_columns(data)
    refs: dict[tuple[str, int], dict[str, Any]] = {}
    for system, result in zip(data["systems"], data["results"]):
        if "error" in result:
            continue
        if system["kind"] == "reference":
            col = _column(system) if len(ref_cols) > 1 else "reference"
            for k, w in _by_key(result).items():
                refs.setdefault(k, {"tokens": w["tokens"]})[col] = w["median_ms"]
        elif _references(data, system["task"]) and _column(system) not in columns:
            columns.append(_column(system))
    cells: dict[tuple[str, int], dict[str, str]] = {}
    for r in speedups(data):
        cells.setdefault((r["workload"], r["batch"]), {})[r["column"]] = f"{r['median_ms']:.0f} ms ({r['e2e']:.2f}x)"
    lines = ["| workload | batch | tokens | " + " | ".join(f"{c} ms" for c in ref_cols) + " | "
             + " | ".join(columns) + " |", "|---|---|---|" + "---|" * (len(ref_cols) + len(columns))]
    for key, ref in refs.items():
        row = cells.get(key, {})
        lines.append(f"| {key[0]} | {key[1]} | {ref['tokens']} | "
                     + " | ".join(f"{ref[c]:.0f}" if c in ref else "-" for c in ref_cols) + " | "
                     + " | ".join(row.get(c, "-") for c in columns) + " |")
    return "\n".join(lines) + "\n"


def machine_line(data: dict[str, Any]) -> str:
    """CPU, cores, memory, versions, date, run shape; SIMD flags and native bf16 where recorded."""
    m = data["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    simd = ""
    if "simd" in m:
        bf16 = ", ".join(m.get("native_bf16") or []) or "none"
        simd = f"; SIMD flags: {' '.join(m['simd']) or 'unknown'}; native bf16: {bf16}"
    return (f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB{simd}; {versions}; {m['date']}; "
            f"repeats {data['repeats']} x rounds {data.get('rounds', 1)}")


def markdown(data: dict[str, Any]) -> str:
    """Machine line, the summary table (benchmarks/README.md's), a latency table per system, and the speed-up table."""
    multi = len(_reference_columns(data)) > 1
    lead = ("Median end-to-end ms; in parentheses the speed-up over the fastest PyTorch reference setting of "
            "the same run on that workload:" if multi else
            "Median end-to-end ms; in parentheses the speed-up over the PyTorch reference of the same run:")
    lines = [machine_line(data), "", lead, "", *summary(data).splitlines(),
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
    if rows and not multi:
        lines += ["", "Speed-up over the PyTorch reference, same run (x = reference time / system time):", "",
                  "| system | workload | batch | end-to-end | graph only |", "|---|---|---|---|---|"]
        lines += [f"| {r['system']} | {r['workload']} | {r['batch']} | {r['e2e']:.2f}x | {r['graph']:.2f}x |"
                  for r in rows]
    elif rows:
        names = list(dict.fromkeys(n for r in rows for n in r["vs"]))
        lines += ["", "Speed-up over each PyTorch reference, same run (x = reference time / system time, end to "
                  "end; graph only against the fastest):", "",
                  "| system | workload | batch | " + " | ".join(f"vs {n}" for n in names) + " | fastest reference "
                  "| graph only |", "|---|---|---|" + "---|" * (len(names) + 2)]
        lines += [f"| {r['system']} | {r['workload']} | {r['batch']} | "
                  + " | ".join(f"{r['vs'][n]:.2f}x" if n in r["vs"] else "-" for n in names)
                  + f" | {r['baseline']} | {r['graph']:.2f}x |" for r in rows]
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
