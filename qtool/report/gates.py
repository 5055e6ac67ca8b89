"""The CI thresholds of `qtool report`: which quantized tensors (or totals) miss them."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qtool.core.metrics import ErrorStats
from qtool.report.fmt import _fmt_sqnr

if TYPE_CHECKING:
    from qtool.report.model import Row


@dataclass(frozen=True)
class Offender:
    """A quantized tensor that misses a CI threshold."""

    name: str
    label: str | None  # the dry-run scheme; None for an artifact
    metric: str  # "sqnr_db", "max_abs_error" or "total_sqnr_db" (name is "" then)
    value: float
    limit: float

    def message(self) -> str:
        if self.metric == "total_sqnr_db":
            where = "total" + (f" ({self.label})" if self.label else "")
            return (f"{where}: SQNR {_fmt_sqnr(self.value)} dB over the gated tensors is "
                    f"below --fail-under-total-sqnr {self.limit:g}")
        where = f"tensor {self.name!r}" + (f" ({self.label})" if self.label else "")
        if self.metric == "sqnr_db":
            return (f"{where}: SQNR {_fmt_sqnr(self.value)} dB is below "
                    f"--fail-under-sqnr {self.limit:g}")
        return (f"{where}: max abs error {self.value:.6g} is above --max-error "
                f"{self.limit:g}")


def check_gates(rows: Sequence[Row], labels: list[str | None], fail_under_sqnr: float | None,
                max_error: float | None, fail_under_total_sqnr: float | None,
                exclude: tuple[str, ...]) -> list[Offender]:
    """Every threshold missed, per tensor (in row order) then per group's total. Rows whose
    name matches a glob of ``exclude`` are left out of all of them (the total too)."""
    out: list[Offender] = []
    merged = [ErrorStats() for _ in labels]
    for r in rows:
        if any(fnmatch.fnmatchcase(r.name, g) for g in exclude):
            continue
        for i, (label, rec) in enumerate(zip(labels, r.results, strict=True)):
            if rec.stats is None:
                continue
            merged[i] = merged[i].merge(rec.stats)
            sqnr = rec.stats.sqnr_db
            if fail_under_sqnr is not None and sqnr < fail_under_sqnr:
                out.append(Offender(r.name, label, "sqnr_db", sqnr, fail_under_sqnr))
            err = rec.stats.max_abs_error
            if max_error is not None and err > max_error:
                out.append(Offender(r.name, label, "max_abs_error", err, max_error))
    if fail_under_total_sqnr is not None:
        for label, st in zip(labels, merged, strict=True):
            # No gated quantized tensor: nothing to judge (the per-tensor gates agree).
            if st.count and st.sqnr_db < fail_under_total_sqnr:
                out.append(Offender("", label, "total_sqnr_db", st.sqnr_db,
                                    fail_under_total_sqnr))
    return out
