"""Rich rendering: the quantize summary and the report tables. Rich is imported only here."""

from __future__ import annotations

from collections.abc import Callable, Iterator
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
    _fmt_bpw,
    _fmt_cos,
    _fmt_err,
    _fmt_ratio,
    _fmt_shape,
    _fmt_sqnr,
    _gran,
    _ratio,
    _safe,
    fit_name,
    human_bytes,
)
from qtool.report.lines import _after_labels, _subtitle, _totals_lines
from qtool.report.model import (
    BEST,
    NAME_MIN_WIDTH,
    SQNR_RED_DB,
    SQNR_YELLOW_DB,
    Report,
    Row,
    bits_per_weight,
)

# --------------------------------------------------------------------------- table


@dataclass
class _Col:
    header: str
    cells: list[Text]
    priority: int  # lower is kept first when the terminal is narrow; equal: all or none
    justify: str = "right"
    key: str = ""  # what it shows, for columns that move into the subtitle when constant
    fixed: int | None = None  # the width, when measured without keeping the cells

    @property
    def width(self) -> int:
        if self.fixed is not None:
            return self.fixed
        lines = [ln for c in self.cells for ln in c.plain.split("\n")]
        return max(len(x) for x in [*self.header.split("\n"), *lines])


def _kept_everywhere(r: Row) -> bool:
    return all(rec.spec is None for rec in r.results)


def _constant_settings(report: Report, rows: list[Row]) -> dict[str, str]:
    """The scheme, bits and granularity when every quantized tensor shares them (an
    artifact's, or a dry run of one spec): said once under the title instead of on every
    row or in every column header."""
    if report.kind != "artifact" and len(report.labels) > 1:
        return {}
    specs = [r.results[0].spec for r in report.rows if r.results[0].spec is not None]
    out = {}
    for key, get in (("scheme", lambda s: s.scheme), ("bits", lambda s: f"{s.bits} bits"),
                     ("granularity", _gran)):
        values = {get(s) for s in specs}
        if len(values) == 1:
            out[key] = values.pop()
    return out


LARGE_TABLE = 5000
"""Rows above which the table is drawn in chunks of _CHUNK rows (same columns, widths fixed
from every row), each printed as it is made: Rich holds a table's cells and its rendered
lines whole, hundreds of MB for 100,000 rows."""
_CHUNK = 1000


def render_report(report: Report, sort: str | None = None, top: int | None = None,
                  width: int = 80, show_all: bool = False) -> RenderableType:
    """The Rich renderable of the report for a terminal ``width`` columns wide: the tensor
    table with as many columns as fit (JSON, CSV and Markdown always have them all), the
    totals with the estimates, and the assumptions behind them.

    Tensors kept in float by every group are summed into one line (``show_all`` lists them,
    one line each); columns whose value never changes move into the subtitle; names that do
    not fit lose their common prefix, then middle parts ("layers.3.….q_proj.weight")."""
    return Group(*render_report_parts(report, sort, top, width, show_all))


def render_report_parts(report: Report, sort: str | None = None, top: int | None = None,
                        width: int = 80, show_all: bool = False) -> Iterator[RenderableType]:
    """:func:`render_report` one part at a time, for printing part by part: with more than
    LARGE_TABLE rows shown, the table comes as chunks of _CHUNK rows."""
    rows = report.sorted_rows(sort, top)
    kept = [] if show_all else [r for r in rows if _kept_everywhere(r)]
    if not show_all:
        rows = [r for r in rows if not _kept_everywhere(r)]
    prefix = _common_prefix(r.name for r in report.rows)
    big = len(rows) > LARGE_TABLE
    cols = _measured_cols(report, rows) if big else _cols_for(report, rows)
    constant = _constant_settings(report, rows)
    cols = [c for c in cols if c.key not in constant]
    # Columns are kept by priority, the most useful first; columns of the same priority
    # (one metric for every dry-run scheme) are shown all together or not at all. The first
    # tier (SQNR) is always shown: names give way to it (down to NAME_MIN_WIDTH). Further
    # tiers share what is left with the names, which keep up to 45 % of the width.
    # The names as shown are made again where needed, not held: 200,000 of them are 20 MB.
    longest = max((len(_shown_name(r, prefix)) for r in rows), default=len("tensor"))
    first = min(c.priority for c in cols) if cols else 0
    need0 = sum(c.width + 2 for c in cols if c.priority == first)
    name_w = max(NAME_MIN_WIDTH, min(longest, width - need0 - 1))
    name_w = min(name_w, max(NAME_MIN_WIDTH, int(width * 0.45), width - need0 - 1))
    budget = width - name_w - 1
    chosen: list[_Col] = []
    for prio in sorted({c.priority for c in cols}):
        tier = [c for c in cols if c.priority == prio]
        need = sum(c.width + 2 for c in tier)  # two spaces between columns
        if need <= budget or prio == first:
            chosen += tier
            budget -= need
    shown = [c for c in cols if c in chosen]
    # What the chosen columns leave goes back to the names.
    name_w = max(NAME_MIN_WIDTH, min(longest, name_w + max(budget, 0)))
    yield Text.assemble(("qtool report ", "bold"), _safe(report.path))
    yield Text(_subtitle(report), style="dim")
    if constant:
        yield Text("every quantized tensor: " + ", ".join(constant.values()), style="dim")
    if prefix:
        yield Text(f"tensor names below start with {prefix!r}", style="dim")
    if big:
        yield from _chunked_table(report, rows, prefix, shown, name_w)
    else:
        table = _table(shown, name_w, None, True)
        for i, r in enumerate(rows):
            table.add_row(Text(fit_name(_shown_name(r, prefix), name_w)),
                          *[c.cells[i] for c in shown])
        yield table
    if kept and not show_all:
        yield Text(_kept_line(kept))
    notes = []
    if top is not None and top < len(report.rows):
        notes.append(f"showing {top} of {len(report.rows)} tensors")
    if len(shown) < len(cols):
        notes.append(f"{len(cols) - len(shown)} more columns in a wider terminal or with "
                     "--format json, csv or markdown")
    if any(r.best is not None and any(rec.spec is None for rec in r.results) for r in rows):
        notes.append("n/a: the scheme cannot quantize the tensor (the reason is in "
                     "--format json)")
    if notes:
        yield Text("; ".join(notes), style="dim")
    yield Text("")
    yield _totals_table(report)
    for label, t in zip(report.labels, report.totals, strict=True):
        if t.worst is not None:
            who = "" if report.kind == "artifact" else f" ({label})"
            yield Text(f"worst tensor{who}: {_safe(t.worst.name)}, SQNR "
                       f"{_fmt_sqnr(t.worst.sqnr_db)} dB, max abs error "
                       f"{_fmt_err(t.worst.max_abs_error)}")
    yield Text("estimates (docs/ENERGY.md):\n" + "\n".join(
        f"- {a}" for a in assumptions(report.energy_model, report.workload)), style="dim")
    for o in report.offenders:
        yield Text(f"FAIL {o.message()}", style="bold red")


def _cols_for(report: Report, rows: list[Row]) -> list[_Col]:
    return _artifact_cols(report, rows) if report.kind == "artifact" else \
        _dry_run_cols(report, rows)


def _table(shown: list[_Col], name_w: int, widths: list[int] | None, header: bool) -> Table:
    """The tensor table's frame; ``widths``: fixed column widths (a chunk of a large table,
    name column first), else Rich sizes the columns from their cells."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, collapse_padding=True,
                  padding=(0, 1), header_style="bold", show_header=header)
    if widths is None:
        table.add_column("tensor", no_wrap=True, min_width=min(NAME_MIN_WIDTH, name_w),
                         max_width=name_w)
        for c in shown:
            table.add_column(c.header, justify=c.justify, no_wrap=True)  # type: ignore[arg-type]
        return table
    table.add_column("tensor", no_wrap=True, width=widths[0])
    for c, w in zip(shown, widths[1:], strict=True):
        table.add_column(c.header, justify=c.justify, no_wrap=True, width=w)  # type: ignore[arg-type]
    return table


def _measured_cols(report: Report, rows: list[Row]) -> list[_Col]:
    """The columns of ``rows`` with their widths over every row but no cells (built and
    dropped a chunk at a time)."""
    cols: list[_Col] = []
    for start in range(0, len(rows), _CHUNK):
        chunk = _cols_for(report, rows[start:start + _CHUNK])
        if not cols:
            cols = [_Col(c.header, [], c.priority, c.justify, c.key, c.width) for c in chunk]
        for c, m in zip(chunk, cols, strict=True):
            m.fixed = max(m.width, c.width)
    return cols


def _shown_name(r: Row, prefix: str) -> str:
    return _safe(r.name[len(prefix):])


def _chunked_table(report: Report, rows: list[Row], prefix: str, shown: list[_Col],
                   name_w: int) -> Iterator[Table]:
    """The table in chunks of _CHUNK rows, each chunk's cells (names too) made as it is
    drawn: nothing per row is held for the whole table."""
    longest = max((len(fit_name(_shown_name(r, prefix), name_w)) for r in rows), default=0)
    widths = [max(len("tensor"), longest)] + [c.width for c in shown]
    keep = {c.header for c in shown}
    for start in range(0, len(rows), _CHUNK):
        chunk = rows[start:start + _CHUNK]
        cells = [c for c in _cols_for(report, chunk) if c.header in keep]
        table = _table(shown, name_w, widths, start == 0)
        for i, r in enumerate(chunk):
            table.add_row(Text(fit_name(_shown_name(r, prefix), name_w)),
                          *[c.cells[i] for c in cells])
        yield table


def _kept_line(kept: list[Row]) -> str:
    """ "kept: 12 tensors, 30.5 KiB (1-D tensor (bias or norm): 11, not float: 1); --all lists
    them" """
    reasons: dict[str, int] = {}
    for r in kept:
        why = _safe(r.results[0].passthrough or "kept")
        reasons[why] = reasons.get(why, 0) + 1
    size = human_bytes(sum(r.original_bytes for r in kept))
    why = ", ".join(f"{k}: {n}" for k, n in reasons.items())
    n = len(kept)
    return f"kept: {n} tensor{'s' if n != 1 else ''}, {size} ({why}); --all lists them"


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
        _Col("scheme", [spec_cell(rec, lambda s: s.scheme) for rec in recs], 4, "left",
             "scheme"),
        _Col("bits", [spec_cell(rec, lambda s: str(s.bits)) for rec in recs], 9, key="bits"),
        _Col("granularity", [spec_cell(rec, _gran) for rec in recs], 10, "left",
             "granularity"),
        _Col("params", [Text(f"{r.parameters:,}") for r in rows], 11),
        _Col("size", [Text(human_bytes(rec.original_bytes)) for rec in recs], 6),
        _Col("stored", [Text(human_bytes(rec.stored_bytes)) for rec in recs], 2),
        _Col("ratio", [Text(_fmt_ratio(_ratio(rec))) for rec in recs], 3),
        _Col("bits/\nweight", [Text(_fmt_bpw(bits_per_weight(rec))) for rec in recs], 6),
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
    for g, full_label in enumerate(report.labels):
        # "symmetric-unsigned 4b channel" over three short lines: a narrow column, so that
        # four schemes' SQNR columns fit beside the names at 80 columns.
        label = _header_label(full_label)
        if len(report.labels) == 1:  # the one spec is said under the title
            label = ""

        def head(what: str, label: str = label) -> str:
            return f"{label}\n{what}" if label else what

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
            _Col(head("stored"), [Text(human_bytes(rec.stored_bytes)) for rec in recs],
                 2),
            _Col(head("SQNR dB"), sqnr, 1),
            _Col(head("max err"), _metric_cells(
                report, recs, lambda s: _fmt_err(s.max_abs_error),
                lambda s: _err_style(report, s.max_abs_error)), 3),
            _Col(head("ratio"), [Text(_fmt_ratio(_ratio(rec))) for rec in recs], 5),
            _Col(head("bits/w"), [Text(_fmt_bpw(bits_per_weight(rec))) for rec in recs], 5),
            _Col(head("cosine"), _metric_cells(report, recs, lambda s: _fmt_cos(s.cosine)),
                 8),
            _Col(head("MSE"), _metric_cells(report, recs, lambda s: f"{s.mse:.3g}"), 9),
        ]
    return cols


def _header_label(label: str) -> str:
    words = label.replace("-", "- ").split()
    lines: list[str] = []
    for w in words:
        if lines and len(lines[-1]) + len(w) + (0 if lines[-1].endswith("-") else 1) <= 10:
            lines[-1] += w if lines[-1].endswith("-") else " " + w
        else:
            lines.append(w)
    return "\n".join(lines)


def _totals_table(report: Report) -> Table:
    t = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, collapse_padding=True,
              padding=(0, 1), header_style="bold")
    t.add_column("totals", no_wrap=True)
    t.add_column("before", justify="right", no_wrap=True)
    for label in _after_labels(report):
        head = _header_label(label)
        t.add_column(head, justify="right", overflow="fold",
                     min_width=max(len(ln) for ln in head.split("\n")))
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




def render_summary(summary: dict[str, Any]) -> RenderableType:
    t = Table(title=f"qtool quantize → {summary['output']}", show_header=False, box=None)
    t.add_column(style="bold")
    t.add_column(justify="right")
    t.add_row("tensors quantized", str(summary["tensors"]["quantized"]))
    t.add_row("tensors kept in float", str(summary["tensors"]["passthrough"]))
    t.add_row("bytes before", human_bytes(summary["bytes"]["before"]))
    t.add_row("bytes after", human_bytes(summary["bytes"]["after"]))
    ratio = summary["compression_ratio"]
    t.add_row("compression", f"{ratio:.2f}×" if ratio else "-")
    per = list(summary["bits_per_weight_by_tensor"].values())
    spread = f" ({_fmt_bpw(min(per))}–{_fmt_bpw(max(per))} per tensor)" \
        if per and min(per) != max(per) else ""
    t.add_row("bits per weight, quantized", _fmt_bpw(summary["bits_per_weight"]) + spread)
    t.add_row("time", f"{summary['seconds']:.2f} s")
    q = summary.get("quality")
    if q is None:
        return t
    # On a line of its own: a long tensor name would stretch the table.
    return Group(t, Text(f"quality: SQNR {_fmt_sqnr(float(q['sqnr_db']))} dB over all "
                         f"quantized values; worst tensor {_safe(q['worst']['name'])} "
                         f"({_fmt_sqnr(float(q['worst']['sqnr_db']))} dB)"))
