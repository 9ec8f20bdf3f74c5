"""The parity bar for every graph precision and weight format, in one table.

Against the float32 transformers model for exported precisions; against the fp32 bundle they came
from for weight-quantized bundles (which is itself held to the fp32 bar). Values were set from
measurements on the random-weight tiny and small checkpoints (docs/parity.md); they are floors a
bundle must clear, not the typical figure (fp32 bundles measure cosine 1 - 1e-12).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tolerance:
    """Minimum cosines and maximum score difference one bundle precision must meet."""

    vision_cos: float  # min cosine over every merged row and DeepStack row
    embed_cos: float  # min cosine per pooled embedding
    score_abs: float  # max |score difference| for the reranker


TOLERANCES = {
    "fp32": Tolerance(vision_cos=0.99999, embed_cos=0.9999, score_abs=1e-4),
    "fp16": Tolerance(vision_cos=0.999, embed_cos=0.999, score_abs=5e-3),
    "bf16": Tolerance(vision_cos=0.99, embed_cos=0.99, score_abs=3e-2),
    # Weight formats, against the fp32 bundle. Worst item on the 28-item parity set (56 reranker scores),
    # small shape, outlier-realistic checkpoints (docs/quantization.md; benchmarks/quant_parity.py):
    # fp16 weights: cos 1.000000, |diff| 1.2e-5
    "fp16-weights": Tolerance(vision_cos=0.999, embed_cos=0.9999, score_abs=1e-3),
    # int8 (method smooth): cos 0.9986, |diff| 0.0113 (method dynamic: 0.38 / 0.196, outside)
    "int8-weights": Tolerance(vision_cos=0.99, embed_cos=0.99, score_abs=2e-2),
    # int4: cos 0.964, |diff| 0.132 (default checkpoints: cos 0.941 small, 0.965 tiny)
    "int4-weights": Tolerance(vision_cos=0.90, embed_cos=0.90, score_abs=0.15),
}


def tolerance(precision: str) -> Tolerance:
    """The tolerance for a bundle graph's recorded precision."""
    try:
        return TOLERANCES[precision]
    except KeyError:
        raise ValueError(f"no parity tolerance defined for precision {precision!r}") from None
