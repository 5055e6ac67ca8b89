"""``--range search`` through the C kernel (``_fit.c``, ``_fit_long.c``): the fit of
:mod:`qtool.core.fit`, with the same scales, zero points and errors bit for bit, in one pass
over the values per candidate instead of about forty numpy calls per tile.

Every unfitted (plain squared error) fit of float32 or bfloat16 values goes through it:
groups and channels (units of up to 2048 values, side by side in vector lanes, as fit.py's
transposed tiles; longer ones one at a time, in fit_tile.py's lanes) and the whole tensor.
The weighted fit (``fit_search(weighted=True)``, not used by the quantizer) and float64
tensors stay in numpy.

Numeric core: numpy in, numpy out, no files, no terminal.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qtool.core import fit as F
from qtool.core.schemes import QuantSpec

# Scheme codes of _fit.c.
_SCHEMES = {"asymmetric": 0, "symmetric": 1, "symmetric-unsigned": 2}


def supported(unit_len: int, scheme: str) -> bool:
    """Whether units of ``unit_len`` values under ``scheme`` are fitted by the kernel."""
    return scheme in _SCHEMES and unit_len >= 1


def fit_units(kernels: Any, raw: np.ndarray, src: int, rows: int, cols: int, group: int,
              spec: QuantSpec) -> tuple[F.Fit, float, np.ndarray, np.ndarray] | None:
    """fit_search of every unit of a C-contiguous (rows, cols) block in units of ``group``
    columns (the last unit of a row may be shorter), as fit.fit_search(units, spec.bits,
    spec.scheme) computes it: a Fit of (rows, units) arrays, flattened row-major, the
    smallest value of the block, and the fit's (lo, hi) ranges (fit.fit_range) as (rows,
    units) arrays. ``raw`` is float32 (src 0) or bfloat16 bits as uint16 (src 1). None if
    the kernel does not fit these units (see :func:`supported`) or the block holds NaN or
    inf: numpy then does the work, and reports those values."""
    g = min(group, cols)
    if not supported(g, spec.scheme):
        return None
    qmin, qmax = F.limits(spec.bits, spec.scheme)
    ratios = F.LOW_BIT_RATIOS if spec.bits <= 3 else F.DEFAULT_RATIOS
    units = rows * (-(-cols // g))
    out = F.Fit(np.empty(units, np.float32), np.empty(units, np.int32),
                np.empty(units, np.float64), np.empty(units, np.float64))
    finite, lowest = kernels.fit_search(raw, src, rows, cols, g, _SCHEMES[spec.scheme],
                                        float(qmin), float(qmax), tuple(map(float, ratios)),
                                        F.DEFAULT_ROUNDS, F.TILE_ELEMS, out.scale, out.zero_point,
                                        out.error, out.minmax_error)
    if not finite:
        return None
    lo, hi = F.fit_range(out, spec.bits, spec.scheme)
    return out, lowest, lo.reshape(rows, -1), hi.reshape(rows, -1)


def ranges(kernels: Any, x: np.ndarray, spec: QuantSpec
           ) -> tuple[np.ndarray, np.ndarray] | None:
    """The ``--range search`` ranges of a (rows, cols) block in compute dtype as the numpy
    path finds them (blocks._ranges_or_nonfinite: (1,) arrays per tensor, (rows, units) per
    channel or group), through the kernel; None where numpy does it (no kernel, another
    range, not contiguous float32, empty, NaN or inf). E.g. float16 values widened by the
    caller, which the quantizing kernel does not take, still get the C fit."""
    if kernels is None or spec.range != "search" or x.dtype != np.float32 or \
            not x.flags.c_contiguous or x.size == 0 or x.ndim != 2:
        return None
    rows, cols = (1, x.size) if spec.granularity == "tensor" else x.shape
    g = spec.group_size if spec.granularity == "group" else cols
    got = fit_units(kernels, x, 0, rows, cols, g, spec)
    if got is None:
        return None
    lo, hi = got[2], got[3]
    return (lo.reshape(-1), hi.reshape(-1)) if spec.granularity == "tensor" else (lo, hi)


def fit_search_kernel(kernels: Any, x: np.ndarray, bits: int, scheme: str = "asymmetric"
                      ) -> F.Fit:
    """fit.fit_search(x, bits, scheme) of a float32 (units, n) array through the kernel.
    Raises ValueError on NaN or inf, as fit_search does."""
    x = np.ascontiguousarray(x, np.float32)
    units, n = x.shape
    if units == 0 or n == 0:
        return F.fit_search(x, bits, scheme)
    if not supported(n, scheme):
        raise ValueError(f"the kernel fits {', '.join(_SCHEMES)}; not {scheme!r}")
    spec = QuantSpec(scheme, bits, "group", n, range="search")
    got = fit_units(kernels, x, 0, units, n, n, spec)
    if got is None:
        raise ValueError("cannot fit: a row contains NaN or inf")
    return got[0]
