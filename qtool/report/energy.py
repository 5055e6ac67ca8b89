"""The energy model of `qtool report`: pure arithmetic over byte and parameter counts.

One pass over the weights: every stored byte is read once from DRAM, and every float weight
takes part in one multiply-accumulate (MAC). Before quantization the MAC runs in the tensor's
float type; after, a quantized weight's MAC is an int8 one. The default figures are the 45 nm
numbers of M. Horowitz, "Computing's energy problem (and what we can do about it)",
ISSCC 2014. docs/ENERGY.md gives the model, its assumptions and a worked example.

No files and no numpy here: the CLI reads a model file and hands its parsed JSON to
:meth:`EnergyModel.from_dict`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

HOROWITZ_2014 = "M. Horowitz, Computing's energy problem, ISSCC 2014 (45 nm)"

# Which MAC figures a float tensor's arithmetic uses. Horowitz gives no fp64 numbers, so F64
# is charged as fp32 (an underestimate of its cost, hence of the saving); BF16 as fp16 (same
# width, a similar multiplier).
MAC_CLASS = {"F64": "fp32", "F32": "fp32", "F16": "fp16", "BF16": "fp16"}


class EnergyModelError(ValueError):
    """A model file that is not an object of known keys with finite, non-negative numbers."""


@dataclass(frozen=True)
class EnergyModel:
    """Energy figures in picojoules. Field names are the keys of a model file."""

    name: str = HOROWITZ_2014
    dram_read_32bit_pj: float = 640.0
    fp32_mul_pj: float = 3.7
    fp32_add_pj: float = 0.9
    fp16_mul_pj: float = 1.1
    fp16_add_pj: float = 0.4
    int8_mul_pj: float = 0.2
    int8_add_pj: float = 0.03

    @property
    def dram_pj_per_byte(self) -> float:
        return self.dram_read_32bit_pj / 4.0

    def mac_pj(self, kind: str) -> float:
        """One multiply plus one add in ``kind`` ("fp32", "fp16" or "int8")."""
        return float(getattr(self, f"{kind}_mul_pj")) + float(getattr(self, f"{kind}_add_pj"))

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
            if key == "name":
                if not isinstance(value, str):
                    raise EnergyModelError(f"'name' must be a string, not {value!r:.40}")
            # bool is an int in Python; "true" pJ is a mistake, not 1 pJ.
            elif isinstance(value, bool) or not isinstance(value, int | float) or \
                    not math.isfinite(value) or value < 0:
                raise EnergyModelError(
                    f"{key!r} must be a finite number of picojoules >= 0, not {value!r:.40}"
                )
            else:
                value = float(value)
            values[key] = value
        if "name" not in values and values:
            values["name"] = "custom (from --energy-model)"
        return cls(**values)


@dataclass(frozen=True)
class TensorCost:
    """What the energy model needs to know about one tensor."""

    dtype: str  # safetensors code of the original tensor
    parameters: int
    original_bytes: int
    stored_bytes: int
    quantized: bool


@dataclass(frozen=True)
class EnergyEstimate:
    """Energy of one pass over the weights, in picojoules, before and after quantization."""

    memory_before_pj: float
    memory_after_pj: float
    compute_before_pj: float
    compute_after_pj: float

    @property
    def total_before_pj(self) -> float:
        return self.memory_before_pj + self.compute_before_pj

    @property
    def total_after_pj(self) -> float:
        return self.memory_after_pj + self.compute_after_pj

    @staticmethod
    def saving_percent(before: float, after: float) -> float | None:
        """(before − after) / before in percent; None when there was nothing to save."""
        return 100.0 * (before - after) / before if before > 0 else None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for part, before, after in (
            ("memory", self.memory_before_pj, self.memory_after_pj),
            ("compute", self.compute_before_pj, self.compute_after_pj),
            ("total", self.total_before_pj, self.total_after_pj),
        ):
            out[part] = {"before_pj": before, "after_pj": after,
                         "saving_percent": self.saving_percent(before, after)}
        return out


def estimate(model: EnergyModel, tensors: Iterable[TensorCost]) -> EnergyEstimate:
    """Memory and compute energy of one pass over ``tensors`` (see the module docstring).

    Non-float tensors (integer buffers, bools) are read but not multiplied: they cost memory
    energy only.
    """
    mem_b = mem_a = comp_b = comp_a = 0.0
    per_byte = model.dram_pj_per_byte
    int8_mac = model.mac_pj("int8")
    for t in tensors:
        mem_b += t.original_bytes * per_byte
        mem_a += t.stored_bytes * per_byte
        kind = MAC_CLASS.get(t.dtype)
        if kind is None:
            continue
        before = t.parameters * model.mac_pj(kind)
        comp_b += before
        comp_a += t.parameters * int8_mac if t.quantized else before
    return EnergyEstimate(mem_b, mem_a, comp_b, comp_a)


ASSUMPTIONS = (
    "one pass over the weights: every stored byte (integers, scales, zero points, kept "
    "tensors) is read once from DRAM",
    "one multiply-accumulate per float weight: in fp32 (F32, F64) or fp16 (F16, BF16) "
    "before; in int8 for a quantized weight after, whatever its bit width",
    "integer and bool tensors cost memory energy only; activations, caches, the per-output "
    "rescale by the scale, and data movement other than DRAM reads are left out",
)


def assumptions(model: EnergyModel) -> list[str]:
    """The assumptions, with the figures in use, for showing beside the numbers."""
    figures = (
        f"figures ({model.name}): DRAM {model.dram_read_32bit_pj:g} pJ per 32-bit read; "
        f"MAC fp32 {model.fp32_mul_pj:g}+{model.fp32_add_pj:g} pJ, "
        f"fp16 {model.fp16_mul_pj:g}+{model.fp16_add_pj:g} pJ, "
        f"int8 {model.int8_mul_pj:g}+{model.int8_add_pj:g} pJ"
    )
    return [*ASSUMPTIONS, figures]


__all__ = [
    "ASSUMPTIONS",
    "HOROWITZ_2014",
    "EnergyEstimate",
    "EnergyModel",
    "EnergyModelError",
    "TensorCost",
    "assumptions",
    "estimate",
]
