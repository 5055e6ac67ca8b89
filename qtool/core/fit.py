"""``--range search``: data-free least-squares fitting of each range unit's scale and zero point.

The idea is llama.cpp's k-quants (``make_qkx2_quants``): instead of deriving the scale from the
extremes of a row and rounding everything to that grid, try several grids, and for each one
solve for the scale and offset that best reproduce the row *given the integers it rounded to*.
This module is our own vectorized numpy version, adapted to what qtool stores:

* the zero point is an integer in ``[0, qmax]`` (asymmetric) or 0 (symmetric), never a float
  minimum as in k-quants, so the fitted offset is rounded to an integer and the scale refitted;
* the stored integers are always recomputed by qtool's own formula
  ``q = clip(rint(x / scale) + zero_point, qmin, qmax)`` (see :func:`quantize_rows`), so the
  error reported in :class:`Fit` is the error of exactly what the quantizer will store.

Input: a 2-D array (units, n), one range unit (tensor, channel or group) per row, in the
compute dtype of the quantizer (float32, or float64 for F64 tensors). Output: per row a float32
scale (finite, > 0) and an int32 zero point; :func:`fit_range` turns them into a ``(lo, hi)``
that ``qtool.core.schemes.qparams`` maps back to the same scale and zero point bit for bit, so the
fit plugs into the existing range-then-qparams pipeline.

Numeric core: numpy only, no files, no terminal.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from qtool.core.fit_tile import Tile as _Tile

FIT_SCHEMES = ("symmetric", "symmetric-unsigned", "asymmetric")
# As in qtool.core.schemes: the smallest scale ever stored (a zero scale would give inf/NaN).
MIN_SCALE = float(np.finfo(np.float32).tiny)

# Candidate grids, as clip ratios of the min-max range (1.0 = min-max itself). Why these:
# * the least-squares refit moves the scale only within the integers the grid produced, so
#   the grid must already reach the clipping a heavy tail wants: at 4 bits on Student-t rows
#   the best ratio is 0.75-0.95, at 2-3 bits lower (qtool's mse search finds ~0.5 at 2 bits);
#   k-quants' +-1 level around min-max (ratios 0.94-1.07 at 4 bits) cannot clip that far;
# * the refit makes the error a smooth function of the ratio near its optimum, so a handful
#   of coarse ratios finds what ``--range mse`` needs 100 grid points for;
# * every candidate costs about one quantization pass, and the budget is ~3x min-max.
# Min-max itself is always a candidate (the exact qtool grid, refitted), so it is not listed.
DEFAULT_RATIOS: tuple[float, ...] = (0.9, 0.8, 0.7)
LOW_BIT_RATIOS: tuple[float, ...] = (0.85, 0.7, 0.55, 0.4)
# Requantize-and-refit rounds after the best candidate is chosen (Lloyd iterations): the
# refitted scale rounds some values to other integers, which a second refit can use.
DEFAULT_ROUNDS = 3

# Values per tile: each tile goes through every candidate while it is in the core's cache
# (a handful of temporaries of this size, ~1 MB in float32).
TILE_ELEMS = 1 << 17
# Rows no longer than this are processed transposed, (n, rows): numpy reduces a short inner
# axis row by row (~2 ns per value for a min over 32), but an outer axis with SIMD over the
# rows (~0.15 ns); the transposed copy costs ~0.7 ns once. Up to 2048 the transposed fit was
# measured as fast or faster than the long-row layout (fit_tile.py; 1M values: n = 512
# 0.018 s against 0.041 s, 1408: 0.020 against 0.027; 4096: 0.032 against 0.025), and its
# float32 sums run over at most 2048 values. The C kernel reproduces both layouts.
_TRANSPOSE_MAX_N = 2048


@dataclass(frozen=True)
class Fit:
    """The fitted parameters of every row, and what they cost.

    ``error`` is the weighted squared error ``sum(weight * (w_hat - x)**2)`` of the integers
    :func:`quantize_rows` produces with ``scale`` and ``zero_point`` (``w_hat`` computed as
    qtool dequantizes: ``(q - zero_point) * scale`` in the compute dtype); ``minmax_error`` is
    the same for qtool's min-max parameters. ``error <= minmax_error`` on every row.
    """

    scale: np.ndarray  # float32 (units,), finite, >= MIN_SCALE
    zero_point: np.ndarray  # int32 (units,), in [0, qmax]; 0 for the symmetric schemes
    error: np.ndarray  # float64 (units,)
    minmax_error: np.ndarray  # float64 (units,)


def limits(bits: int, scheme: str) -> tuple[int, int]:
    """(qmin, qmax) of a scheme at ``bits``, as in qtool.core.schemes.QuantSpec."""
    if scheme not in FIT_SCHEMES:
        raise ValueError(f"search fits {', '.join(FIT_SCHEMES)}; not {scheme!r}")
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer from 2 to 8, got {bits!r}")
    if scheme == "symmetric":
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def importance(x: np.ndarray) -> np.ndarray:
    """k-quants' weights for a (units, n) array, ``sqrt(mean(x**2)) + |x|`` per row, divided
    by the row's rms (a per-row constant changes no choice, and keeps sums in float32 range):
    ``1 + |x| / rms``. float64.

    Large values weigh up to several times more than small ones: their error counts more for
    the layer's output, and a fit that sacrifices them to the bulk (clipping too hard) is
    what hurts a real network most. The rms term keeps every weight positive (a zero value
    still has to stay near zero) and the weights scale-free.
    """
    x = np.asarray(x)
    rms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64) / max(x.shape[1], 1))
    with np.errstate(divide="ignore"):
        inv = np.where(rms > 0, 1.0 / rms, 0.0)
    # In float64: 1 / rms overflows float32 for rows of subnormal values.
    return 1.0 + np.abs(x).astype(np.float64) * inv[:, None]


def quantize_rows(
    x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, bits: int, scheme: str
) -> np.ndarray:
    """qtool's quantize formula, per row: ``clip(rint(x / scale) + zero_point, qmin, qmax)``.

    Computed in x's dtype with the scale cast to it, as qtool.core.schemes.quantize_values does, so
    the result is the q qtool stores for these parameters.
    """
    qmin, qmax = limits(bits, scheme)
    x = np.asarray(x)
    with np.errstate(over="ignore"):
        t = np.divide(x, np.asarray(scale, np.float32).astype(x.dtype)[:, None])
    np.rint(t, out=t)
    np.add(t, np.asarray(zero_point).astype(x.dtype)[:, None], out=t)
    return np.clip(t, qmin, qmax, out=t)


def fit_range(fit: Fit, bits: int, scheme: str) -> tuple[np.ndarray, np.ndarray]:
    """A ``(lo, hi)`` (float64) per row from which ``qtool.core.schemes.qparams`` computes exactly
    ``fit.scale`` and ``fit.zero_point`` (for use where the pipeline expects a range).

    qparams takes ``float32((hi - lo) / qmax)`` (asymmetric) or ``float32(max|.| / qmax)``
    as the scale and ``rint(-lo / scale)`` as the zero point; the float64 values below are
    within a few float64 ulps of ``scale * qmax``, far from a float32 rounding boundary, and
    ``-lo / scale`` is an integer up to float64 rounding. The tests check the round trip.
    """
    _, qmax = limits(bits, scheme)
    s = fit.scale.astype(np.float64)
    z = fit.zero_point.astype(np.float64)
    if scheme == "asymmetric":
        lo = -z * s
        return lo, lo + s * qmax
    if scheme == "symmetric-unsigned":
        return np.zeros_like(s), s * qmax
    return -s * qmax, s * qmax


def fit_search(
    w: np.ndarray,
    bits: int,
    scheme: str = "asymmetric",
    *,
    weighted: bool = False,
    ratios: tuple[float, ...] | None = None,
    rounds: int = DEFAULT_ROUNDS,
) -> Fit:
    """Fit each row's scale and zero point by weighted least squares over candidate grids.

    ``w`` is (units, n) float32 or float64 (the quantizer's compute dtype). ``weighted``
    uses :func:`importance` as weights, else all weights are 1 (plain squared error).
    ``ratios`` overrides the candidate clip ratios. Deterministic; memory is bounded by
    ``TILE_ELEMS`` temporaries (plus the output). Raises ValueError on NaN or inf.
    """
    qmin, qmax = limits(bits, scheme)
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"fit_search expects a 2-D (units, n) array, got shape {w.shape}")
    if w.dtype not in (np.float32, np.float64):
        raise TypeError(f"fit_search expects float32 or float64 values, got {w.dtype}")
    if ratios is None:
        ratios = LOW_BIT_RATIOS if bits <= 3 else DEFAULT_RATIOS
    units, n = w.shape
    out = Fit(np.ones(units, np.float32), np.zeros(units, np.int32),
              np.zeros(units, np.float64), np.zeros(units, np.float64))
    if units == 0 or n == 0:
        return out
    rows = max(1, TILE_ELEMS // n)
    for r0 in range(0, units, rows):
        r1 = min(units, r0 + rows)
        # Sums of values near the float32 limits overflow to inf: such a candidate's fit is
        # invalid (error inf) and an error sum is redone in float64; no warning is due.
        with np.errstate(over="ignore"):
            s, z, e, e0 = _fit_block(w[r0:r1], qmin, qmax, scheme, weighted, ratios, rounds)
        out.scale[r0:r1], out.zero_point[r0:r1] = s, z
        out.error[r0:r1], out.minmax_error[r0:r1] = e, e0
    return out


def _requant(tile: _Tile, s32: np.ndarray, zp: np.ndarray, qmin: int, qmax: int,
             out: np.ndarray) -> np.ndarray:
    """qtool's formula on a tile: clip(rint(x / scale) + zp, qmin, qmax), into ``out``."""
    np.divide(tile.x, tile.bc(s32), out=out)
    np.rint(out, out=out)
    if zp.any():
        np.add(out, tile.bc(zp), out=out)
    return np.clip(out, qmin, qmax, out=out)


def _wsums(tile: _Tile, q: np.ndarray, wq: np.ndarray, sums: np.ndarray) -> None:
    """Add sum(w q), sum(w q q), sum(w q x) of a tile to ``sums`` (3, r)."""
    if tile.wt is None:
        wq = q
    else:
        np.multiply(tile.wt, q, out=wq)
    sums[0] += tile.sum(wq)
    sums[1] += tile.dot(wq, q)
    sums[2] += tile.dot(wq, tile.x)


def _werr(tile: _Tile, q: np.ndarray, s32: np.ndarray, zp: np.ndarray, d: np.ndarray
          ) -> np.ndarray:
    """sum(w * (w_hat - x)**2) of a tile, w_hat = (q - zp) * scale as qtool dequantizes."""
    np.subtract(q, tile.bc(zp), out=d)
    np.multiply(d, tile.bc(s32), out=d)
    np.subtract(d, tile.x, out=d)
    e = tile.dot(d, d) if tile.wt is None else tile.dot(tile.wt * d, d)
    # A float32 square underflows below ~1e-23 and overflows above ~1e19: such rows are
    # summed again in float64 (rare; this error is what "never worse than min-max" rests on).
    redo = ~np.isfinite(e) | (e < 1e-30)
    if redo.any():
        d64 = d.astype(np.float64)
        if tile.wt is not None:
            d64 *= np.sqrt(tile.wt)
        e = np.where(redo, tile.dot(d64, d64), e)
    return e


def _lsq(sums: np.ndarray, g: np.ndarray, qmax: int, asym: bool
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best (scale, integer zp) for fixed integers q, and its weighted error (an upper bound
    of the error after requantizing: the formula picks each value's nearest level).

    ``sums`` = (Sq, Sqq, Sqx), ``g`` = (Sw, Swx, Swxx), all weighted, float64 (..., r).
    Asymmetric: the unconstrained fit x ~ s q + m has the 2x2 normal equations below; the
    offset is then rounded to an integer zero point in [0, qmax] (what qtool can store) and
    the scale refitted for it, which is again a 1-D least-squares problem. Symmetric: zp = 0
    and only the scale is fitted. Invalid fits (all q equal, s <= 0) get error inf.
    """
    sq, sqq, sqx = sums[..., 0, :], sums[..., 1, :], sums[..., 2, :]
    sw, swx, swxx = g

    def refit(zp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        suu = sqq - 2.0 * zp * sq + zp * zp * sw
        sux = sqx - zp * swx
        s = sux / suu
        err = swxx - sux * s
        ok = (suu > 0) & (s > 0) & np.isfinite(s) & np.isfinite(err)
        return np.where(ok, np.maximum(s, MIN_SCALE), 1.0), np.where(ok, err, np.inf)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if not asym:
            zp = np.zeros_like(sqq)
            s, err = refit(zp)
            return s, zp, err
        det = sw * sqq - sq * sq
        s = (sw * sqx - swx * sq) / det
        m = (sqq * swx - sq * sqx) / det
        # The error is a convex quadratic in the zero point (with the scale refitted), so the
        # best integer is one of the two around the continuous optimum: try both.
        z = np.where((det > 0) & (s > 0), -m / s, 0.0)
        z = np.where(np.isfinite(z), z, 0.0)
        z_lo = np.clip(np.floor(z), 0, qmax)
        z_hi = np.clip(z_lo + 1, 0, qmax)
        s_lo, e_lo = refit(z_lo)
        s_hi, e_hi = refit(z_hi)
    up = e_hi < e_lo
    return np.where(up, s_hi, s_lo), np.where(up, z_hi, z_lo), np.where(up, e_hi, e_lo)


def _grid(lo: np.ndarray, hi: np.ndarray, qmax: int, asym: bool
          ) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32) and zero point of a range, exactly as qtool.core.schemes.qparams computes
    them (lo <= 0 <= hi; symmetric: lo = -hi, unsigned: lo = 0)."""
    span = (hi - lo) / qmax if asym else hi / qmax
    s = np.where(span == 0, 1.0, np.maximum(span, MIN_SCALE)).astype(np.float32)
    z = np.clip(np.rint(-lo / s.astype(np.float64)), 0, qmax) if asym else np.zeros(lo.shape)
    return s, z


def _fit_block(x: np.ndarray, qmin: int, qmax: int, scheme: str, weighted: bool,
               ratios: tuple[float, ...], rounds: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    r, n = x.shape
    asym = scheme == "asymmetric"
    step = max(1, TILE_ELEMS // r) if r > 1 else TILE_ELEMS
    spans = [slice(c, min(n, c + step)) for c in range(0, n, step)]
    # The common case is one tile: prepared once (copy, weights) and reused in every phase.
    cached = _Tile(x, x.shape[1] <= _TRANSPOSE_MAX_N) if len(spans) == 1 else None
    inv_rms: np.ndarray | None = None  # known after phase 1; then tiles carry their weights

    def tiles() -> Iterator[_Tile]:
        for sp in spans:
            tile = cached if cached is not None else _Tile(x[:, sp], n <= _TRANSPOSE_MAX_N)
            if weighted and inv_rms is not None and tile.wt is None:
                # |x| / rms <= sqrt(n), but 1 / rms alone overflows float32 for rows of
                # subnormal values: the product is formed in float64, then narrowed.
                inv = inv_rms if tile.t else inv_rms[:, None]
                wt = np.abs(tile.x).astype(np.float64) * inv
                wt += 1.0
                tile.wt = wt.astype(tile.x.dtype)
            yield tile

    # Phase 1: the min-max range, and sum(x**2) for the weights.
    mn = np.full(r, np.inf)
    mx = np.full(r, -np.inf)
    sxx = np.zeros(r)
    for tile in tiles():
        mn = np.minimum(mn, tile.reduce(np.minimum))
        mx = np.maximum(mx, tile.reduce(np.maximum))
        sxx += tile.dot(tile.x, tile.x)
    if not np.all(np.isfinite(sxx) & ((sxx > 1e-30) | ((mn == 0) & (mx == 0)))):
        sxx = np.einsum("ij,ij->i", x, x, dtype=np.float64)  # float32 over/underflow
    bad = ~(np.isfinite(mn) & np.isfinite(mx))
    if bad.any():
        raise ValueError(f"cannot fit: {int(bad.sum())} row(s) contain NaN or inf")
    if asym:
        lo, hi = np.minimum(mn, 0.0), np.maximum(mx, 0.0)
    elif scheme == "symmetric":
        hi = np.maximum(mx, -mn)
        lo = -hi
    else:
        lo, hi = np.zeros(r), np.maximum(mx, 0.0)
    # qtool's min-max parameters.
    s0, z0 = _grid(lo, hi, qmax, asym)

    # Phase 2: every candidate grid on every tile while it is in cache. A candidate is qtool's
    # own grid for the min-max range shrunk about zero by a ratio (as ``--range mse`` tries),
    # rounded by qtool's formula; its integers then get the least-squares scale and zero
    # point, whose error can only be lower than the grid's own (the grid is one feasible
    # choice). Candidate 0 is min-max itself; its exact error e0 is measured: the guarantee.
    k = len(ratios) + 1
    sums = np.zeros((k, 3, r))
    g = np.zeros((3, r))  # Sw, Swx, Swxx
    e0 = np.zeros(r)
    grids = [(s0, z0)] + [_grid(lo * c, hi * c, qmax, asym) for c in ratios]
    with np.errstate(divide="ignore"):
        inv_rms = np.where(sxx > 0, 1.0 / np.sqrt(sxx / n), 0.0)
    for tile in tiles():
        xt = tile.x
        t = np.empty_like(xt)
        wq = np.empty_like(xt)
        if tile.wt is not None:
            wx = tile.wt * xt
            g[0] += tile.sum(tile.wt)
            g[1] += tile.sum(wx)
            g[2] += tile.dot(wx, xt)
        else:
            g[0] += xt.shape[0 if tile.t else 1]
            g[1] += tile.sum(xt)
            g[2] += tile.dot(xt, xt)
        for c, (sc, zc) in enumerate(grids):
            with np.errstate(over="ignore"):
                _requant(tile, sc, zc, qmin, qmax, t)
            _wsums(tile, t, wq, sums[c])
            if c == 0:
                e0 += _werr(tile, t, s0, z0, wq)
    s, zp, err = _lsq(sums, g, qmax, asym)
    # The best candidate per row (the first one on ties: min-max is candidate 0).
    best = np.argmin(err, axis=0)
    cols = np.arange(r)
    s, zp = s[best, cols], zp[best, cols]

    # Phase 3: requantize with the chosen parameters by qtool's formula and measure the
    # exact error; each round also refits the scale and zero point to the new integers.
    best_s, best_z, best_e = s0, z0, e0
    for i in range(rounds):
        last = i == rounds - 1
        s32 = s.astype(np.float32)
        e = np.zeros(r)
        rs = np.zeros((1, 3, r))
        for tile in tiles():
            t = np.empty_like(tile.x)
            wq = np.empty_like(tile.x)
            with np.errstate(over="ignore"):
                _requant(tile, s32, zp, qmin, qmax, t)
            if not last:  # the last round's integers need no refit
                _wsums(tile, t, wq, rs[0])
            e += _werr(tile, t, s32, zp, wq)
        better = e < best_e  # strict: min-max keeps every tie
        best_s = np.where(better, s32, best_s)
        best_z = np.where(better, zp, best_z)
        best_e = np.where(better, e, best_e)
        if not last:
            s, zp, _ = _lsq(rs, g, qmax, asym)
            s, zp = s[0], zp[0]
    return best_s, best_z.astype(np.int32), best_e, e0
