"""bfloat16 without ml_dtypes: values travel as their uint16 bit patterns.

bfloat16 is the top half of a float32, so widening is a shift, and narrowing rounds to nearest
even on the bits (NaN becomes the quiet NaN 0x7FC0, or 0xFFC0 with the sign bit, as ml_dtypes
does). ml_dtypes would do all this too, but takes
0.8-1.3 s to import on our machines; tests cross-check these functions against it bit for bit.

Convention of the core: a uint16 array given where float weights are expected holds bfloat16
bit patterns (integer tensors are never quantized). ml_dtypes' own bfloat16 arrays (a caller
may still have some) are accepted wherever bit patterns are.
"""

from __future__ import annotations

import numpy as np

BITS = np.dtype("<u2")
"""How bfloat16 values are held: little-endian uint16 bit patterns."""

MAX = 3.3895313892515355e38
"""The largest finite bfloat16, (2 - 2^-7) * 2^127."""

SMALLEST_NORMAL = 1.1754943508222875e-38  # 2^-126, as for float32


def is_bf16(a: np.ndarray | np.dtype) -> bool:
    """Whether ``a`` (an array or a dtype) holds bfloat16: bit patterns or ml_dtypes' type."""
    dt = a if isinstance(a, np.dtype) else np.asarray(a).dtype
    return dt == BITS or dt.name == "bfloat16"


def bits(a: np.ndarray) -> np.ndarray:
    """The uint16 bit patterns of a bfloat16 array (a view, no copy)."""
    return a if a.dtype == BITS else a.view(BITS)


def to_float32(a: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """bfloat16 (bit patterns) -> float32, exactly: the bits shifted into the top half."""
    b = bits(np.asarray(a))
    if out is None:
        out = np.empty(b.shape, np.float32)
    u = out.view(np.uint32)
    np.copyto(u, b, casting="unsafe")  # zero-extends
    np.left_shift(u, np.uint32(16), out=u)
    return out


def from_float32(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, rounded to nearest even; NaN stays NaN (the quiet NaN
    0x7FC0 with the input's sign), values beyond the largest bfloat16 become infinity."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    lsb = (u >> np.uint32(16)) & np.uint32(1)
    # Adds with wrap-around only for NaN bit patterns near 0xFFFFFFFF, replaced below.
    r = ((u + (np.uint32(0x7FFF) + lsb)) >> np.uint32(16)).astype(BITS)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    if nan.any():
        r[nan] = ((u[nan] >> np.uint32(16)) & np.uint32(0x8000) | np.uint32(0x7FC0)).astype(BITS)
    if out is None:
        return r
    out[...] = r.reshape(out.shape)
    return out


def from_float64(x: np.ndarray) -> np.ndarray:
    """float64 -> bfloat16 bit patterns with one rounding (to nearest even), as a direct cast
    does: first to float32 rounding to odd (exact whenever float32 holds the value; 29 extra
    bits keep the second rounding from seeing a false tie), then :func:`from_float32`."""
    x = np.asarray(x, np.float64)
    y = x.astype(np.float32)  # to nearest even
    yb = y.view(np.uint32).copy()
    with np.errstate(invalid="ignore"):
        inexact = (y.astype(np.float64) != x) & np.isfinite(y) & ~np.isnan(x)
    even = (yb & np.uint32(1)) == 0
    fix = inexact & even
    if fix.any():
        # The other float32 neighbour of x, which is odd: one step toward x in magnitude.
        away = np.abs(y.astype(np.float64)) > np.abs(x)
        step = np.where(away, np.uint32(0xFFFFFFFF), np.uint32(1))  # -1 or +1, mod 2^32
        yb[fix] = yb[fix] + step[fix]
    return from_float32(yb.view(np.float32))


def isfinite(a: np.ndarray) -> np.ndarray:
    """np.isfinite of bfloat16 bit patterns: an exponent that is not all ones."""
    return (bits(np.asarray(a)) & np.uint16(0x7F80)) != np.uint16(0x7F80)


def as_float(a: np.ndarray, dtype: np.dtype | type = np.float32) -> np.ndarray:
    """Values as ``dtype`` floats: bfloat16 widened from its bits, others converted (a copy
    only where needed)."""
    if is_bf16(a):
        f = to_float32(a)
        return f if np.dtype(dtype) == np.float32 else f.astype(dtype)
    return np.asarray(a).astype(dtype, copy=False)
