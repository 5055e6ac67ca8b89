"""The report of `qtool report QUANTIZED --against ORIGINAL` (pipeline/against.py): the
records as measured, with the bytes each tensor really occupies in QUANTIZED (for a
compressed-tensors folder: its int32 words, scales and zero points)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from qtool.formats.manifest import TensorRecord
from qtool.report.model import Report, ReportOptions, Row


def against_report(path: str | Path, records: Sequence[TensorRecord], original: str | Path,
                   *, options: ReportOptions | None = None) -> Report:
    rows = [Row(r.name, r.dtype, tuple(r.shape), [r]) for r in records]
    return Report("artifact", str(path), ["artifact"], [None], rows, "original",
                  original=str(original), **(options or ReportOptions()).report_fields())
