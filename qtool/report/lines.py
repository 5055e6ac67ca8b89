"""Lines shared by the renderers: the subtitle, the group labels and the totals (what,
before, after per group), so that table, Markdown and HTML say the same thing."""

from __future__ import annotations

from qtool.report.fmt import (
    _fmt_bpw,
    _fmt_change,
    _fmt_err,
    _fmt_pct,
    _fmt_ratio,
    _fmt_sqnr,
    human_area,
    human_energy,
    human_seconds,
    short_bytes,
)
from qtool.report.model import BEST, Report


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
        ("tensor bytes", short_bytes(t0.bytes_before), [short_bytes(t.bytes_after) for t in ts]),
        ("compression", "", [_fmt_ratio(t.ratio) for t in ts]),
        ("bits per weight, quantized", "", [_fmt_bpw(t.bits_per_weight) for t in ts]),
        ("memory saved", "", [short_bytes(t.saved) for t in ts]),
        ("memory saved %", "", [_fmt_pct(t.saved_percent) for t in ts]),
    ]
    if report.disk is not None:
        lines.append(("file bytes", short_bytes(report.disk[0]), [short_bytes(report.disk[1])]))
    lines += [
        ("SQNR, all quantized", "",
         [f"{_fmt_sqnr(t.stats.sqnr_db)} dB" if t.quantized else "-" for t in ts]),
        ("max abs error", "", [_fmt_err(t.stats.max_abs_error) if t.quantized else "-"
                               for t in ts]),
        ("worst tensor", "", [f"{t.worst.name} ({_fmt_sqnr(t.worst.sqnr_db)} dB)"
                              if t.worst else "-" for t in ts]),
    ]
    for what, get, show in (
        ("DRAM bytes per pass", lambda e: (e.dram_bytes_before, e.dram_bytes_after),
         short_bytes),
        ("energy: DRAM reads", lambda e: (e.memory_before_pj, e.memory_after_pj),
         human_energy),
        ("energy: MACs", lambda e: (e.compute_before_pj, e.compute_after_pj), human_energy),
        ("energy: total", lambda e: (e.total_before_pj, e.total_after_pj), human_energy),
        ("latency", lambda e: (e.latency_before_s, e.latency_after_s), human_seconds),
        ("MAC area", lambda e: (e.area_before_um2, e.area_after_um2), human_area),
    ):
        pairs = [get(e) for e in es]
        lines.append((what, show(pairs[0][0]), [show(a) for _, a in pairs]))
        if what != "DRAM bytes per pass":
            lines.append((f"{what} saved", "", [_fmt_change(b, a) for b, a in pairs]))
    return lines
