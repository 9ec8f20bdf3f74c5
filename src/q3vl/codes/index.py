"""An embedded vector index: binary codes searched by Hamming distance, then rescored.

Built on usearch (https://github.com/unum-cloud/usearch) rather than faiss because it stores 1-bit
vectors natively (`b1`, Hamming, HNSW or exact), saves to a single file that can be memory-mapped
(`view=True`), installs as one small wheel with no BLAS/OpenMP stack, and is the library
sentence-transformers' quantized-search examples use. faiss's IndexBinaryHNSW would serve too, at
the cost of a much larger dependency.

Search is the usual two-stage recipe: the k x `rescore_multiplier` nearest binary codes by Hamming
distance, then those candidates re-scored with the query's float vector against stored int8 codes
(dequantized with the index's calibration) or float32 vectors, and the best k returned.

Files (a directory, no server): `binary.usearch`, `rescore.npy` (int8 or float32, memory-mapped on
load), `calibration.json` (int8 only), `index.json` (dims, counts, settings, the source bundle).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from q3vl.codes.embeddings import Calibration, dequantize, quantize_embeddings
from q3vl.errors import missing_extra, option

RESCORE = ("int8", "float32", "none")


def _usearch() -> Any:
    # onnxruntime must be loaded before usearch: the other order segfaults on import (seen with
    # usearch 2.26 + onnxruntime 1.32 on Linux x86_64: `import usearch.index; import onnxruntime`)
    with contextlib.suppress(ImportError):
        import onnxruntime  # noqa: F401
    try:
        from usearch import index as us
    except ImportError as e:
        raise missing_extra("usearch", "index") from e
    return us


class BinaryIndex:
    """Binary-code index with rescoring; vectors must be L2-normalised float32 `[N, D]`."""

    def __init__(self, dim: int, rescore: str = "int8", calibration: Calibration | None = None,
                 connectivity: int = 16, meta: dict[str, Any] | None = None) -> None:
        if rescore not in RESCORE:
            raise ValueError(f"rescore must be one of {RESCORE}")
        us = _usearch()
        self.dim, self.rescore, self.calibration = dim, rescore, calibration
        self.meta = dict(meta or {})
        self.index = us.Index(ndim=dim, metric=us.MetricKind.Hamming, dtype=us.ScalarKind.B1,
                              connectivity=connectivity)
        self.keys = np.zeros(0, np.int64)
        self.vectors: np.ndarray = np.zeros((0, dim), np.int8 if rescore == "int8" else np.float32)

    @classmethod
    def build(cls, emb: np.ndarray, keys: np.ndarray | None = None, rescore: str = "int8",
              calibration: Calibration | None = None, **kw: Any) -> BinaryIndex:
        """Index `emb`; int8 rescoring fits its calibration on `emb` unless one is given."""
        emb = np.asarray(emb, np.float32)
        if rescore == "int8" and calibration is None:
            calibration = Calibration.fit(emb)
        index = cls(emb.shape[1], rescore, calibration, **kw)
        index.add(emb, keys)
        return index

    def add(self, emb: np.ndarray, keys: np.ndarray | None = None) -> None:
        """Append vectors (keys default to their running position)."""
        emb = np.asarray(emb, np.float32)
        if emb.ndim != 2 or emb.shape[1] != self.dim:
            raise ValueError(f"expected [N, {self.dim}] embeddings, got {emb.shape}")
        if np.isnan(emb).any():
            skip = option("on_error='skip'", "--on-error skip")
            raise ValueError(f"embeddings contain NaN rows (items that failed with {skip}); drop them first")
        keys = np.arange(len(self.keys), len(self.keys) + len(emb)) if keys is None else np.asarray(keys, np.int64)
        self.index.add(keys, np.packbits(emb > 0, axis=1))
        self.keys = np.concatenate([self.keys, keys])
        if self.rescore == "int8":
            self.vectors = np.concatenate([self.vectors, quantize_embeddings(emb, "int8", self.calibration)])
        elif self.rescore == "float32":
            self.vectors = np.concatenate([self.vectors, emb])

    def __len__(self) -> int:
        return len(self.keys)

    def search(self, queries: np.ndarray, k: int = 10, rescore_multiplier: int = 4,
               exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(keys int64 `[Q, k]`, scores float32 `[Q, k]`) for float queries `[Q, D]` (or `[D]`).

        Scores are dot products after rescoring, or negative Hamming distances without it. Rows hold
        fewer than k valid hits (key -1, score -inf) only when the index is smaller than k.
        """
        q = np.atleast_2d(np.asarray(queries, np.float32))
        n_cand = min(len(self), k * (rescore_multiplier if self.rescore != "none" else 1))
        matches = self.index.search(np.packbits(q > 0, axis=1), n_cand, exact=exact)
        cand_keys = np.atleast_2d(matches.keys).astype(np.int64)
        cand_dist = np.atleast_2d(matches.distances).astype(np.float32)
        out_keys = np.full((len(q), k), -1, np.int64)
        out_scores = np.full((len(q), k), -np.inf, np.float32)
        pos = {int(key): i for i, key in enumerate(self.keys)} if self.rescore != "none" else {}
        for r in range(len(q)):
            valid = cand_keys[r] >= 0
            keys, dist = cand_keys[r][valid], cand_dist[r][valid]
            scores = -dist if self.rescore == "none" else self._rescore(q[r], keys, pos)
            top = np.argsort(-scores, kind="stable")[:k]
            out_keys[r, :len(top)], out_scores[r, :len(top)] = keys[top], scores[top]
        return out_keys, out_scores

    def _rescore(self, query: np.ndarray, keys: np.ndarray, pos: dict[int, int]) -> np.ndarray:
        rows = self.vectors[[pos[int(x)] for x in keys]]
        if self.rescore == "int8":
            rows = dequantize(rows, "int8", self.calibration)  # type: ignore[arg-type]
        return rows.astype(np.float32) @ query

    def save(self, directory: str | Path) -> Path:
        """Write the index directory (overwrites its files)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.index.save(str(d / "binary.usearch"))
        np.save(d / "keys.npy", self.keys)
        if self.rescore != "none":
            np.save(d / "rescore.npy", self.vectors)
        if self.calibration is not None:
            self.calibration.save(d / "calibration.json")
        (d / "index.json").write_text(json.dumps({"format": "q3vl-index/1", "dim": self.dim, "count": len(self),
                                                  "rescore": self.rescore, **self.meta}, indent=1))
        return d

    @classmethod
    def load(cls, directory: str | Path, view: bool = True) -> BinaryIndex:
        """Open an index directory; `view` memory-maps the binary index and the rescoring vectors."""
        d = Path(directory)
        meta = json.loads((d / "index.json").read_text())
        if meta.get("format") != "q3vl-index/1":
            raise ValueError(f"{d} is not a q3vl index")
        calib = Calibration.load(d / "calibration.json") if (d / "calibration.json").exists() else None
        extra = {k: v for k, v in meta.items() if k not in ("format", "dim", "count", "rescore")}
        index = cls(int(meta["dim"]), meta["rescore"], calib, meta=extra)
        (index.index.view if view else index.index.load)(str(d / "binary.usearch"))
        index.keys = np.load(d / "keys.npy")
        if index.rescore != "none":
            index.vectors = np.load(d / "rescore.npy", mmap_mode="r" if view else None)
        if len(index.keys) != meta["count"] or len(index.index) != meta["count"]:
            raise ValueError(f"{d} is inconsistent: index.json says {meta['count']} vectors")
        return index
