"""Double quantization of group scales (a prototype, measured by ``make bench``; no CLI yet).

Per-group scales cost 16 or 32 bits per group. k-quants and QLoRA store them as small integers
times one float per block instead. Here: each group's scale is an 8-bit unsigned code
``c`` in ``[1, 255]`` times one float32 scale ``d`` per row, and the scale that quantization
uses is exactly the stored one, ``float32(c) * d`` computed in float32
(:func:`stored_scales`, the one formula every reader must use).

Why the codes are rounded UP: the stored scale must still cover the group's range (``qmax *
scale >= hi - lo`` for asymmetric), so that the error of every value inside that range stays
<= scale / 2, as issue 11 requires of float16 scales. ``d`` is the row's largest group
scale / 255, rounded up to float32, so the largest group gets code 255 and no code overflows.
Zero points are computed from the stored scale exactly as ``qtool.core.schemes.qparams`` does
(``clip(rint(-lo / scale), 0, qmax)``), and stored as today.

A group whose range is zero (all values 0) can use any scale: it gets code 1.

Numeric core: numpy only, no files, no terminal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from qtool.core.ranges import find_range
from qtool.core.schemes import (
    MIN_SCALE,
    QParams,
    QuantSpec,
    dequantize_values,
    qparams,
    quantize_values,
)
from qtool.core.shapes import rows_cols, stored_shape, zero_point_shape

CODE_MAX = 255  # 8-bit unsigned scale codes
ROW_SCALE_ITEMSIZE = 4  # one float32 per row
DQ_SCHEMES = ("symmetric", "symmetric-unsigned", "asymmetric")


@dataclass(frozen=True)
class DQScales:
    """The double-quantized parameters of a (rows, groups) grid of range units."""

    codes: np.ndarray  # uint8 (rows, groups), in [1, 255]
    row_scale: np.ndarray  # float32 (rows,), finite, > 0
    zero_point: np.ndarray  # int32 (rows, groups), in [0, qmax]; 0 for the symmetric schemes

    @property
    def scale(self) -> np.ndarray:
        """The stored scale of every group (float32): what quantization used."""
        return stored_scales(self.codes, self.row_scale)


def stored_scales(codes: np.ndarray, row_scale: np.ndarray) -> np.ndarray:
    """``float32(code) * row_scale`` per group, multiplied in float32: the scale as stored."""
    return np.multiply(np.asarray(codes).astype(np.float32),
                       np.asarray(row_scale, np.float32)[:, None], dtype=np.float32)


def scales_of_codes(codes: np.ndarray, row_scale: np.ndarray) -> np.ndarray:
    """:func:`stored_scales` of codes in their stored shape (param_shape: one row of groups
    per row scale), returned in that shape. Also for a tensor with no rows or no columns,
    which reshape(rows, -1) refuses (numpy cannot infer -1 for a size-0 array)."""
    rows = len(row_scale)
    per_row = codes.size // rows if rows else 0
    return stored_scales(codes.reshape(rows, per_row), row_scale).reshape(codes.shape)


def _spans(lo: np.ndarray, hi: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
    """The exact (float64) scale each range asks for, and the range's low end (the formulas
    of qtool.core.schemes.qparams before rounding)."""
    if spec.scheme == "symmetric":
        return np.maximum(np.abs(lo), np.abs(hi)) / spec.qmax, np.zeros_like(lo)
    if spec.scheme == "symmetric-unsigned":
        return np.maximum(hi, 0.0) / spec.qmax, np.zeros_like(lo)
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    return (hi - lo) / spec.qmax, lo


def _up32(x: np.ndarray) -> np.ndarray:
    """float64 -> the smallest float32 not below it (x finite, >= 0)."""
    f = x.astype(np.float32)
    return np.where(f.astype(np.float64) < x, np.nextafter(f, np.float32(np.inf)), f)


def double_quantize(lo: np.ndarray, hi: np.ndarray, spec: QuantSpec) -> DQScales:
    """Codes, row scales and zero points for ranges ``lo``, ``hi`` of shape (rows, groups),
    float64, finite, as ``qtool.core.ranges.find_range`` gives them (reshaped per row).

    Guarantees: every stored scale is >= the scale the range asks for (so the range is
    covered), codes are in [1, 255], row scales are normal float32 values.
    """
    if spec.scheme not in DQ_SCHEMES:
        raise ValueError(f"double quantization fits {', '.join(DQ_SCHEMES)}, not {spec.scheme}")
    lo = np.asarray(lo, np.float64)
    hi = np.asarray(hi, np.float64)
    if lo.ndim != 2 or lo.shape != hi.shape:
        raise ValueError(f"expected (rows, groups) ranges, got {lo.shape} and {hi.shape}")
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        raise ValueError("cannot double-quantize: a range is NaN or infinite")
    want, low = _spans(lo, hi, spec)
    rows = lo.shape[0]
    top = want.max(axis=1, initial=0.0)
    # d: the row's largest scale / 255, rounded up; a row of zero ranges gets 1 (any works).
    d = np.where(top > 0, _up32(np.maximum(top / CODE_MAX, MIN_SCALE)), np.float32(1.0))
    for _ in range(4):
        # float32(255) * d is rounded to nearest: if that lands below the largest scale, the
        # row's largest code could not cover it. Step d up an ulp (at most a few times).
        short = stored_scales(np.full((rows, 1), CODE_MAX), d)[:, 0].astype(np.float64) < top
        if not short.any():
            break
        d = np.where(short, np.nextafter(d, np.float32(np.inf)), d)
    d = d.astype(np.float32)
    d64 = d.astype(np.float64)[:, None]
    codes = np.clip(np.ceil(want / d64), 1, CODE_MAX)
    # The same float32-product check per group: ceil in float64 can still give a stored
    # product one ulp short of the wanted scale.
    short = stored_scales(codes, d).astype(np.float64) < want
    codes = np.where(short, np.minimum(codes + 1, CODE_MAX), codes).astype(np.uint8)
    s = stored_scales(codes, d).astype(np.float64)
    if spec.scheme == "asymmetric":
        zp = np.clip(np.rint(-low / s), 0, spec.qmax).astype(np.int32)
    else:
        zp = np.zeros(lo.shape, np.int32)
    return DQScales(codes, d, zp)


def unit_qparams(lo: np.ndarray, hi: np.ndarray, spec: QuantSpec,
                 row_out: np.ndarray | None) -> QParams:
    """The quantizer's parameters of (r, units) ranges: ``qparams``, or with
    ``spec.scale_bits`` the double-quantized scales (the stored products), the row scales
    written to ``row_out`` ((r,))."""
    if spec.scale_bits is None:
        return qparams(lo, hi, spec)
    assert row_out is not None
    dq = double_quantize(lo, hi, spec)
    row_out[...] = dq.row_scale
    return QParams(dq.scale, dq.zero_point)


def _per_column(p: np.ndarray, cols: int, group_size: int) -> np.ndarray:
    """(rows, groups) parameters repeated over their groups' columns: (rows, cols)."""
    return np.repeat(p, group_size, axis=1)[:, :cols]


def quantize_dq(w: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, DQScales]:
    """Quantize a tensor by groups with double-quantized scales: the ranges by
    ``spec.range`` (``find_range`` per group, as the quantizer does), the scales by
    :func:`double_quantize`, ``q`` by qtool's formula with the stored scales. Returns the
    unpacked q as (rows, cols) (storage dtype) and the parameters."""
    if spec.granularity != "group":
        raise ValueError("double quantization applies to group scales (granularity group)")
    rows, cols = rows_cols(tuple(w.shape))
    g = spec.group_size
    groups = -(-cols // g)
    x = np.asarray(w).reshape(rows, cols)
    x = x.astype(np.float64 if x.dtype == np.float64 else np.float32)
    lo, hi = find_range(x.reshape(-1, g), spec) if cols % g == 0 else _ragged_ranges(x, spec)
    dq = double_quantize(lo.reshape(rows, groups), hi.reshape(rows, groups), spec)
    params = QParams(_per_column(dq.scale, cols, g), _per_column(dq.zero_point, cols, g))
    q = quantize_values(x.copy(), params, spec)
    return q.astype(spec.storage_dtype), dq


def _ragged_ranges(x: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
    """Ranges when the last group is short: full groups in one call, the tail in another."""
    rows, cols = x.shape
    g = spec.group_size
    full = cols // g * g
    lo_f, hi_f = find_range(x[:, :full].reshape(-1, g), spec) if full else (
        np.zeros(0), np.zeros(0))
    lo_t, hi_t = find_range(np.ascontiguousarray(x[:, full:]), spec)
    lo = np.concatenate([lo_f.reshape(rows, -1), lo_t[:, None]], axis=1)
    hi = np.concatenate([hi_f.reshape(rows, -1), hi_t[:, None]], axis=1)
    return lo.reshape(-1), hi.reshape(-1)


def dequantize_dq(q: np.ndarray, dq: DQScales, group_size: int,
                  dtype: np.dtype = np.float32) -> np.ndarray:
    """``w_hat = scale * (q - zero_point)`` with the stored scales, (rows, cols) in ``dtype``."""
    cols = q.shape[1]
    return dequantize_values(q, _per_column(dq.scale, cols, group_size),
                             _per_column(dq.zero_point, cols, group_size), dtype)


def stored_bytes_dq(shape: tuple[int, ...], spec: QuantSpec) -> int:
    """Bytes of a tensor stored with double-quantized scales: the integers and zero points as
    today (format_version 2), one byte per group scale code, one float32 per row (what
    ``qtool.core.shapes.stored_bytes`` gives for ``scale_bits`` 8)."""
    rows, cols = rows_cols(shape)
    groups = -(-cols // spec.group_size)
    return (math.prod(stored_shape(shape, spec)) + rows * groups + rows * ROW_SCALE_ITEMSIZE
            + math.prod(zero_point_shape(shape, spec)))


def codes_of(scale: np.ndarray, row_scale: np.ndarray) -> np.ndarray:
    """The codes back from stored scales and their row scales (exact: a code <= 255 times a
    float32 is within 2^-16 of the code); ValueError if ``scale`` is not such a product."""
    codes = np.rint(np.asarray(scale, np.float64) /
                    np.asarray(row_scale, np.float64)[:, None])
    if codes.size and (codes.min() < 1 or codes.max() > CODE_MAX):
        raise ValueError("scales are not 8-bit codes times their row scale")
    codes = codes.astype(np.uint8)
    if not np.array_equal(stored_scales(codes, row_scale), scale):
        raise ValueError("scales are not 8-bit codes times their row scale")
    return codes
