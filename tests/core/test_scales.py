"""qtool.core.scales and the stored zero points: scales rounded up to float16/bfloat16 (checked
against numpy's float16 and ml_dtypes' bfloat16), their stored forms, and dequantizing from
them exactly as from float32 sidecars."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qtool.core.quant import dequantize, quantize
from qtool.core.scales import round_scale, scale_to_float32, scale_to_stored
from qtool.core.schemes import QuantSpec, qparams
from qtool.core.shapes import (
    param_shape,
    stored_bytes,
    zero_point_from_stored,
    zero_point_shape,
    zero_point_to_stored,
)

NARROW = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
positive = st.floats(1e-45, 3e38, allow_nan=False, allow_infinity=False)


@settings(max_examples=300, deadline=None)
@given(x=positive, dtype=st.sampled_from(sorted(NARROW)))
def test_round_scale_is_the_smallest_normal_value_of_the_dtype_not_below(x, dtype):
    r = float(round_scale(np.array([x]), dtype)[0])
    dt = NARROW[dtype]
    finfo = ml_dtypes.finfo(dt)
    if x > float(finfo.max):
        assert r == math.inf
        return
    # a value of the dtype (round-trips through it), normal, not below x
    assert float(np.float32(r).astype(dt).astype(np.float64)) == r
    assert r >= x and r >= float(finfo.smallest_normal)
    # and the smallest such: the dtype's next value down is below x (or below the normals)
    below = float(np.nextafter(np.array(r, dt), np.array(0, dt)).astype(np.float64))
    assert below < x or below < float(finfo.smallest_normal)


def test_round_scale_examples():
    # float16: 0.1 -> 0.10003662 (the next float16 up); 1e-7 -> 2^-14; 7e4 -> overflow
    got = round_scale(np.array([0.1, 1.0, 1e-7, 7e4]), "float16")
    np.testing.assert_array_equal(got, np.array([0.10003662109375, 1.0, 2.0**-14, np.inf],
                                                np.float32))
    # bfloat16 keeps 8 significant bits: 0.1 = 1.6 * 2^-4 -> 1.6015625 * 2^-4
    got = round_scale(np.array([0.1, 3.0, 3.5e38]), "bfloat16")
    np.testing.assert_array_equal(got, np.array([0.10009765625, 3.0, np.inf], np.float32))
    # float32 rounds to nearest, as format_version 1 did
    assert round_scale(np.array([0.1]), "float32")[0] == np.float32(0.1)


@settings(max_examples=200, deadline=None)
@given(x=st.lists(positive, min_size=1, max_size=20))
def test_bfloat16_bit_patterns_match_ml_dtypes(x):
    r = round_scale(np.array(x), "bfloat16")
    r = r[np.isfinite(r)]
    stored = scale_to_stored(r, "bfloat16")
    assert stored.dtype == np.uint16
    np.testing.assert_array_equal(stored, r.astype(ml_dtypes.bfloat16).view(np.uint16))
    np.testing.assert_array_equal(scale_to_float32(stored, "bfloat16"), r)
    # an ml_dtypes array (how a safetensors reader may hand BF16 out) converts the same
    np.testing.assert_array_equal(scale_to_float32(r.astype(ml_dtypes.bfloat16), "bfloat16"), r)


def test_float16_stored_form_is_exact():
    r = round_scale(np.geomspace(1e-6, 6e4, 50), "float16")
    stored = scale_to_stored(r, "float16")
    assert stored.dtype == np.float16
    np.testing.assert_array_equal(scale_to_float32(stored, "float16"), r)


def test_a_scale_beyond_the_dtype_is_inf_for_the_caller_to_report():
    spec = QuantSpec("symmetric", granularity="tensor", scale_dtype="float16")
    p = qparams(np.array([-1e7]), np.array([1e7]), spec)
    assert p.scale[0] == np.inf


ZP_CASES = [
    (QuantSpec("asymmetric", bits=4, granularity="group", group_size=8), (6, 40)),
    (QuantSpec("asymmetric", bits=3, granularity="group", group_size=4), (5, 30)),
    (QuantSpec("asymmetric", bits=8, granularity="group", group_size=8), (3, 20)),
    (QuantSpec("asymmetric", bits=4, granularity="channel"), (7, 9)),
    (QuantSpec("asymmetric", bits=4, granularity="tensor"), (7, 9)),
]


@pytest.mark.parametrize("spec,shape", ZP_CASES)
def test_asymmetric_zero_points_are_stored_packed_and_restored(spec, shape):
    rng = np.random.default_rng(3)
    w = rng.normal(0.3, 1.0, shape).astype(np.float32)
    qt = quantize(w, spec)
    stored = zero_point_to_stored(qt.zero_point, shape, spec)
    assert stored.dtype == np.uint8 and stored.shape == zero_point_shape(shape, spec)
    back = zero_point_from_stored(stored, shape, spec)
    assert back.shape == param_shape(shape, spec)
    np.testing.assert_array_equal(back, qt.zero_point)
    if spec.bits == 4 and spec.granularity == "group":
        # 5 groups of 4-bit zero points in a row: 3 bytes, low nibble first
        z = qt.zero_point.astype(np.uint8)
        assert stored.shape == (6, 3)
        np.testing.assert_array_equal(stored[:, 0], z[:, 0] | (z[:, 1] << 4))
        np.testing.assert_array_equal(stored[:, 2], z[:, 4])


@pytest.mark.parametrize("scheme", ["symmetric", "symmetric-unsigned", "gnmt"])
@pytest.mark.parametrize("scale_dtype", ["float32", "float16", "bfloat16"])
def test_symmetric_store_one_zero_point_and_dequantize_from_the_stored_forms(scheme,
                                                                            scale_dtype):
    rng = np.random.default_rng(5)
    w = rng.normal(0, 0.02, (12, 64)).astype(np.float32)
    if scheme == "symmetric-unsigned":
        w = np.abs(w)
    g = "channel" if scheme == "gnmt" else "group"
    spec = QuantSpec(scheme, granularity=g, group_size=16, scale_dtype=scale_dtype)
    qt = quantize(w, spec)
    z = zero_point_to_stored(qt.zero_point, w.shape, spec)
    assert z.shape == () and z.dtype == np.uint8 and int(z) == 0
    s = scale_to_stored(qt.scale, scale_dtype)
    expect = dequantize(qt.data, qt.scale, qt.zero_point, qt.shape, spec, np.float32)
    got = dequantize(qt.data, s, zero_point_from_stored(z, w.shape, spec), qt.shape, spec,
                     np.float32)
    np.testing.assert_array_equal(got, expect)
    # stored_bytes counts exactly the arrays stored
    assert stored_bytes(w.shape, spec) == qt.data.nbytes + s.nbytes + z.nbytes
