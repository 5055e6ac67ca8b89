"""Rich rendering: the quantize summary and the report tables. Rich is imported only here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from qtool.core.metrics import ErrorStats
from qtool.core.schemes import QuantSpec
from qtool.formats.manifest import TensorRecord
from qtool.report.energy import assumptions
from qtool.report.fmt import (
    _common_prefix,
    _fmt_cos,
    _fmt_err,
    _fmt_ratio,
    _fmt_shape,
    _fmt_sqnr,
    _gran,
    _ratio,
    _safe,
    human_bytes,
)
from qtool.report.model import (
    BEST,
    NAME_MIN_WIDTH,
    SQNR_RED_DB,
    SQNR_YELLOW_DB,
    Report,
    Row,
    _after_labels,
    _subtitle,
    _totals_lines,
)

# --------------------------------------------------------------------------- table








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
