"""The report of `qtool report QUANTIZED --against ORIGINAL` (pipeline/against.py): the
records as measured, with the bytes each tensor really occupies in QUANTIZED (for a
compressed-tensors folder: its int32 words, scales and zero points)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from qtool.formats.manifest import TensorRecord
from qtool.report.energy import EnergyModel, Workload
from qtool.report.model import Report, Row


def against_report(path: str | Path, records: Sequence[TensorRecord], original: str | Path,
                   *, energy_model: EnergyModel | None = None,
                   fail_under_sqnr: float | None = None,
                   max_error: float | None = None,
                   workload: Workload | None = None,
                   fail_under_total_sqnr: float | None = None,
                   exclude: tuple[str, ...] = ()) -> Report:
    rows = [Row(r.name, r.dtype, tuple(r.shape), [r]) for r in records]
    return Report("artifact", str(path), ["artifact"], [None], rows, "original",
                  original=str(original), energy_model=energy_model or EnergyModel(),
                  fail_under_sqnr=fail_under_sqnr, max_error=max_error,
                  workload=workload or Workload(),
                  fail_under_total_sqnr=fail_under_total_sqnr, exclude=tuple(exclude))
