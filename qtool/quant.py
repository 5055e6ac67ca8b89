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
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from qtool import packing
from qtool.metrics import ErrorStats
from qtool.ranges import find_range, minmax_ranges
from qtool.schemes import QParams, QuantSpec, qparams, quantize_values

# The optional C accelerator (qtool/_kernels.c): the same integers, scales and zero points as
# the numpy code below, in one pass per block instead of about ten. Without a C compiler at
# install time it is absent, and numpy does all the work. QTOOL_PURE_NUMPY=1 turns it off
# (the tests compare both paths byte for byte).
_kernels: Any
try:
    if os.environ.get("QTOOL_PURE_NUMPY"):
        raise ImportError("QTOOL_PURE_NUMPY is set")
    from qtool import _kernels
except ImportError:
    _kernels = None

# Elements per block: a block (2 MB of float32) and its scratch stay in the cache of the core
# (L2) and the shared L3. Each numpy call on a block releases and re-takes the GIL; with
# smaller blocks those hand-offs between threads cost more than the passes gain from L2
# (`make bench` sweeps the size: on 2 cores, 64k-value blocks ran at about half the speed).
BLOCK_ELEMENTS = 1 << 19
# Values per thread-pool task (whole blocks); the task's rows get their ranges at once.
TASK_ELEMENTS = 1 << 20
# Per-thread scratch buffers up to this many elements are kept for the next block.
_SCRATCH_KEEP_ELEMENTS = 1 << 22

_local = threading.local()

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


def _block_rows(cols: int) -> int:
    """Rows per block: blocks hold about BLOCK_ELEMENTS values (at least one row)."""
    return max(1, BLOCK_ELEMENTS // max(cols, 1))


def _blocks(rows: int, cols: int) -> list[slice]:
    step = _block_rows(cols)
    return [slice(i, min(i + step, rows)) for i in range(0, rows, step)]


def _tasks(blocks: list[slice], cols: int) -> list[list[slice]]:
    """Consecutive blocks grouped into tasks of about TASK_ELEMENTS values: a thread-pool task
    and the per-task parameter arithmetic cost tens of microseconds, as much as quantizing
    tens of thousands of values. The grouping depends only on the blocks, never on the pool,
    so neither does the result."""
    if not blocks:
        return []
    size = (blocks[0].stop - blocks[0].start) * max(cols, 1)
    per = max(1, TASK_ELEMENTS // size)
    return [blocks[i : i + per] for i in range(0, len(blocks), per)]


def _serial_map(fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
    return map(fn, items)


def _bufsize(spec: QuantSpec, cols: int) -> int:
    """numpy's ufunc buffer size for blocks of rows of ``cols`` values under ``spec``.

    With a per-row (or per-group) parameter broadcast along rows shorter than the buffer
    (8192 values by default), numpy copies operands through its buffers to make longer inner
    loops, which made a divide or multiply of 2048-wide rows 1.7x slower. A buffer no longer
    than a row (or group) keeps the plain strided loop. Values are elementwise, so the buffer
    size never changes a result.
    """
    inner = min(cols, spec.group_size) if spec.granularity == "group" else cols
    return max(16, min(8192, inner) // 16 * 16)


def _scratch(slot: str, n: int, dtype: np.dtype) -> np.ndarray:
    """A reusable per-thread buffer of ``n`` elements. A fresh block-sized temporary for every
    block would cost page faults worth another pass over the block; threads never share one."""
    cache: dict[tuple[str, str], np.ndarray] | None = getattr(_local, "scratch", None)
    if cache is None:
        cache = _local.scratch = {}
    key = (slot, dtype.str)
    buf = cache.get(key)
    if buf is None or buf.size < n:
        buf = np.empty(n, dtype)
        if n <= _SCRATCH_KEEP_ELEMENTS:  # one huge row is not worth pinning for the thread's life
            cache[key] = buf
    return buf[:n]


_Params = tuple[np.ndarray | None, ...]
_View = Callable[[np.ndarray], np.ndarray]


def _whole(a: np.ndarray) -> np.ndarray:
    return a


def _parts(spec: QuantSpec, cols: int, params: _Params) -> list[tuple[_View, _Params]]:
    """Pair a (r, cols) block with its per-unit parameters by broadcasting, never by repeating
    a parameter per element.

    Per tensor ((1,) arrays) and per channel ((r, 1)) the parameters broadcast as they are.
    Per group, the whole groups are viewed as (r, groups, G) against (r, groups, 1), and a
    shorter last group as (r, cols % G) against (r, 1). The views are reshapes of a column
    slice that only split its last axis, which numpy always does without a copy, so writing
    through them (``out=``) writes the block.
    """
    if spec.granularity != "group":
        return [(_whole, params)]
    g = spec.group_size
    full = cols // g
    parts: list[tuple[_View, _Params]] = []
    if full:
        parts.append((lambda a: a[:, : full * g].reshape(a.shape[0], full, g),
                      tuple(None if p is None else p[:, :full, None] for p in params)))
    if cols % g:
        parts.append((lambda a: a[:, full * g :],
                      tuple(None if p is None else p[:, full:] for p in params)))
    return parts


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


def _as_compute(xs: np.ndarray, cdt: np.dtype) -> np.ndarray:
    """The block in the compute dtype: the caller's rows themselves when they already are
    (e.g. float32 rows of a memory map, only ever read), else a per-thread scratch copy."""
    if xs.dtype == cdt and xs.flags.c_contiguous:
        return xs
    x = _scratch("x", xs.size, cdt).reshape(xs.shape)
    np.copyto(x, xs, casting="unsafe")  # exact: every float dtype widens to the compute dtype
    return x


def _quantize_task(
    xs: np.ndarray,
    blocks: list[slice],
    spec: QuantSpec,
    cdt: np.dtype,
    tensor_p: QParams | None,
    q_out: np.ndarray,
    scale_out: np.ndarray | None,
    zero_out: np.ndarray | None,
) -> list[ErrorStats]:
    """Quantize the rows ``xs`` (r, cols) into ``q_out``, storing their parameters in
    ``scale_out`` / ``zero_out`` ((r, units) views) unless ``tensor_p`` holds the tensor's;
    returns the statistics of each of ``blocks`` (row slices of ``xs``), in order.

    The ranges and parameters of all the rows are found at once (a few dozen small numpy
    calls, paid once per task, not per block); then each block goes through the arithmetic of
    schemes.quantize_values and dequantize_values in place in a per-thread scratch block, so
    that every pass reads and writes cache, not memory.
    """
    with np.errstate():  # restores numpy's buffer size on the way out
        np.setbufsize(_bufsize(spec, xs.shape[1]))
        return _quantize_rows(xs, blocks, spec, cdt, tensor_p, q_out, scale_out, zero_out)


def _quantize_rows(xs: np.ndarray, blocks: list[slice], spec: QuantSpec, cdt: np.dtype,
                   tensor_p: QParams | None, q_out: np.ndarray, scale_out: np.ndarray | None,
                   zero_out: np.ndarray | None) -> list[ErrorStats]:
    """The body of :func:`_quantize_task`, run with numpy's buffer size set for the rows."""
    src = _kernel_source(xs, cdt)
    if src is not None:
        return _quantize_rows_kernel(xs, src, blocks, spec, tensor_p, q_out, scale_out, zero_out)
    r, cols = xs.shape
    x = _as_compute(xs, cdt)
    per_tensor = tensor_p is not None
    if tensor_p is None:
        assert scale_out is not None and zero_out is not None
        lo, hi = _ranges_or_nonfinite(x, spec)
        if spec.scheme == "symmetric-unsigned" and x.size and x.min() < 0:
            raise NegativeValuesError(float(x.min()))
        p = qparams(lo, hi, spec)
        scale_out[...] = p.scale.reshape(r, -1)
        zero_out[...] = p.zero_point.reshape(r, -1)
    else:
        p = tensor_p
    asym = spec.scheme == "asymmetric"
    # With minmax ranges the symmetric schemes cannot leave [qmin, qmax]: |w| <= absmax and the
    # float32 scale is within 2^-24 of absmax / qmax, so |w / s| <= qmax + 0.0001 rounds to at
    # most qmax (and -0.0 stays -0.0 either way). Skipping the clip is bit-identical and saves
    # a pass; every other case clips.
    clip = not (spec.range == "minmax" and spec.scheme in ("symmetric", "gnmt"))
    # (view, scale, zero point, 1/scale) per part, cast to the compute dtype once per task.
    parts = [
        (view, s.astype(cdt, copy=False), z.astype(cdt),
         None if inv is None else inv.astype(cdt, copy=False))
        for view, (s, z, inv) in _parts(spec, cols, (p.scale, p.zero_point, p.inv_scale))
    ]
    any_zero = [bool(np.any(z)) for _, _, z, _ in parts]
    t_all = _scratch("t", min(x.size, max(b.stop - b.start for b in blocks) * cols), cdt)
    stats = []
    for sl in blocks:
        xb = x[sl]
        t = t_all[: xb.size].reshape(xb.shape)
        for view, s, z, inv in parts:
            if not per_tensor:  # per-row parameters: this block's rows
                s, z, inv = s[sl], z[sl], None if inv is None else inv[sl]
            xv, tv = view(xb), view(t)
            if inv is not None:
                np.multiply(xv, inv, out=tv)
            else:
                np.divide(xv, s, out=tv)
            np.rint(tv, out=tv)
            if asym:
                np.add(tv, z, out=tv)
            if clip:
                np.clip(tv, spec.qmin, spec.qmax, out=tv)
        if spec.packed:
            q_out[sl] = packing.pack(t.astype(spec.storage_dtype), spec.bits)
        else:
            np.copyto(q_out[sl], t, casting="unsafe")  # exact: t holds integers of the dtype
        # t becomes w_hat - w, for the statistics.
        for (view, s, z, _), has_zero in zip(parts, any_zero, strict=True):
            if not per_tensor:
                s, z = s[sl], z[sl]
            tv = view(t)
            if has_zero:
                np.subtract(tv, z, out=tv)
            np.multiply(tv, s, out=tv)
        np.subtract(t, xb, out=t)
        stats.append(ErrorStats.of(xb, t))
    return stats


def kernels_available() -> bool:
    """Whether the C accelerator is in use (see _kernels above)."""
    return _kernels is not None


def _kernel_source(xs: np.ndarray, cdt: np.dtype) -> int | None:
    """The kernel's source code for these rows (0 float32, 1 bfloat16), or None when numpy
    does the work: no kernel, float64 or float16 values, or rows not laid out contiguously."""
    if _kernels is None or cdt != np.float32 or not xs.flags.c_contiguous or xs.shape[1] == 0:
        return None
    if xs.dtype == np.float32:
        return 0
    return 1 if xs.dtype.name == "bfloat16" else None


def _quantize_rows_kernel(xs: np.ndarray, src: int, blocks: list[slice], spec: QuantSpec,
                          tensor_p: QParams | None, q_out: np.ndarray,
                          scale_out: np.ndarray | None,
                          zero_out: np.ndarray | None) -> list[ErrorStats]:
    """:func:`_quantize_rows` through the C kernel: the same ranges (minmax in C, the other
    methods in numpy), the same qparams, and per block one call that quantizes, stores and
    sums the error statistics (float32 within chunks of 1024 values, float64 across them: the
    figures may differ from the numpy path's float32 dot products in their last digits; the
    stored bytes do not differ)."""
    r, cols = xs.shape
    raw = xs.view(np.uint16) if src == 1 else xs  # bfloat16 goes to C as its bits
    g = spec.group_size if spec.granularity == "group" else cols
    if tensor_p is None:
        assert scale_out is not None and zero_out is not None
        if spec.range == "minmax":
            units = n_groups(cols, spec)
            mn = np.empty((r, units), np.float32)
            mx = np.empty((r, units), np.float32)
            if not _kernels.minmax(raw, src, r, cols, g, mn, mx):
                raise NonFiniteError(int(np.count_nonzero(~np.isfinite(
                    _as_compute(xs, np.dtype(np.float32))))))
            lowest = float(mn.min()) if mn.size else 0.0
            lo, hi = minmax_ranges(mn.astype(np.float64), mx.astype(np.float64), spec)
        else:
            x = _as_compute(xs, np.dtype(np.float32))
            lo, hi = _ranges_or_nonfinite(x, spec)
            lowest = float(x.min()) if x.size else 0.0
        if spec.scheme == "symmetric-unsigned" and lowest < 0:
            raise NegativeValuesError(lowest)
        p = qparams(lo, hi, spec)
        scale_out[...] = p.scale.reshape(r, -1)
        zero_out[...] = p.zero_point.reshape(r, -1)
        stride = scale_out.shape[1]
    else:
        p = tensor_p
        stride = 0
    # The parameters as contiguous float32: (r, units) rows per unit, or one for the tensor.
    shape = (r, stride) if stride else (1,)
    scale = p.scale.astype(np.float32).reshape(shape)
    inv = None if p.inv_scale is None else p.inv_scale.astype(np.float32).reshape(shape)
    zero = p.zero_point.astype(np.float32).reshape(shape)
    # The kernel writes whole rows of bytes: straight into q_out when it can, else (packing
    # below 8 bits, or an output laid out with gaps) into scratch that is then stored.
    direct = not spec.packed and q_out.flags.c_contiguous
    stats = []
    for sl in blocks:
        n = sl.stop - sl.start
        dest = q_out[sl] if direct else \
            _scratch("q", n * cols, np.dtype(np.uint8)).reshape(n, cols)
        s, i, z = (scale, inv, zero) if stride == 0 else \
            (scale[sl], None if inv is None else inv[sl], zero[sl])
        sums = _kernels.quantize(raw[sl], src, n, cols, g, s, i, z, stride, float(spec.qmin),
                                 float(spec.qmax), dest)
        if spec.packed:
            q_out[sl] = packing.pack(dest.view(spec.storage_dtype), spec.bits)
        elif not direct:
            q_out[sl] = dest.view(spec.storage_dtype)
        if all(map(math.isfinite, sums)):
            stats.append(ErrorStats(n * cols, *sums))
        else:  # float32 partial sums overflow once |w| passes ~1e18: redo them as numpy does
            stats.append(_block_stats(_as_compute(xs[sl], np.dtype(np.float32)),
                                      dest.view(spec.storage_dtype), s, z, spec, cols))
    return stats


def _block_stats(x: np.ndarray, q: np.ndarray, s: np.ndarray, z: np.ndarray, spec: QuantSpec,
                 cols: int) -> ErrorStats:
    """The error statistics of one block as the numpy path computes them: w_hat - w in
    float32, summed by ErrorStats.of (which redoes an overflowing sum in float64)."""
    t = q.astype(np.float32)
    for view, (sv, zv) in _parts(spec, cols, (s, z)):
        assert sv is not None and zv is not None
        tv = view(t)
        np.subtract(tv, zv, out=tv)
        np.multiply(tv, sv, out=tv)
    np.subtract(t, x, out=t)
    return ErrorStats.of(x, t)


def _minmax_block(xs: np.ndarray) -> tuple[float, float]:
    x = _as_compute(xs, compute_dtype(xs.dtype))
    return float(x.min()), float(x.max())


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
        self.stats = ErrorStats()
        self.block_rows = _block_rows(self.cols)
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
            lo, hi = _ranges_or_nonfinite(rows_of(0, self.rows).astype(self.cdt), spec)
            if spec.scheme == "symmetric-unsigned":
                minimum = min((float(rows_of(a, b).min()) for a, b in self.chunks(max_elements)
                               if b > a and self.cols), default=0.0)
                if minimum < 0:
                    raise NegativeValuesError(minimum)
        if not finite:
            bad = sum(int(np.count_nonzero(~np.isfinite(rows_of(a, b).astype(self.cdt))))
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
        mapper = mapper or _serial_map
        n = x.shape[0]
        if row0 != self._done or row0 % self.block_rows or row0 + n > self.rows:
            raise ValueError(f"rows [{row0}, {row0 + n}) are not the next run of whole blocks")
        tp = self._tensor_p
        if tp is None and self.needs_tensor_range:
            raise ValueError("per-tensor quantization needs set_tensor_range() first")
        spec, cdt = self.spec, self.cdt
        scale2d = None if tp is not None else self.scale.reshape(self.rows, -1)
        zero2d = None if tp is not None else self.zero_point.reshape(self.rows, -1)

        def task(blocks: list[slice]) -> list[ErrorStats]:
            a, b = blocks[0].start, blocks[-1].stop
            rows = slice(row0 + a, row0 + b)
            return _quantize_task(
                x[a:b], [slice(sl.start - a, sl.stop - a) for sl in blocks], spec, cdt, tp,
                out[a:b], None if scale2d is None else scale2d[rows],
                None if zero2d is None else zero2d[rows])

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
        raise NonFiniteError(int(np.count_nonzero(~np.isfinite(w2d.astype(tq.cdt))))) from None
    return QTensor(data, tq.scale, tq.zero_point, tq.shape, spec, tq.stats)


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
    scale = np.asarray(scale, np.float32)
    zero_point = np.asarray(zero_point, np.int32)
    per_tensor = spec.granularity == "tensor"
    s2d = scale if per_tensor else scale.reshape(rows, -1)
    z2d = zero_point if per_tensor else zero_point.reshape(rows, -1)

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
    return 1 if out.dtype.name == "bfloat16" else None


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
        np.copyto(out, dest, casting="unsafe")
