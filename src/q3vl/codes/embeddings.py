"""Embedding codes: float16, int8/uint8 with stored calibration, binary/ubinary, Matryoshka truncation.

Pure numpy, in the order truncate -> normalise -> quantize. The code conventions are
sentence-transformers' `quantize_embeddings`, so stored codes stay interchangeable:

- uint8: `floor((x - start) / step)` with `step = (max - min) / 255` per dimension; int8 is the same
  minus 128. Unlike sentence-transformers, values outside the calibration range are clipped
  instead of wrapping around, and the ranges always come from a stored `Calibration`, never
  silently from the batch being encoded (a query batch of one would get a useless range).
- binary: `packbits(x > 0) - 128` as int8; ubinary: `packbits(x > 0)` as uint8 (8 dims per byte).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from q3vl.precision import CODE_PRECISIONS, check

PRECISIONS = CODE_PRECISIONS
BYTES_PER_DIM = {"float32": 4.0, "float16": 2.0, "int8": 1.0, "uint8": 1.0, "binary": 0.125, "ubinary": 0.125}


def truncate(emb: np.ndarray, dim: int, normalize: bool = True) -> np.ndarray:
    """Matryoshka: the first `dim` values of each row of float `[N, D]`, L2-normalised again.

    Returns float32 `[N, dim]`.
    """
    emb = np.asarray(emb, np.float32)
    if emb.ndim != 2 or not 0 < dim <= emb.shape[1]:
        raise ValueError(f"need a 2-D array and 0 < dim <= {emb.shape[-1]}, got shape {emb.shape} and dim {dim}")
    out = np.ascontiguousarray(emb[:, :dim])
    if normalize:
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out


@dataclass(frozen=True)
class Calibration:
    """Per-dimension ranges `[2, D]` (row 0 = start, row 1 = end) for int8/uint8 codes.

    Fit it once on a representative sample (documents, after truncation and normalisation), save it
    with the index, and reuse it for every batch and every query.
    """

    ranges: np.ndarray
    dim: int
    n_samples: int
    percentile: float
    normalized: bool = True

    @classmethod
    def fit(cls, sample: np.ndarray, percentile: float = 100.0, normalized: bool = True) -> Calibration:
        """Ranges from a float `[N, D]` sample; `percentile` < 100 trims outliers symmetrically."""
        sample = np.asarray(sample, np.float32)
        if sample.ndim != 2 or len(sample) < 2:
            raise ValueError("calibration needs a 2-D sample with at least 2 rows")
        if not 50 < percentile <= 100:
            raise ValueError("percentile must be in (50, 100]")
        lo, hi = np.percentile(sample, [100 - percentile, percentile], axis=0)
        hi = np.where(hi > lo, hi, lo + 1e-6)  # constant dimensions still get a valid step
        return cls(np.stack([lo, hi]).astype(np.float32), sample.shape[1], len(sample), percentile, normalized)

    @property
    def starts(self) -> np.ndarray:
        return self.ranges[0]

    @property
    def steps(self) -> np.ndarray:
        return (self.ranges[1] - self.ranges[0]) / 255

    def save(self, path: str | Path) -> None:
        """JSON with the ranges (portable, diffable, a few KB)."""
        Path(path).write_text(json.dumps({"format": "q3vl-calibration/1", "dim": self.dim,
                                          "n_samples": self.n_samples, "percentile": self.percentile,
                                          "normalized": self.normalized, "ranges": self.ranges.tolist()}))

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        """Inverse of `save`."""
        d = json.loads(Path(path).read_text())
        if d.get("format") != "q3vl-calibration/1":
            raise ValueError(f"{path} is not a q3vl calibration file")
        ranges = np.asarray(d["ranges"], np.float32)
        if ranges.shape != (2, d["dim"]):
            raise ValueError(f"{path}: ranges shape {ranges.shape} does not match dim {d['dim']}")
        return cls(ranges, int(d["dim"]), int(d["n_samples"]), float(d["percentile"]), bool(d["normalized"]))


def quantize_embeddings(emb: np.ndarray, precision: str, calibration: Calibration | None = None) -> np.ndarray:
    """Encode float `[N, D]` embeddings.

    Returns: float32/float16 `[N, D]`; int8/uint8 `[N, D]` (needs `calibration` for this D);
    binary (int8) / ubinary (uint8) `[N, ceil(D / 8)]`.
    """
    check(precision, CODE_PRECISIONS, "code precision")
    emb = np.asarray(emb, np.float32)
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be 2-D [N, D], got shape {emb.shape}")
    if precision in ("float32", "float16"):
        return emb.astype(precision)
    if precision in ("binary", "ubinary"):
        packed = np.packbits(emb > 0, axis=1)
        return (packed.astype(np.int16) - 128).astype(np.int8) if precision == "binary" else packed
    if calibration is None:
        raise ValueError(f"{precision} codes need a Calibration (Calibration.fit on a sample, then save/load it)")
    if calibration.dim != emb.shape[1]:
        raise ValueError(f"calibration is for dim {calibration.dim}, embeddings have {emb.shape[1]}")
    codes = np.clip(np.floor((emb - calibration.starts) / calibration.steps), 0, 255)
    return (codes - 128).astype(np.int8) if precision == "int8" else codes.astype(np.uint8)


def dequantize(codes: np.ndarray, precision: str, calibration: Calibration) -> np.ndarray:
    """Approximate floats `[N, D]` from int8/uint8 codes (bin centres), for rescoring."""
    if precision not in ("int8", "uint8"):
        raise ValueError("dequantize applies to int8/uint8 codes")
    u = codes.astype(np.float32) + (128 if precision == "int8" else 0)
    return (u + 0.5) * calibration.steps + calibration.starts


def unpack_binary(codes: np.ndarray, precision: str, dim: int) -> np.ndarray:
    """±1 float `[N, dim]` from packed binary/ubinary codes."""
    u = (codes.astype(np.int16) + 128).astype(np.uint8) if precision == "binary" else codes
    return np.unpackbits(u, axis=1)[:, :dim].astype(np.float32) * 2 - 1


def encode(emb: np.ndarray, precision: str = "float32", dim: int | None = None,
           calibration: Calibration | None = None) -> np.ndarray:
    """The full pipeline: truncate (Matryoshka) -> normalise -> quantize."""
    x = truncate(emb, dim) if dim else np.asarray(emb, np.float32)
    return quantize_embeddings(x, precision, calibration)


def describe(precision: str, dim: int) -> dict[str, Any]:
    """Bytes per vector and the compression against float32."""
    nbytes = int(np.ceil(dim * BYTES_PER_DIM[precision]))
    return {"precision": precision, "dim": dim, "bytes": nbytes, "compression": 4 * dim / nbytes}
