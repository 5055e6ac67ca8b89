"""Error statistics of a quantized tensor, accumulated block by block.

Numeric core: numpy in, plain numbers out. Sums are kept in float64 and merged in a fixed
order, so the figures are identical whatever the number of worker threads.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class ErrorStats:
    """Sufficient statistics for MSE, SQNR, max error and cosine similarity.

    ``cross`` is sum(w * (w_hat - w)); with it, sum(w * w_hat) and sum(w_hat ** 2) follow
    without a second pass and without the cancellation of subtracting two large sums.
    """

    count: int = 0
    signal_sq: float = 0.0
    error_sq: float = 0.0
    cross: float = 0.0
    max_abs_error: float = 0.0

    @classmethod
    def of(cls, w: np.ndarray, err: np.ndarray) -> ErrorStats:
        """Statistics of one block: ``w`` the original values, ``err`` = w_hat - w (same shape).

        Sums are taken in the arrays' dtype (float32 blocks: as BLAS computes them) with
        np.dot, which, unlike np.inner or np.vecdot, lets go of the GIL while it sums (two
        threads ran 1.9x as fast as one). The pipeline runs OpenBLAS single-threaded, so the
        sums do not depend on its thread count. A float32 sum of squares that overflows (values
        near the float32 limit) is redone in float64.
        """
        w1 = w.reshape(-1)
        e1 = err.reshape(-1)
        if e1.size == 0:
            return cls()
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is redone below
            stats = cls._sums(w1, e1)
        if math.isfinite(stats.signal_sq) and math.isfinite(stats.error_sq):
            return stats
        return cls._sums(w1.astype(np.float64), e1.astype(np.float64))

    @classmethod
    def _sums(cls, w1: np.ndarray, e1: np.ndarray) -> ErrorStats:
        return cls(
            count=int(w1.size),
            signal_sq=float(np.dot(w1, w1)),
            error_sq=float(np.dot(e1, e1)),
            cross=float(np.dot(w1, e1)),
            max_abs_error=float(max(e1.max(), -e1.min())),
        )

    @classmethod
    def between(cls, w: np.ndarray, w_hat: np.ndarray) -> ErrorStats:
        w64 = np.asarray(w, dtype=np.float64)
        return cls.of(w64, np.asarray(w_hat, dtype=np.float64) - w64)

    def merge(self, other: ErrorStats) -> ErrorStats:
        return ErrorStats(
            self.count + other.count,
            self.signal_sq + other.signal_sq,
            self.error_sq + other.error_sq,
            self.cross + other.cross,
            max(self.max_abs_error, other.max_abs_error),
        )

    @property
    def mse(self) -> float:
        return self.error_sq / self.count if self.count else 0.0

    @property
    def sqnr_db(self) -> float:
        """10 log10(sum w^2 / sum err^2); +inf for an exact round trip (never NaN)."""
        if self.error_sq == 0.0:
            return math.inf
        if self.signal_sq == 0.0:
            return -math.inf
        return 10.0 * math.log10(self.signal_sq / self.error_sq)

    @property
    def cosine(self) -> float:
        """cos(w, w_hat); 1.0 when both are all zero, 0.0 when only one is."""
        dot = self.signal_sq + self.cross
        recon_sq = max(self.signal_sq + 2.0 * self.cross + self.error_sq, 0.0)
        if self.error_sq == 0.0:
            return 1.0  # an exact round trip (w_hat == w), all-zero tensors included
        if self.signal_sq == 0.0 or recon_sq == 0.0:
            return 0.0
        # Two square roots: the product of two tiny sums could underflow to 0.
        denom = math.sqrt(self.signal_sq) * math.sqrt(recon_sq)
        if denom == 0.0:
            return 1.0 if dot > 0 else 0.0
        return max(-1.0, min(1.0, dot / denom))

    def to_dict(self) -> dict[str, float | int | None]:
        d: dict[str, float | int | None] = dict(asdict(self))
        sqnr = self.sqnr_db
        d.update(mse=self.mse, sqnr_db=None if math.isinf(sqnr) else sqnr, cosine=self.cosine)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ErrorStats:
        """Statistics as ``to_dict`` wrote them. The dict may come from a hostile manifest:
        anything but a count >= 0 and finite sums (>= 0 where they are sums of squares)
        raises ValueError, so that no NaN or infinity reaches the figures derived here."""
        count = d["count"]
        if type(count) is not int or count < 0:
            raise ValueError(f"count must be an integer >= 0, not {count!r:.40}")
        values = []
        for key in ("signal_sq", "error_sq", "cross", "max_abs_error"):
            v = d[key]
            # bool is an int; a string would be converted by float() without complaint.
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) \
                    or (key != "cross" and v < 0):
                raise ValueError(f"{key} must be a finite number"
                                 f"{'' if key == 'cross' else ' >= 0'}, not {v!r:.40}")
            values.append(float(v))
        return cls(count, *values)


def sqnr_db(w: np.ndarray, w_hat: np.ndarray) -> float:
    return ErrorStats.between(w, w_hat).sqnr_db
