"""Presentation: turns pipeline results into Rich renderables and JSON/CSV/Markdown strings.

Nothing here prints; the CLI does.

`qtool report` builds one :class:`Report` from per-tensor :class:`TensorRecord`s (from an
artifact's manifest, from a new measurement against the original, or from a dry run of one or
more schemes over a plain checkpoint) and renders it as a Rich table, JSON (docs/REPORT.md),
CSV or Markdown. The exit code for CI (:attr:`Report.exit_code`) is computed here from the
data, so every output format agrees with it.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from qtool import __version__
from qtool.artifact import TensorRecord
from qtool.energy import (
    EnergyEstimate,
    EnergyModel,
    EnergyModelError,
    TensorCost,
    assumptions,
    estimate,
)
from qtool.io import DTYPES, CheckpointError
from qtool.metrics import ErrorStats
from qtool.schemes import QuantSpec

SCHEMA_VERSION = 1
FORMATS = ("table", "json", "csv", "markdown")
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


# --------------------------------------------------------------------------- quantize summary


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def quantize_summary(records: list[TensorRecord], out_dir: Path, seconds: float) -> dict[str, Any]:
    """The summary `quantize` shows: counts, bytes as stored (file sizes) before and after."""
    from qtool.artifact import Artifact

    art = Artifact.open(out_dir)
    before = sum(int(f["size"]) for f in art.manifest.source["files"])
    after = sum(int(f["size"]) for f in art.manifest.files.values())
    quantized = sum(1 for r in records if r.quantized)
    return {
        "output": str(out_dir),
        "tensors": {"quantized": quantized, "passthrough": len(records) - quantized},
        "bytes": {"before": before, "after": after},
        "compression_ratio": round(before / after, 4) if after else None,
        "seconds": round(seconds, 3),
    }


def render_summary(summary: dict[str, Any]) -> Table:
    t = Table(title=f"qtool quantize → {summary['output']}", show_header=False, box=None)
    t.add_column(style="bold")
    t.add_column(justify="right")
    t.add_row("tensors quantized", str(summary["tensors"]["quantized"]))
    t.add_row("tensors kept in float", str(summary["tensors"]["passthrough"]))
    t.add_row("bytes before", human_bytes(summary["bytes"]["before"]))
    t.add_row("bytes after", human_bytes(summary["bytes"]["after"]))
    ratio = summary["compression_ratio"]
    t.add_row("compression", f"{ratio:.2f}×" if ratio else "-")
    t.add_row("time", f"{summary['seconds']:.2f} s")
    return t


# --------------------------------------------------------------------------- energy model file


def load_energy_model(path: str | Path) -> EnergyModel:
    """The figures of ``--energy-model FILE.json`` (see docs/ENERGY.md); ReportError naming
    the file when it cannot be read or is malformed."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            raw = f.read(ENERGY_MODEL_SIZE_LIMIT + 1)
    except OSError as e:
        raise ReportError(f"{p}: cannot read the energy model ({e.strerror or e})") from None
    if len(raw) > ENERGY_MODEL_SIZE_LIMIT:
        raise ReportError(f"{p}: energy model over the {ENERGY_MODEL_SIZE_LIMIT}-byte limit")
    try:
        # parse_constant: NaN/Infinity are not JSON, and not energy figures either.
        doc = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise ReportError(f"{p}: energy model is not valid JSON ({str(e):.80})") from None
    try:
        return EnergyModel.from_dict(doc)
    except EnergyModelError as e:
        raise ReportError(f"{p}: bad energy model: {e}") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


# --------------------------------------------------------------------------- the report data


@dataclass
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


@dataclass(frozen=True)
class Offender:
    """A quantized tensor that misses a CI threshold."""

    name: str
    label: str | None  # the dry-run scheme; None for an artifact
    metric: str  # "sqnr_db" or "max_abs_error"
    value: float
    limit: float

    def message(self) -> str:
        where = f"tensor {self.name!r}" + (f" ({self.label})" if self.label else "")
        if self.metric == "sqnr_db":
            return (f"{where}: SQNR {_fmt_sqnr(self.value)} dB is below "
                    f"--fail-under-sqnr {self.limit:g}")
        return (f"{where}: max abs error {self.value:.6g} is above --max-error "
                f"{self.limit:g}")


@dataclass
class Report:
    """Everything `qtool report` shows; built once, then rendered in any format."""

    kind: str  # "artifact" or "dry-run"
    path: str
    labels: list[str]  # one per group: "artifact", or the scheme of each dry run
    specs: list[QuantSpec | None]  # the dry run's spec per group; None for an artifact
    rows: list[Row]
    metrics_from: str  # "manifest", "original" or "dry-run"
    original: str | None = None
    energy_model: EnergyModel = field(default_factory=EnergyModel)
    fail_under_sqnr: float | None = None
    max_error: float | None = None
    disk: tuple[int, int] | None = None  # an artifact's file bytes: source, artifact
    totals: list[Totals] = field(init=False)
    energy: list[EnergyEstimate] = field(init=False)
    offenders: list[Offender] = field(init=False)

    def __post_init__(self) -> None:
        self.totals = [self._totals(i) for i in range(len(self.labels))]
        self.energy = [
            estimate(self.energy_model, (
                TensorCost(r.dtype, r.parameters, r.results[i].original_bytes,
                           r.results[i].stored_bytes, r.results[i].quantized)
                for r in self.rows))
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
        quantized = 0
        for r in self.rows:
            rec = r.results[i]
            if rec.stats is None:
                continue
            quantized += 1
            stats = stats.merge(rec.stats)
            s = rec.stats
            if worst is None or (s.sqnr_db, -s.max_abs_error) < (worst.sqnr_db,
                                                                   -worst.max_abs_error):
                worst = Worst(r.name, s.sqnr_db, s.max_abs_error)
        return Totals(
            tensors=len(self.rows), quantized=quantized,
            bytes_before=sum(r.results[i].original_bytes for r in self.rows),
            bytes_after=sum(r.results[i].stored_bytes for r in self.rows),
            stats=stats, worst=worst,
        )

    def _check(self) -> list[Offender]:
        out: list[Offender] = []
        for r in self.rows:
            for label, rec in zip(self._offender_labels(), r.results, strict=True):
                if rec.stats is None:
                    continue
                sqnr = rec.stats.sqnr_db
                if self.fail_under_sqnr is not None and sqnr < self.fail_under_sqnr:
                    out.append(Offender(r.name, label, "sqnr_db", sqnr, self.fail_under_sqnr))
                err = rec.stats.max_abs_error
                if self.max_error is not None and err > self.max_error:
                    out.append(Offender(r.name, label, "max_abs_error", err, self.max_error))
        return out

    def _offender_labels(self) -> list[str | None]:
        return [None] * len(self.labels) if self.kind == "artifact" else list(self.labels)

    def sorted_rows(self, sort: str | None = None, top: int | None = None) -> list[Row]:
        """The rows to show: in checkpoint order, or sorted (worst first for sqnr and error,
        largest first for size; a dry run sorts by its first scheme), then the first ``top``."""
        rows = list(self.rows)
        if sort == "name":
            rows.sort(key=lambda r: r.name)
        elif sort == "sqnr":
            # Tensors kept in float have no SQNR: they go last.
            rows.sort(key=lambda r: (0, r.results[0].stats.sqnr_db) if r.results[0].stats
                      else (1, 0.0))
        elif sort == "error":
            rows.sort(key=lambda r: (0, -r.results[0].stats.max_abs_error)
                      if r.results[0].stats else (1, 0.0))
        elif sort == "size":
            rows.sort(key=lambda r: -r.original_bytes)
        elif sort is not None:
            raise ReportError(f"unknown sort key {sort!r}; choose one of {', '.join(SORT_KEYS)}")
        return rows[:top] if top is not None else rows


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
        # integers are one byte each (packed below 8 bits); scales F32 and zero points I32
        stored = math.prod(rec.stored_shape) + 8 * math.prod(rec.param_shape)
    return replace(rec, original_bytes=original, stored_bytes=stored)


def artifact_report(path: str | Path, records: Sequence[TensorRecord], *,
                    metrics_from: str = "manifest", original: str | Path | None = None,
                    disk: tuple[int, int] | None = None,
                    energy_model: EnergyModel | None = None,
                    fail_under_sqnr: float | None = None,
                    max_error: float | None = None) -> Report:
    """The report of an artifact from its records (the manifest's, or re-measured ones)."""
    _check_records(records, str(Path(path) / "qtool.json"))
    records = [_with_real_bytes(r) for r in records]
    rows = [Row(r.name, r.dtype, tuple(r.shape), [r]) for r in records]
    return Report("artifact", str(path), ["artifact"], [None], rows, metrics_from,
                  original=None if original is None else str(original),
                  energy_model=energy_model or EnergyModel(), fail_under_sqnr=fail_under_sqnr,
                  max_error=max_error, disk=disk)


def dry_run_report(path: str | Path, specs: Sequence[QuantSpec],
                   results: Sequence[Sequence[TensorRecord]], *,
                   energy_model: EnergyModel | None = None,
                   fail_under_sqnr: float | None = None,
                   max_error: float | None = None) -> Report:
    """The report of a dry run: ``results[t][g]`` is tensor t under ``specs[g]``."""
    labels = spec_labels(specs)
    rows = [Row(rs[0].name, rs[0].dtype, tuple(rs[0].shape), list(rs)) for rs in results]
    return Report("dry-run", str(path), labels, list(specs), rows, "dry-run",
                  energy_model=energy_model or EnergyModel(), fail_under_sqnr=fail_under_sqnr,
                  max_error=max_error)


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


# --------------------------------------------------------------------------- formatting


def _gran(spec: QuantSpec) -> str:
    return f"group {spec.group_size}" if spec.granularity == "group" else spec.granularity


def _fmt_sqnr(x: float) -> str:
    if math.isinf(x):
        return "∞" if x > 0 else "-∞"
    return f"{x:.2f}"


def _fmt_err(x: float) -> str:
    return f"{x:.3g}"


def _fmt_cos(x: float) -> str:
    return f"{x:.6f}"


def _fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}×"


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "×".join(str(d) for d in shape) if shape else "scalar"


def human_energy(pj: float) -> str:
    """Picojoules in the largest unit that keeps the number ≥ 1, three significant digits."""
    for unit, scale in (("J", 1e12), ("mJ", 1e9), ("µJ", 1e6), ("nJ", 1e3)):
        if abs(pj) >= scale:
            return f"{pj / scale:.3g} {unit}"
    return f"{pj:.3g} pJ"


def _fmt_pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f} %"


def _fmt_change(before: float, after: float) -> str:
    """The saving from before to after in percent (negative when after costs more)."""
    return _fmt_pct(EnergyEstimate.saving_percent(before, after))


def _json_float(x: float | None) -> float | str | None:
    """JSON has no infinity: ±∞ become the strings "inf"/"-inf" (docs/REPORT.md)."""
    if x is None:
        return None
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if math.isnan(x):
        return None
    return x


def _csv_value(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "inf" if v == math.inf else "-inf" if v == -math.inf else repr(v)
    return str(v)


# --------------------------------------------------------------------------- JSON


def _result_json(rec: TensorRecord) -> dict[str, Any]:
    spec, stats = rec.spec, rec.stats
    ratio = rec.original_bytes / rec.stored_bytes if rec.stored_bytes else None
    d: dict[str, Any] = {
        "quantized": spec is not None,
        "passthrough": rec.passthrough if spec is None else None,
        "scheme": spec.scheme if spec else None,
        "bits": spec.bits if spec else None,
        "granularity": spec.granularity if spec else None,
        "group_size": spec.group_size if spec and spec.granularity == "group" else None,
        "range": spec.range if spec else None,
        "quantized_bytes": rec.stored_bytes,
        "compression_ratio": ratio,
        "mse": None, "sqnr_db": None, "exact": None, "max_abs_error": None, "cosine": None,
    }
    if stats is not None:
        d.update(mse=stats.mse, sqnr_db=_json_float(stats.sqnr_db),
                 exact=stats.error_sq == 0.0, max_abs_error=stats.max_abs_error,
                 cosine=stats.cosine)
    return d


def _spec_json(spec: QuantSpec | None) -> dict[str, Any] | None:
    """Every key always present (null where it does not apply), unlike the manifest's."""
    if spec is None:
        return None
    return {"scheme": spec.scheme, "bits": spec.bits, "granularity": spec.granularity,
            "group_size": spec.group_size if spec.granularity == "group" else None,
            "range": spec.range,
            "percentile": spec.percentile if spec.range == "percentile" else None}


def _totals_json(t: Totals) -> dict[str, Any]:
    q = t.quantized > 0
    return {
        "tensors": t.tensors, "quantized": t.quantized, "passthrough": t.passthrough,
        "bytes_before": t.bytes_before, "bytes_after": t.bytes_after,
        "compression_ratio": t.ratio, "bytes_saved": t.saved, "saved_percent": t.saved_percent,
        "mse": t.stats.mse if q else None,
        "sqnr_db": _json_float(t.stats.sqnr_db) if q else None,
        "max_abs_error": t.stats.max_abs_error if q else None,
        "cosine": t.stats.cosine if q else None,
        "worst": None if t.worst is None else {
            "name": t.worst.name, "sqnr_db": _json_float(t.worst.sqnr_db),
            "max_abs_error": t.worst.max_abs_error},
    }


def to_json(report: Report, sort: str | None = None, top: int | None = None) -> str:
    """The JSON document of docs/REPORT.md (``schema_version`` 1)."""
    rows = report.sorted_rows(sort, top)
    doc = {
        "schema_version": SCHEMA_VERSION,
        "qtool_version": __version__,
        "kind": report.kind,
        "path": report.path,
        "metrics_from": report.metrics_from,
        "original": report.original,
        "groups": [
            {"label": label, "spec": _spec_json(spec),
             "totals": _totals_json(t), "energy": e.to_dict()}
            for label, spec, t, e in zip(report.labels, report.specs, report.totals,
                                         report.energy, strict=True)
        ],
        # energy_model alone is a valid --energy-model file: the figures in use.
        "energy_model": report.energy_model.to_dict(),
        "energy_assumptions": assumptions(report.energy_model),
        "disk": None if report.disk is None else {"before": report.disk[0],
                                                  "after": report.disk[1]},
        "sort": sort,
        "tensors_total": len(report.rows),
        "tensors_shown": len(rows),
        "tensors": [
            {"name": r.name, "dtype": r.dtype, "shape": list(r.shape),
             "parameters": r.parameters, "original_bytes": r.original_bytes,
             "best": None if r.best is None else report.labels[r.best],
             "results": {label: _result_json(rec)
                         for label, rec in zip(report.labels, r.results, strict=True)}}
            for r in rows
        ],
        "checks": {
            "fail_under_sqnr": report.fail_under_sqnr,
            "max_error": report.max_error,
            "passed": not report.offenders,
            "offenders": [{"name": o.name, "group": o.label or report.labels[0],
                           "metric": o.metric, "value": _json_float(o.value),
                           "limit": o.limit} for o in report.offenders],
        },
        "exit_code": report.exit_code,
    }
    # allow_nan=False: a stray inf/NaN fails loudly here instead of writing invalid JSON.
    return json.dumps(doc, indent=2, allow_nan=False) + "\n"


# --------------------------------------------------------------------------- CSV

CSV_FIELDS = ("scheme", "bits", "granularity", "group_size", "range", "passthrough",
              "quantized_bytes", "compression_ratio", "mse", "sqnr_db", "max_abs_error",
              "cosine")


def to_csv(report: Report, sort: str | None = None, top: int | None = None) -> str:
    """One row per tensor with a header. An artifact's columns are plain (``sqnr_db``); a dry
    run has one set per scheme, prefixed ``<label>.`` (``gnmt.sqnr_db``), and ``best``."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    prefixes = [""] if report.kind == "artifact" else [f"{lb}." for lb in report.labels]
    head = ["name", "dtype", "shape", "parameters", "original_bytes"]
    if report.kind == "dry-run":
        head.append("best")
    head += [p + f for p in prefixes for f in CSV_FIELDS]
    w.writerow(head)
    for r in report.sorted_rows(sort, top):
        line: list[Any] = [r.name, r.dtype, json.dumps(list(r.shape)), r.parameters,
                           r.original_bytes]
        if report.kind == "dry-run":
            line.append(None if r.best is None else report.labels[r.best])
        for rec in r.results:
            d = _result_json(rec)
            if rec.stats is not None:
                d["sqnr_db"] = rec.stats.sqnr_db  # _csv_value writes ±inf as inf/-inf
            line += [d[f] for f in CSV_FIELDS]
        w.writerow([_csv_value(v) for v in line])
    return buf.getvalue()


# --------------------------------------------------------------------------- Markdown


def _safe(text: str) -> str:
    """Names come from the checkpoint and may hold control characters: an ESC would reach the
    terminal as an escape sequence. They are shown escaped, as Python writes them."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _md(text: str) -> str:
    return _safe(text).replace("|", "\\|")


def to_markdown(report: Report, sort: str | None = None, top: int | None = None) -> str:
    """Tables for a pull request: every tensor, the totals with the energy estimate, and the
    energy model's assumptions."""
    rows = report.sorted_rows(sort, top)
    out = [f"### qtool report: `{_md(report.path)}`", "", _subtitle(report), ""]
    if report.kind == "artifact":
        out += ["| tensor | shape | scheme | bits | granularity | parameters | size | stored "
                "| ratio | MSE | SQNR dB | max abs error | cosine |",
                "|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            rec = r.results[0]
            cells = [f"`{_md(r.name)}`", _fmt_shape(r.shape)]
            if rec.spec is None:
                cells += [f"kept: {_md(rec.passthrough or '')}", "", ""]
            else:
                cells += [rec.spec.scheme, str(rec.spec.bits), _gran(rec.spec)]
            cells += [f"{r.parameters:,}", human_bytes(rec.original_bytes),
                      human_bytes(rec.stored_bytes), _fmt_ratio(_ratio(rec))]
            cells += _md_metrics(rec)
            out.append("| " + " | ".join(cells) + " |")
    else:
        head = ["tensor", "shape", "parameters", "size"]
        align = ["---", "---:", "---:", "---:"]
        for lb in report.labels:
            head += [f"{lb} stored", f"{lb} ratio", f"{lb} SQNR dB", f"{lb} max abs error"]
            align += ["---:"] * 4
        out += ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
        for r in rows:
            cells = [f"`{_md(r.name)}`", _fmt_shape(r.shape), f"{r.parameters:,}",
                     human_bytes(r.original_bytes)]
            for g, rec in enumerate(r.results):
                if rec.stats is None:
                    cells += [human_bytes(rec.stored_bytes), "1.00×",
                              f"kept: {_md(rec.passthrough or '')}", ""]
                    continue
                mark = f" {BEST}" if r.best == g else ""
                cells += [human_bytes(rec.stored_bytes), _fmt_ratio(_ratio(rec)),
                          _fmt_sqnr(rec.stats.sqnr_db) + mark,
                          _fmt_err(rec.stats.max_abs_error)]
            out.append("| " + " | ".join(cells) + " |")
    if len(rows) < len(report.rows):
        out += ["", f"Showing {len(rows)} of {len(report.rows)} tensors."]
    out += ["", "| | before | " + " | ".join(_after_labels(report)) + " |",
            "|---|---:|" + "---:|" * len(report.labels)]
    for key, before, afters in _totals_lines(report):
        out.append(f"| {key} | {_md(before)} | " + " | ".join(_md(a) for a in afters) + " |")
    out += ["", "Energy estimate, one pass over the weights (docs/ENERGY.md):", ""]
    out += [f"- {a}" for a in assumptions(report.energy_model)]
    out += _md_checks(report)
    return "\n".join(out) + "\n"


def _md_metrics(rec: TensorRecord) -> list[str]:
    if rec.stats is None:
        return ["", "", "", ""]
    s = rec.stats
    return [f"{s.mse:.3g}", _fmt_sqnr(s.sqnr_db), _fmt_err(s.max_abs_error), _fmt_cos(s.cosine)]


def _md_checks(report: Report) -> list[str]:
    if report.fail_under_sqnr is None and report.max_error is None:
        return []
    if not report.offenders:
        return ["", "All quantized tensors pass the thresholds."]
    return ["", f"**{len(report.offenders)} threshold failure(s):**", ""] + [
        f"- {_md(o.message())}" for o in report.offenders]


def _ratio(rec: TensorRecord) -> float | None:
    return rec.original_bytes / rec.stored_bytes if rec.stored_bytes else None


# --------------------------------------------------------------------------- table


def _subtitle(report: Report) -> str:
    if report.kind == "dry-run":
        return ("dry run: what each scheme would do (nothing written); "
                f"{BEST} marks the best SQNR per tensor" if len(report.labels) > 1 else
                "dry run: what the scheme would do (nothing written)")
    if report.metrics_from == "original":
        return f"artifact; metrics measured again against {report.original}"
    return "artifact; metrics measured at quantize time (from qtool.json)"


def _after_labels(report: Report) -> list[str]:
    return ["after"] if report.kind == "artifact" else list(report.labels)


def _totals_lines(report: Report) -> list[tuple[str, str, list[str]]]:
    """(what, before, [after per group]) lines of the totals, shared by table and Markdown.
    Values are kept short so that three groups still fit in 80 columns."""
    ts, es = report.totals, report.energy
    t0 = ts[0]
    lines: list[tuple[str, str, list[str]]] = [
        ("tensors", str(t0.tensors), [str(t.tensors) for t in ts]),
        ("tensors quantized", "", [str(t.quantized) for t in ts]),
        ("tensors kept in float", "", [str(t.passthrough) for t in ts]),
        ("tensor bytes", human_bytes(t0.bytes_before), [human_bytes(t.bytes_after) for t in ts]),
        ("compression", "", [_fmt_ratio(t.ratio) for t in ts]),
        ("memory saved", "", [human_bytes(t.saved) for t in ts]),
        ("memory saved %", "", [_fmt_pct(t.saved_percent) for t in ts]),
    ]
    if report.disk is not None:
        lines.append(("file bytes", human_bytes(report.disk[0]), [human_bytes(report.disk[1])]))
    lines += [
        ("SQNR, all quantized", "",
         [f"{_fmt_sqnr(t.stats.sqnr_db)} dB" if t.quantized else "-" for t in ts]),
        ("max abs error", "", [_fmt_err(t.stats.max_abs_error) if t.quantized else "-"
                               for t in ts]),
        ("worst tensor", "", [f"{t.worst.name} ({_fmt_sqnr(t.worst.sqnr_db)} dB)"
                              if t.worst else "-" for t in ts]),
    ]
    for what, get in (
        ("energy: DRAM reads", lambda e: (e.memory_before_pj, e.memory_after_pj)),
        ("energy: MACs", lambda e: (e.compute_before_pj, e.compute_after_pj)),
        ("energy: total", lambda e: (e.total_before_pj, e.total_after_pj)),
    ):
        pairs = [get(e) for e in es]
        lines.append((what, human_energy(pairs[0][0]), [human_energy(a) for _, a in pairs]))
        lines.append((f"{what} saved", "", [_fmt_change(b, a) for b, a in pairs]))
    return lines


@dataclass
class _Col:
    header: str
    cells: list[Text]
    priority: int  # lower is kept first when the terminal is narrow; equal: all or none
    justify: str = "right"

    @property
    def width(self) -> int:
        lines = [ln for c in self.cells for ln in c.plain.split("\n")]
        return max(len(x) for x in [*self.header.split("\n"), *lines])


def _common_prefix(names: list[str]) -> str:
    """The longest common prefix of whole dot-separated parts ("model." of a HF checkpoint),
    never a whole name."""
    if len(names) < 2:
        return ""
    parts = [n.split(".") for n in names]
    prefix: list[str] = []
    for group in zip(*parts, strict=False):
        if len(set(group)) != 1:
            break
        prefix.append(group[0])
    if prefix and any(len(p) == len(prefix) for p in parts):
        prefix.pop()
    return ".".join(prefix) + "." if prefix else ""


def render_report(report: Report, sort: str | None = None, top: int | None = None,
                  width: int = 80) -> RenderableType:
    """The Rich renderable of the report for a terminal ``width`` columns wide: the tensor
    table with as many columns as fit (JSON, CSV and Markdown always have them all), the
    totals with the energy estimate, and the assumptions behind it."""
    rows = report.sorted_rows(sort, top)
    prefix = _common_prefix([r.name for r in report.rows])
    cols = _artifact_cols(report, rows) if report.kind == "artifact" else \
        _dry_run_cols(report, rows)
    names = []
    for r in rows:
        t = Text(_safe(r.name[len(prefix):]))
        kept = [rec for rec in r.results if rec.spec is None]
        if len(kept) == len(r.results):  # kept in float under every group: say why
            t.append(f"\n  kept: {_safe(kept[0].passthrough or '')}", style="dim")
        names.append(t)
    name_col = _Col("tensor", names, 0, "left")
    # Greedily keep the most useful columns that fit beside a readable name column: up to
    # 45 % of the width is kept for the names, so that a typical Hugging Face name
    # ("layers.12.self_attn.q_proj.weight") stays on one line at 80 columns. Columns of the
    # same priority (one metric for every dry-run scheme) are shown all together or not at
    # all, so that the schemes can be compared.
    # The name column is never narrower than NAME_MIN_WIDTH, even for short names: reserve
    # what it will really take, or the numeric columns get cropped.
    budget = width - max(NAME_MIN_WIDTH, min(name_col.width, int(width * 0.45)))
    chosen: list[_Col] = []
    for prio in sorted({c.priority for c in cols}):
        tier = [c for c in cols if c.priority == prio]
        need = sum(c.width + 2 for c in tier)  # two spaces between columns
        if need <= budget:
            chosen += tier
            budget -= need
    shown = [c for c in cols if c in chosen]
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, collapse_padding=True,
                  padding=(0, 1), header_style="bold")
    table.add_column(name_col.header, overflow="fold", min_width=NAME_MIN_WIDTH)
    for c in shown:
        table.add_column(c.header, justify=c.justify, no_wrap=True)  # type: ignore[arg-type]
    for i, name in enumerate(names):
        table.add_row(name, *[c.cells[i] for c in shown])
    parts: list[RenderableType] = [Text.assemble(("qtool report ", "bold"), _safe(report.path)),
                                   Text(_subtitle(report), style="dim")]
    if prefix:
        parts.append(Text(f"tensor names below start with {prefix!r}", style="dim"))
    parts.append(table)
    notes = []
    if len(rows) < len(report.rows):
        notes.append(f"showing {len(rows)} of {len(report.rows)} tensors")
    if len(shown) < len(cols):
        notes.append(f"{len(cols) - len(shown)} more columns in a wider terminal or with "
                     "--format json, csv or markdown")
    if any(r.best is not None and any(rec.spec is None for rec in r.results) for r in rows):
        notes.append("n/a: the scheme cannot quantize the tensor (the reason is in "
                     "--format json)")
    if notes:
        parts.append(Text("; ".join(notes), style="dim"))
    parts += [Text(""), _totals_table(report)]
    for label, t in zip(report.labels, report.totals, strict=True):
        if t.worst is not None:
            who = "" if report.kind == "artifact" else f" ({label})"
            parts.append(Text(f"worst tensor{who}: {_safe(t.worst.name)}, SQNR "
                              f"{_fmt_sqnr(t.worst.sqnr_db)} dB, max abs error "
                              f"{_fmt_err(t.worst.max_abs_error)}"))
    parts.append(Text("energy estimate (docs/ENERGY.md):\n" + "\n".join(
        f"- {a}" for a in assumptions(report.energy_model)), style="dim"))
    for o in report.offenders:
        parts.append(Text(f"FAIL {o.message()}", style="bold red"))
    return Group(*parts)


def _sqnr_style(report: Report, x: float) -> str:
    if report.fail_under_sqnr is not None:
        return "bold red" if x < report.fail_under_sqnr else ""
    return "bold red" if x < SQNR_RED_DB else "yellow" if x < SQNR_YELLOW_DB else ""


def _err_style(report: Report, x: float) -> str:
    return "bold red" if report.max_error is not None and x > report.max_error else ""


def _metric_cells(report: Report, recs: list[TensorRecord],
                  fmt: Callable[[ErrorStats], str],
                  style: Callable[[ErrorStats], str] | None = None) -> list[Text]:
    out = []
    for rec in recs:
        if rec.stats is None:
            out.append(Text("-", style="dim"))
        else:
            out.append(Text(fmt(rec.stats), style=style(rec.stats) if style else ""))
    return out


def _artifact_cols(report: Report, rows: list[Row]) -> list[_Col]:
    recs = [r.results[0] for r in rows]

    def spec_cell(rec: TensorRecord, f: Callable[[QuantSpec], str]) -> Text:
        return Text(f(rec.spec)) if rec.spec else Text("kept", style="dim")

    return [
        _Col("shape", [Text(_fmt_shape(r.shape)) for r in rows], 7),
        _Col("scheme", [spec_cell(rec, lambda s: s.scheme) for rec in recs], 4, "left"),
        _Col("bits", [spec_cell(rec, lambda s: str(s.bits)) for rec in recs], 9),
        _Col("granularity", [spec_cell(rec, _gran) for rec in recs], 10, "left"),
        _Col("params", [Text(f"{r.parameters:,}") for r in rows], 11),
        _Col("size", [Text(human_bytes(rec.original_bytes)) for rec in recs], 6),
        _Col("stored", [Text(human_bytes(rec.stored_bytes)) for rec in recs], 2),
        _Col("ratio", [Text(_fmt_ratio(_ratio(rec))) for rec in recs], 3),
        _Col("MSE", _metric_cells(report, recs, lambda s: f"{s.mse:.3g}"), 12),
        _Col("SQNR\ndB", _metric_cells(report, recs, lambda s: _fmt_sqnr(s.sqnr_db),
                                       lambda s: _sqnr_style(report, s.sqnr_db)), 1),
        _Col("max abs\nerror", _metric_cells(report, recs, lambda s: _fmt_err(s.max_abs_error),
                                             lambda s: _err_style(report, s.max_abs_error)), 5),
        _Col("cosine", _metric_cells(report, recs, lambda s: _fmt_cos(s.cosine)), 8),
    ]


def _dry_run_cols(report: Report, rows: list[Row]) -> list[_Col]:
    cols = [
        _Col("shape", [Text(_fmt_shape(r.shape)) for r in rows], 6),
        _Col("params", [Text(f"{r.parameters:,}") for r in rows], 7),
        _Col("size", [Text(human_bytes(r.original_bytes)) for r in rows], 4),
    ]
    for g, label in enumerate(report.labels):
        recs = [r.results[g] for r in rows]
        sqnr = []
        for r, rec in zip(rows, recs, strict=True):
            if rec.stats is None:
                # Kept by every scheme: the reason is under the name. Kept by this one only:
                # the scheme cannot do it (symmetric-unsigned on negative values).
                sqnr.append(Text("n/a" if r.best is not None else "kept", style="dim"))
                continue
            t = Text(_fmt_sqnr(rec.stats.sqnr_db), style=_sqnr_style(report, rec.stats.sqnr_db))
            t.append(f" {BEST}" if r.best == g else "  ", style="bold green")
            sqnr.append(t)
        cols += [
            _Col(f"{label}\nstored", [Text(human_bytes(rec.stored_bytes)) for rec in recs],
                 2),
            _Col(f"{label}\nSQNR dB", sqnr, 1),
            _Col(f"{label}\nmax err", _metric_cells(
                report, recs, lambda s: _fmt_err(s.max_abs_error),
                lambda s: _err_style(report, s.max_abs_error)), 3),
            _Col(f"{label}\nratio", [Text(_fmt_ratio(_ratio(rec))) for rec in recs], 5),
            _Col(f"{label}\ncosine", _metric_cells(report, recs, lambda s: _fmt_cos(s.cosine)),
                 8),
            _Col(f"{label}\nMSE", _metric_cells(report, recs, lambda s: f"{s.mse:.3g}"), 9),
        ]
    return cols


def _totals_table(report: Report) -> Table:
    t = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, collapse_padding=True,
              padding=(0, 1), header_style="bold")
    t.add_column("totals", no_wrap=True)
    t.add_column("before", justify="right", no_wrap=True)
    for label in _after_labels(report):
        t.add_column(label, justify="right", overflow="fold")
    for key, before, afters in _totals_lines(report):
        if key == "worst tensor":  # long names: shown on their own lines below the table
            continue
        cells = [Text(a) for a in afters]
        if key == "SQNR, all quantized":
            for c, tot in zip(cells, report.totals, strict=True):
                if tot.quantized:
                    c.stylize(_sqnr_style(report, tot.stats.sqnr_db))
        t.add_row(key, before, *cells)
    return t


__all__ = [
    "FORMATS",
    "SCHEMA_VERSION",
    "SORT_KEYS",
    "Offender",
    "Report",
    "ReportError",
    "Row",
    "Totals",
    "artifact_report",
    "disk_bytes",
    "dry_run_report",
    "human_bytes",
    "human_energy",
    "load_energy_model",
    "quantize_summary",
    "render_report",
    "render_summary",
    "spec_labels",
    "to_csv",
    "to_json",
    "to_markdown",
]
