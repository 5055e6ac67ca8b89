"""The tiles of :mod:`qtool.core.fit`: a piece of a block in the layout whose per-row sums
numpy computes fast *and in an order the C kernel (``_fit.c``) reproduces bit for bit*.

* Short rows (fit.py's ``_TRANSPOSE_MAX_N``) are copied transposed, (n, r): a sum over the
  outer axis is numpy's ``out[j] = out[j] + a[i, j]`` for i = 0, 1, ... (a single row gets a
  twin column: of one column numpy would sum pairwise).
* Long rows stay (r, n) and are summed in LANES lanes: value i goes to lane i % LANES, each
  lane summed in order over the row ((r, m, LANES) summed over its middle axis, the values
  past m * LANES then added to the first lanes); the lanes, in float64, are then summed the
  same way into 8 (lane j to j % 8), and those 8 added up in order (a cumulative sum, which
  is sequential by definition). Not BLAS or einsum along the row: their order is their own
  (blocked, fused multiply-add where the CPU has it). The 8-way step lets the C kernel add
  the lanes up with eight independent chains instead of one of 256 additions.

Numeric core: numpy only.
"""

from __future__ import annotations

import numpy as np

# Lanes of a long row's sums: enough that numpy's inner loop over them is long (a reduction
# whose inner loop is 8 values long is ~8x slower), few enough to stay in L1 in C.
LANES = 256


def lane_sum(p: np.ndarray) -> np.ndarray:
    """Per-row sums of a (r, c) array in the lane order above, float64 (r,)."""
    r, c = p.shape
    m = c // LANES
    if m:
        lanes = p[:, : m * LANES].reshape(r, m, LANES).sum(axis=1)
    else:
        lanes = np.zeros((r, LANES), p.dtype)
    t = c - m * LANES
    if t:
        lanes[:, :t] += p[:, m * LANES :]
    # The 8-way step on the lanes transposed, (LANES, r): numpy's inner loop then runs over
    # the rows, not over 8 values (~10x faster for a tile of many short rows).
    eight = lanes.T.astype(np.float64, order="C").reshape(LANES // 8, 8 * r).sum(axis=0)
    return np.cumsum(eight.reshape(8, r), axis=0)[-1]


class Tile:
    """A (rows, cols) piece of the block in the layout its reductions are fast in.

    Per-row vectors are broadcast with :meth:`bc`, per-row sums taken with :meth:`sum` /
    :meth:`dot` (in the tile's dtype, over at most fit.TILE_ELEMS values, then added up in
    float64 across tiles). ``transposed``: the short-row layout.
    """

    def __init__(self, x: np.ndarray, transposed: bool) -> None:
        self.t = transposed
        self.r = x.shape[0]
        xt = np.repeat(x.T, 2, axis=1) if self.t and self.r == 1 else x.T
        self.x = np.ascontiguousarray(xt) if self.t else x
        self.wt: np.ndarray | None = None  # the weights, once known

    def bc(self, v: np.ndarray) -> np.ndarray:
        v = v.astype(self.x.dtype, copy=False)
        return v if self.t else v[:, None]

    def sum(self, a: np.ndarray) -> np.ndarray:
        return a.sum(axis=0)[: self.r].astype(np.float64) if self.t else lane_sum(a)

    def dot(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        if self.t:
            return np.einsum("ij,ij->j", a, b)[: self.r].astype(np.float64)
        return lane_sum(a * b)  # the products rounded, then summed: no fused multiply-add

    def reduce(self, op: np.ufunc) -> np.ndarray:
        return (op.reduce(self.x, axis=0)[: self.r] if self.t
                else op.reduce(self.x, axis=1)).astype(np.float64)
