"""Weight-quantized graphs straight from the checkpoint: the fused builders' MatMul hook.

`q3vl export --weights int8|int4` builds the fused graphs with quantized weights written tensor by
tensor, as each projection is assembled from the checkpoint: no fp32 graph exists in memory or on
disk. The ops and weight values are the ones the fp32-bundle path writes (`q3vl quantize`):
int8 through `q3vl.export.quantize.int8.emit_matmul` with the same calibrated plan, int4 through
ONNX Runtime's own block quantizer (the one `MatMulNBitsQuantizer` calls), so both paths give the
same numbers (tests/test_int8.py::test_export_time_weights_equal_quantizing_the_fp32_bundle).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from q3vl.export.quantize.int8 import MS, Int8Plan, OpSink, emit_matmul


class QuantHook(ABC):
    """How a builder writes constant-weight MatMuls and transforms other initializers."""

    weights = ""

    def transform(self, name: str, array: np.ndarray) -> np.ndarray:
        """An initializer as the quantized graph holds it (the identity unless a plan folds into it)."""
        return array

    @abstractmethod
    def matmul(self, g: OpSink, x: str, w: np.ndarray, name: str) -> str:
        """`x @ w` (w [K, N], graph layout, before any transform) as this format writes it."""

    def summary(self) -> dict[str, Any]:
        return {"weights": self.weights}


class Int8Hook(QuantHook):
    """Smoothing folded into the initializers, planned projections as per-token int8 ops."""

    weights = "int8"

    def __init__(self, plan: Int8Plan) -> None:
        self.plan = plan

    def transform(self, name: str, array: np.ndarray) -> np.ndarray:
        return self.plan.transform(name, array)

    def matmul(self, g: OpSink, x: str, w: np.ndarray, name: str) -> str:
        return emit_matmul(g, x, w.astype(np.float32), name, self.plan)

    def summary(self) -> dict[str, Any]:
        return {"weights": "int8", "method": "smooth", "int8_plan": self.plan.summary()}


class NBitsHook(QuantHook):
    """MatMulNBits (block-wise symmetric weights, accuracy_level 4) for every constant-weight MatMul."""

    def __init__(self, bits: int = 4, block_size: int = 32) -> None:
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig,
            DefaultWeightOnlyQuantizer,
        )

        self.bits, self.block_size = bits, block_size
        self.weights = f"int{bits}"
        self.quantizer = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(
            block_size=block_size, is_symmetric=True, accuracy_level=4, bits=bits))

    def matmul(self, g: OpSink, x: str, w: np.ndarray, name: str) -> str:
        w = np.ascontiguousarray(w, dtype=np.float32)
        packed, scales, _ = self.quantizer.qbits_block_quant(w)
        k, n = w.shape
        return g.op("MatMulNBits", [x, g.weight(f"{name}_Q{self.bits}", packed), g.weight(f"{name}_scales", scales)],
                    domain=MS, K=k, N=n, bits=self.bits, block_size=self.block_size, accuracy_level=4)

    def summary(self) -> dict[str, Any]:
        return {"weights": self.weights, "method": "nbits", "block_size": self.block_size}
