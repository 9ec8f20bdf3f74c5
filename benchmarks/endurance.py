"""Endurance and concurrency of one loaded model: results bit-identical across threads, memory flat over calls.

Two checks on one `Embedder` (and a `Reranker` when given), written to benchmarks/results/endurance.md:
1. 8 threads x 200 mixed calls (texts, images, a video, a frame list, a bad item in skip mode) give
   results bit-identical to the same calls run one by one on one thread;
2. 1,000 sequential mixed calls: RSS sampled every 100 calls, after a warm-up; the growth from call
   100 to call 1,000 must stay under a bound (a leak of even 100 KB per call would show as ~90 MB).

Usage: python benchmarks/endurance.py EMBEDDING_BUNDLE [--reranker RERANKER_BUNDLE] [--calls 1000]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from q3vl.runtime import Embedder, Reranker
from q3vl.testing.inputs import gradient_image, write_video

RSS_GROWTH_LIMIT_MB = 64.0


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def calls(media: Path) -> list[list[dict[str, Any]]]:
    """24 distinct mixed calls of 1-3 items (one holds an unreadable image, run in skip mode)."""
    pool = [{"text": "a short text"}, {"text": "retrieval " * 60}, {"image": gradient_image(96, 128, 1)},
            {"image": str(media / "photo.png")}, {"video": str(media / "clip.mp4"), "fps": 2},
            {"video": [gradient_image(64, 96, seed=i) for i in range(3)]},
            {"text": ["two", "texts"], "image": [gradient_image(64, 64, 2)]}, {"image": str(media / "missing.png")}]
    return [[pool[(k + j) % len(pool)] for j in range(1 + k % 3)] for k in range(24)]


def concurrency(model: Embedder, jobs: list[list[dict[str, Any]]], threads: int, per_thread: int) -> dict[str, Any]:
    want = [model.process(j, on_error="skip") for j in jobs]
    order = [k % len(jobs) for k in range(threads * per_thread)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        got = list(pool.map(lambda k: model.process(jobs[k], on_error="skip"), order))
    identical = all(np.array_equal(g, want[k], equal_nan=True) for g, k in zip(got, order))
    return {"threads": threads, "calls": len(order), "identical": identical, "seconds": time.perf_counter() - t0}


def endurance(run: Any, n: int) -> dict[str, Any]:
    samples = []
    t0 = time.perf_counter()
    for k in range(n):
        run(k)
        if (k + 1) % 100 == 0:
            samples.append((k + 1, rss_mb()))
    growth = samples[-1][1] - samples[0][1]
    return {"calls": n, "rss_mb": samples, "growth_mb": growth, "ok": growth < RSS_GROWTH_LIMIT_MB,
            "seconds": time.perf_counter() - t0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--reranker", type=Path)
    p.add_argument("--calls", type=int, default=1000)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/endurance.md"))
    a = p.parse_args()
    logging.getLogger("q3vl").setLevel(logging.ERROR)  # the skipped bad item would log on every call
    with tempfile.TemporaryDirectory() as tmp:
        media = Path(tmp)
        write_video(media / "clip.mp4", frames=16, width=160, height=96, fps=8)
        gradient_image(96, 128, seed=4).save(media / "photo.png")
        jobs = calls(media)
        emb = Embedder(a.bundle)
        conc = concurrency(emb, jobs, threads=8, per_thread=200)
        results = {"embedder": endurance(lambda k: emb.process(jobs[k % len(jobs)], on_error="skip"), a.calls)}
        if a.reranker:
            rr = Reranker(a.reranker)
            results["reranker"] = endurance(lambda k: rr.process(
                {"query": {"text": "q"}, "documents": jobs[k % len(jobs)]}, on_error="skip"), a.calls)
    lines = [f"# Endurance (`python benchmarks/endurance.py`, {time.strftime('%Y-%m-%d')}, "
             f"{len(os.sched_getaffinity(0))} cores, load average {os.getloadavg()[0]:.1f})", "",
             f"- concurrency: {conc['threads']} threads x {conc['calls'] // conc['threads']} mixed calls on one "
             f"Embedder: bit-identical to one thread: **{conc['identical']}** ({conc['seconds']:.0f} s)"]
    for name, r in results.items():
        trace = ", ".join(f"{c}: {m:.0f}" for c, m in r["rss_mb"])
        lines.append(f"- {name}: {r['calls']} sequential mixed calls, RSS MB by call ({trace}); growth from call 100 "
                     f"to {r['calls']}: **{r['growth_mb']:+.1f} MB** (bound {RSS_GROWTH_LIMIT_MB:.0f} MB: "
                     f"{'ok' if r['ok'] else 'EXCEEDED'}; {r['seconds']:.0f} s)")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("\n".join(lines) + "\n")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0 if conc["identical"] and all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
