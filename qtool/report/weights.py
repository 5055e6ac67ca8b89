"""Histograms of the worst tensors' weights with their quantization grid, for the HTML report.

The values come from the original checkpoint when the report has one (a dry run: PATH
itself; an artifact with --original or --against: that file), quantized again with the
tensor's recorded spec to get its grid (quantizing is deterministic: the same scales as the
artifact's). For an artifact alone they are its dequantized values, which lie on the grid;
the page says which. One range unit is drawn, the one with the largest |w| (its grid is the
coarsest): the whole tensor (per-tensor), that row (per-channel) or that group (per-group).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qtool.core.quant import dequantize, quantize
from qtool.core.shapes import compute_dtype, rows_cols
from qtool.formats._common import DTYPES, CheckpointError
from qtool.formats.manifest import TensorRecord
from qtool.formats.safetensors import SafetensorsFile
from qtool.formats.shards import open_checkpoint
from qtool.report.model import Report

BINS = 80
WORST = 3
SAMPLE = 1 << 20  # values histogrammed at most per tensor (an even stride through the unit)


@dataclass(frozen=True)
class Histogram:
    name: str
    sqnr_db: float
    source: str  # "original weights" or "dequantized values"
    unit: str  # "whole tensor", "row 12 of 64", "row 12, group 3 of 8"
    edges: list[float]  # BINS + 1
    counts: list[int]  # BINS
    grid: list[float]  # the representable values (scale · (q − zero point)) in the range
    levels: int  # 2^bits, or 255 for gnmt
    clipped: int  # values beyond the grid's ends


def worst_records(report: Report, k: int = WORST) -> list[TensorRecord]:
    """The k quantized tensors of the first group with the lowest SQNR (checkpoint order
    breaks ties)."""
    recs = [r.results[0] for r in report.rows if r.results[0].stats is not None]
    recs.sort(key=lambda rec: rec.stats.sqnr_db if rec.stats else math.inf)
    return recs[:k]


def histograms(report: Report, original: str | Path | None = None,
               k: int = WORST) -> tuple[list[Histogram], str | None]:
    """The histograms of the worst ``k`` tensors, and a note when they cannot be drawn (a
    folder qtool cannot read tensors from, say): the rest of the page does not need them."""
    worst = worst_records(report, k)
    if not worst:
        return [], None
    src = report.path if report.kind == "dry-run" else (original or report.original)
    try:
        if src is not None:
            return [_from_original(Path(src), rec) for rec in worst], None
        return [_from_artifact(Path(report.path), rec) for rec in worst], None
    except (CheckpointError, OSError, KeyError, ValueError) as e:
        return [], f"histograms not drawn: {' '.join(str(e).split())[:200]}"


def _from_original(src: Path, rec: TensorRecord) -> Histogram:
    ckpt = open_checkpoint(src)
    info = next((t for t in ckpt.tensors() if t.name == rec.name), None)
    if info is None:
        raise CheckpointError(f"{src}: no tensor {rec.name!r}")
    assert rec.spec is not None and rec.stats is not None
    with SafetensorsFile(info.path) as f:
        w = np.array(f.read(info))
    qt = quantize(w, rec.spec)
    return _histogram(rec, w, qt.scale, qt.zero_point, "original weights")


def _from_artifact(root: Path, rec: TensorRecord) -> Histogram:
    from qtool.pipeline.dequantize import open_source

    assert rec.spec is not None
    reader = open_source(root).open_shard(rec.file)
    try:
        t = reader.read(rec)
        rows, _ = rows_cols(rec.shape)
        assert t.scale is not None and t.zero_point is not None
        cdt = compute_dtype(DTYPES[rec.dtype])
        w = dequantize(np.array(t.rows(0, rows)), t.scale, t.zero_point, rec.shape, rec.spec,
                       cdt, cdt)
        return _histogram(rec, w, t.scale, t.zero_point,
                          "dequantized values (on the grid; pass --original to see the "
                          "original weights)")
    finally:
        reader.close()


def _param(a: np.ndarray, rows: int, r: int, g: int) -> float:
    """One range unit's scale or zero point; ``a`` may be 0-d (one for the tensor)."""
    a = np.asarray(a, np.float64)
    if a.size == 1:
        return float(a.reshape(-1)[0])
    return float(a.reshape(rows, -1)[r, g])


def _histogram(rec: TensorRecord, w: np.ndarray, scale: np.ndarray, zero: np.ndarray,
               source: str) -> Histogram:
    spec = rec.spec
    assert spec is not None and rec.stats is not None
    rows, cols = rows_cols(rec.shape)
    w2 = np.asarray(w, np.float64).reshape(rows, cols)
    r = g = 0
    if spec.granularity == "tensor":
        values, unit = w2.reshape(-1), "whole tensor"
    else:
        flat = int(np.argmax(np.abs(w2)))
        r, c = divmod(flat, cols)
        if spec.granularity == "channel":
            values, unit = w2[r], f"row {r} of {rows} (the one with the largest |w|)"
        else:
            g = c // spec.group_size
            values = w2[r, g * spec.group_size:(g + 1) * spec.group_size]
            groups = -(-cols // spec.group_size)
            unit = f"row {r}, group {g} of {groups} (the one with the largest |w|)"
    if values.size > SAMPLE:
        values = values[::math.ceil(values.size / SAMPLE)]
    s, z = _param(scale, rows, r, g), _param(zero, rows, r, g)
    grid = [(q - z) * s for q in range(spec.qmin, spec.qmax + 1)]
    lo = min(float(values.min()), grid[0]) if values.size else grid[0]
    hi = max(float(values.max()), grid[-1]) if values.size else grid[-1]
    if hi <= lo:
        hi = lo + 1.0
    counts, edges = np.histogram(values, bins=BINS, range=(lo, hi))
    clipped = int(np.count_nonzero((values < grid[0] - s / 2) | (values > grid[-1] + s / 2)))
    return Histogram(rec.name, rec.stats.sqnr_db, source, unit, [float(e) for e in edges],
                     [int(n) for n in counts], grid, spec.qmax - spec.qmin + 1, clipped)
