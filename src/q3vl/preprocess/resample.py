"""torchvision's antialiased bicubic resize (`resize(uint8 video, antialias=True)`) in numpy.

qwen-vl-utils resizes video frames with torchvision on a uint8 tensor: bicubic (Keys, a = -0.5)
with an antialias filter widened by the scale when shrinking, computed in float32, then rounded
(half to even) and clamped back to uint8. PIL's bicubic differs from it by up to ~20 levels when
upscaling, so the runtime reproduces torch's arithmetic instead:

- weights per output pixel exactly as ATen's `_compute_indices_min_size_weights_aa` (float32,
  with the fused multiply-adds the x86 build uses in the cubic kernel);
- width first, then height; an axis whose size does not change is not touched;
- taps accumulated in order, fused (FMA) when enlarging as ATen's build does, plain float32 when
  shrinking. The result matches torch bit for bit when enlarging; when shrinking about 1 value
  in 100,000 can differ by one level after rounding (ATen's shrinking loop has size-dependent
  code paths). Measured in tests/test_preprocess.py.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_F32 = np.float32
_A = _F32(-0.5)


def _fma(a: Any, b: Any, c: Any) -> np.ndarray:
    """float32 fused multiply-add: the float64 product of two float32 values is exact."""
    return (np.asarray(a, np.float64) * np.asarray(b, np.float64) + np.asarray(c, np.float64)).astype(_F32)


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys cubic kernel, a = -0.5, evaluated in float32 with ATen's fused operations."""
    x = np.abs(x.astype(_F32))
    near = _fma((_fma(_A + 2, x, -(_A + 3)) * x).astype(_F32), x, _F32(1))
    far = _fma(_fma(_fma(_A, x, -(_F32(5) * _A)), x, _F32(8) * _A), x, -(_F32(4) * _A))
    return np.where(x < 1, near, np.where(x < 2, far, _F32(0))).astype(_F32)


def aa_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(source indices [out, K], float32 weights [out, K]) of one axis; unused taps have weight 0."""
    scale = _F32(in_size) / _F32(out_size)
    support = _F32(2.0 * float(scale)) if scale >= 1 else _F32(2.0)
    invscale = _F32(1.0 / float(scale)) if scale >= 1 else _F32(1.0)
    i = np.arange(out_size)
    center = (float(scale) * (i + 0.5)).astype(_F32)
    xmin = np.maximum(((center - support).astype(np.float64) + 0.5).astype(np.int64), 0)
    xmax = np.minimum(((center + support).astype(np.float64) + 0.5).astype(np.int64), in_size)
    xsize = xmax - xmin
    j = np.arange(int(xsize.max()))
    arg = (((j[None] + xmin[:, None]).astype(_F32) - center[:, None]).astype(np.float64) + 0.5) * float(invscale)
    w = np.where(j[None] < xsize[:, None], _cubic(arg.astype(_F32)), _F32(0))
    total = np.zeros(out_size, _F32)
    for k in range(w.shape[1]):
        total = (total + w[:, k]).astype(_F32)
    w = (w / np.where(total == 0, _F32(1), total)[:, None]).astype(_F32)
    return np.minimum(xmin[:, None] + j[None], in_size - 1), w


def _resample_axis(x: np.ndarray, out_size: int, axis: int,
                   taps: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """One axis of float32 `x`, taps gathered along `axis` itself (rows stay contiguous for the
    height pass) and accumulated in place, in the same order and float32 operations as ATen.
    """
    fused = out_size > x.shape[axis]
    idx, w = taps if taps is not None else aa_weights(x.shape[axis], out_size)
    shape = [1] * x.ndim
    shape[axis] = out_size
    acc = np.take(x, idx[:, 0], axis=axis)
    acc *= w[:, 0].reshape(shape)
    for k in range(1, idx.shape[1]):
        term = np.take(x, idx[:, k], axis=axis)
        if fused:
            acc = _fma(term, w[:, k].reshape(shape), acc)
        else:
            term *= w[:, k].reshape(shape)
            acc += term
    return acc


STRIPE = 128  # source rows converted to float32 at a time in the width pass


def _resize_frame(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """One uint8 frame `[H, W, C]` -> `[height, width, C]`.

    The width pass runs on stripes of source rows (it is independent per row), so no float32 copy of
    the full-resolution frame exists: a 4K frame costs its uint8 pixels plus a target-width buffer.
    """
    chw = frame.transpose(2, 0, 1)  # torch layout: W contiguous after the copy below
    channels, rows, cols = chw.shape
    if cols != width:
        taps = aa_weights(cols, width)
        x = np.empty((channels, rows, width), _F32)
        for r in range(0, rows, STRIPE):
            stripe = np.ascontiguousarray(chw[:, r:r + STRIPE]).astype(_F32)
            x[:, r:r + STRIPE] = _resample_axis(stripe, width, -1, taps)
    else:
        x = np.ascontiguousarray(chw).astype(_F32)
    if rows != height:
        x = _resample_axis(x, height, -2)
    np.clip(x, 0, 255, out=x)
    return np.rint(x, out=x).astype(np.uint8).transpose(1, 2, 0)


def resize_bicubic_aa(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize uint8 frames `[T, H, W, C]` to `[T, height, width, C]` as torchvision does, frame by frame."""
    if frames.shape[1:3] == (height, width):
        return frames
    out = np.empty((frames.shape[0], height, width, frames.shape[3]), np.uint8)
    for t in range(frames.shape[0]):
        out[t] = _resize_frame(frames[t], height, width)
    return out
