"""Quantize and dequantize whole tensors: the dispatcher over schemes, granularities and ranges.

A tensor is viewed as (rows, cols) = (shape[0], prod(shape[1:])). Work is split into row
blocks small enough to stay in cache; each block is independent (per-channel and per-group
parameters live inside a block, per-tensor parameters are computed first), so blocks can run
on a thread pool (numpy releases the GIL) and the result does not depend on the pool size.

Numeric core: numpy arrays in, arrays out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from qtool import packing
from qtool.metrics import ErrorStats
from qtool.ranges import find_range
from qtool.schemes import QParams, QuantSpec, dequantize_values, qparams, quantize_values

# Elements per block: the float32 scratch (~4 copies of the block) stays within a core's L2.
BLOCK_ELEMENTS = 1 << 16

Mapper = Callable[[Callable[[Any], Any], Iterable[Any]], Iterator[Any]]


class NonFiniteError(ValueError):
    """The tensor holds NaN or infinity; ``count`` says how many values."""

    def __init__(self, count: int) -> None:
        super().__init__(f"{count} NaN/inf value{'s' if count != 1 else ''}")
        self.count = count


class NegativeValuesError(ValueError):
    """symmetric-unsigned was asked to quantize a tensor holding negative values."""

    def __init__(self, minimum: float) -> None:
        super().__init__(f"has negative values (min {minimum:.6g})")
        self.minimum = minimum


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


@dataclass
class QTensor:
    """A quantized tensor: stored integers (packed below 8 bits) plus its sidecars."""

    data: np.ndarray  # int8/uint8 in ``shape`` (8-bit) or uint8 (rows, packed bytes)
    scale: np.ndarray  # float32, param_shape
    zero_point: np.ndarray  # int32, param_shape
    shape: tuple[int, ...]
    spec: QuantSpec
    stats: ErrorStats

    def values(self) -> np.ndarray:
        """The integer q values, unpacked, in the tensor's original shape."""
        if not self.spec.packed:
            return self.data
        rows, cols = rows_cols(self.shape)
        q = packing.unpack(self.data, self.spec.bits, cols, self.spec.signed)
        return q.reshape(self.shape)


def _blocks(rows: int, cols: int) -> list[slice]:
    step = max(1, BLOCK_ELEMENTS // max(cols, 1))
    return [slice(i, min(i + step, rows)) for i in range(0, rows, step)] or [slice(0, 0)]


def _serial_map(fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
    return map(fn, items)


def _unit_ranges(x: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) per range unit of a (r, cols) block: (r, 1) per channel, (r, groups) per group."""
    r, cols = x.shape
    if spec.granularity == "channel":
        lo, hi = find_range(x, spec)
        return lo.reshape(r, 1), hi.reshape(r, 1)
    g = spec.group_size
    full = cols // g
    los, his = [], []
    if full:
        lo, hi = find_range(x[:, : full * g].reshape(r * full, g), spec)
        los.append(lo.reshape(r, full))
        his.append(hi.reshape(r, full))
    if cols % g:  # the last group of each row is shorter; it gets its own scale all the same
        lo, hi = find_range(x[:, full * g :], spec)
        los.append(lo.reshape(r, 1))
        his.append(hi.reshape(r, 1))
    return np.concatenate(los, axis=1), np.concatenate(his, axis=1)


def _expand(a: np.ndarray, spec: QuantSpec, cols: int) -> np.ndarray:
    """Broadcastable per-element view of per-unit parameters of shape (r, units)."""
    if spec.granularity == "group" and a.ndim == 2:
        return np.repeat(a, spec.group_size, axis=1)[:, :cols]
    return a


def _expand_params(p: QParams, spec: QuantSpec, cols: int) -> QParams:
    inv = None if p.inv_scale is None else _expand(p.inv_scale, spec, cols)
    return QParams(_expand(p.scale, spec, cols), _expand(p.zero_point, spec, cols), inv)


def _ranges_or_nonfinite(x: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
    # find_range rejects NaN/inf (they propagate into min/max, so its check is free);
    # count them here, where the tensor is known, for a useful message.
    try:
        if spec.granularity == "tensor":
            return find_range(x.reshape(1, -1), spec)
        return _unit_ranges(x, spec)
    except ValueError:
        bad = int(np.count_nonzero(~np.isfinite(x)))
        if bad:
            raise NonFiniteError(bad) from None
        raise


def _tensor_params(w2d: np.ndarray, spec: QuantSpec, cdt: np.dtype, mapper: Mapper) -> QParams:
    """One (scale, zero point) for the whole tensor."""
    rows, cols = w2d.shape
    if spec.range == "minmax":
        # min and max are exact and order-free, so per-block partials reduce deterministically.
        def part(sl: slice) -> tuple[float, float]:
            b = w2d[sl]
            return float(b.min()), float(b.max())

        parts = list(mapper(part, _blocks(rows, cols)))
        lo = np.array([min(p[0] for p in parts)])
        hi = np.array([max(p[1] for p in parts)])
    else:
        lo, hi = _ranges_or_nonfinite(w2d.astype(cdt), spec)
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        raise NonFiniteError(int(np.count_nonzero(~np.isfinite(w2d))))
    if spec.scheme == "symmetric-unsigned":
        minimum = float(lo[0]) if spec.range == "minmax" else float(w2d.min())
        if minimum < 0:
            raise NegativeValuesError(minimum)
    return qparams(lo, hi, spec)


def quantize(
    w: np.ndarray, spec: QuantSpec, mapper: Mapper | None = None
) -> QTensor:
    """Quantize a float tensor of two or more dimensions according to ``spec``.

    ``mapper`` (e.g. ``ThreadPoolExecutor.map``) runs the row blocks; the default is serial.
    Raises NonFiniteError for NaN/inf and NegativeValuesError for symmetric-unsigned on
    negative values.
    """
    mapper = mapper or _serial_map
    shape = tuple(w.shape)
    rows, cols = rows_cols(shape)
    w2d = w.reshape(rows, cols)
    cdt = compute_dtype(w.dtype)
    sdt = spec.storage_dtype
    tensor_p = _tensor_params(w2d, spec, cdt, mapper) if spec.granularity == "tensor" else None
    units = n_groups(cols, spec) if spec.granularity == "group" else 1
    pshape = param_shape(shape, spec)
    scale = np.empty(pshape, np.float32)
    zero = np.empty(pshape, np.int32)
    data = np.empty(stored_shape(shape, spec), sdt if not spec.packed else np.uint8)
    data2d = data.reshape(rows, -1)

    def run(sl: slice) -> ErrorStats:
        x = w2d[sl].astype(cdt)  # a scratch copy in the compute dtype
        if tensor_p is None:
            lo, hi = _ranges_or_nonfinite(x, spec)
            if spec.scheme == "symmetric-unsigned" and x.min() < 0:
                raise NegativeValuesError(float(x.min()))
            p = qparams(lo, hi, spec)
            scale[sl] = p.scale.reshape(-1, units)
            zero[sl] = p.zero_point.reshape(-1, units)
        else:
            p = tensor_p
        p = _expand_params(p, spec, cols)
        t = quantize_values(x, p, spec, out=np.empty_like(x))
        q = t.astype(sdt)
        data2d[sl] = packing.pack(q, spec.bits) if spec.packed else q
        # t becomes the error w_hat - w, for the statistics.
        what = dequantize_values(t, p.scale, p.zero_point, cdt)
        np.subtract(what, x, out=what)
        return ErrorStats.of(x, what)

    stats = ErrorStats()
    try:
        for s in mapper(run, _blocks(rows, cols)):
            stats = stats.merge(s)  # merged in block order: deterministic
    except NonFiniteError:
        # A block counts only its own rows; the message must give the whole tensor's count.
        raise NonFiniteError(int(np.count_nonzero(~np.isfinite(w2d.astype(cdt))))) from None
    if tensor_p is not None:
        scale[()] = tensor_p.scale[0]
        zero[()] = tensor_p.zero_point[0]
    return QTensor(data, scale, zero, shape, spec, stats)


def quantize_fixed(
    w: np.ndarray, scale: float, zero_point: int = 0, spec: QuantSpec | None = None
) -> np.ndarray:
    """Quantize with a given scale and zero point (e.g. the notes' scale 1/255 example).

    q = clip(rint(w / scale) + zero_point, qmin, qmax), as int8 (signed) or uint8.
    """
    spec = spec or QuantSpec("symmetric", granularity="tensor")
    cdt = compute_dtype(w.dtype)
    p = QParams(np.asarray(scale, np.float64), np.asarray(zero_point, np.int32))
    x = np.asarray(w, dtype=cdt).copy()
    if spec.scheme != "asymmetric" and zero_point:
        raise ValueError("a non-zero zero point needs the asymmetric scheme")
    return quantize_values(x, p, spec, out=x).astype(spec.storage_dtype)


def dequantize(
    data: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray,
    shape: tuple[int, ...],
    spec: QuantSpec,
    out_dtype: np.dtype,
    compute: np.dtype | None = None,
    mapper: Mapper | None = None,
) -> np.ndarray:
    """w_hat = scale * (q - zero_point), cast to ``out_dtype``, in the tensor's ``shape``."""
    mapper = mapper or _serial_map
    compute = np.dtype(compute or np.float32)
    rows, cols = rows_cols(shape)
    out = np.empty(shape, out_dtype)
    out2d = out.reshape(rows, cols)
    stored2d = data.reshape(rows, -1)
    scale = np.asarray(scale, np.float32)
    zero_point = np.asarray(zero_point, np.int32)

    def run(sl: slice) -> None:
        q = stored2d[sl]
        if spec.packed:
            q = packing.unpack(q, spec.bits, cols, spec.signed)
        if spec.granularity == "tensor":
            s, z = scale, zero_point
        else:
            s = _expand(scale[sl], spec, cols)
            z = _expand(zero_point[sl], spec, cols)
        out2d[sl] = dequantize_values(q, s, z, compute)

    for _ in mapper(run, _blocks(rows, cols)):
        pass
    return out
