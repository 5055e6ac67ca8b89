"""Range setting: choose the clipping range [lo, hi] of every range unit.

The caller reshapes a tensor so that each ROW of a 2-D array is one range unit (the whole
tensor as one row, one output channel, or one group). ``find_range`` returns per-row ``lo`` and
``hi`` (float64) that are then turned into scales and zero points by ``schemes.qparams``.

Four methods:

* ``minmax``: the plain extremes of each row. Nothing is clipped.
* ``percentile``: clip the tails at the ``spec.percentile``-th percentile of each row.
* ``mse``: try a grid of clip ratios on every row and keep, per row, the one whose
  quantize -> dequantize round trip (done with the exact ``schemes`` functions) has the least
  squared error. Ratio 1.0 (= minmax) is tried first and wins ties, so the result is never
  worse than minmax on any row.
* ``search``: each row's scale and zero point fitted by least squares over a few candidate
  grids (``qtool.core.fit``), returned as the range that ``qparams`` maps back to exactly the
  fitted parameters. Never a larger squared error than minmax on any row; the range may be
  a little wider than minmax (the fitted scale can grow when the extremes are clipped less).

This module is part of the numeric core: numpy in, numpy out, no files, no terminal.
"""

from __future__ import annotations

import numpy as np

from qtool.core.fit import fit_range, fit_search
from qtool.core.schemes import QParams, QuantSpec, dequantize_values, qparams, quantize_values

# Clip ratios for the mse search, largest first: 1.00, 0.99, ..., 0.20 (81 points), then 19
# geometric steps from 0.2 down to 0.02. Why this shape (measured on 256x1024 normal and
# Student-t(3) rows, 2..8 bits, against a 200-point grid; every figure within 0.03 dB):
# * Near 1.0 the steps must be fine: at 8 bits the optimum is a 1-3% clip and a 4% step
#   finds nothing (a pure geometric grid gained 0.00 dB where this one gains 0.06-0.11 dB).
# * The floor must be low: at 2 bits heavy-tailed rows clip to ~0.14 of their absmax (some
#   rows to 0.05); a grid stopping at 0.2 loses 0.5 dB there. Below 0.2 the error curve is
#   flat in relative terms, so ~12% geometric steps suffice.
# * 100 points is linear in cost (each is one quantize/dequantize pass over the tensor).
# 1.0 comes first so that minmax wins every tie (see _mse_ranges).
MSE_RATIOS: np.ndarray = np.concatenate(
    [np.linspace(1.0, 0.2, 81), np.geomspace(0.2, 0.02, 20)[1:]]
)

# A candidate ratio replaces the current best only if its error is smaller by this relative
# margin. Our per-row error sum is accumulated block by block, so it may differ from a
# straight np.sum over the row in the last few ulps; without the margin a "win" inside that
# noise could make the chosen range fractionally worse than minmax when re-measured.
_MSE_REL_MARGIN = 1e-9

# percentile: rows are processed in chunks of about this many elements, bounding the copy
# that np.percentile makes (it partitions a copy of its input).
_PERCENTILE_CHUNK_ELEMS = 1 << 20
# mse: each block of the tensor is run through every grid point before moving on, so a block
# that stays in cache is read from main memory once instead of once per grid point. Long rows
# (a whole tensor as one row) are split across columns, so temporaries (~16 bytes per block
# element) stay at a few MB whatever the shape. 256k elements measured fastest on a
# 4096x4096 tensor (64k: +7%, 1M: +45%).
_MSE_BLOCK_ELEMS = 1 << 18


def find_range(w: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
    """Per-row clipping range of ``w`` (shape (units, n)) under ``spec``.

    Returns ``(lo, hi)``, each float64 of shape (units,), ready for ``schemes.qparams``:
    symmetric / gnmt give ``lo = -a, hi = a``; symmetric-unsigned gives ``lo = 0, hi >= 0``;
    asymmetric gives ``lo <= 0 <= hi``. The range is never wider than the row's minmax range,
    except with ``search`` (see the module docstring).
    Raises ``ValueError`` if a row contains NaN or inf (no finite range exists then).
    """
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"find_range expects a 2-D (units, n) array, got shape {w.shape}")
    if w.dtype not in (np.float32, np.float64):
        raise TypeError(f"find_range expects float32 or float64 weights, got {w.dtype}")
    units, n = w.shape
    if units == 0 or n == 0:
        # Nothing to measure: a zero range, which qparams turns into scale 1.
        return np.zeros(units, np.float64), np.zeros(units, np.float64)

    # Always needed: they are the minmax answer, the bound that percentile must not exceed,
    # and the starting range of the mse search. Two reductions, no temporary of w's size.
    mn = w.min(axis=1).astype(np.float64)
    mx = w.max(axis=1).astype(np.float64)
    # min/max propagate NaN and expose inf, so checking the per-row results is a full
    # finiteness check of w for free.
    bad = ~(np.isfinite(mn) & np.isfinite(mx))
    if bad.any():
        rows = np.flatnonzero(bad)
        shown = ", ".join(str(r) for r in rows[:10]) + (", ..." if rows.size > 10 else "")
        raise ValueError(f"cannot set a range: {rows.size} row(s) contain NaN or inf ({shown})")

    lo, hi = minmax_ranges(mn, mx, spec)
    if spec.range == "minmax":
        return lo, hi
    if spec.range == "percentile":
        return _percentile_ranges(w, lo, hi, spec)
    if spec.range == "search":
        return fit_range(fit_search(w, spec.bits, spec.scheme), spec.bits, spec.scheme)
    return _mse_ranges(w, lo, hi, spec)


def minmax_ranges(
    mn: np.ndarray, mx: np.ndarray, spec: QuantSpec
) -> tuple[np.ndarray, np.ndarray]:
    if spec.scheme in ("symmetric", "gnmt"):
        a = np.maximum(mx, -mn)
        return -a, a
    if spec.scheme == "symmetric-unsigned":
        # Negative values can only become 0, so they do not widen the range.
        return np.zeros_like(mx), np.maximum(mx, 0.0)
    # asymmetric: 0.0 must be exactly representable (padding, ReLU zeros), so include it.
    return np.minimum(mn, 0.0), np.maximum(mx, 0.0)


def _percentile_ranges(
    w: np.ndarray, lo: np.ndarray, hi: np.ndarray, spec: QuantSpec
) -> tuple[np.ndarray, np.ndarray]:
    p = float(spec.percentile)
    units, n = w.shape
    step = max(1, _PERCENTILE_CHUNK_ELEMS // n)
    if n > _PERCENTILE_CHUNK_ELEMS and w.dtype == np.float32:
        # Rows longer than a chunk (a whole tensor as one row): a float32 copy per row,
        # half the float64 one, with the same figures (_row_percentiles).
        if spec.scheme == "asymmetric":
            lh = np.array([_row_percentiles(row.copy(), [100.0 - p, p]) for row in w])
            return np.clip(lh[:, 0], lo, 0.0), np.clip(lh[:, 1], 0.0, hi)
        a = np.array([_row_percentiles(np.abs(row), [p])[0] for row in w])
        return (lo, np.minimum(a, hi)) if spec.scheme == "symmetric-unsigned" else \
            (-np.minimum(a, hi), np.minimum(a, hi))
    if spec.scheme == "asymmetric":
        lo_p = np.empty(units, np.float64)
        hi_p = np.empty(units, np.float64)
        for r0 in range(0, units, step):
            # One call for both tails: a single partition pass over our own float64 copy
            # (see below for why float64), which np.percentile may then reorder in place.
            q = np.percentile(
                w[r0:r0 + step].astype(np.float64), [100.0 - p, p], axis=1,
                overwrite_input=True,
            )
            lo_p[r0:r0 + step] = q[0]
            hi_p[r0:r0 + step] = q[1]
        # Interpolated percentiles lie within [min, max] mathematically; clamping guards the
        # last ulp so the range is never wider than minmax, and keeps 0 inside the range.
        return np.clip(lo_p, lo, 0.0), np.clip(hi_p, 0.0, hi)

    a = np.empty(units, np.float64)
    for r0 in range(0, units, step):
        # Work in float64 whatever w's dtype, so the result is exactly
        # np.percentile(|w| as float64): numpy's float32 path computes the interpolation
        # weight and the lerp in float32 (or mixed, depending on how q is spelled), which
        # differs in the last ulps. The float64 |w| is our own temporary (chunked, so
        # bounded except for a single huge row), so np.percentile may partition it in place.
        a[r0:r0 + step] = np.percentile(
            np.abs(w[r0:r0 + step], dtype=np.float64), p, axis=1, overwrite_input=True
        )
    if spec.scheme == "symmetric-unsigned":
        # The percentile of |w| can exceed max(w) when the row is mostly negative; the
        # unsigned range cannot usefully extend past the largest positive value.
        return lo, np.minimum(a, hi)
    a = np.minimum(a, hi)  # hi is the absmax here
    return -a, a


def _row_percentiles(x: np.ndarray, qs: list[float]) -> list[float]:
    """np.percentile(x.astype(np.float64), qs) of one finite float32 row ``x`` (a copy, which
    this reorders), to the bit: the order statistics of float32 values widen exactly to
    float64, and the interpolation is numpy's linear method as numpy computes it in float64
    (virtual index (n - 1) * q / 100, its floor and the next, then numpy's _lerp)."""
    n = x.size
    picks = []
    for q in qs:
        virtual = (n - 1) * (q / 100.0)
        if virtual >= n - 1:
            prev = nxt = n - 1
            gamma = virtual + 1.0  # numpy's index -1; both ends equal, so only t >= 0.5 counts
        else:
            prev = max(int(np.floor(virtual)), 0)
            nxt, gamma = prev + 1, virtual - prev
        picks.append((prev, nxt, gamma))
    x.partition(sorted({i for prev, nxt, _ in picks for i in (prev, nxt)}))
    out = []
    for prev, nxt, t in picks:
        a, b = float(x[prev]), float(x[nxt])
        diff = b - a
        out.append(b - diff * (1.0 - t) if t >= 0.5 else a + diff * t)
    return out


def _mse_ranges(
    w: np.ndarray, lo: np.ndarray, hi: np.ndarray, spec: QuantSpec
) -> tuple[np.ndarray, np.ndarray]:
    units, n = w.shape
    ratios = MSE_RATIOS
    k_count = ratios.size
    out_lo = np.empty(units, np.float64)
    out_hi = np.empty(units, np.float64)
    rows_per_chunk = max(1, _MSE_BLOCK_ELEMS // n)
    cols_per_block = min(n, _MSE_BLOCK_ELEMS)

    for r0 in range(0, units, rows_per_chunk):
        r1 = min(units, r0 + rows_per_chunk)
        # Candidate ranges for all grid points and rows of this chunk: (K, R). These exact
        # float64 values are both simulated and returned, so the caller's qparams reproduces
        # the simulated scales bit for bit.
        lo_k = ratios[:, None] * lo[None, r0:r1]
        hi_k = ratios[:, None] * hi[None, r0:r1]
        params = qparams(lo_k, hi_k, spec)
        errs = np.zeros((k_count, r1 - r0), np.float64)

        for c0 in range(0, n, cols_per_block):
            block = w[r0:r1, c0:c0 + cols_per_block]
            qbuf = np.empty(block.shape, block.dtype)
            diff = np.empty(block.shape, np.float64)
            _search_block(block, params, spec, qbuf, diff, errs)

        # Walk the grid from ratio 1.0 down, switching only on a clear improvement, so minmax
        # keeps every tie (all-zero and constant rows, saturated tiny ranges).
        best = np.zeros(r1 - r0, np.intp)
        best_err = errs[0].copy()
        for k in range(1, k_count):
            better = errs[k] < best_err * (1.0 - _MSE_REL_MARGIN)
            best[better] = k
            best_err[better] = errs[k][better]
        cols = np.arange(r1 - r0)
        out_lo[r0:r1] = lo_k[best, cols]
        out_hi[r0:r1] = hi_k[best, cols]
    return out_lo, out_hi


def _search_block(
    block: np.ndarray,
    params: QParams,
    spec: QuantSpec,
    qbuf: np.ndarray,
    diff: np.ndarray,
    errs: np.ndarray,
) -> None:
    """Add each grid point's squared round-trip error of ``block`` to ``errs`` (K, R)."""
    # Narrow candidate ranges make w / scale overflow to +-inf for far-out values (e.g. big
    # negatives under symmetric-unsigned with a tiny max); quantize_values then clips them to
    # qmin/qmax, which is the right answer, so the warning would only be noise.
    with np.errstate(over="ignore"):
        for k in range(errs.shape[0]):
            pk = _row_params(params, k)
            q = quantize_values(block, pk, spec, out=qbuf)
            w_hat = dequantize_values(q, pk.scale, pk.zero_point, block.dtype)
            # The difference in float64: a float32 subtraction would round, and the error is
            # what decides between candidates.
            np.subtract(block, w_hat, out=diff, dtype=np.float64)
            errs[k] += np.einsum("ij,ij->i", diff, diff)


def _row_params(params: QParams, k: int) -> QParams:
    """Grid point k of (K, R) qparams, shaped (R, 1) to broadcast along each row."""
    inv = None if params.inv_scale is None else params.inv_scale[k][:, None]
    return QParams(params.scale[k][:, None], params.zero_point[k][:, None], inv)
