"""Scales as stored (format_version 2): rounded to their storage dtype (float32, float16 or
bfloat16) before they are used, so that the stored sidecar reproduces q exactly.

bfloat16 is handled as uint16 bit patterns (the top half of a float32), so nothing here needs
ml_dtypes: float32 -> bfloat16 is a shift after rounding, bfloat16 -> float32 a shift back.
Every stored scale goes back to float32 through :func:`scale_to_float32`, the one place that
knows the stored forms.

Numeric core: numpy arrays in, arrays out.
"""

from __future__ import annotations

import numpy as np

from qtool.core import bf16

# The smallest normal value of each scale dtype: a smaller scale is raised to it, so that a
# stored scale is never a subnormal (whose relative precision would break the error bound).
SMALLEST_NORMAL = {
    "float32": float(np.finfo(np.float32).tiny),
    "float16": float(np.finfo(np.float16).tiny),
    "bfloat16": float(np.finfo(np.float32).tiny),  # bfloat16 has float32's exponent range
}
LARGEST = {
    "float32": float(np.finfo(np.float32).max),
    "float16": float(np.finfo(np.float16).max),
    "bfloat16": float(np.uint32(0x7F7F0000).view(np.float32)),
}
SCALE_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def round_scale(scale: np.ndarray, dtype: str) -> np.ndarray:
    """``scale`` (float64 or float32, > 0) rounded to a value of ``dtype``, as float32.

    float32 rounds to nearest, as format_version 1 did (its error bound holds within
    float32's precision). float16 and bfloat16 round UP to the next value of the dtype, so
    that qmax * scale still covers the range and the error stays <= scale / 2 inside it
    (rounding down by bfloat16's 2^-9 would cost up to 255 * 2^-9 ~ 0.5 scale at the range's
    edge). A scale below the dtype's smallest normal is raised to it; one beyond its largest
    value becomes inf (the caller reports it as an overflow naming the tensor).
    """
    if dtype == "float32":
        return np.asarray(scale).astype(np.float32)
    s64 = np.maximum(np.asarray(scale, np.float64), SMALLEST_NORMAL[dtype])
    with np.errstate(over="ignore"):
        s32 = s64.astype(np.float32)
    if dtype == "float16":
        with np.errstate(over="ignore"):
            h = s32.astype(np.float16)
            h = np.where(h.astype(np.float64) < s64, np.nextafter(h, np.float16(np.inf)), h)
        out = h.astype(np.float32)
    else:  # bfloat16: truncate the float32 to its top 16 bits, then step up if that is below
        bits = np.asarray(s32).view(np.uint32) & np.uint32(0xFFFF0000)
        low = bits.view(np.float32).astype(np.float64) < s64
        bits = bits + np.where(low, np.uint32(0x10000), np.uint32(0))
        out = np.asarray(bits, np.uint32).view(np.float32).reshape(np.shape(s64))
    out = np.where(s64 > LARGEST[dtype], np.float32(np.inf), out).astype(np.float32)
    return out.reshape(np.shape(scale))


def scale_to_stored(scale: np.ndarray, dtype: str) -> np.ndarray:
    """Float32 scales (already values of ``dtype``, see :func:`round_scale`) in their stored
    form: float32, float16, or bfloat16 as uint16 bit patterns. Exact."""
    s = np.ascontiguousarray(scale, np.float32)
    if dtype == "float32":
        return s
    if dtype == "float16":
        return s.astype(np.float16)
    return (s.view(np.uint32) >> np.uint32(16)).astype(np.uint16)


def scale_to_float32(stored: np.ndarray, dtype: str) -> np.ndarray:
    """A stored scale back to float32, exactly: float32 or float16 arrays as they are;
    bfloat16 given as uint16 bit patterns or as an ml_dtypes bfloat16 array (a shift)."""
    a = np.asarray(stored)
    if dtype == "bfloat16" and bf16.is_bf16(a):
        return bf16.to_float32(np.ascontiguousarray(a))  # the one bfloat16 widening
    return a.astype(np.float32, copy=False)
