"""Number and label formatting shared by every renderer (no Rich here)."""

from __future__ import annotations

import math
from typing import Any

from qtool.core.schemes import QuantSpec
from qtool.formats.manifest import TensorRecord
from qtool.report.energy import EnergyEstimate


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


def _safe(text: str) -> str:
    """Names come from the checkpoint and may hold control characters: an ESC would reach the
    terminal as an escape sequence. They are shown escaped, as Python writes them."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _ratio(rec: TensorRecord) -> float | None:
    return rec.original_bytes / rec.stored_bytes if rec.stored_bytes else None








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


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
