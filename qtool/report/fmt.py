"""Number and label formatting shared by every renderer (no Rich here)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from qtool.core.schemes import QuantSpec
from qtool.formats.manifest import TensorRecord
from qtool.report.energy import EnergyEstimate


def _gran(spec: QuantSpec) -> str:
    """``group 32``, ``channel``; ``group 32 codes`` with 8-bit scale codes, as the
    mixed-precision plan says it (report/plan.py setting_label)."""
    unit = f"group {spec.group_size}" if spec.granularity == "group" else spec.granularity
    return unit + (" codes" if spec.scale_bits is not None else "")


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


def _fmt_bpw(x: float | None) -> str:
    """Bits per weight: three decimals (4.625, 8.008), enough to tell sidecar layouts apart."""
    return "-" if x is None else f"{x:.3f}"


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "×".join(str(d) for d in shape) if shape else "scalar"


def human_energy(pj: float) -> str:
    """Picojoules in the largest unit that keeps the number ≥ 1, three significant digits."""
    for unit, scale in (("J", 1e12), ("mJ", 1e9), ("µJ", 1e6), ("nJ", 1e3)):
        if abs(pj) >= scale:
            return f"{pj / scale:.3g} {unit}"
    return f"{pj:.3g} pJ"


def human_seconds(s: float | None) -> str:
    """Seconds in the largest unit that keeps the number ≥ 1, three significant digits."""
    if s is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if abs(s) >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s * 1e9:.3g} ns"


def human_area(um2: float | None) -> str:
    """µm², or mm² from 10⁶ µm² on; "-" when nothing is multiplied."""
    if um2 is None:
        return "-"
    return f"{um2 / 1e6:.3g} mm²" if um2 >= 1e6 else f"{um2:.0f} µm²"


def short_bytes(n: float) -> str:
    """Bytes with three significant digits ("507 KiB", "1.74 MiB"): the totals of four
    column groups fit in 80 columns."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1000 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _fmt_pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f} %"


def _fmt_change(before: float | None, after: float | None) -> str:
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


def _safe(text: str) -> str:
    """Names come from the checkpoint and may hold control characters: an ESC would reach the
    terminal as an escape sequence. They are shown escaped, as Python writes them."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _ratio(rec: TensorRecord) -> float | None:
    return rec.original_bytes / rec.stored_bytes if rec.stored_bytes else None


def _common_prefix(names: Iterable[str]) -> str:
    """The longest common prefix of whole dot-separated parts ("model." of a HF checkpoint),
    never a whole name. One name split at a time: a checkpoint may have 200,000 names."""
    it = iter(names)
    first_name = next(it, None)
    if first_name is None:
        return ""
    first = first_name.split(".")
    k = len(first)  # parts shared by every name so far
    lengths = {len(first)}  # how many parts the names have
    several = False
    for name in it:
        several = True
        parts = name.split(".")
        lengths.add(len(parts))
        j, m = 0, min(k, len(parts))
        while j < m and parts[j] == first[j]:
            j += 1
        k = j
    if not several:
        return ""
    if k and k in lengths:  # the prefix would be a whole name
        k -= 1
    return ".".join(first[:k]) + "." if k else ""


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


ELLIPSIS = "…"


def fit_name(name: str, width: int) -> str:
    """``name`` in at most ``width`` characters, never cut inside a dot-separated part: the
    middle parts give way to "…" (the first parts name the layer, the last ones the module).
    Only a name whose first and last parts alone do not fit is cut inside a part, in its
    middle."""
    if len(name) <= width:
        return name
    parts = name.split(".")
    head, tail = 1, 1
    if len(parts) > 2:
        def text(h: int, t: int) -> str:
            return ".".join(parts[:h]) + f".{ELLIPSIS}." + ".".join(parts[-t:])

        if len(text(1, 1)) <= width:
            if len(parts) > 3 and parts[1].isdigit() and len(text(2, 1)) <= width:
                head = 2  # "layers.17": the layer number belongs to its name
            # Grow the tail first (the module and weight/bias), then the head, by one part.
            while head + tail < len(parts) - 1:
                if len(text(head, tail + 1)) <= width:
                    tail += 1
                elif len(text(head + 1, tail)) <= width:
                    head += 1
                else:
                    break
            return text(head, tail)
    keep = max(width - 1, 2)
    return name[:keep - keep // 2] + ELLIPSIS + name[len(name) - keep // 2:]
