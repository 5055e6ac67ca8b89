"""Presentation: turns pipeline results into Rich renderables and JSON/CSV/Markdown strings.

Nothing here prints; the CLI does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table

from qtool.artifact import TensorRecord


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
