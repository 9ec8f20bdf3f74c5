"""Export side (torch): checkpoint -> bundle of ONNX graphs with fused heads, validated for parity."""
