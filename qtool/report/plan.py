"""The mixed-precision plan as plain text: one line per tensor (`qtool report --target-bits`)."""

from __future__ import annotations

import math
from typing import Any

from qtool import __version__
from qtool.core.schemes import QuantSpec
from qtool.pipeline.mixed import MixedPlan


def setting_label(spec: QuantSpec) -> str:
    """``4-bit g32`` / ``8-bit channel``: a QuantSpec's bits and range unit (``4-bit g32
    codes`` with 8-bit scale codes)."""
    unit = f"g{spec.group_size}" if spec.granularity == "group" else spec.granularity
    return f"{spec.bits}-bit {unit}" + (" codes" if spec.scale_bits is not None else "")


def plan_table(mp: MixedPlan) -> str:
    """Per tensor: the chosen setting, its bits per weight (sidecars included), the SQNR it
    was chosen on, and whether that was measured on a sample of rows or fixed by a rule."""
    head = ("tensor", "shape", "setting", "bits/w", "est. SQNR dB", "measured on")
    rows = []
    for c in mp.choices:
        shape = "x".join(str(d) for d in c.shape)
        how = c.fixed or (f"{c.sampled_rows} sampled rows" if c.sampled_rows else "all rows")
        db = "inf" if not math.isfinite(c.sqnr_db) else f"{c.sqnr_db:.2f}"
        bpw = f"{8 * c.stored_bytes / c.n_weights:.3f}"
        rows.append((c.name, shape, setting_label(c.spec), bpw, db, how))
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    right = {3, 4}

    def fmt(r: tuple[str, ...]) -> str:
        return "  ".join(v.rjust(w) if i in right else v.ljust(w)
                         for i, (v, w) in enumerate(zip(r, widths, strict=True))).rstrip()

    lines = ["mixed-precision plan (nothing written)", fmt(head),
             "-" * len(fmt(head)), *(fmt(r) for r in rows)]
    lines.append(f"total: {len(mp.choices)} tensors, {mp.bits_per_weight:.3f} bits per weight, "
                 f"estimated SQNR {mp.sqnr_db:.2f} dB")
    return "\n".join(lines) + "\n"


def mixed_line(mp: MixedPlan) -> str:
    """One line on the plan: target, bits per weight, estimated SQNR, sampling, shortfalls."""
    what = " ".join(([f"--target-bits {mp.target.bits:g}"] if mp.target.bits is not None
                     else []) + ([f"--target-sqnr {mp.target.sqnr_db:g}"]
                                 if mp.target.sqnr_db is not None else [])
                    + ([f"--scale-bits {mp.target.scale_bits}"]
                       if mp.target.scale_bits is not None else []))
    line = (f"mixed precision ({what}): {len(mp.choices)} tensors at "
            f"{mp.bits_per_weight:.3f} bits per weight, estimated SQNR {mp.sqnr_db:.2f} dB")
    if mp.sampled:
        line += (f"; {mp.sampled} large tensors measured on a fixed seeded sample of rows "
                 "(the report gives their exact figures)")
    if mp.short:
        line += (f"; {len(mp.short)} tensors cannot reach the target and get their most "
                 f"accurate setting: {', '.join(mp.short[:5])}"
                 + (", ..." if len(mp.short) > 5 else ""))
    return line


def mixed_summary(mp: MixedPlan) -> dict[str, Any]:
    """The plan's figures for `quantize --json`."""
    return {"target_bits": mp.target.bits, "target_sqnr_db": mp.target.sqnr_db,
            "bits_per_weight": round(mp.bits_per_weight, 6),
            "scale_bits": mp.target.scale_bits,
            "estimated_sqnr_db": round(mp.sqnr_db, 4), "sampled_tensors": mp.sampled,
            "short_of_target": list(mp.short)}


def recipe_header(src_name: str, mp: MixedPlan | None) -> str:
    """The comment at the top of a recipe written by `quantize --write-recipe`."""
    head = f"Written by qtool {__version__} (quantize {src_name} --write-recipe)."
    if mp is not None:
        head += "\n" + mixed_line(mp)
    return head + ("\nOne rule per quantized tensor; use it with the same --skip / --only:"
                   "\n  qtool quantize SRC OUT --recipe THIS.toml")
