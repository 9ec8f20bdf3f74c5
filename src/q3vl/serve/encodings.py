"""Embeddings in the encodings the APIs return: float lists, base64 float32, and Cohere's code types.

base64 is the little-endian float32 bytes of the vector (what openai-python decodes with numpy and
what Cohere documents). int8/uint8/binary/ubinary are `q3vl.codes.quantize_embeddings`, in the
order truncate -> normalise -> quantize; int8/uint8 need the calibration given at start
(`--calibration`), never ranges fitted on the request itself.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from q3vl.codes.embeddings import Calibration, quantize_embeddings
from q3vl.serve.errors import RequestError

CODE_TYPES = ("int8", "uint8", "binary", "ubinary")
HOW_TO_CALIBRATE = ("start the server with --calibration FILE; make FILE from embeddings of a sample of your "
                    "documents: `q3vl embed BUNDLE sample.jsonl -o sample.npy [--dim D]` then "
                    "`q3vl calibrate sample.npy -o calibration.json [--dim D]`")


def b64_float32(vector: np.ndarray) -> str:
    """base64 of the little-endian float32 bytes of one vector."""
    return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")


def check_codes(types: list[str], calibration: Calibration | None, dim: int) -> None:
    """int8/uint8 need a calibration for exactly this dimension; refused before any work starts."""
    wanted = [t for t in types if t in ("int8", "uint8")]
    if not wanted:
        return
    if calibration is None:
        raise RequestError(f"embedding_types {wanted} need a calibration, and this server has none: "
                           f"{HOW_TO_CALIBRATE}", "embedding_types")
    if calibration.dim != dim:
        raise RequestError(f"the server's calibration is for {calibration.dim} dimensions, this request's "
                           f"embeddings have {dim}; ask for output_dimension={calibration.dim}", "output_dimension")


def by_type(vectors: np.ndarray, types: list[str], calibration: Calibration | None) -> dict[str, Any]:
    """Cohere's `embeddings` object: one list per requested type, rows in input order."""
    out: dict[str, Any] = {}
    for kind in dict.fromkeys(types):
        if kind == "float":
            out["float"] = vectors.tolist()
        elif kind == "base64":
            out["base64"] = [b64_float32(v) for v in vectors]
        else:
            out[kind] = quantize_embeddings(vectors, kind, calibration).tolist()
    return out
