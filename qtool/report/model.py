"""Presentation: turns pipeline results into Rich renderables and JSON/CSV/Markdown strings.

Nothing here prints; the CLI does.

`qtool report` builds one :class:`Report` from per-tensor :class:`TensorRecord`s (from an
artifact's manifest, from a new measurement against the original, or from a dry run of one or
more schemes over a plain checkpoint) and renders it as a Rich table, JSON (docs/REPORT.md),
CSV or Markdown. The exit code for CI (:attr:`Report.exit_code`) is computed here from the
data, so every output format agrees with it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, overload

from qtool.core.metrics import ErrorStats
from qtool.core.schemes import QuantSpec
from qtool.core.shapes import stored_bytes
from qtool.formats._common import DTYPES, CheckpointError
from qtool.formats.manifest import TensorRecord
from qtool.formats.safeio import read_capped
from qtool.report.energy import (
    EnergyEstimate,
    EnergyModel,
    EnergyModelError,
    TensorCost,
    Workload,
    estimate,
)
from qtool.report.fmt import _gran
from qtool.report.gates import Offender, check_gates

SCHEMA_VERSION = 1
FORMATS = ("table", "json", "csv", "markdown", "html")
SORT_KEYS = ("name", "sqnr", "error", "size")
# Without --fail-under-sqnr, the table colours SQNR below these (dB) red and yellow: at 20 dB
# the error's energy is 1 % of the signal's, at 30 dB 0.1 %.
SQNR_RED_DB = 20.0
SQNR_YELLOW_DB = 30.0
ENERGY_MODEL_SIZE_LIMIT = 1_000_000  # bytes; a model file is a dozen numbers
NAME_MIN_WIDTH = 20  # the tensor-name column never gets narrower than this in the table
BEST = "★"

class ReportError(CheckpointError):
    """Bad input to the report (exit 2): a malformed energy model, a manifest without
    metrics, options that do not apply to the given PATH."""


# --------------------------------------------------------------------------- energy model file


def load_energy_model(path: str | Path) -> EnergyModel:
    """The figures of ``--energy-model FILE.json`` (see docs/ENERGY.md); ReportError naming
    the file when it cannot be read or is malformed."""
    p = Path(path)
    # Non-blocking and regular files only: a FIFO must not hang the report.
    raw = read_capped(p, ENERGY_MODEL_SIZE_LIMIT, "energy model", error=ReportError)
    try:
        # parse_constant: NaN/Infinity are not JSON, and not energy figures either.
        doc = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except RecursionError:
        raise ReportError(f"{p}: energy model is not valid JSON (nested too deeply)") from None
    except ValueError as e:
        raise ReportError(f"{p}: energy model is not valid JSON ({str(e):.80})") from None
    try:
        return EnergyModel.from_dict(doc)
    except EnergyModelError as e:
        raise ReportError(f"{p}: bad energy model: {e}") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


# --------------------------------------------------------------------------- the report data


@dataclass(slots=True)  # no per-row __dict__: a report may have 200,000 rows
class Row:
    """One tensor: its record under each group (the artifact, or each dry-run scheme)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    results: list[TensorRecord]
    best: int | None = None  # index of the best group (dry run of two or more schemes)

    @property
    def parameters(self) -> int:
        return math.prod(self.shape)

    @property
    def original_bytes(self) -> int:
        return self.results[0].original_bytes


class RecordRows(Sequence[Row]):
    """An artifact's rows, made from its records when asked for: one Row held per tensor
    cost ~150 bytes a tensor (30 MB for 200,000) beside the records themselves. Each access
    makes a new Row of one record; sorting or slicing gives another RecordRows."""

    __slots__ = ("records",)

    def __init__(self, records: list[TensorRecord]) -> None:
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    @overload
    def __getitem__(self, i: int) -> Row: ...
    @overload
    def __getitem__(self, i: slice) -> RecordRows: ...
    def __getitem__(self, i: int | slice) -> Row | RecordRows:
        if isinstance(i, slice):
            return RecordRows(self.records[i])
        return _row(self.records[i])

    def __iter__(self) -> Iterator[Row]:
        return map(_row, self.records)

    def sorted(self, key: Callable[[Row], Any]) -> RecordRows:
        return RecordRows(sorted(self.records, key=lambda rec: key(_row(rec))))


def _row(rec: TensorRecord) -> Row:
    return Row(rec.name, rec.dtype, tuple(rec.shape), [rec])


def bits_per_weight(rec: TensorRecord) -> float | None:
    """8 × stored bytes / weights (integers, scales and zero points all counted); a kept
    tensor: its dtype's width. None for an empty tensor. The one place the report computes
    it (core.shapes.bits_per_weight gives the same for a spec; this takes what is stored)."""
    n = math.prod(rec.shape)
    return 8.0 * rec.stored_bytes / n if n else None


@dataclass(frozen=True)
class Worst:
    name: str
    sqnr_db: float
    max_abs_error: float


@dataclass
class Totals:
    """One group's totals over every tensor (passthrough ones included in the bytes)."""

    tensors: int
    quantized: int
    bytes_before: int
    bytes_after: int
    stats: ErrorStats  # merged over the quantized tensors
    worst: Worst | None
    weights: int = 0  # parameters of every tensor
    quantized_weights: int = 0  # parameters of the quantized tensors
    quantized_bytes: int = 0  # what the quantized tensors occupy: integers + scales + zero points

    @property
    def bits_per_weight(self) -> float | None:
        """8 x stored bytes / weights over the quantized tensors (sidecars included)."""
        return 8.0 * self.quantized_bytes / self.quantized_weights if self.quantized_weights \
            else None

    @property
    def bits_per_weight_all(self) -> float | None:
        """The same over every tensor, those kept in float included."""
        return 8.0 * self.bytes_after / self.weights if self.weights else None

    @property
    def passthrough(self) -> int:
        return self.tensors - self.quantized

    @property
    def ratio(self) -> float | None:
        return self.bytes_before / self.bytes_after if self.bytes_after else None

    @property
    def saved(self) -> int:
        return self.bytes_before - self.bytes_after

    @property
    def saved_percent(self) -> float | None:
        return 100.0 * self.saved / self.bytes_before if self.bytes_before else None


@dataclass
class Report:
    """Everything `qtool report` shows; built once, then rendered in any format."""

    kind: str  # "artifact" or "dry-run"
    path: str
    labels: list[str]  # one per group: "artifact", or the scheme of each dry run
    specs: list[QuantSpec | None]  # the dry run's spec per group; None for an artifact
    rows: Sequence[Row]  # a list (dry run) or RecordRows (an artifact's, made when read)
    metrics_from: str  # "manifest", "original" or "dry-run"
    original: str | None = None
    energy_model: EnergyModel = field(default_factory=EnergyModel)
    fail_under_sqnr: float | None = None
    max_error: float | None = None
    # The SQNR of all gated tensors together (their error statistics merged), and globs of
    # tensor names left out of every threshold (still shown).
    fail_under_total_sqnr: float | None = None
    exclude: tuple[str, ...] = ()
    disk: tuple[int, int] | None = None  # an artifact's file bytes: source, artifact
    workload: Workload = field(default_factory=Workload)
    totals: list[Totals] = field(init=False)
    energy: list[EnergyEstimate] = field(init=False)
    offenders: list[Offender] = field(init=False)

    def __post_init__(self) -> None:
        self.totals = [self._totals(i) for i in range(len(self.labels))]
        lookup = [self.workload.is_lookup(r.name, r.shape) for r in self.rows]
        self.energy = [
            estimate(self.energy_model, (
                TensorCost(r.dtype, r.parameters, r.results[i].original_bytes,
                           r.results[i].stored_bytes, r.results[i].quantized,
                           r.shape[0] if lk else None)
                for r, lk in zip(self.rows, lookup, strict=True)), self.workload)
            for i in range(len(self.labels))
        ]
        if self.kind == "dry-run" and len(self.labels) > 1:
            for r in self.rows:
                r.best = _best(r.results)
        self.offenders = self._check()

    @property
    def exit_code(self) -> int:
        """0: every threshold holds (or none was given); 1: some tensor misses one."""
        return 1 if self.offenders else 0

    def _totals(self, i: int) -> Totals:
        stats = ErrorStats()
        worst: Worst | None = None
        quantized = before = after = weights = q_weights = q_bytes = 0
        for r in self.rows:  # one pass, nothing kept per row (rows may be made on the fly)
            rec = r.results[i]
            before += rec.original_bytes
            after += rec.stored_bytes
            n = r.parameters
            weights += n
            if rec.quantized:
                q_weights += n
                q_bytes += rec.stored_bytes
            if rec.stats is None:
                continue
            quantized += 1
            stats = stats.merge(rec.stats)
            s = rec.stats
            if worst is None or (s.sqnr_db, -s.max_abs_error) < (worst.sqnr_db,
                                                                   -worst.max_abs_error):
                worst = Worst(r.name, s.sqnr_db, s.max_abs_error)
        return Totals(
            tensors=len(self.rows), quantized=quantized, bytes_before=before,
            bytes_after=after, stats=stats, worst=worst, weights=weights,
            quantized_weights=q_weights, quantized_bytes=q_bytes,
        )

    def _check(self) -> list[Offender]:
        return check_gates(self.rows, self._offender_labels(), self.fail_under_sqnr,
                           self.max_error, self.fail_under_total_sqnr, self.exclude)

    def _offender_labels(self) -> list[str | None]:
        return [None] * len(self.labels) if self.kind == "artifact" else list(self.labels)

    def sorted_rows(self, sort: str | None = None, top: int | None = None) -> Sequence[Row]:
        """The rows to show: in checkpoint order, or sorted (worst first for sqnr and error,
        largest first for size; a dry run sorts by its first scheme), then the first ``top``."""
        key: Callable[[Row], Any] | None = None
        if sort == "name":
            key = _by_name
        elif sort == "sqnr":
            # Tensors kept in float have no SQNR: they go last.
            key = _by_sqnr
        elif sort == "error":
            key = _by_error
        elif sort == "size":
            key = _by_size
        elif sort is not None:
            raise ReportError(f"unknown sort key {sort!r}; choose one of {', '.join(SORT_KEYS)}")
        rows = self.rows
        if key is not None:  # sorted stably: equal keys keep checkpoint order
            rows = rows.sorted(key) if isinstance(rows, RecordRows) else sorted(rows, key=key)
        return rows[:top] if top is not None else rows


def _by_name(r: Row) -> Any:
    return r.name


def _by_sqnr(r: Row) -> Any:
    return (0, r.results[0].stats.sqnr_db) if r.results[0].stats else (1, 0.0)


def _by_error(r: Row) -> Any:
    return (0, -r.results[0].stats.max_abs_error) if r.results[0].stats else (1, 0.0)


def _by_size(r: Row) -> Any:
    return -r.original_bytes


def _best(results: list[TensorRecord]) -> int | None:
    """The group with the highest SQNR for this tensor (ties: fewer stored bytes, then the
    first given); None when no group quantized it."""
    cands = [(-rec.stats.sqnr_db, rec.stored_bytes, i) for i, rec in enumerate(results)
             if rec.stats is not None]
    return min(cands)[2] if cands else None


def _check_records(records: Sequence[TensorRecord], where: str) -> None:
    """What the report relies on in a manifest that may be damaged or hostile: metrics for
    every quantized tensor (ErrorStats.from_dict has made sure they are finite), with sums
    that do not overflow. ReportError naming the manifest and the tensor otherwise."""
    signal = error = 0.0
    for rec in records:
        if not rec.quantized:
            continue
        if rec.stats is None:
            raise ReportError(
                f"{where}: tensor {rec.name!r:.80} has no metrics; pass --original FILE to "
                "measure them"
            )
        signal += rec.stats.signal_sq
        error += rec.stats.error_sq
    if not (math.isfinite(signal) and math.isfinite(error)):
        raise ReportError(f"{where}: the metrics' sums overflow; they are not plausible")


def _with_real_bytes(rec: TensorRecord) -> TensorRecord:
    """The record with its byte counts computed from its dtype and shapes, which the
    artifact's cheap checks have matched against the files: what is really stored, whatever
    the manifest's ``bytes`` says."""
    original = math.prod(rec.shape) * DTYPES[rec.dtype].itemsize
    if rec.spec is None:
        stored = original
    else:
        if rec.format_version == 1:
            # integers are one byte each (packed below 8 bits); scales F32, zero points I32
            stored = math.prod(rec.stored_shape) + 8 * math.prod(rec.param_shape)
        else:  # scales in their scale_dtype, zero points U8 (0-d, or packed below 8 bits)
            stored = stored_bytes(rec.shape, rec.spec)
    if (original, stored) == (rec.original_bytes, rec.stored_bytes):
        return rec  # as recorded (the usual case): no second copy of every record
    return replace(rec, original_bytes=original, stored_bytes=stored)


@dataclass(frozen=True)
class ReportOptions:
    """How a report is judged and priced, built once at the edge (the CLI) and handed to
    every report builder: the cost model and workload, and the CI thresholds."""

    energy_model: EnergyModel = field(default_factory=EnergyModel)
    workload: Workload = field(default_factory=Workload)
    fail_under_sqnr: float | None = None
    max_error: float | None = None
    fail_under_total_sqnr: float | None = None
    exclude: tuple[str, ...] = ()

    def report_fields(self) -> dict[str, Any]:
        """The options as :class:`Report` fields of the same names."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def artifact_report(path: str | Path, records: Sequence[TensorRecord], *,
                    metrics_from: str = "manifest", original: str | Path | None = None,
                    disk: tuple[int, int] | None = None,
                    options: ReportOptions | None = None) -> Report:
    """The report of an artifact from its records (the manifest's, or re-measured ones)."""
    _check_records(records, str(Path(path) / "qtool.json"))
    rows = RecordRows([_with_real_bytes(r) for r in records])
    return Report("artifact", str(path), ["artifact"], [None], rows, metrics_from,
                  original=None if original is None else str(original), disk=disk,
                  **(options or ReportOptions()).report_fields())


def dry_run_report(path: str | Path, specs: Sequence[QuantSpec],
                   results: Sequence[Sequence[TensorRecord]], *,
                   options: ReportOptions | None = None) -> Report:
    """The report of a dry run: ``results[t][g]`` is tensor t under ``specs[g]``."""
    labels = spec_labels(specs)
    rows = [Row(rs[0].name, rs[0].dtype, tuple(rs[0].shape), list(rs)) for rs in results]
    return Report("dry-run", str(path), labels, list(specs), rows, "dry-run",
                  **(options or ReportOptions()).report_fields())


def spec_labels(specs: Sequence[QuantSpec]) -> list[str]:
    """Column-group labels: the scheme name, with the settings that tell specs apart added
    only when two specs share a scheme."""
    labels = []
    for s in specs:
        label = s.scheme
        if sum(1 for o in specs if o.scheme == s.scheme) > 1:
            label += f" {s.bits}b {_gran(s)}"
        labels.append(label)
    return labels


def disk_bytes(source: dict[str, Any], files: dict[str, dict[str, Any]]
               ) -> tuple[int, int] | None:
    """(source files, artifact files) sizes from a manifest, as `quantize` summarises them;
    None when the manifest does not say (the report does not need them)."""
    try:
        return (sum(int(f["size"]) for f in source["files"]),
                sum(int(f["size"]) for f in files.values()))
    except (KeyError, TypeError, ValueError):
        return None
