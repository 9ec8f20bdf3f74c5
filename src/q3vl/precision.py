"""One vocabulary for every precision q3vl speaks of, as `Literal` types and the tuples derived from them.

- graph precision (`q3vl export --precision`): the dtype of an exported graph's weights and matmuls;
- weight format (`q3vl quantize --weights`, `q3vl export --weights`): a weight-only quantized bundle,
  recorded in the manifest as the bundle precision `"<format>-weights"`;
- engine precision (`q3vl trt build --precision`): what TensorRT may use inside an engine;
- code precision (`q3vl embed --quantize`, the server's embedding types): the dtype of the output
  vectors. These follow sentence-transformers' and Cohere's names (`float32`, `int8`, `binary`, ...)
  because stored codes and API clients use them.

Every parser of these names (CLI choices, manifests, tolerances) uses the tuples here, so a name
accepted in one place is accepted everywhere it means the same thing.
"""

from __future__ import annotations

from typing import Literal, get_args

from q3vl.errors import ConfigError

GraphPrecision = Literal["fp32", "fp16", "bf16"]
WeightFormat = Literal["int8", "int4", "fp16"]
BundlePrecision = Literal["fp32", "fp16", "bf16", "int8-weights", "int4-weights", "fp16-weights"]
EnginePrecision = Literal["fp16", "bf16", "fp32"]
CodePrecision = Literal["float32", "float16", "int8", "uint8", "binary", "ubinary"]
GraphKind = Literal["fused", "plain"]

GRAPH_PRECISIONS: tuple[str, ...] = get_args(GraphPrecision)
WEIGHT_FORMATS: tuple[str, ...] = get_args(WeightFormat)
BUNDLE_PRECISIONS: tuple[str, ...] = get_args(BundlePrecision)
ENGINE_PRECISIONS: tuple[str, ...] = get_args(EnginePrecision)
CODE_PRECISIONS: tuple[str, ...] = get_args(CodePrecision)
GRAPH_KINDS: tuple[str, ...] = get_args(GraphKind)


def weights_precision(fmt: str) -> str:
    """The bundle precision a weight format is recorded as: "int8" -> "int8-weights"."""
    check(fmt, WEIGHT_FORMATS, "weight format")
    return f"{fmt}-weights"


def check(value: str, allowed: tuple[str, ...], what: str) -> str:
    """`value` if it is one of `allowed`, else a `ConfigError` naming the allowed values."""
    if value not in allowed:
        raise ConfigError(f"{what} must be one of {list(allowed)}, not {value!r}")
    return value


def check_bundle_precision(value: str) -> str:
    """A manifest's graph precision."""
    return check(value, BUNDLE_PRECISIONS, "bundle precision")
