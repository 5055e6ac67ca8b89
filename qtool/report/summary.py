"""The summary `quantize` prints (table on stderr, or JSON on stdout with --json)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from qtool.core.metrics import ErrorStats
from qtool.formats.manifest import MANIFEST, TensorRecord
from qtool.report.fmt import _json_float
from qtool.report.model import bits_per_weight


def quantize_summary(records: list[TensorRecord], out_dir: Path, seconds: float,
                     sources: list[Path]) -> dict[str, Any]:
    """The summary `quantize` shows: counts, bytes as stored (file sizes) before (the source
    files) and after (the artifact's files but qtool.json, as the manifest lists them),
    bits per weight, and the quality (SQNR over all quantized values, the worst tensor).

    Sizes are taken from the file system, not by loading the artifact just written again
    (with 200,000 tensors that alone cost more memory than the whole run)."""
    before = sum(os.stat(p).st_size for p in sources)
    after = sum(e.stat(follow_symlinks=False).st_size for e in os.scandir(out_dir)
                if e.name != MANIFEST and e.is_file(follow_symlinks=False))
    quantized = [r for r in records if r.quantized]
    weights = sum(math.prod(r.shape) for r in quantized)
    stats = ErrorStats()
    worst: TensorRecord | None = None
    for r in records:
        if r.stats is None:
            continue
        stats = stats.merge(r.stats)
        if worst is None or worst.stats is None or r.stats.sqnr_db < worst.stats.sqnr_db:
            worst = r

    quality = None if worst is None or worst.stats is None else {
        "sqnr_db": _json_float(stats.sqnr_db),
        "worst": {"name": worst.name, "sqnr_db": _json_float(worst.stats.sqnr_db)}}
    return {
        "output": str(out_dir),
        "tensors": {"quantized": len(quantized), "passthrough": len(records) - len(quantized)},
        "bytes": {"before": before, "after": after},
        "compression_ratio": round(before / after, 4) if after else None,
        # 8 x (integers + scales + zero points) / weights, over the quantized tensors
        "bits_per_weight": 8.0 * sum(r.stored_bytes for r in quantized) / weights
        if weights else None,
        "bits_per_weight_by_tensor": {r.name: bits_per_weight(r) for r in quantized},
        # SQNR over every quantized value and the worst tensor; null when nothing is quantized
        "quality": quality,
        "seconds": round(seconds, 3),
    }
