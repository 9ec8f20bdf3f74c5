"""What an export or a quantization writes, declared once and validated once (torch-free).

`ExportRecipe` is the graph kind x precision x weight format of `q3vl export` / `export_bundle`
(plus the TensorRT engines built after it); `QuantizeRecipe` the weight format and method of
`q3vl quantize` / `quantize_bundle`. Their fields make the commands' flags (`q3vl.options`), and
every combination that cannot be built is refused here, at construction, before minutes of work:
bf16 needs the plain graphs, quantized weights the fused fp32 ones, TensorRT the plain ones, and
an int8 smoothing strength the int8 smoothing method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from q3vl.errors import ConfigError, option
from q3vl.options import check_fields, opt
from q3vl.precision import GRAPH_KINDS, GRAPH_PRECISIONS, WEIGHT_FORMATS

EXPORT_WEIGHTS = ("int8", "int4")  # the weight formats an export writes straight from the checkpoint
INT8_METHODS = ("smooth", "dynamic", "nbits")
GRAPH_PLAIN = option("graph='plain'", "--graph plain")
TENSORRT = "TensorRT"
_ALPHA_HELP = ("one int8 smoothing strength in (0, 1) instead of trying 0.3-0.6 (each strength tried runs a "
               "simulated copy of the model: a fixed one calibrates ~5x faster, which matters for the 8B shape on "
               "a CPU)")


def _alpha_plan(alpha: float | None) -> Any:
    from q3vl.export.quantize.int8 import plan_for_alpha  # numpy only; its own check names the range

    return plan_for_alpha(alpha)


@dataclass(frozen=True)
class ExportRecipe:
    """The graphs an export writes (see the module docstring); `kind` is the graph kind it resolves to."""

    precision: str = opt("fp32", "graph weights and matmuls (norms, softmax, residuals and heads stay fp32); bf16 "
                                 "needs --graph plain", choices=GRAPH_PRECISIONS)
    graph: str | None = opt(None, "fused: ORT contrib ops (fast; the default); plain: standard ops, traced (parity "
                                  "baseline; the default with --tensorrt)", choices=GRAPH_KINDS)
    weights: str | None = opt(None, "write quantized weights straight from the checkpoint (fused fp32 graphs): int8 = "
                                    "the calibrated smoothing method of `q3vl quantize`, int4 = MatMulNBits; parity "
                                    "is checked against transformers with the weight format's tolerance",
                              choices=EXPORT_WEIGHTS)
    block_size: int = opt(32, "int4 block size (with --weights int4)", low=1)
    int8_alpha: float | None = opt(None, "with --weights int8: " + _ALPHA_HELP, metavar="A")
    tensorrt: bool = opt(False, "build TensorRT engines after the export (as `q3vl trt build` does)", group=TENSORRT)

    def __post_init__(self) -> None:
        _alpha_plan(self.int8_alpha)
        check_fields(self)
        kind = self.kind
        if kind == "fused" and self.precision == "bf16":
            bf16 = option(repr_of("precision", "bf16"), "--precision bf16")
            raise ConfigError(f"fused graphs are built in fp32 or fp16: {bf16} needs {GRAPH_PLAIN}")
        if self.tensorrt and kind == "fused":
            raise ConfigError(f"{option('tensorrt=True', '--tensorrt')} needs {GRAPH_PLAIN}: TensorRT's ONNX parser "
                              "does not know the fused graphs' ONNX Runtime contrib ops")
        if self.weights is not None and (self.tensorrt or kind != "fused" or self.precision != "fp32"):
            raise ConfigError(f"{option(repr_of('weights', self.weights), '--weights')} needs the fused fp32 graphs "
                              f"(no --tensorrt, --graph plain or --precision), not graph={kind!r}, "
                              f"precision={self.precision!r}")
        if self.int8_alpha is not None and self.weights != "int8":
            raise ConfigError(f"{option(f'int8_alpha={self.int8_alpha}', '--int8-alpha')} is for "
                              f"{option(repr_of('weights', 'int8'), '--weights int8')}")

    @property
    def kind(self) -> str:
        """The graph kind: `graph`, else plain with TensorRT, else fused."""
        return self.graph or ("plain" if self.tensorrt else "fused")

    def int8_plan(self) -> Any:
        """The `Int8Plan` settings of `int8_alpha` (None: the default search)."""
        return _alpha_plan(self.int8_alpha)


@dataclass(frozen=True)
class QuantizeRecipe:
    """A weight-quantized copy of a bundle: the format, the int8 method and its settings."""

    weights: str = opt("int8", "the weight format (the command line asks for it)", choices=WEIGHT_FORMATS,
                       required=True)
    method: str | None = opt(None, "int8 only: smooth (default: calibrated smoothing, per-token activations, spiking "
                                   "projections kept float), dynamic (ONNX Runtime dynamic quantization, the previous "
                                   "default), nbits (MatMulNBits 8-bit, accuracy level 4)", choices=INT8_METHODS)
    block_size: int = opt(32, "int4 (and int8 nbits) block size", low=1)
    int8_alpha: float | None = opt(None, "int8 smooth: " + _ALPHA_HELP, metavar="A")

    def __post_init__(self) -> None:
        _alpha_plan(self.int8_alpha)
        check_fields(self)
        if self.weights != "int8" and self.method is not None:
            raise ConfigError(f"{option(repr_of('method', self.method), f'--method {self.method}')} is for int8 "
                              f"weights, not {self.weights}")
        if self.int8_alpha is not None and self.int8_method != "smooth":
            raise ConfigError(f"{option(f'int8_alpha={self.int8_alpha}', '--int8-alpha')} is for --weights int8 with "
                              "--method smooth (the default)")

    @property
    def int8_method(self) -> str | None:
        """The int8 method (default "smooth"; None for the other formats, which have one method each)."""
        return (self.method or "smooth") if self.weights == "int8" else None

    def int8_plan(self) -> Any:
        """The `Int8Plan` settings of `int8_alpha` (None: the default search)."""
        return _alpha_plan(self.int8_alpha)


def repr_of(name: str, value: object) -> str:
    """`name='value'`: how a message names a keyword argument and its value."""
    return f"{name}={value!r}"


__all__ = ["EXPORT_WEIGHTS", "INT8_METHODS", "ExportRecipe", "QuantizeRecipe"]
