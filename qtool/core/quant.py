"""Quantize and dequantize whole tensors: the dispatcher over schemes, granularities and ranges.

A tensor is viewed as (rows, cols) = (shape[0], prod(shape[1:])). Work is split into row
blocks that stay in cache; each block is independent (per-channel and per-group parameters
live inside a block, per-tensor parameters are computed first), so blocks can run on a thread
pool (numpy releases the GIL) and the result does not depend on the pool size. Consecutive
blocks form a task, whose rows get their ranges and parameters in one go. Every block goes
through the whole arithmetic in place, in float32 (float64 for F64), with no Python loop per
element, row or group. :class:`TensorQuantizer` takes a tensor a run of rows at a time, so a
caller can stream it; :func:`quantize` and :func:`dequantize` are the one-call forms.

Numeric core: numpy arrays in, arrays out.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from qtool.core import bf16, packing
from qtool.core.blocks import (
    Mapper,
    NegativeValuesError,
    NonFiniteError,
    _block_rows,
    _blocks,
    _bufsize,
    _kernels,
    _minmax_block,
    _parts,
    _quantize_task,
    _ranges_or_nonfinite,
    _scratch,
    _serial_map,
    _tasks,
)
from qtool.core.metrics import ErrorStats
from qtool.core.scales import scale_to_float32
from qtool.core.schemes import QParams, QuantSpec, qparams, quantize_values
from qtool.core.shapes import compute_dtype, param_shape, rows_cols, stored_shape


@dataclass
class QTensor:
    """A quantized tensor: stored integers (packed below 8 bits) plus its sidecars."""

    data: np.ndarray  # int8/uint8 in ``shape`` (8-bit) or uint8 (rows, packed bytes)
    scale: np.ndarray  # float32 values of spec.scale_dtype, param_shape
    zero_point: np.ndarray  # int32, param_shape
    shape: tuple[int, ...]
    spec: QuantSpec
    stats: ErrorStats
    row_scale: np.ndarray | None = None  # float32 (rows,) with spec.scale_bits, else None

    def values(self) -> np.ndarray:
        """The integer q values, unpacked, in the tensor's original shape."""
        if not self.spec.packed:
            return self.data
        rows, cols = rows_cols(self.shape)
        q = packing.unpack(self.data, self.spec.bits, cols, self.spec.signed)
        return q.reshape(self.shape)


class TensorQuantizer:
    """Quantizes one tensor a run of rows at a time, so that a caller can stream a tensor from
    a memory map to a file in bounded memory. :func:`quantize` is the one-call form.

    Runs of rows must come in order and be those of :meth:`chunks` (whole blocks), so that the
    blocks, and with them every output byte and the order in which the block statistics are
    merged, are the same whatever the run length or the thread count. Per-tensor granularity
    needs :meth:`set_tensor_range` first. ``scale``, ``zero_point`` and ``stats`` are complete
    once every row has been run.
    """

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype, spec: QuantSpec) -> None:
        self.shape = tuple(int(d) for d in shape)
        self.spec = spec
        self.rows, self.cols = rows_cols(self.shape)
        self.cdt = compute_dtype(np.dtype(dtype))
        pshape = param_shape(self.shape, spec)
        self.scale = np.empty(pshape, np.float32)
        self.zero_point = np.empty(pshape, np.int32)
        # scale_bits 8: each row's float32 scale (self.scale holds code x row scale).
        self.row_scale = np.empty(self.rows, np.float32) if spec.scale_bits else None
        self.stats = ErrorStats()
        self.block_rows = _block_rows(self.cols)
        # The C kernel reads float32 and bfloat16 tensors. A float16 tensor always takes the
        # numpy path, even when a caller hands its rows already widened to float32 (one long
        # row, to save a copy): the kernel's sums would change its figures' last digits.
        self._kernel = np.dtype(dtype) != np.float16
        self._tensor_p: QParams | None = None
        self._done = 0

    @property
    def out_dtype(self) -> np.dtype:
        """dtype of the stored values (uint8 bytes when packed)."""
        return np.dtype(np.uint8) if self.spec.packed else self.spec.storage_dtype

    @property
    def out_row_items(self) -> int:
        """Stored items per row: cols, or the packed bytes of a row."""
        return stored_shape((self.rows, self.cols), self.spec)[1]

    @property
    def needs_tensor_range(self) -> bool:
        return self.spec.granularity == "tensor"

    def chunks(self, max_elements: int) -> list[tuple[int, int]]:
        """Row runs [a, b) of whole blocks, each about ``max_elements`` values (at least one
        block), covering the tensor."""
        per_block = self.block_rows * max(self.cols, 1)
        step = self.block_rows * max(1, max_elements // per_block)
        return [(a, min(a + step, self.rows)) for a in range(0, self.rows, step)]

    def set_tensor_range(
        self, rows_of: Callable[[int, int], np.ndarray], mapper: Mapper | None = None,
        max_elements: int = 1 << 22,
    ) -> None:
        """The one (scale, zero point) of a per-tensor spec, from the whole tensor.

        ``rows_of(a, b)`` returns rows [a, b) as a (b - a, cols) array. minmax reads the
        tensor run by run; percentile and mse need it whole, as one compute-dtype copy.
        """
        mapper = mapper or _serial_map
        spec = self.spec
        finite = True
        if spec.range == "minmax":
            lo_v, hi_v = math.inf, -math.inf
            for a, b in self.chunks(max_elements):
                x = rows_of(a, b)
                # min and max are exact and order-free: per-block partials reduce exactly.
                for mn, mx in mapper(_minmax_block, [x[sl] for sl in _blocks(b - a, self.cols)
                                                     if x[sl].size]):
                    finite = finite and math.isfinite(mn) and math.isfinite(mx)
                    lo_v, hi_v = min(lo_v, mn), max(hi_v, mx)
            if lo_v > hi_v:  # no values at all
                lo_v = hi_v = 0.0
            lo, hi = np.array([lo_v]), np.array([hi_v])
            if finite and spec.scheme == "symmetric-unsigned" and lo_v < 0:
                raise NegativeValuesError(lo_v)
        else:
            lo, hi = _ranges_or_nonfinite(bf16.as_float(rows_of(0, self.rows), self.cdt), spec)
            if spec.scheme == "symmetric-unsigned":
                minimum = min((float(bf16.as_float(rows_of(a, b), self.cdt).min())
                               for a, b in self.chunks(max_elements)
                               if b > a and self.cols), default=0.0)
                if minimum < 0:
                    raise NegativeValuesError(minimum)
        if not finite:
            bad = sum(int(np.count_nonzero(~np.isfinite(bf16.as_float(rows_of(a, b), self.cdt))))
                      for a, b in self.chunks(max_elements))
            raise NonFiniteError(bad)
        self._tensor_p = qparams(lo, hi, spec)
        self.scale[()] = self._tensor_p.scale[0]
        self.zero_point[()] = self._tensor_p.zero_point[0]

    def run(self, x: np.ndarray, row0: int, out: np.ndarray, mapper: Mapper | None = None) -> None:
        """Quantize rows [row0, row0 + len(x)) of the tensor, ``x`` of shape (n, cols) in any
        float dtype, into ``out`` (n, out_row_items) of out_dtype. Blocks run on ``mapper``
        (e.g. ``ThreadPoolExecutor.map``; serial by default). Raises NonFiniteError for
        NaN/inf, NegativeValuesError for symmetric-unsigned on negative values."""
        self.run_rows(lambda a, b: x[a - row0 : b - row0], row0, x.shape[0], out, mapper)

    def run_rows(self, rows_of: Callable[[int, int], np.ndarray], row0: int, n: int,
                 out: np.ndarray, mapper: Mapper | None = None) -> None:
        """:meth:`run` of rows [row0, row0 + n), each task fetching its own rows [a, b) of the
        tensor with ``rows_of(a, b)`` ((b - a, cols), any float dtype) on the thread that
        quantizes them: a caller can read them there into a small buffer of that thread's,
        which the quantizing then finds in the core's cache, and the reads run in parallel.
        The rows need to stay valid only until the task is done."""
        mapper = mapper or _serial_map
        if row0 != self._done or row0 % self.block_rows or row0 + n > self.rows:
            raise ValueError(f"rows [{row0}, {row0 + n}) are not the next run of whole blocks")
        tp = self._tensor_p
        if tp is None and self.needs_tensor_range:
            raise ValueError("per-tensor quantization needs set_tensor_range() first")
        spec, cdt = self.spec, self.cdt
        scale2d = None if tp is not None else self.scale.reshape(self.rows, -1)
        zero2d = None if tp is not None else self.zero_point.reshape(self.rows, -1)
        row_scale = self.row_scale

        def task(blocks: list[slice]) -> list[ErrorStats]:
            a, b = blocks[0].start, blocks[-1].stop
            rows = slice(row0 + a, row0 + b)
            return _quantize_task(
                rows_of(rows.start, rows.stop), [slice(sl.start - a, sl.stop - a) for sl in blocks],
                spec, cdt, tp, out[a:b], None if scale2d is None else scale2d[rows],
                None if zero2d is None else zero2d[rows], self._kernel,
                None if row_scale is None else row_scale[rows])

        for stats in mapper(task, _tasks(_blocks(n, self.cols), self.cols)):
            for s in stats:
                self.stats = self.stats.merge(s)  # merged in block order: deterministic
        self._done += n


def quantize(
    w: np.ndarray, spec: QuantSpec, mapper: Mapper | None = None
) -> QTensor:
    """Quantize a float tensor of two or more dimensions according to ``spec``.

    ``mapper`` (e.g. ``ThreadPoolExecutor.map``) runs the row blocks; the default is serial.
    Raises NonFiniteError for NaN/inf and NegativeValuesError for symmetric-unsigned on
    negative values.
    """
    tq = TensorQuantizer(tuple(w.shape), w.dtype, spec)
    w2d = np.ascontiguousarray(w).reshape(tq.rows, tq.cols)
    if tq.needs_tensor_range:
        tq.set_tensor_range(lambda a, b: w2d[a:b], mapper)
    data = np.empty(stored_shape(tq.shape, spec), tq.out_dtype)
    try:
        tq.run(w2d, 0, data.reshape(tq.rows, tq.out_row_items), mapper)
    except NonFiniteError:
        # A block counts only its own values; the message must give the whole tensor's count.
        raise NonFiniteError(int(np.count_nonzero(~np.isfinite(bf16.as_float(w2d, tq.cdt))))) \
            from None
    return QTensor(data, tq.scale, tq.zero_point, tq.shape, spec, tq.stats, tq.row_scale)


def quantize_fixed(
    w: np.ndarray, scale: float, zero_point: int = 0, spec: QuantSpec | None = None
) -> np.ndarray:
    """Quantize with a given scale and zero point (e.g. the notes' scale 1/255 example).

    q = clip(rint(w / scale) + zero_point, qmin, qmax), as int8 (signed) or uint8.
    """
    spec = spec or QuantSpec("symmetric", granularity="tensor")
    cdt = compute_dtype(w.dtype)
    p = QParams(np.asarray(scale, np.float64), np.asarray(zero_point, np.int32))
    x = bf16.as_float(w, cdt).copy()
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
    rows, cols = rows_cols(shape)
    out = np.empty(shape, out_dtype)
    stored = data.reshape(rows, stored_shape((rows, cols), spec)[1])
    dequantize_rows(stored, scale, zero_point, 0, shape, spec, out.reshape(rows, cols), compute,
                    mapper)
    return out


def dequantize_rows(
    stored: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray,
    row0: int,
    shape: tuple[int, ...],
    spec: QuantSpec,
    out: np.ndarray,
    compute: np.dtype | None = None,
    mapper: Mapper | None = None,
) -> None:
    """The streaming form of :func:`dequantize`: rows [row0, row0 + len(stored)) of a tensor of
    ``shape``, ``stored`` as in the file ((n, cols) integers, or (n, packed bytes)), into
    ``out`` ((n, cols) of any float dtype). ``scale`` and ``zero_point`` are the whole
    tensor's. Every value depends only on its own q and parameters, so any split is exact."""
    mapper = mapper or _serial_map
    compute = np.dtype(compute or np.float32)
    rows, cols = rows_cols(shape)
    n = stored.shape[0]
    # Scales may be stored as float16 or bfloat16 (uint16 bit patterns); zero points as one
    # 0-d value (symmetric schemes) or uint8: all widen exactly.
    scale = scale_to_float32(scale, spec.scale_dtype)
    zero_point = np.asarray(zero_point, np.int32)
    per_tensor = spec.granularity == "tensor"
    if zero_point.ndim == 0 and not per_tensor:
        zero_point = np.broadcast_to(zero_point, scale.shape)
    # (rows, units); not reshape(rows, -1), which numpy refuses for a size-0 array (a tensor
    # with no rows or no columns that a manifest says is quantized).
    s2d = scale if per_tensor else scale.reshape(rows, scale.size // max(rows, 1))
    z2d = zero_point if per_tensor else zero_point.reshape(rows, zero_point.size // max(rows, 1))

    def task(blocks: list[slice]) -> None:
        with np.errstate():  # restores the buffer size on the way out
            np.setbufsize(_bufsize(spec, cols))
            for sl in blocks:
                rows_ = slice(row0 + sl.start, row0 + sl.stop)
                s = s2d if per_tensor else s2d[rows_]
                z = z2d if per_tensor else z2d[rows_]
                _dequantize_block(stored[sl], s, z, spec, cols, compute, out[sl])

    for _ in mapper(task, _tasks(_blocks(n, cols), cols)):
        pass


def _kernel_output(out: np.ndarray, compute: np.dtype) -> int | None:
    """The kernel's output code for ``out`` (0 float32, 1 bfloat16), or None for numpy."""
    if _kernels is None or compute != np.float32 or not out.flags.c_contiguous or \
            out.shape[-1] == 0:
        return None
    if out.dtype == np.float32:
        return 0
    return 1 if bf16.is_bf16(out) else None


def _dequantize_block(
    q: np.ndarray, s: np.ndarray, z: np.ndarray, spec: QuantSpec, cols: int,
    compute: np.dtype, out: np.ndarray,
) -> None:
    """schemes.dequantize_values on one block, in place: the result lands in ``out`` directly
    unless ``out`` needs a narrower dtype (then via a per-thread scratch block)."""
    if spec.packed:
        q = packing.unpack(q, spec.bits, cols, spec.signed)
    out_code = _kernel_output(out, compute)
    if out_code is not None and q.flags.c_contiguous and q.dtype.itemsize == 1:
        per_tensor = spec.granularity == "tensor"
        g = spec.group_size if spec.granularity == "group" else cols
        s32 = np.ascontiguousarray(s, np.float32)
        _kernels.dequantize(q, q.dtype == np.int8, q.shape[0], cols, g, s32,
                            z.astype(np.float32), 0 if per_tensor else s32.shape[-1],
                            out.view(np.uint16) if out_code == 1 else out, out_code)
        return
    if out.dtype == compute and out.flags.c_contiguous:
        dest = out
    else:
        dest = _scratch("w", q.size, compute).reshape(q.shape)
    for view, (sv, zv) in _parts(spec, cols, (s, z)):
        assert sv is not None and zv is not None
        qv, dv = view(q), view(dest)
        # Convert, then compute in place: a plain int -> float copy is vectorised, whereas a
        # ufunc given int8 operands and a float loop converts through small buffers (measured
        # 1.7x slower). The values are those of q.astype(compute).
        np.copyto(dv, qv)
        if np.any(zv):
            np.subtract(dv, zv, out=dv, dtype=compute)
        np.multiply(dv, sv, out=dv, dtype=compute)
    if dest is not out:
        if bf16.is_bf16(out):  # bit patterns, rounded to nearest even as a cast would
            bits = bf16.from_float32(dest) if compute == np.float32 else bf16.from_float64(dest)
            np.copyto(bf16.bits(out), bits)
        else:
            np.copyto(out, dest, casting="unsafe")
