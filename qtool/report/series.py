"""The series the charts draw (terminal and HTML alike): one value per quantized tensor, and
the layer × module grid when names follow ``layers.N.<module>`` (also ``h.N.``, ``layer.N.``,
``blocks.N.``). Pure data, no Rich."""

from __future__ import annotations

import re
from dataclasses import dataclass

from qtool.report.model import Report, bits_per_weight

LAYER = re.compile(r"^(?:.*\.)?(?:layers|layer|h|blocks)\.(\d+)\.(.+?)(?:\.weight)?$")


@dataclass(frozen=True)
class Point:
    name: str
    value: float  # SQNR dB (may be +inf) or bits per weight


def chart_points(report: Report, what: str, group: int = 0) -> list[Point]:
    """The quantized tensors of one group with the charted value, in checkpoint order."""
    out = []
    for r in report.rows:
        rec = r.results[group]
        if rec.stats is None:
            continue
        if what == "bits":
            bpw = bits_per_weight(rec)
            if bpw is None:
                continue
            out.append(Point(r.name, bpw))
        else:
            out.append(Point(r.name, rec.stats.sqnr_db))
    return out


def layer_grid(points: list[Point]) -> tuple[list[int], list[str], dict[tuple[int, str], float],
                                             list[Point]] | None:
    """(layers, module types, {(layer, module): value}, tensors outside the layers) when at
    least two layers share at least two module types; None otherwise."""
    cells: dict[tuple[int, str], float] = {}
    rest = []
    for p in points:
        m = LAYER.match(p.name)
        if m is None:
            rest.append(p)
            continue
        cells[(int(m.group(1)), m.group(2))] = p.value
    layers = sorted({k[0] for k in cells})
    modules = list(dict.fromkeys(k[1] for k in cells))
    if len(layers) < 2 or len(modules) < 2:
        return None
    return layers, modules, cells, rest
