"""`qtool report --chart`: per-tensor bars (SQNR, or bits per weight) and, when names follow
``layers.N.<module>`` (or ``h.N.``, ``layer.N.``, ``blocks.N.``), a heatmap of layer × module
type, so that a weak module type shows as a column. Rich is imported here, and this module
only when a chart is drawn."""

from __future__ import annotations

import math
import re

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from qtool.report.fmt import _common_prefix, _fmt_sqnr, _safe, fit_name
from qtool.report.model import SQNR_RED_DB, SQNR_YELLOW_DB, Report
from qtool.report.series import Point, chart_points, layer_grid

EIGHTHS = " ▏▎▍▌▋▊▉"
CELL = 6  # characters per heatmap cell: "43.78" and a space


def _style(what: str, v: float) -> str:
    if what == "bits":
        return "cyan"
    return "red" if v < SQNR_RED_DB else "yellow" if v < SQNR_YELLOW_DB else "green"


def _fmt(what: str, v: float) -> str:
    if what == "bits":
        return f"{v:.2f}"
    return _fmt_sqnr(v) if math.isinf(v) else f"{v:.1f}"


def _bar(v: float, top: float, width: int) -> str:
    """A bar of ``width`` characters at most, in eighths of a character; ∞ is full."""
    if top <= 0 or width <= 0:
        return ""
    frac = 1.0 if math.isinf(v) else max(0.0, min(v / top, 1.0))
    eighths = round(frac * width * 8)
    full, part = divmod(eighths, 8)
    return "█" * full + (EIGHTHS[part] if part else "")


def _short_modules(modules: list[str]) -> dict[str, str]:
    """Column labels: the last part of each module path, or more parts where that is
    ambiguous ("attention.output.dense" beside "output.dense")."""
    out = {}
    for m in modules:
        parts = m.split(".")
        for k in range(1, len(parts) + 1):
            label = ".".join(parts[-k:])
            if sum(1 for o in modules if o.endswith(label)) == 1 or k == len(parts):
                out[m] = label
                break
    return out


def _bars(points: list[Point], what: str, width: int, title: str) -> list[RenderableType]:
    prefix = _common_prefix(p.name for p in points)
    names = [_safe(p.name[len(prefix):]) for p in points]
    name_w = min(max((len(n) for n in names), default=6), max(16, int(width * 0.4)))
    value_w = 8
    bar_w = max(4, width - name_w - value_w - 3)
    finite = [p.value for p in points if not math.isinf(p.value)]
    top = max(finite, default=1.0)
    if what == "bits":
        top = max(top, 8.0)  # bits per weight: on a common scale up to 8
    lines: list[RenderableType] = [Text(title, style="bold")]
    if prefix:
        lines.append(Text(f"names start with {prefix!r}", style="dim"))
    for p, n in zip(points, names, strict=True):
        t = Text(fit_name(n, name_w).ljust(name_w) + " ")
        bar = _bar(p.value, top, bar_w)
        t.append(bar, style=_style(what, p.value))
        t.append(" " * (bar_w - len(bar) + 1) + _fmt(what, p.value).rjust(value_w))
        lines.append(t)
    return lines


def _heatmap(grid: tuple, what: str, width: int, title: str) -> list[RenderableType] | None:
    layers, modules, cells, rest = grid
    short = _short_modules(modules)
    # Long labels go over two or more lines at "_" and "." ("down_/proj"), never cut.
    heads = {m: re.sub(r"([_.])", r"\1\n", short[m]) if len(short[m]) > CELL + 1 else short[m]
             for m in modules}
    widths = {m: max(CELL, max(len(x) for x in heads[m].split("\n")) + 1) for m in modules}
    if 6 + sum(widths.values()) > width:
        return None  # too many module types for the terminal: bars instead
    table = Table(box=None, pad_edge=False, padding=(0, 0), show_edge=False,
                  header_style="bold", title=title, title_justify="left",
                  title_style="bold")
    table.add_column("layer", justify="right", width=6, no_wrap=True)
    for m in modules:
        table.add_column(heads[m], justify="right", width=widths[m], no_wrap=True)
    values = [v for v in cells.values() if not math.isinf(v)]
    for layer in layers:
        row: list[Text] = [Text(str(layer))]
        for m in modules:
            v = cells.get((layer, m))
            if v is None:
                row.append(Text("·", style="dim"))
            else:
                row.append(Text(_fmt(what, v), style=_cell_style(what, v, values)))
        table.add_row(*row)
    out: list[RenderableType] = [table]
    if what == "sqnr":
        out.append(Text(f"SQNR dB; red < {SQNR_RED_DB:g}, yellow < {SQNR_YELLOW_DB:g}; "
                        "· = not quantized in that layer", style="dim"))
    else:
        out.append(Text("bits per weight (integers, scales and zero points); "
                        "· = not quantized in that layer", style="dim"))
    if rest:
        out += _bars(rest, what, width, "outside the layers")
    return out


def _cell_style(what: str, v: float, values: list[float]) -> str:
    """Background by the value: the worst third red-ish for SQNR (or by the fixed
    thresholds), the most bits darkest for bits per weight."""
    if what == "bits":
        hi = max(values, default=v)
        return "reverse cyan" if hi and v >= hi - 1e-9 else "cyan"
    return "reverse " + _style(what, v)


def render_chart(report: Report, what: str = "sqnr", width: int = 80) -> RenderableType:
    """The chart of every group of the report (one for an artifact), ``width`` columns wide."""
    parts: list[RenderableType] = [Text.assemble(("qtool report ", "bold"),
                                                 _safe(report.path))]
    label = "SQNR dB per tensor" if what == "sqnr" else "bits per weight per tensor"
    for g, group in enumerate(report.labels):
        title = label if report.kind == "artifact" else f"{label}: {group}"
        points = chart_points(report, what, g)
        if not points:
            parts.append(Text(f"{title}: no tensor is quantized", style="dim"))
            continue
        grid = layer_grid(points)
        drawn = _heatmap(grid, what, width, title) if grid is not None else None
        parts += drawn if drawn is not None else _bars(points, what, width, title)
        kept = sum(1 for r in report.rows if r.results[g].stats is None)
        if kept:
            parts.append(Text(f"kept in float (not drawn): {kept} tensor"
                              f"{'s' if kept != 1 else ''}", style="dim"))
        t = report.totals[g]
        if t.worst is not None:
            parts.append(Text(f"worst: {_safe(t.worst.name)} "
                              f"({_fmt_sqnr(t.worst.sqnr_db)} dB)"))
    return Group(*parts)
