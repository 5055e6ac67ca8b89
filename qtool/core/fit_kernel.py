"""``--range search`` through the C kernel (``qtool/core/_fit.c``): the fit of
:mod:`qtool.core.fit`, with the same scales and zero points bit for bit, in one pass over the
values instead of about forty numpy calls per tile.

Which fits go through it: float32 or bfloat16 rows, unweighted (what ``--range search``
fits), units of at most 256 values (``fit._TRANSPOSE_MAX_N``): groups of up to 256, and
channels of rows that short. Longer units (per channel of long rows, per tensor) stay in
numpy: there fit.py sums each row with BLAS and einsum along it, whose summation order is
theirs (blocked, fused multiply-add where the CPU has it) and cannot be reproduced bit for
bit; numpy is also efficient on long rows, where the per-call overhead is spread over
thousands of values.

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
    return scheme in _SCHEMES and 1 <= unit_len <= F._TRANSPOSE_MAX_N


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
                                        F.DEFAULT_ROUNDS, out.scale, out.zero_point, out.error,
                                        out.minmax_error)
    if not finite:
        return None
    lo, hi = F.fit_range(out, spec.bits, spec.scheme)
    return out, lowest, lo.reshape(rows, -1), hi.reshape(rows, -1)


def fit_search_kernel(kernels: Any, x: np.ndarray, bits: int, scheme: str = "asymmetric"
                      ) -> F.Fit:
    """fit.fit_search(x, bits, scheme) of a float32 (units, n) array through the kernel
    (n <= 256). Raises ValueError on NaN or inf, as fit_search does."""
    x = np.ascontiguousarray(x, np.float32)
    units, n = x.shape
    if units == 0 or n == 0:
        return F.fit_search(x, bits, scheme)
    if not supported(n, scheme):
        raise ValueError(f"the kernel fits units of 1 to {F._TRANSPOSE_MAX_N} values under "
                         f"{', '.join(_SCHEMES)}; not {n} under {scheme!r}")
    spec = QuantSpec(scheme, bits, "group", n, range="search")
    got = fit_units(kernels, x, 0, units, n, n, spec)
    if got is None:
        raise ValueError("cannot fit: a row contains NaN or inf")
    return got[0]
