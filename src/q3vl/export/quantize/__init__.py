"""Weight quantization, export side: the int8 plan and its graph emitters (`int8`), the smoothing
planner (`planner`), calibration on the checkpoint (`calibrate`), quantized projections written at
export time (`quantized`), simulated int8 (`fakequant`), and `q3vl quantize` on an fp32 bundle
(`weights`, `rewrite`).
"""
