"""Machine-readable renderings of a report: JSON (stable schema), CSV and Markdown."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator
from typing import Any

from qtool import __version__
from qtool.core.schemes import QuantSpec
from qtool.formats.manifest import TensorRecord
from qtool.report.energy import assumptions
from qtool.report.fmt import (
    _csv_value,
    _fmt_bpw,
    _fmt_cos,
    _fmt_err,
    _fmt_ratio,
    _fmt_shape,
    _fmt_sqnr,
    _gran,
    _json_float,
    _ratio,
    _safe,
    human_bytes,
)
from qtool.report.lines import _after_labels, _subtitle, _totals_lines
from qtool.report.model import (
    BEST,
    SCHEMA_VERSION,
    Report,
    Totals,
    bits_per_weight,
)

# --------------------------------------------------------------------------- formatting
























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
        # 8 x quantized_bytes / parameters: sidecars included (kept tensors: their dtype's)
        "bits_per_weight": bits_per_weight(rec),
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
            "percentile": spec.percentile if spec.range == "percentile" else None,
            "scale_bits": spec.scale_bits}


def _totals_json(t: Totals) -> dict[str, Any]:
    q = t.quantized > 0
    return {
        "tensors": t.tensors, "quantized": t.quantized, "passthrough": t.passthrough,
        "bytes_before": t.bytes_before, "bytes_after": t.bytes_after,
        "compression_ratio": t.ratio, "bytes_saved": t.saved, "saved_percent": t.saved_percent,
        "bits_per_weight": t.bits_per_weight, "bits_per_weight_all": t.bits_per_weight_all,
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
    return "".join(iter_json(report, sort, top))


def iter_json(report: Report, sort: str | None = None, top: int | None = None
              ) -> Iterator[str]:
    """:func:`to_json` in pieces, a row at a time (the whole text of 200,000 rows is never
    held)."""
    rows = report.sorted_rows(sort, top)
    mark = json.dumps(os.urandom(16).hex())  # where the rows go: no other value equals it
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
        "energy_assumptions": assumptions(report.energy_model, report.workload),
        "workload": report.workload.to_dict(),
        "disk": None if report.disk is None else {"before": report.disk[0],
                                                  "after": report.disk[1]},
        "sort": sort,
        "tensors_total": len(report.rows),
        "tensors_shown": len(rows),
        "tensors": mark[1:-1],  # the rows go in as text, below
        "checks": {
            "fail_under_sqnr": report.fail_under_sqnr,
            "max_error": report.max_error,
            "fail_under_total_sqnr": report.fail_under_total_sqnr,
            "exclude": list(report.exclude),
            "passed": not report.offenders,
            "offenders": [{"name": o.name, "group": o.label or report.labels[0],
                           "metric": o.metric, "value": _json_float(o.value),
                           "limit": o.limit} for o in report.offenders],
        },
        "exit_code": report.exit_code,
    }
    # allow_nan=False: a stray inf/NaN fails loudly here instead of writing invalid JSON.
    # Each row is yielded as soon as its dict is made, one dict at a time (100,000 tensors
    # held as dicts took hundreds of MB); indent=2 at the depth of the list: 4 more spaces
    # per line (a JSON string never holds a raw newline).
    head = json.dumps(doc, indent=2, allow_nan=False)
    before, after = head.split(mark, 1)
    yield before
    yield "[\n    " if rows else "[]"
    for i, r in enumerate(rows):
        yield ("" if i == 0 else ",\n    ") + json.dumps(
            {"name": r.name, "dtype": r.dtype, "shape": list(r.shape),
             "parameters": r.parameters, "original_bytes": r.original_bytes,
             "best": None if r.best is None else report.labels[r.best],
             "results": {label: _result_json(rec)
                         for label, rec in zip(report.labels, r.results, strict=True)}},
            indent=2, allow_nan=False).replace("\n", "\n    ")
    if rows:
        yield "\n  ]"
    yield after + "\n"


# --------------------------------------------------------------------------- CSV

CSV_FIELDS = ("scheme", "bits", "granularity", "group_size", "range", "passthrough",
              "quantized_bytes", "compression_ratio", "mse", "sqnr_db", "max_abs_error",
              "cosine", "bits_per_weight")  # new fields go last: readers by position keep working


def to_csv(report: Report, sort: str | None = None, top: int | None = None) -> str:
    """One row per tensor with a header. An artifact's columns are plain (``sqnr_db``); a dry
    run has one set per scheme, prefixed ``<label>.`` (``gnmt.sqnr_db``), and ``best``."""
    return "".join(iter_csv(report, sort, top))


def iter_csv(report: Report, sort: str | None = None, top: int | None = None
             ) -> Iterator[str]:
    """:func:`to_csv` in pieces of at most 1,000 rows."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    prefixes = [""] if report.kind == "artifact" else [f"{lb}." for lb in report.labels]
    head = ["name", "dtype", "shape", "parameters", "original_bytes"]
    if report.kind == "dry-run":
        head.append("best")
    head += [p + f for p in prefixes for f in CSV_FIELDS]
    w.writerow(head)
    for i, r in enumerate(report.sorted_rows(sort, top)):
        if i % 1000 == 999:
            yield buf.getvalue()
            buf.seek(0)
            buf.truncate()
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
    yield buf.getvalue()


# --------------------------------------------------------------------------- Markdown




def _md(text: str) -> str:
    return _safe(text).replace("|", "\\|")


def to_markdown(report: Report, sort: str | None = None, top: int | None = None) -> str:
    """Tables for a pull request: every tensor, the totals with the energy estimate, and the
    energy model's assumptions."""
    return "".join(iter_markdown(report, sort, top))


def iter_markdown(report: Report, sort: str | None = None, top: int | None = None
                  ) -> Iterator[str]:
    """:func:`to_markdown` a line at a time."""
    return (line + "\n" for line in _md_lines(report, sort, top))


def _md_lines(report: Report, sort: str | None, top: int | None) -> Iterator[str]:
    rows = report.sorted_rows(sort, top)
    yield from [f"### qtool report: `{_md(report.path)}`", "", _subtitle(report), ""]
    if report.kind == "artifact":
        yield from ["| tensor | shape | scheme | bits | granularity | parameters | size | "
                    "stored | ratio | bits/weight | MSE | SQNR dB | max abs error | cosine |",
                    "|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            rec = r.results[0]
            cells = [f"`{_md(r.name)}`", _fmt_shape(r.shape)]
            if rec.spec is None:
                cells += [f"kept: {_md(rec.passthrough or '')}", "", ""]
            else:
                cells += [rec.spec.scheme, str(rec.spec.bits), _gran(rec.spec)]
            cells += [f"{r.parameters:,}", human_bytes(rec.original_bytes),
                      human_bytes(rec.stored_bytes), _fmt_ratio(_ratio(rec)),
                      _fmt_bpw(bits_per_weight(rec))]
            cells += _md_metrics(rec)
            yield "| " + " | ".join(cells) + " |"
    else:
        head = ["tensor", "shape", "parameters", "size"]
        align = ["---", "---:", "---:", "---:"]
        for lb in report.labels:
            head += [f"{lb} stored", f"{lb} ratio", f"{lb} bits/weight", f"{lb} SQNR dB",
                     f"{lb} max abs error"]
            align += ["---:"] * 5
        yield from ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
        for r in rows:
            cells = [f"`{_md(r.name)}`", _fmt_shape(r.shape), f"{r.parameters:,}",
                     human_bytes(r.original_bytes)]
            for g, rec in enumerate(r.results):
                if rec.stats is None:
                    cells += [human_bytes(rec.stored_bytes), "1.00×",
                              _fmt_bpw(bits_per_weight(rec)),
                              f"kept: {_md(rec.passthrough or '')}", ""]
                    continue
                mark = f" {BEST}" if r.best == g else ""
                cells += [human_bytes(rec.stored_bytes), _fmt_ratio(_ratio(rec)),
                          _fmt_bpw(bits_per_weight(rec)),
                          _fmt_sqnr(rec.stats.sqnr_db) + mark,
                          _fmt_err(rec.stats.max_abs_error)]
            yield "| " + " | ".join(cells) + " |"
    out: list[str] = []
    if len(rows) < len(report.rows):
        out += ["", f"Showing {len(rows)} of {len(report.rows)} tensors."]
    out += ["", "| | before | " + " | ".join(_after_labels(report)) + " |",
            "|---|---:|" + "---:|" * len(report.labels)]
    for key, before, afters in _totals_lines(report):
        out.append(f"| {key} | {_md(before)} | " + " | ".join(_md(a) for a in afters) + " |")
    out += ["", "Estimates: energy, memory-bound latency and MAC area (docs/ENERGY.md):", ""]
    out += [f"- {a}" for a in assumptions(report.energy_model, report.workload)]
    out += _md_checks(report)
    yield from out


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




