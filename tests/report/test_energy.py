"""The energy model: the documented figures and arithmetic, recomputed by hand."""

from __future__ import annotations

import math

import pytest

from qtool.report.energy import EnergyModel, EnergyModelError, TensorCost, assumptions, estimate


def test_default_figures_are_horowitz_isscc_2014():
    m = EnergyModel()
    assert "Horowitz" in m.name and "ISSCC 2014" in m.name and "45 nm" in m.name
    assert (m.dram_read_32bit_pj, m.fp32_mul_pj, m.fp32_add_pj, m.fp16_mul_pj, m.fp16_add_pj,
            m.int8_mul_pj, m.int8_add_pj) == (640.0, 3.7, 0.9, 1.1, 0.4, 0.2, 0.03)


def test_estimate_by_hand():
    tensors = [
        # an F32 matrix quantized to 8 bits: 1000 values, 4000 bytes -> 1000 + 2·10·4 bytes
        TensorCost("F32", 1000, 4000, 1080, quantized=True),
        # a BF16 matrix quantized: fp16 figures before
        TensorCost("BF16", 200, 400, 216, quantized=True),
        # an F32 bias kept in float: the same MAC before and after
        TensorCost("F32", 10, 40, 40, quantized=False),
        # an integer buffer: memory only
        TensorCost("I64", 5, 40, 40, quantized=False),
    ]
    e = estimate(EnergyModel(), tensors)
    assert e.memory_before_pj == pytest.approx((4000 + 400 + 40 + 40) * 160.0)
    assert e.memory_after_pj == pytest.approx((1080 + 216 + 40 + 40) * 160.0)
    assert e.compute_before_pj == pytest.approx(1000 * 4.6 + 200 * 1.5 + 10 * 4.6)
    assert e.compute_after_pj == pytest.approx(1000 * 0.23 + 200 * 0.23 + 10 * 4.6)
    assert e.total_before_pj == pytest.approx(e.memory_before_pj + e.compute_before_pj)
    d = e.to_dict()
    assert d["memory"]["saving_percent"] == pytest.approx(
        100 * (4480 - 1376) / 4480)
    assert d["total"]["after_pj"] == pytest.approx(e.memory_after_pj + e.compute_after_pj)
    assert estimate(EnergyModel(), []).to_dict()["total"]["saving_percent"] is None


def test_f64_is_charged_fp32_and_f16_fp16():
    e64 = estimate(EnergyModel(), [TensorCost("F64", 1, 8, 8, False)])
    e16 = estimate(EnergyModel(), [TensorCost("F16", 1, 2, 2, False)])
    assert e64.compute_before_pj == pytest.approx(4.6)
    assert e16.compute_before_pj == pytest.approx(1.5)


def test_partial_override_keeps_other_defaults():
    m = EnergyModel.from_dict({"dram_read_32bit_pj": 100, "int8_mul_pj": 0.5})
    assert m.dram_read_32bit_pj == 100.0 and m.int8_mul_pj == 0.5
    assert m.fp32_mul_pj == 3.7 and m.int8_add_pj == 0.03
    assert m.name.startswith("custom")
    assert EnergyModel.from_dict({"name": "x", **EnergyModel(name="x").to_dict()}) == \
        EnergyModel(name="x")
    assert EnergyModel.from_dict({}) == EnergyModel()
    assert any("640" in a for a in assumptions(EnergyModel()))


@pytest.mark.parametrize("doc, fragment", [
    ([1, 2], "JSON object"),
    ({"fp32_mul": 1.0}, "unknown key 'fp32_mul'"),
    ({"fp32_mul_pj": "3.7"}, "'fp32_mul_pj' must be a finite number"),
    ({"fp32_mul_pj": True}, "'fp32_mul_pj' must be a finite number"),
    ({"fp32_mul_pj": -1}, "'fp32_mul_pj' must be a finite number"),
    ({"fp32_mul_pj": math.inf}, "'fp32_mul_pj' must be a finite number"),
    ({"fp32_mul_pj": None}, "'fp32_mul_pj' must be a finite number"),
    ({"name": 3}, "'name' must be a string"),
])
def test_malformed_models_are_refused(doc, fragment):
    with pytest.raises(EnergyModelError, match=fragment):
        EnergyModel.from_dict(doc)
