"""`qtool report --format html`: one self-contained page. Inline SVG and CSS only: no script,
no font or image from the network, readable with scripting off. Pure string building.

The page holds the per-tensor SQNR and bits-per-weight charts (a layer × module heatmap too
when names follow ``layers.N.<module>``), the histograms of the worst tensors with their
quantization grid, the totals with the energy, latency and area estimates and their
assumptions, and the per-tensor table. Its size grows with the number of tensors (about
1 KB each), not with their bytes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from html import escape

from qtool import __version__
from qtool.report.energy import assumptions
from qtool.report.fmt import _common_prefix, _fmt_err, _fmt_shape, _fmt_sqnr, human_bytes
from qtool.report.lines import _after_labels, _subtitle, _totals_lines
from qtool.report.model import SQNR_RED_DB, SQNR_YELLOW_DB, Report, Row, bits_per_weight
from qtool.report.series import Point, chart_points, layer_grid
from qtool.report.weights import Histogram

CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px auto;
max-width:1100px;padding:0 16px;color:#1d1d1f;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid
#ddd;padding-bottom:4px}.sub{color:#666;margin:2px 0}
table{border-collapse:collapse;font-variant-numeric:tabular-nums}
td,th{padding:2px 8px;text-align:right;border-bottom:1px solid #eee;white-space:nowrap}
th{background:#f5f5f7}td.n,th.n{text-align:left;white-space:normal;word-break:break-word}
.bad{color:#b00020;font-weight:600}.warn{color:#9a6700}
svg{display:block;margin:6px 0}svg text{font:11px system-ui,sans-serif;fill:#333}
.note{color:#666;font-size:13px}ul.a{color:#555;font-size:13px}
.hist{display:inline-block;margin:0 16px 16px 0;vertical-align:top}
"""

BAR_W = 560  # px of the longest bar
ROW_H = 16


def _colour(what: str, v: float) -> str:
    if what == "bits":
        return "#3b7dd8"
    return "#d1344b" if v < SQNR_RED_DB else "#e0a100" if v < SQNR_YELLOW_DB else "#2e9b57"


def _num(what: str, v: float) -> str:
    return f"{v:.2f}" if what == "bits" else _fmt_sqnr(v)


def _bars_svg(points: list[Point], what: str, title: str) -> Iterator[str]:
    prefix = _common_prefix(p.name for p in points)
    label_w = min(420, 7 * max(len(p.name) - len(prefix) for p in points) + 10)
    finite = [p.value for p in points if not math.isinf(p.value)]
    top = max([*finite, 8.0] if what == "bits" else finite or [1.0])
    del finite
    h = ROW_H * len(points) + 24
    w = label_w + BAR_W + 70
    if prefix:
        yield f'<p class="note">names start with <code>{escape(prefix)}</code></p>'
    yield (f'<svg class="bars" role="img" aria-label="{escape(title)}" width="{w}" '
           f'height="{h}" viewBox="0 0 {w} {h}" xmlns="http://www.w3.org/2000/svg">')
    for i, p in enumerate(points):
        y = i * ROW_H + 4
        frac = 1.0 if math.isinf(p.value) else max(0.0, p.value / top) if top > 0 else 0.0
        name = escape(p.name[len(prefix):])
        yield (f'<text x="{label_w - 6}" y="{y + 11}" text-anchor="end">{name}</text>'
               f'<rect x="{label_w}" y="{y + 1}" width="{frac * BAR_W:.1f}" '
               f'height="{ROW_H - 4}" fill="{_colour(what, p.value)}"><title>{escape(p.name)}'
               f': {_num(what, p.value)}</title></rect>'
               f'<text x="{label_w + frac * BAR_W + 4:.1f}" y="{y + 11}">'
               f'{_num(what, p.value)}</text>')
    axis_y = ROW_H * len(points) + 8
    yield (f'<line x1="{label_w}" y1="{axis_y}" x2="{label_w + BAR_W}" y2="{axis_y}" '
           f'stroke="#999"/><text x="{label_w}" y="{axis_y + 12}">0</text>'
           f'<text x="{label_w + BAR_W}" y="{axis_y + 12}" text-anchor="end">{top:.4g} '
           f'{"bits" if what == "bits" else "dB"}</text></svg>')


def _heatmap_svg(points: list[Point], what: str, title: str) -> Iterator[str]:
    grid = layer_grid(points)
    if grid is None:
        return
    layers, modules, cells, _ = grid
    cw, ch, left, topm = 64, 18, 56, 100
    w, h = left + cw * len(modules) + 90, topm + ch * len(layers) + 8
    # Darker is worse (lower SQNR) or costlier (more bits per weight), within this model.
    finite = [v for v in cells.values() if not math.isinf(v)]
    lo, hi = min(finite, default=0.0), max(finite, default=0.0)
    del finite

    def opacity(v: float) -> float:
        if math.isinf(v) or hi <= lo:
            return 0.5
        rel = (hi - v) / (hi - lo) if what == "sqnr" else (v - lo) / (hi - lo)
        return 0.35 + 0.65 * rel

    yield (f'<svg class="heat" role="img" aria-label="{escape(title)}" width="{w}" '
           f'height="{h}" viewBox="0 0 {w} {h}" xmlns="http://www.w3.org/2000/svg">')
    for j, m in enumerate(modules):
        x = left + j * cw + cw / 2
        yield (f'<text transform="translate({x:.0f},{topm - 6}) rotate(-35)">'
               f'{escape(m)}</text>')
    for i, layer in enumerate(layers):
        y = topm + i * ch
        yield f'<text x="{left - 6}" y="{y + 13}" text-anchor="end">{layer}</text>'
        for j, m in enumerate(modules):
            v = cells.get((layer, m))
            if v is None:
                continue
            x = left + j * cw
            yield (f'<rect x="{x}" y="{y}" width="{cw - 2}" height="{ch - 2}" '
                   f'fill="{_colour(what, v)}" fill-opacity="{opacity(v):.2f}">'
                   f'<title>layer {layer} '
                   f'{escape(m)}: {_num(what, v)}</title></rect>'
                   f'<text x="{x + cw - 6}" y="{y + 12}" text-anchor="end" '
                   f'style="fill:#fff">{_num(what, v)}</text>')
    yield "</svg>"


def _hist_svg(hg: Histogram) -> str:
    w, h, pad = 520, 190, 28
    lo, hi = hg.edges[0], hg.edges[-1]
    span = hi - lo
    top = max(hg.counts) or 1

    def x(v: float) -> float:
        return pad + (v - lo) / span * (w - 2 * pad)

    out = [f'<svg class="hist-svg" role="img" aria-label="histogram of {escape(hg.name)}" '
           f'width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
           'xmlns="http://www.w3.org/2000/svg">']
    base = h - pad
    bw = (w - 2 * pad) / len(hg.counts)
    for i, n in enumerate(hg.counts):
        bh = n / top * (h - 2 * pad)
        out.append(f'<rect x="{pad + i * bw:.1f}" y="{base - bh:.1f}" '
                   f'width="{max(bw - 0.5, 0.5):.1f}" height="{bh:.1f}" fill="#7a8fa6"/>')
    # The grid: every representable value as a thin line; at 8 bits they are dense, so they
    # are drawn light and the two ends (the clipping range) dark.
    # One path of vertical strokes keeps 256 levels to a few KB.
    d = "".join(f"M{x(v):.1f} {pad - 4}V{base}" for v in hg.grid)
    out.append(f'<path class="grid" d="{d}" stroke="#d1344b" stroke-width="0.7" '
               f'stroke-opacity="{0.6 if len(hg.grid) <= 32 else 0.3}" fill="none"/>')
    for v in (hg.grid[0], hg.grid[-1]):
        out.append(f'<line x1="{x(v):.1f}" y1="{pad - 8}" x2="{x(v):.1f}" y2="{base}" '
                   'stroke="#d1344b" stroke-width="1.5"/>')
    out.append(f'<line x1="{pad}" y1="{base}" x2="{w - pad}" y2="{base}" stroke="#999"/>'
               f'<text x="{pad}" y="{h - 10}">{lo:.3g}</text>'
               f'<text x="{w - pad}" y="{h - 10}" text-anchor="end">{hi:.3g}</text></svg>')
    return "".join(out)


def _hist_block(hg: Histogram) -> str:
    clip = f"; {hg.clipped} values beyond the grid's ends (clipped)" if hg.clipped else ""
    return (f'<div class="hist"><b>{escape(hg.name)}</b> — SQNR {_fmt_sqnr(hg.sqnr_db)} dB'
            f'<br><span class="note">{escape(hg.unit)}; {escape(hg.source)}; '
            f'{hg.levels} grid levels (red){clip}</span>{_hist_svg(hg)}</div>')


def _totals_html(report: Report) -> str:
    heads = "".join(f"<th>{escape(lb)}</th>" for lb in _after_labels(report))
    rows = [f'<table class="totals"><tr><th class="n">totals</th><th>before</th>{heads}</tr>']
    for key, before, afters in _totals_lines(report):
        cells = "".join(f"<td>{escape(a)}</td>" for a in afters)
        rows.append(f'<tr><td class="n">{escape(key)}</td><td>{escape(before)}</td>{cells}</tr>')
    rows.append("</table>")
    return "".join(rows)


def _tensor_table(report: Report, sort: str | None, top: int | None) -> Iterator[str]:
    """The table a row at a time: 200,000 rows are ~40 MB of HTML, never held whole."""
    rows = report.sorted_rows(sort, top)
    heads = ["tensor", "shape", "size"]
    for lb in report.labels:
        p = "" if report.kind == "artifact" else f"{lb} "
        heads += [f"{p}setting", f"{p}stored", f"{p}bits/w", f"{p}SQNR dB", f"{p}max err"]
    yield '<table class="tensors"><tr>' + "".join(
        f'<th{" class=n" if i == 0 else ""}>{escape(x)}</th>' for i, x in enumerate(heads)) \
        + "</tr>"
    for r in rows:
        yield _tensor_row(r)
    yield "</table>"
    if len(rows) < len(report.rows):
        yield f'<p class="note">showing {len(rows)} of {len(report.rows)} tensors</p>'


def _tensor_row(r: Row) -> str:
    cells = [f'<tr><td class="n">{escape(r.name)}</td><td>{_fmt_shape(r.shape)}</td>'
             f"<td>{human_bytes(r.original_bytes)}</td>"]
    for rec in r.results:
        if rec.spec is None or rec.stats is None:
            why = escape(rec.passthrough or "kept")
            cells.append(f'<td class="n">kept: {why}</td><td>{human_bytes(rec.stored_bytes)}'
                         "</td><td></td><td></td><td></td>")
            continue
        s = rec.stats.sqnr_db
        cls = ' class="bad"' if s < SQNR_RED_DB else ' class="warn"' \
            if s < SQNR_YELLOW_DB else ""
        bpw = bits_per_weight(rec)
        cells.append(f"<td>{escape(rec.spec.scheme)} {rec.spec.bits}b</td>"
                     f"<td>{human_bytes(rec.stored_bytes)}</td>"
                     f"<td>{'' if bpw is None else f'{bpw:.2f}'}</td>"
                     f"<td{cls}>{_fmt_sqnr(s)}</td><td>{_fmt_err(rec.stats.max_abs_error)}"
                     "</td>")
    cells.append("</tr>")
    return "".join(cells)


def to_html(report: Report, hists: list[Histogram], hist_note: str | None = None,
            sort: str | None = None, top: int | None = None) -> str:
    """The page (see the module docstring) as one string."""
    return "".join(iter_html(report, hists, hist_note, sort, top))


def iter_html(report: Report, hists: list[Histogram], hist_note: str | None = None,
              sort: str | None = None, top: int | None = None) -> Iterator[str]:
    """:func:`to_html` in pieces, a tensor (a table row, a bar, a heatmap cell) at a time:
    the page of 200,000 tensors is never held whole, nor a list of its rows."""
    first = True
    for part in _parts(report, hists, hist_note, sort, top):
        if not first:
            yield "\n"  # the page's parts are separated by a newline
        first = False
        if isinstance(part, str):
            yield part
        else:
            yield from part


def _parts(report: Report, hists: list[Histogram], hist_note: str | None,
           sort: str | None, top: int | None) -> Iterator[str | Iterator[str]]:
    """The page's parts, in order: a string, or the pieces of a long part."""
    title = f"qtool report {report.path}"
    yield '<!doctype html><html lang="en"><head><meta charset="utf-8">'
    yield '<meta name="viewport" content="width=device-width,initial-scale=1">'
    yield f"<title>{escape(title)}</title><style>{CSS}</style></head><body>"
    yield f"<h1>{escape(title)}</h1><p class=\"sub\">{escape(_subtitle(report))}</p>"
    yield f'<p class="sub">qtool {escape(__version__)}</p>'
    for g, label in enumerate(report.labels):
        suffix = "" if report.kind == "artifact" else f": {label}"
        for what, name in (("sqnr", "SQNR per tensor (dB)"), ("bits", "Bits per weight")):
            points = chart_points(report, what, g)
            yield f"<h2>{escape(name + suffix)}</h2>"
            if not points:
                yield '<p class="note">no tensor is quantized</p>'
                continue
            yield _heatmap_svg(points, what, name)
            yield _bars_svg(points, what, name)
            del points  # one chart's points at a time
        t = report.totals[g]
        if t.worst is not None:
            yield (f"<p>worst tensor{escape(suffix)}: <b>{escape(t.worst.name)}</b>, "
                   f"SQNR {_fmt_sqnr(t.worst.sqnr_db)} dB</p>")
    yield "<h2>Worst tensors: weights and the quantization grid</h2>"
    if len(report.labels) > 1:
        yield (f'<p class="note">the three lowest SQNRs under '
               f'{escape(report.labels[0])}, with its grid</p>')
    if hists:
        yield from (_hist_block(h) for h in hists)
    else:
        yield f'<p class="note">{escape(hist_note or "no tensor is quantized")}</p>'
    yield "<h2>Totals and estimates</h2>" + _totals_html(report)
    yield '<p class="note">estimates (docs/ENERGY.md):</p><ul class="a">' + "".join(
        f"<li>{escape(a)}</li>" for a in assumptions(report.energy_model, report.workload)) \
        + "</ul>"
    for o in report.offenders:
        yield f'<p class="bad">FAIL {escape(o.message())}</p>'
    yield _chain("<h2>Tensors</h2>", _tensor_table(report, sort, top))
    yield "</body></html>\n"


def _chain(head: str, rest: Iterator[str]) -> Iterator[str]:
    yield head
    yield from rest
