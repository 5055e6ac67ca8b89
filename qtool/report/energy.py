"""The cost model of `qtool report`: energy, memory-bound latency and MAC area, pure
arithmetic over byte and parameter counts.

One forward pass over ``tokens`` tokens (default 1: one decode step). Every matrix is read
once from DRAM and each of its float weights takes part in ``tokens`` multiply-accumulates
(MACs). A lookup table (an embedding: ``*embed*``, ``wte``, ``wpe``, ...) is not multiplied:
each token reads one of its rows. Activations are float by default (weight-only
quantization): a quantized weight is widened to the activations' type, so its MAC stays a
float one and only DRAM traffic shrinks; ``int_activations`` prices the integer case (int8
MACs for quantized weights). Latency is the time to stream the bytes read once at a given
bandwidth: a lower bound on a memory-bound step. Area is the silicon of the MAC units the
arithmetic needs. The default figures are the 45 nm numbers of M. Horowitz, "Computing's
energy problem (and what we can do about it)", ISSCC 2014. docs/ENERGY.md gives the model,
every assumption and a worked example.

No files and no numpy here: the CLI reads a model file and hands its parsed JSON to
:meth:`EnergyModel.from_dict`.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

HOROWITZ_2014 = "M. Horowitz, Computing's energy problem, ISSCC 2014 (45 nm)"

# Which MAC figures a float tensor's arithmetic uses. Horowitz gives no fp64 numbers, so F64
# is charged as fp32 (an underestimate of its cost, hence of the saving); BF16 as fp16 (same
# width, a similar multiplier).
MAC_CLASS = {"F64": "fp32", "F32": "fp32", "F16": "fp16", "BF16": "fp16"}

# Names of embedding tables, looked up one row per token rather than multiplied. Matched
# (fnmatch, case-sensitive) against the whole tensor name; only 2-D tensors are lookups.
DEFAULT_LOOKUP = ("*embed*", "wte.*", "*.wte.*", "wpe.*", "*.wpe.*")

# Dual-channel DDR5-5600: 2 channels × 64 bits × 5600 MT/s = 89.6 GB/s, the theoretical
# peak of a current desktop (sustained reads reach roughly 70-90 % of it).
DEFAULT_BANDWIDTH_GBS = 89.6
DEFAULT_BANDWIDTH_NOTE = "dual-channel DDR5-5600 desktop, theoretical peak"


class EnergyModelError(ValueError):
    """A model file that is not an object of known keys with finite, non-negative numbers."""


@dataclass(frozen=True)
class EnergyModel:
    """Energy figures in picojoules and area figures in µm². Field names are the keys of a
    model file."""

    name: str = HOROWITZ_2014
    dram_read_32bit_pj: float = 640.0
    fp32_mul_pj: float = 3.7
    fp32_add_pj: float = 0.9
    fp16_mul_pj: float = 1.1
    fp16_add_pj: float = 0.4
    int8_mul_pj: float = 0.2
    int8_add_pj: float = 0.03
    fp32_mul_um2: float = 7700.0
    fp32_add_um2: float = 4184.0
    fp16_mul_um2: float = 1640.0
    fp16_add_um2: float = 1360.0
    int8_mul_um2: float = 282.0
    int8_add_um2: float = 36.0

    @property
    def dram_pj_per_byte(self) -> float:
        return self.dram_read_32bit_pj / 4.0

    def mac_pj(self, kind: str) -> float:
        """One multiply plus one add in ``kind`` ("fp32", "fp16" or "int8")."""
        return float(getattr(self, f"{kind}_mul_pj")) + float(getattr(self, f"{kind}_add_pj"))

    def mac_um2(self, kind: str) -> float:
        """The area of one multiplier plus one adder in ``kind``."""
        return float(getattr(self, f"{kind}_mul_um2")) + float(getattr(self, f"{kind}_add_um2"))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, doc: Any) -> EnergyModel:
        """A model from a parsed JSON object. Keys left out keep the default figures; an
        unknown key is an error (most likely a typo that would silently keep a default)."""
        if not isinstance(doc, dict):
            raise EnergyModelError(f"must be a JSON object, not {type(doc).__name__}")
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in doc.items():
            if key not in known:
                raise EnergyModelError(
                    f"unknown key {key!r}; known keys: {', '.join(sorted(known))}"
                )
            unit = "µm²" if key.endswith("_um2") else "picojoules"
            if key == "name":
                if not isinstance(value, str):
                    raise EnergyModelError(f"'name' must be a string, not {value!r:.40}")
            # bool is an int in Python; "true" pJ is a mistake, not 1 pJ.
            elif isinstance(value, bool) or not isinstance(value, int | float) or \
                    not math.isfinite(value) or value < 0:
                raise EnergyModelError(
                    f"{key!r} must be a finite number of {unit} >= 0, not {value!r:.40}"
                )
            else:
                value = float(value)
            values[key] = value
        if "name" not in values and values:
            values["name"] = "custom (from --energy-model)"
        return cls(**values)


@dataclass(frozen=True)
class Workload:
    """What the estimate prices: ``tokens`` tokens in one pass, with float or integer
    activations, lookup tables named by ``lookup`` globs, weights streamed at
    ``bandwidth_gbs`` GB/s (10⁹ bytes per second)."""

    tokens: int = 1
    int_activations: bool = False
    lookup: tuple[str, ...] = DEFAULT_LOOKUP
    bandwidth_gbs: float = DEFAULT_BANDWIDTH_GBS

    def is_lookup(self, name: str, shape: tuple[int, ...]) -> bool:
        return len(shape) == 2 and any(fnmatch.fnmatchcase(name, g) for g in self.lookup)

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "int_activations": self.int_activations,
                "lookup": list(self.lookup), "bandwidth_gbs": self.bandwidth_gbs}


@dataclass(frozen=True)
class TensorCost:
    """What the cost model needs to know about one tensor."""

    dtype: str  # safetensors code of the original tensor
    parameters: int
    original_bytes: int
    stored_bytes: int
    quantized: bool
    lookup_rows: int | None = None  # rows of a lookup table; None: a matrix that is multiplied


@dataclass(frozen=True)
class EnergyEstimate:
    """One pass, before and after quantization: energy in picojoules, DRAM bytes read,
    latency in seconds at the workload's bandwidth and the mean MAC area in µm²."""

    memory_before_pj: float
    memory_after_pj: float
    compute_before_pj: float
    compute_after_pj: float
    dram_bytes_before: float = 0.0
    dram_bytes_after: float = 0.0
    macs: int = 0
    area_before_um2: float | None = None
    area_after_um2: float | None = None
    bandwidth_gbs: float = DEFAULT_BANDWIDTH_GBS

    @property
    def total_before_pj(self) -> float:
        return self.memory_before_pj + self.compute_before_pj

    @property
    def total_after_pj(self) -> float:
        return self.memory_after_pj + self.compute_after_pj

    @property
    def latency_before_s(self) -> float:
        return self.dram_bytes_before / (self.bandwidth_gbs * 1e9)

    @property
    def latency_after_s(self) -> float:
        return self.dram_bytes_after / (self.bandwidth_gbs * 1e9)

    @staticmethod
    def saving_percent(before: float | None, after: float | None) -> float | None:
        """(before − after) / before in percent; None when there was nothing to save."""
        if before is None or after is None or before <= 0:
            return None
        return 100.0 * (before - after) / before

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for part, before, after in (
            ("memory", self.memory_before_pj, self.memory_after_pj),
            ("compute", self.compute_before_pj, self.compute_after_pj),
            ("total", self.total_before_pj, self.total_after_pj),
        ):
            out[part] = {"before_pj": before, "after_pj": after,
                         "saving_percent": self.saving_percent(before, after)}
        out["dram_bytes"] = {"before": self.dram_bytes_before, "after": self.dram_bytes_after}
        out["macs"] = self.macs
        out["latency"] = {"before_s": self.latency_before_s, "after_s": self.latency_after_s,
                          "saving_percent": self.saving_percent(self.latency_before_s,
                                                                self.latency_after_s)}
        out["area"] = {"before_um2": self.area_before_um2, "after_um2": self.area_after_um2,
                       "saving_percent": self.saving_percent(self.area_before_um2,
                                                             self.area_after_um2)}
        return out


def estimate(model: EnergyModel, tensors: Iterable[TensorCost],
             work: Workload | None = None) -> EnergyEstimate:
    """Energy, DRAM bytes, latency and MAC area of one pass (see the module docstring).

    Non-float tensors (integer buffers, bools) are read but not multiplied. A lookup table
    reads min(tokens, rows) of its rows, each costing its share of the table's bytes
    (integers, scales and zero points alike). The area is the MAC-weighted mean area of one
    MAC unit: Σ macs·area(kind) / Σ macs; None when nothing is multiplied.
    """
    work = work or Workload()
    bytes_b = bytes_a = comp_b = comp_a = area_b = area_a = 0.0
    macs = 0
    for t in tensors:
        if t.lookup_rows is not None:
            share = min(work.tokens, t.lookup_rows) / t.lookup_rows if t.lookup_rows else 0.0
            bytes_b += t.original_bytes * share
            bytes_a += t.stored_bytes * share
            continue
        bytes_b += t.original_bytes
        bytes_a += t.stored_bytes
        kind = MAC_CLASS.get(t.dtype)
        if kind is None:
            continue
        n = t.parameters * work.tokens
        after = "int8" if t.quantized and work.int_activations else kind
        macs += n
        comp_b += n * model.mac_pj(kind)
        comp_a += n * model.mac_pj(after)
        area_b += n * model.mac_um2(kind)
        area_a += n * model.mac_um2(after)
    per_byte = model.dram_pj_per_byte
    return EnergyEstimate(
        bytes_b * per_byte, bytes_a * per_byte, comp_b, comp_a, bytes_b, bytes_a, macs,
        area_b / macs if macs else None, area_a / macs if macs else None, work.bandwidth_gbs)


def assumptions(model: EnergyModel, work: Workload | None = None) -> list[str]:
    """The assumptions, with the figures in use, for showing beside the numbers."""
    work = work or Workload()
    tok = f"{work.tokens} token{'s' if work.tokens != 1 else ''}"
    act = ("integer activations (--int-activations): a quantized weight's MAC is an int8 one, "
           "whatever its bit width" if work.int_activations else
           "float activations (weight-only quantization): every MAC stays in the tensor's "
           "float type, so only DRAM traffic shrinks; --int-activations prices int8 MACs")
    return [
        f"one pass over {tok}: each matrix is read once from DRAM (integers, scales, zero "
        "points, kept tensors) and each float weight does one multiply-accumulate per token",
        f"lookup tables ({', '.join(work.lookup) or 'none'}; 2-D) read one row per token "
        "and do no MACs",
        act,
        "integer and bool tensors cost memory only; activations, caches, the per-output "
        "rescale, on-chip traffic and leakage are left out",
        f"latency: DRAM bytes / {work.bandwidth_gbs:g} GB/s"
        + (f" ({DEFAULT_BANDWIDTH_NOTE})" if work.bandwidth_gbs == DEFAULT_BANDWIDTH_GBS
           else "") + ", a lower bound for a memory-bound step",
        "area: mean silicon of one MAC unit (multiplier + adder) over the MACs done",
        f"figures ({model.name}): DRAM {model.dram_read_32bit_pj:g} pJ per 32-bit read; "
        f"MAC fp32 {model.fp32_mul_pj:g}+{model.fp32_add_pj:g} pJ, "
        f"fp16 {model.fp16_mul_pj:g}+{model.fp16_add_pj:g} pJ, "
        f"int8 {model.int8_mul_pj:g}+{model.int8_add_pj:g} pJ; area fp32 "
        f"{model.fp32_mul_um2:g}+{model.fp32_add_um2:g} µm², fp16 "
        f"{model.fp16_mul_um2:g}+{model.fp16_add_um2:g} µm², int8 "
        f"{model.int8_mul_um2:g}+{model.int8_add_um2:g} µm²",
    ]


__all__ = [
    "DEFAULT_BANDWIDTH_GBS",
    "DEFAULT_LOOKUP",
    "HOROWITZ_2014",
    "EnergyEstimate",
    "EnergyModel",
    "EnergyModelError",
    "TensorCost",
    "Workload",
    "assumptions",
    "estimate",
]
