"""Block-level quantize/dequantize arithmetic, numpy and the optional C kernel.

A (rows, cols) tensor is cut into row blocks that stay in cache; consecutive blocks form a
thread-pool task. Everything here works on one block or task, in place, in float32 (float64
for F64), with no Python loop per element, row or group. quant.py drives it.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from qtool.core import bf16, fit_kernel, packing
from qtool.core.double_quant import unit_qparams as _params
from qtool.core.metrics import ErrorStats
from qtool.core.ranges import find_range, minmax_ranges
from qtool.core.schemes import QParams, QuantSpec
from qtool.core.shapes import compute_dtype, n_groups

# The optional C accelerator (qtool/core/_kernels.c): the same integers, scales and zero points as
# the numpy code below, in one pass per block instead of about ten. Without a C compiler at
# install time it is absent, and numpy does all the work. QTOOL_PURE_NUMPY=1 turns it off
# (the tests compare both paths byte for byte).
_kernels: Any
try:
    if os.environ.get("QTOOL_PURE_NUMPY"):
        raise ImportError("QTOOL_PURE_NUMPY is set")
    from qtool.core import _kernels
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
        if (got := fit_kernel.ranges(_kernels, x, spec)) is not None:  # --range search in C
            return got
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
    if bf16.is_bf16(xs):  # bit patterns (docs: core/bf16.py)
        if cdt == np.float32:
            return bf16.to_float32(xs, out=x)
        np.copyto(x, bf16.to_float32(xs))
        return x
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
    kernel: bool = True,
    row_out: np.ndarray | None = None,
) -> list[ErrorStats]:
    """Quantize the rows ``xs`` (r, cols) into ``q_out``, storing their parameters in
    ``scale_out`` / ``zero_out`` ((r, units) views) unless ``tensor_p`` holds the tensor's;
    returns the statistics of each of ``blocks`` (row slices of ``xs``), in order.

    The ranges and parameters of all the rows are found at once (a few dozen small numpy
    calls, paid once per task, not per block); then each block goes through the arithmetic of
    schemes.quantize_values and dequantize_values in place in a per-thread scratch block, so
    that every pass reads and writes cache, not memory. With ``spec.scale_bits`` the scales
    are double-quantized and each row's float32 scale goes to ``row_out`` ((r,)).
    """
    with np.errstate():  # restores numpy's buffer size on the way out
        np.setbufsize(_bufsize(spec, xs.shape[1]))
        return _quantize_rows(xs, blocks, spec, cdt, tensor_p, q_out, scale_out, zero_out,
                              kernel, row_out)


def _quantize_rows(xs: np.ndarray, blocks: list[slice], spec: QuantSpec, cdt: np.dtype,
                   tensor_p: QParams | None, q_out: np.ndarray, scale_out: np.ndarray | None,
                   zero_out: np.ndarray | None, kernel: bool = True,
                   row_out: np.ndarray | None = None) -> list[ErrorStats]:
    """The body of :func:`_quantize_task`, run with numpy's buffer size set for the rows
    (``kernel`` False: numpy even for float32 rows, e.g. float16 values widened by a caller)."""
    src = _kernel_source(xs, cdt) if kernel else None
    if src is not None:
        return _quantize_rows_kernel(xs, src, blocks, spec, tensor_p, q_out, scale_out, zero_out,
                                     row_out)
    r, cols = xs.shape
    x = _as_compute(xs, cdt)
    per_tensor = tensor_p is not None
    if tensor_p is None:
        assert scale_out is not None and zero_out is not None
        lo, hi = _ranges_or_nonfinite(x, spec)
        if spec.scheme == "symmetric-unsigned" and x.size and x.min() < 0:
            raise NegativeValuesError(float(x.min()))
        p = _params(lo, hi, spec, row_out)
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
    return 1 if bf16.is_bf16(xs) else None


def _quantize_rows_kernel(xs: np.ndarray, src: int, blocks: list[slice], spec: QuantSpec,
                          tensor_p: QParams | None, q_out: np.ndarray,
                          scale_out: np.ndarray | None,
                          zero_out: np.ndarray | None,
                          row_out: np.ndarray | None = None) -> list[ErrorStats]:
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
        fit = None
        if spec.range == "minmax":
            units = n_groups(cols, spec)
            mn = np.empty((r, units), np.float32)
            mx = np.empty((r, units), np.float32)
            if not _kernels.minmax(raw, src, r, cols, g, mn, mx):
                raise NonFiniteError(int(np.count_nonzero(~np.isfinite(
                    _as_compute(xs, np.dtype(np.float32))))))
            lowest = float(mn.min()) if mn.size else 0.0
            lo, hi = minmax_ranges(mn.astype(np.float64), mx.astype(np.float64), spec)
        elif spec.range == "search" and (got := fit_kernel.fit_units(_kernels, raw, src, r, cols,
                                                                     g, spec)) is not None:
            fit, lowest, lo, hi = got  # fit.py's fit in C (None on NaN: numpy counts them)
        else:
            x = _as_compute(xs, np.dtype(np.float32))
            lo, hi = _ranges_or_nonfinite(x, spec)
            lowest = float(x.min()) if x.size else 0.0
        if spec.scheme == "symmetric-unsigned" and lowest < 0:
            raise NegativeValuesError(lowest)
        p = QParams(fit.scale, fit.zero_point) if fit is not None and spec.scale_dtype == \
            "float32" and spec.scale_bits is None else _params(lo, hi, spec, row_out)  # equal
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




