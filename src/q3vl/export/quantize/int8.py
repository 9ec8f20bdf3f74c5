"""int8 projections that survive activation outliers: smoothing, per-token activations, float fallback.

Numpy and ONNX only (no torch): the plan is computed on the export side (`q3vl.export.quantize.calibrate`),
and both ways of making an int8 bundle apply it through this module, so they write the same
graphs: the fused builder at export time (`q3vl export --weights int8`) and the rewrite of an
fp32 bundle (`q3vl quantize --weights int8`).

The scheme (SmoothQuant's "O1" recipe, Xiao et al. 2023, with the quantization-free modules of
Yang et al. 2024 for activation spikes), chosen by measurement (docs/quantization.md):

- **Smoothing**: projection input channel k is divided by s_k and the weight's row k multiplied
  by s_k, s_k = max|x_k|^alpha / max|w_k|^(1 - alpha) from calibration, rounded to a power of two
  so the fold is exact in floating point. 1/s_k goes into the producer: the norm's gain (and bias),
  or the v / up columns of the previous projection (attention and the SwiGLU product are linear
  in v and up).
- **Per-token activations**: each row gets its own scale (max|x| / 127) and is stored as uint8
  around 128, so a massive or spiking token no longer sets the scale of every other token.
- **7-bit weights**, per output column: ONNX Runtime's x86 u8 x s8 kernels (vpmaddubsw) add two
  products in int16 and saturate with 8-bit weights on CPUs without VNNI (measured: 10% max error
  per matmul); 7 bits cannot saturate.
- **Float fallback**: a projection whose simulated int8 error on the calibration activations
  stays above `max_error` after smoothing keeps a float MatMul (on the realistic checkpoints: the
  fc2 of the vision block whose register neurons fire).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

ACTIVATIONS = ("token", "tensor")
GEMMS = ("integer", "to_float")  # how a per-token int8 projection is written (`emit_matmul`)
MS = "com.microsoft"
PLAN_FILE = "int8_plan.npz"  # where an int8 bundle keeps its plan (`q3vl export --weights int8`, `q3vl quantize`)


@dataclass(frozen=True)
class Fold:
    """Where 1/s of a smoothed projection goes: `target` initializer, divided along its last axis at
    `offset` (a gain or bias vector, or a weight's output columns) by `divisor`.
    """

    target: str
    offset: int
    divisor: np.ndarray


@dataclass
class Projection:
    """One MatMul's plan: smoothing scales (or None), float fallback, and the simulated errors."""

    name: str
    smooth: np.ndarray | None
    keep_float: bool
    error: float  # mean per-token relative error of the int8 product on the calibration activations
    folds: list[Fold] = field(default_factory=list)


@dataclass
class Int8Plan:
    """The calibrated plan for every projection of a bundle's two graphs."""

    activations: str = "token"
    weight_bits: int = 7
    activation_bits: int = 8
    alpha: float | None = None  # the smoothing strength used (None: no smoothing)
    max_error: float | None = 0.05
    projections: dict[str, Projection] = field(default_factory=dict)
    alphas: tuple[float, ...] | None = (0.3, 0.4, 0.5, 0.6)  # strengths calibration tries (None: no smoothing)
    search: dict[str, float] = field(default_factory=dict)  # strength -> head error on the calibration inputs
    gemm: str = "to_float"  # "to_float": MatMulIntegerToFloat; "integer": MatMulInteger + Cast + 2 Mul (before)
    _divisors: dict[str, list[Fold]] = field(default_factory=dict, repr=False)

    def add(self, p: Projection) -> None:
        """Register a projection (and index its folds by target)."""
        self.projections[p.name] = p
        for f in p.folds:
            self._divisors.setdefault(f.target, []).append(f)

    def transform(self, name: str, array: np.ndarray) -> np.ndarray:
        """An initializer as the smoothed graph holds it: folds divided out, smoothed rows scaled.

        Every factor is a power of two, so this changes no float result of the graph.
        """
        folds, proj = self._divisors.get(name, []), self.projections.get(name)
        if not folds and (proj is None or proj.smooth is None):
            return array
        out = np.array(array, dtype=np.float32, copy=True)
        for f in folds:
            out[..., f.offset:f.offset + len(f.divisor)] /= f.divisor.astype(np.float32)
        if proj is not None and proj.smooth is not None:
            out *= proj.smooth.astype(np.float32)[:, None]
        return out

    def quantized(self, name: str) -> bool:
        p = self.projections.get(name)
        return p is not None and not p.keep_float

    def summary(self) -> dict[str, Any]:
        """What the manifest records: the settings, the float projections, the error range."""
        errs = [p.error for p in self.projections.values()]
        return {"activations": self.activations, "activation_bits": self.activation_bits,
                "weight_bits": self.weight_bits, "alpha": self.alpha, "alphas_tried": self.search,
                "max_error": self.max_error, "gemm": self.gemm, "projections": len(self.projections),
                "float_projections": sorted(n for n, p in self.projections.items() if p.keep_float),
                "simulated_error_max": round(max(errs), 5) if errs else None,
                "simulated_error_median": round(float(np.median(errs)), 5) if errs else None}

    def save(self, path: Path) -> None:
        """npz: the settings and per-projection facts as JSON, the vectors as arrays."""
        arrays: dict[str, Any] = {}
        rows: list[dict[str, Any]] = []
        for i, p in enumerate(self.projections.values()):
            if p.smooth is not None:
                arrays[f"s{i}"] = p.smooth
            for j, f in enumerate(p.folds):
                arrays[f"f{i}_{j}"] = f.divisor
            rows.append({"name": p.name, "keep_float": p.keep_float, "error": p.error, "smooth": p.smooth is not None,
                         "folds": [[f.target, f.offset] for f in p.folds]})
        meta = {"activations": self.activations, "weight_bits": self.weight_bits, "alpha": self.alpha,
                "max_error": self.max_error, "activation_bits": self.activation_bits, "search": self.search,
                "gemm": self.gemm, "projections": rows}
        arrays["meta"] = np.array(json.dumps(meta))
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path: Path) -> Int8Plan:
        with np.load(path) as z:
            meta = json.loads(str(z["meta"]))
            plan = cls(meta["activations"], meta["weight_bits"], meta.get("activation_bits", 8), meta["alpha"],
                       meta["max_error"], search=meta.get("search", {}),
                       gemm=meta.get("gemm", "integer"))  # plans saved before `gemm` were written that way
            for i, p in enumerate(meta["projections"]):
                folds = [Fold(t, o, z[f"f{i}_{j}"]) for j, (t, o) in enumerate(p["folds"])]
                plan.add(Projection(p["name"], z[f"s{i}"] if p["smooth"] else None, p["keep_float"], p["error"],
                                    folds))
        return plan


def plan_for_alpha(alpha: float | None) -> Int8Plan | None:
    """Plan settings for one fixed smoothing strength (None: the default search over `Int8Plan.alphas`).

    Each searched strength runs a simulated int8 copy of the model beside the float one, so the search
    costs (1 + len(alphas)) x the calibration forward passes; a fixed strength costs one.
    """
    if alpha is None:
        return None
    from q3vl.errors import ConfigError

    if not (isinstance(alpha, (int, float)) and 0.0 < float(alpha) < 1.0):  # NaN fails both comparisons
        raise ConfigError(f"int8 smoothing strength {alpha!r} must be a number in (0, 1); 0.4-0.5 suit most models")
    return Int8Plan(alphas=(float(alpha),))


def pow2(x: np.ndarray) -> np.ndarray:
    """Nearest power of two (in log scale), within 2^-24 .. 2^24; 1 where x is not positive."""
    with np.errstate(divide="ignore", invalid="ignore"):
        e = np.where(x > 0, np.round(np.log2(np.where(x > 0, x, 1.0))), 0.0)
    return np.exp2(np.clip(e, -24, 24)).astype(np.float32)


def smoothing_scales(x_absmax: np.ndarray, w_rowmax: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant's s_k = max|x_k|^alpha / max|w_k|^(1-alpha), as powers of two (1 for dead channels)."""
    x = np.maximum(x_absmax.astype(np.float64), 0.0)
    w = np.maximum(w_rowmax.astype(np.float64), 1e-12)
    s = np.where(x > 0, x**alpha / w ** (1 - alpha), 0.0)
    return pow2(s)


def quantize_weight(w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-column int8 codes [K, N] and float32 scales [N] for `w [K, N]`."""
    qmax = 2 ** (bits - 1) - 1
    scale = np.abs(w).max(0).astype(np.float32) / qmax
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    q = np.clip(np.rint(w / scale), -qmax, qmax).astype(np.int8)
    return q, scale


def quantize_rows(x: np.ndarray, bits: int = 8) -> np.ndarray:
    """Per-row symmetric round trip of `x [T, K]` (what the graph's per-token ops compute)."""
    scale = np.maximum(np.abs(x).max(-1, keepdims=True) / (2 ** (bits - 1) - 1), 1e-30)
    return np.rint(x / scale) * scale


def quantize_tensor(x: np.ndarray) -> np.ndarray:
    """Per-tensor asymmetric uint8 round trip (ONNX DynamicQuantizeLinear) of `x`."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (hi - lo) / 255 or 1.0
    zp = np.clip(np.rint(-lo / scale), 0, 255)
    return (np.clip(np.rint(x / scale) + zp, 0, 255) - zp) * scale


def simulated_error(x: np.ndarray, w: np.ndarray, bits: int, activations: str, activation_bits: int = 8) -> float:
    """Mean over tokens of the int8 product's relative error against `x @ w` (x, w already smoothed).

    Per token, not over the whole tensor: a few massive rows would otherwise hide what a projection
    does to every ordinary token (a spike layer's down_proj has a tensor-wide error of 0.2%).
    """
    q, scale = quantize_weight(w, bits)
    xq = quantize_rows(x, activation_bits) if activations == "token" else quantize_tensor(x)
    ref = x.astype(np.float32) @ w.astype(np.float32)
    got = xq.astype(np.float32) @ (q.astype(np.float32) * scale)
    rel = np.linalg.norm(got - ref, axis=1) / np.maximum(np.linalg.norm(ref, axis=1), 1e-30)
    return float(rel.mean())


class OpSink(Protocol):
    """What the emitters need from a graph under construction (`GraphWriter` or a rewrite adapter)."""

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", hint: str | None = None,
           **attrs: Any) -> Any: ...

    def const(self, array: Any, hint: str = "const", dtype: Any = None) -> str: ...

    def weight(self, name: str, array: np.ndarray) -> str: ...


def emit_matmul(g: OpSink, x: str, w: np.ndarray, name: str, plan: Int8Plan) -> str:
    """`x @ w` for projection `name` as the plan says: a float MatMul or the int8 ops.

    `w` is the graph-layout weight [K, N] before smoothing. Per-token activations, gemm "to_float"
    (the default; 8 ops, two of them on the [.., 1] shape only):

        x [.., K] -> |x| -> ReduceMax(-1) -> * 1/127 -> max(., eps) = r [.., 1]
        QuantizeLinear(x, r, 128, block_size=K) -> uint8 xq         (round(x / r) + 128, per row)
        MatMulIntegerToFloat(xq, w_q int8 [K, N], r, w_scale [N], 128) -> y [.., N]

    MatMulIntegerToFloat applies w_scale in the GEMM's output stage and r once after it. gemm
    "integer" (bundles made before) writes the same arithmetic as 12 ops: Div, Add, Round, Cast
    instead of QuantizeLinear (the same codes, except where its float x / r + 128 rounds a value
    within 2^-17 of a tie), and MatMulInteger, Cast, Mul, Mul instead of MatMulIntegerToFloat (the
    same products); each is a pass over [.., K] or [.., N], and at batch 1 each op's thread-pool
    dispatch costs more than its arithmetic (docs/quantization.md, "Profile").
    Per-tensor activations: ONNX Runtime's DynamicQuantizeMatMul (uint8, one scale per call).
    """
    if not plan.quantized(name):
        return g.op("MatMul", [x, g.weight(name, w)])
    q, scale = quantize_weight(plan.transform(name, w), plan.weight_bits)
    ws = g.weight(name + ".scale", scale)
    a_zp = g.const(np.uint8(2 ** (plan.activation_bits - 1)))
    if plan.weight_bits == 8 and plan.activation_bits == 8:  # uint8 around 128: u8 x u8 kernels cannot saturate
        wq = g.weight(name + ".uint8", (q.astype(np.int16) + 128).astype(np.uint8))
        zero_points = [a_zp, g.const(np.uint8(128))]
    else:
        wq = g.weight(name + ".int8", q)
        zero_points = [a_zp]
    if plan.activations == "tensor":
        return g.op("DynamicQuantizeMatMul", [x, wq, ws, *zero_points[1:]], domain=MS)
    amax = 2 ** (plan.activation_bits - 1) - 1  # 127, or 63 (raw uint8 <= 127: 8-bit weights cannot saturate)
    r = g.op("Max", [g.op("Mul", [g.op("ReduceMax", [g.op("Abs", [x]), g.const([-1], dtype=np.int64)], keepdims=1),
                                  g.const(np.float32(1 / amax))]), g.const(np.float32(1e-30))])
    if plan.gemm == "to_float":
        zp_rows = g.op("Expand", [a_zp, g.op("Shape", [r])])  # QuantizeLinear: zero point shaped like the scale
        xq = g.op("QuantizeLinear", [x, r, zp_rows], axis=-1, block_size=int(w.shape[0]))
        return g.op("MatMulIntegerToFloat", [xq, wq, r, ws, *zero_points], domain=MS)
    return _integer_chain(g, x, r, wq, ws, zero_points, amax)


def _integer_chain(g: OpSink, x: str, r: str, wq: str, ws: str, zero_points: list[str], amax: int) -> str:
    """The "integer" gemm: round(x / r + 128) -> uint8 -> MatMulInteger -> int32 -> float -> * w_scale -> * r."""
    from onnx import TensorProto as T

    xq = g.op("Cast", [g.op("Round", [g.op("Add", [g.op("Div", [x, r]), g.const(np.float32(amax + 1))])])],
              to=T.UINT8)
    acc = g.op("MatMulInteger", [xq, wq, *zero_points])
    # (int32 -> float) * w_scale, then * r: not Cast -> Mul(., r * w_scale), the pattern ONNX Runtime
    # fuses into MatMulIntegerToFloat, whose kernel applies a per-row a_scale after a fused bias
    # Add (measured: the final merger's output at cosine 0.68)
    return g.op("Mul", [g.op("Mul", [g.op("Cast", [acc], to=T.FLOAT), ws]), r])
