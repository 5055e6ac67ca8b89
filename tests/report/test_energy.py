"""The energy model: the documented figures and arithmetic, recomputed by hand."""

from __future__ import annotations

import math

import pytest

from qtool.report.energy import (
    EnergyModel,
    EnergyModelError,
    TensorCost,
    Workload,
    assumptions,
    estimate,
)


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
    # Integer activations: a quantized weight's MAC is an int8 one.
    e = estimate(EnergyModel(), tensors, Workload(int_activations=True))
    assert e.memory_before_pj == pytest.approx((4000 + 400 + 40 + 40) * 160.0)
    assert e.memory_after_pj == pytest.approx((1080 + 216 + 40 + 40) * 160.0)
    assert e.compute_before_pj == pytest.approx(1000 * 4.6 + 200 * 1.5 + 10 * 4.6)
    assert e.compute_after_pj == pytest.approx(1000 * 0.23 + 200 * 0.23 + 10 * 4.6)
    # Float activations (the default, weight-only): the MACs cost what they did.
    f = estimate(EnergyModel(), tensors)
    assert f.compute_after_pj == pytest.approx(f.compute_before_pj)
    assert f.memory_after_pj == pytest.approx(e.memory_after_pj)
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


# Horowitz 45 nm areas (µm²): fp32 mul 7700 + add 4184; fp16 1640 + 1360; int8 282 + 36.
FP32_AREA, FP16_AREA, INT8_AREA = 7700 + 4184, 1640 + 1360, 282 + 36


def test_latency_area_and_tokens_by_hand():
    tensors = [TensorCost("F32", 1000, 4000, 1080, quantized=True),
               TensorCost("F16", 500, 1000, 540, quantized=True),
               TensorCost("F32", 10, 40, 40, quantized=False)]
    work = Workload(tokens=3, bandwidth_gbs=2.0)
    e = estimate(EnergyModel(), tensors, work)
    # Weights are streamed once whatever the token count; MACs grow with it.
    assert e.dram_bytes_before == 5040 and e.dram_bytes_after == 1660
    assert e.latency_before_s == pytest.approx(5040 / 2e9)
    assert e.latency_after_s == pytest.approx(1660 / 2e9)
    assert e.macs == 3 * 1510
    assert e.compute_before_pj == pytest.approx(3 * (1010 * 4.6 + 500 * 1.5))
    # Area: the mean MAC unit over the MACs done; float activations keep it.
    want = (1010 * FP32_AREA + 500 * FP16_AREA) / 1510
    assert e.area_before_um2 == pytest.approx(want) and e.area_after_um2 == pytest.approx(want)
    i = estimate(EnergyModel(), tensors, Workload(tokens=3, int_activations=True))
    assert i.area_after_um2 == pytest.approx((1500 * INT8_AREA + 10 * FP32_AREA) / 1510)
    d = i.to_dict()
    assert d["area"]["saving_percent"] == pytest.approx(
        100 * (1 - i.area_after_um2 / i.area_before_um2))
    assert d["latency"]["before_s"] == pytest.approx(5040 / 89.6e9)  # default DDR5-5600 x2
    assert estimate(EnergyModel(), []).to_dict()["area"] == {
        "before_um2": None, "after_um2": None, "saving_percent": None}


def test_lookup_tables_read_one_row_per_token():
    # A 1000-row embedding of 64 F32 values (256 000 bytes), quantized per row to 8 bits:
    # 1000·64 + 1000·8 = 72 000 bytes; a 64×64 F32 matrix quantized to 4 bits: 2048 + 512.
    emb = TensorCost("F32", 64_000, 256_000, 72_000, quantized=True, lookup_rows=1000)
    mat = TensorCost("F32", 4096, 16_384, 2560, quantized=True)
    e = estimate(EnergyModel(), [emb, mat], Workload(tokens=5))
    assert e.dram_bytes_before == pytest.approx(5 * 256 + 16_384)  # 17 664
    assert e.dram_bytes_after == pytest.approx(5 * 72 + 2560)  # 2 920
    assert e.macs == 5 * 4096  # a lookup multiplies nothing
    assert e.memory_before_pj == pytest.approx(17_664 * 160)
    assert e.compute_before_pj == pytest.approx(e.compute_after_pj) == pytest.approx(
        5 * 4096 * 4.6)
    # More tokens than rows: the table is read once, not more.
    big = estimate(EnergyModel(), [emb], Workload(tokens=5000))
    assert big.dram_bytes_before == pytest.approx(256_000)
    # The saving is not the compression ratio restated: 72.6 % of the bytes stored, 83.5 %
    # of the bytes read in the pass, 80.8 % of the energy (the float MACs do not shrink).
    stored = 1 - (72_000 + 2560) / (256_000 + 16_384)
    assert stored == pytest.approx(0.72627, abs=1e-5)
    assert 1 - e.dram_bytes_after / e.dram_bytes_before == pytest.approx(0.83469, abs=1e-5)
    total = (e.total_before_pj - e.total_after_pj) / e.total_before_pj
    assert total == pytest.approx((2_826_240 - 467_200) / (2_826_240 + 94_208))
    assert total == pytest.approx(0.80777, abs=1e-5)


def test_default_lookup_globs():
    w = Workload()
    for name in ("model.embed_tokens.weight", "bert.embeddings.word_embeddings.weight",
                 "transformer.wte.weight", "transformer.wpe.weight", "wte.weight"):
        assert w.is_lookup(name, (100, 8)), name
    for name in ("model.layers.0.mlp.up_proj.weight", "lm_head.weight", "wtest.weight"):
        assert not w.is_lookup(name, (100, 8)), name
    assert not w.is_lookup("bert.embeddings.LayerNorm.weight", (8,))  # 1-D: not a table
    assert Workload(lookup=("lm_head.*",)).is_lookup("lm_head.weight", (100, 8))
    assert any("float activations" in a for a in assumptions(EnergyModel(), w))
    assert any("89.6 GB/s" in a and "DDR5" in a for a in assumptions(EnergyModel(), w))
