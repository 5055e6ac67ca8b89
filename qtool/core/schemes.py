"""The quantization schemes: one frozen spec, and the formulas that turn a range into qparams.

Every scheme approximates w by ``scale * (q - zero_point)``. Rounding is numpy's ``rint``
(round half to even) everywhere, so results are deterministic and match the notes.

This module is part of the numeric core: numpy in, numpy out, no files, no terminal.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from qtool.core.scales import round_scale

SCHEMES = ("symmetric", "symmetric-unsigned", "asymmetric", "gnmt")
GRANULARITIES = ("tensor", "channel", "group")
RANGE_METHODS = ("minmax", "percentile", "mse", "search")
# Dtypes a scale may be stored in (format_version 2). "auto" is resolved per tensor by the
# planner (the source dtype for F16/BF16, float32 otherwise) before a QuantSpec is built.
SCALE_DTYPES = ("float32", "float16", "bfloat16")
SCALE_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}

# The largest --group-size: far beyond any useful group (a group longer than a row is the
# whole row), small enough that no size computed from it can overflow (C kernel, numpy).
MAX_GROUP_SIZE = 1 << 24
# gnmt divides by the row's absmax; an all-zero row uses this instead, so its scale is 1.
GNMT_ZERO_ROW_ABSMAX = 127.0
# The smallest scale we ever store: a zero (or subnormal) scale would turn w / s into inf/NaN.
MIN_SCALE = float(np.finfo(np.float32).tiny)


class SpecError(ValueError):
    """An invalid combination of quantization settings; the message names the field."""


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize one tensor. Built once at the edge (CLI or recipe), then read-only."""

    scheme: str = "symmetric"
    bits: int = 8
    granularity: str = "channel"
    group_size: int = 128
    range: str = "minmax"
    percentile: float = 99.99
    scale_dtype: str = "float32"
    # 8: group scales stored as 8-bit codes x one float32 per row (qtool.core.double_quant);
    # None: each scale stored in scale_dtype.
    scale_bits: int | None = None

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise SpecError(f"unknown scheme {self.scheme!r}; choose one of {', '.join(SCHEMES)}")
        if self.granularity not in GRANULARITIES:
            raise SpecError(
                f"unknown granularity {self.granularity!r}; "
                f"choose one of {', '.join(GRANULARITIES)}"
            )
        if self.range not in RANGE_METHODS:
            raise SpecError(
                f"unknown range {self.range!r}; choose one of {', '.join(RANGE_METHODS)}"
            )
        if type(self.bits) is not int or not 2 <= self.bits <= 8:
            raise SpecError(f"bits must be an integer from 2 to 8, got {self.bits!r:.40}")
        if self.scheme == "gnmt":
            if self.range == "search":
                # gnmt's scale is its paper's absmax / 127 (stored as 127 / absmax too): a
                # fitted scale is not a gnmt tensor.
                raise SpecError("range search fits symmetric, symmetric-unsigned or "
                                "asymmetric scales; scheme gnmt's scale is fixed (absmax / 127)")
            if self.bits != 8:
                raise SpecError(f"scheme gnmt is 8-bit only (as in the paper), got {self.bits}")
            if self.granularity != "channel":
                # gnmt is per row by definition; normalise instead of rejecting the default.
                object.__setattr__(self, "granularity", "channel")
        if type(self.group_size) is not int or not 1 <= self.group_size <= MAX_GROUP_SIZE:
            raise SpecError(f"group_size must be an integer from 1 to {MAX_GROUP_SIZE}, "
                            f"got {self.group_size!r:.40}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise SpecError(f"unknown scale_dtype {self.scale_dtype!r}; "
                            f"choose one of {', '.join(SCALE_DTYPES)}")
        if not 50.0 < float(self.percentile) <= 100.0:
            raise SpecError(f"percentile must be in (50, 100], got {self.percentile!r}")
        if self.scale_bits is not None:
            if type(self.scale_bits) is not int or self.scale_bits != 8:
                raise SpecError(f"scale_bits must be 8 (or absent), got {self.scale_bits!r:.40}")
            if self.granularity != "group" or self.scheme == "gnmt":
                raise SpecError("scale_bits 8 stores group scales as 8-bit codes: it needs "
                                "granularity group and a scheme other than gnmt")
            if self.scale_dtype != "float32":
                raise SpecError("scale_bits 8 stores one float32 scale per row: scale_dtype "
                                f"must be float32, not {self.scale_dtype}")

    def with_(self, **changes: object) -> QuantSpec:
        return replace(self, **changes)

    @property
    def signed(self) -> bool:
        return self.scheme in ("symmetric", "gnmt")

    @property
    def qmin(self) -> int:
        if self.scheme == "gnmt":
            return -127
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        if self.scheme == "gnmt":
            return 127
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def storage_dtype(self) -> np.dtype:
        """The dtype of unpacked q values."""
        return np.dtype(np.int8) if self.signed else np.dtype(np.uint8)

    @property
    def packed(self) -> bool:
        """Below 8 bits the values are bit-packed (see qtool.core.packing)."""
        return self.bits < 8

    def as_dict(self) -> dict[str, object]:
        d: dict[str, object] = {"scheme": self.scheme, "bits": self.bits,
                                "granularity": self.granularity, "range": self.range}
        if self.granularity == "group":
            d["group_size"] = self.group_size
        if self.range == "percentile":
            d["percentile"] = self.percentile
        if self.scale_bits is not None:
            d["scale_bits"] = self.scale_bits
        return d


@dataclass(frozen=True)
class QParams:
    """Per-range-unit quantization parameters.

    ``scale`` is float32 (what is stored), ``zero_point`` int32. ``inv_scale`` is set only for
    gnmt, whose paper multiplies by 127/absmax instead of dividing by absmax/127.
    """

    scale: np.ndarray
    zero_point: np.ndarray
    inv_scale: np.ndarray | None = None


def qparams(lo: np.ndarray, hi: np.ndarray, spec: QuantSpec) -> QParams:
    """Scale and zero point for each range [lo, hi] (arrays of the same shape).

    For the symmetric schemes pass lo = -absmax, hi = absmax (unsigned: lo = 0, hi = max).
    The arithmetic is float64 so that (hi - lo) cannot overflow; the scale is then rounded
    to ``spec.scale_dtype`` (kept as float32 values; see scales.round_scale), and that
    rounded value is the one quantization uses, so that the stored sidecar reproduces q
    exactly. A scale beyond the dtype's range comes back as inf (the caller reports it).
    """
    lo = np.asarray(lo, dtype=np.float64)
    hi = np.asarray(hi, dtype=np.float64)
    if spec.scheme == "gnmt":
        absmax = np.maximum(np.abs(lo), np.abs(hi)).astype(np.float32)
        # An all-zero row would divide by zero: the paper replaces its absmax by 127.
        absmax = np.where(absmax == 0, np.float32(GNMT_ZERO_ROW_ABSMAX), absmax)
        # A tiny absmax would make 127/absmax overflow to inf (and 0 * inf = NaN): clamp it
        # so that the scale is at least MIN_SCALE, like the other schemes.
        absmax = np.maximum(absmax, np.float32(127.0 * MIN_SCALE))
        scale = (absmax / np.float32(127.0)).astype(np.float32)
        if spec.scale_dtype != "float32":
            # The stored scale is rounded (up) to a narrower dtype: q must come from that
            # value, so divide by it like the other schemes (127/absmax no longer matches).
            scale = round_scale(scale, spec.scale_dtype)
            return QParams(scale, np.zeros(scale.shape, np.int32), None)
        inv = (np.float32(127.0) / absmax).astype(np.float32)
        return QParams(scale, np.zeros(scale.shape, np.int32), inv)
    if spec.scheme == "symmetric":
        span = np.maximum(np.abs(lo), np.abs(hi)) / spec.qmax
        zero = None
    elif spec.scheme == "symmetric-unsigned":
        span = np.maximum(hi, 0.0) / spec.qmax
        zero = None
    else:  # asymmetric: the range must contain 0.0 so that 0.0 is exactly representable
        lo = np.minimum(lo, 0.0)
        hi = np.maximum(hi, 0.0)
        span = (hi - lo) / spec.qmax
        zero = lo
    # All-zero or constant-zero ranges would give scale 0: use 1 (any value represents 0 exactly);
    # a tiny positive range is clamped so that the float32 scale never underflows to 0.
    scale64 = np.where(span == 0, 1.0, np.maximum(span, MIN_SCALE))
    # Rounded to the stored dtype here, so that q is computed with the stored value.
    scale = round_scale(scale64, spec.scale_dtype)
    if zero is None:
        zp = np.zeros(scale.shape, np.int32)
    else:
        zp = np.clip(np.rint(-zero / scale.astype(np.float64)), 0, spec.qmax).astype(np.int32)
    return QParams(scale, zp, None)


def quantize_values(
    w: np.ndarray, params: QParams, spec: QuantSpec, out: np.ndarray | None = None
) -> np.ndarray:
    """q = clip(rint(w / scale) + zero_point, qmin, qmax), returned in w's float dtype.

    ``params`` arrays must broadcast against ``w``. Pass ``out=w`` to work in place (w is a
    scratch copy then). The caller casts to the storage dtype.
    """
    dt = w.dtype
    if params.inv_scale is not None:
        out = np.multiply(w, params.inv_scale.astype(dt, copy=False), out=out)
    else:
        out = np.divide(w, params.scale.astype(dt, copy=False), out=out)
    np.rint(out, out=out)
    if spec.scheme == "asymmetric":
        np.add(out, params.zero_point.astype(dt), out=out)
    np.clip(out, spec.qmin, spec.qmax, out=out)
    return out


def dequantize_values(
    q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, dtype: np.dtype = np.float32
) -> np.ndarray:
    """w_hat = scale * (q - zero_point), computed in ``dtype`` (float32, or float64 for F64)."""
    dtype = np.dtype(dtype)
    out = q.astype(dtype)
    if np.any(zero_point):
        np.subtract(out, zero_point.astype(dtype), out=out)
    np.multiply(out, scale.astype(dtype, copy=False), out=out)
    return out
