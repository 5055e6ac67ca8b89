"""A tensor's (rows, cols) view and the shapes of its stored integers and parameters."""

from __future__ import annotations

import math

import numpy as np

from qtool.core import packing
from qtool.core.schemes import QuantSpec


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
