"""q3vl: export Qwen3-VL-Embedding/Reranker to ONNX and run them without PyTorch."""
