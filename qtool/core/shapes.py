"""A tensor's (rows, cols) view and the shapes of its stored integers and parameters."""

from __future__ import annotations

import math

import numpy as np

from qtool.core import packing
from qtool.core.schemes import SCALE_ITEMSIZE, QuantSpec


def rows_cols(shape: tuple[int, ...]) -> tuple[int, int]:
    """The (rows, cols) view of a tensor: rows = shape[0], cols = everything else."""
    if len(shape) == 0:
        return 1, 1
    return int(shape[0]), int(math.prod(shape[1:]))


def compute_dtype(dtype: np.dtype) -> np.dtype:
    """float64 input is computed in float64; every other float in float32."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def n_groups(cols: int, spec: QuantSpec) -> int:
    return -(-cols // spec.group_size) if spec.granularity == "group" else 1


def param_shape(shape: tuple[int, ...], spec: QuantSpec) -> tuple[int, ...]:
    """Shape of the scale and zero-point sidecars of a tensor of this shape."""
    rows, cols = rows_cols(shape)
    if spec.granularity == "tensor":
        return ()
    if spec.granularity == "channel":
        return (rows, 1)
    return (rows, n_groups(cols, spec))


def stored_shape(shape: tuple[int, ...], spec: QuantSpec) -> tuple[int, ...]:
    """Shape of the stored integers: the original shape at 8 bits, (rows, packed bytes) below."""
    if not spec.packed:
        return tuple(shape)
    rows, cols = rows_cols(shape)
    return (rows, packing.packed_row_bytes(cols, spec.bits))


def zero_point_shape(shape: tuple[int, ...], spec: QuantSpec) -> tuple[int, ...]:
    """Shape of the stored zero points (format_version 2): one value (0-d) for the symmetric
    schemes, whose zero point is always the same; for asymmetric, one per range unit, bit-packed
    along each row like q below 8 bits (one byte per value at 8 bits)."""
    if spec.scheme != "asymmetric":
        return ()
    p = param_shape(shape, spec)
    if spec.packed and len(p) == 2:
        return (p[0], packing.packed_row_bytes(p[1], spec.bits))
    return p


def stored_bytes(shape: tuple[int, ...], spec: QuantSpec) -> int:
    """Bytes a quantized tensor occupies (format_version 2): the integers, the scales in
    ``spec.scale_dtype`` and the zero points (one byte per stored item). Bits per weight is
    ``8 * stored_bytes / numel``. With ``scale_bits`` 8 the scales are one byte each plus one
    float32 per row (qtool.core.double_quant)."""
    if spec.scale_bits is not None:
        scales = math.prod(param_shape(shape, spec)) + 4 * row_scale_shape(shape)[0]
    else:
        scales = math.prod(param_shape(shape, spec)) * SCALE_ITEMSIZE[spec.scale_dtype]
    return (math.prod(stored_shape(shape, spec)) + scales
            + math.prod(zero_point_shape(shape, spec)))


def row_scale_shape(shape: tuple[int, ...]) -> tuple[int]:
    """Shape of the per-row float32 scales of ``scale_bits`` 8: one per row."""
    return (rows_cols(shape)[0],)


def bits_per_weight(shape: tuple[int, ...], spec: QuantSpec) -> float:
    """``8 * stored_bytes / weights``: what one weight costs on disk, sidecars included."""
    n = math.prod(shape)
    return 8.0 * stored_bytes(shape, spec) / n if n else 0.0


def zero_point_to_stored(zero_point: np.ndarray, shape: tuple[int, ...],
                         spec: QuantSpec) -> np.ndarray:
    """int32 zero points (param_shape) in their stored form: one uint8 value (0-d) for the
    symmetric schemes; uint8 per range unit for asymmetric, bit-packed along rows below 8
    bits like q (see :func:`zero_point_shape`)."""
    z = np.asarray(zero_point)
    if spec.scheme != "asymmetric":
        # Always 0 for these schemes (qparams sets it so); one value says so.
        return np.zeros((), np.uint8)
    u = z.astype(np.uint8)
    if spec.packed and u.ndim == 2:
        return packing.pack(u, spec.bits)
    return u.reshape(zero_point_shape(shape, spec))


def zero_point_from_stored(stored: np.ndarray, shape: tuple[int, ...],
                           spec: QuantSpec) -> np.ndarray:
    """The stored zero points back to one per range unit (param_shape), or the single 0-d
    value of the symmetric schemes (which broadcasts)."""
    z = np.asarray(stored)
    if z.ndim == 0:
        return z
    p = param_shape(shape, spec)
    if spec.packed and len(p) == 2 and spec.scheme == "asymmetric":
        return packing.unpack(np.ascontiguousarray(z, np.uint8), spec.bits, p[1], False)
    return z.reshape(p)
