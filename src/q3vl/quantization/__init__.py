"""Quantization: embedding codes, Matryoshka, an embedded index with rescoring, weight-quantized bundles."""

from q3vl.quantization.embeddings import Calibration, dequantize, encode, quantize_embeddings, truncate

__all__ = ["Calibration", "dequantize", "encode", "quantize_embeddings", "truncate"]
