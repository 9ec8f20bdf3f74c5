"""Embedding codes (torch-free, numpy only): Matryoshka truncation, int8/uint8 codes with a stored
calibration, binary codes, and the embedded binary index with rescoring (`codes.index`, usearch).
"""

from q3vl.codes.embeddings import Calibration, dequantize, encode, quantize_embeddings, truncate

__all__ = ["Calibration", "dequantize", "encode", "quantize_embeddings", "truncate"]
