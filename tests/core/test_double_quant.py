"""qtool.core.double_quant: group scales stored as 8-bit codes x one float32 per row. A worked
example computed by hand, and properties: q in range, codes in [1, 255], every stored scale
covers its group's range, and the round-trip error is <= stored scale / 2 inside the range."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qtool.core.double_quant import (
    dequantize_dq,
    double_quantize,
    quantize_dq,
    stored_bytes_dq,
    stored_scales,
)
from qtool.core.ranges import find_range
from qtool.core.schemes import QuantSpec


def test_worked_example_by_hand():
    # One row, two groups of 4, 4-bit asymmetric (qmax 15).
    # group 0: [0, 3825/1024, 1, 2]: lo 0, hi 3825/1024 -> wanted scale 255/1024.
    # group 1: [-1, 0.5, 0.25, 0]:    lo -1, hi 0.5     -> wanted scale 1.5/15 = 0.1.
    # Row scale d = (255/1024) / 255 = 1/1024 (exact in float32); codes ceil(s / d):
    # 255 and ceil(102.4) = 103, stored scales 255/1024 and 103/1024 = 0.1005859375.
    # Zero points rint(-lo / s): 0 and rint(1 / 0.1005859375) = rint(9.94) = 10.
    # q: group 0: 0, 15, rint(1 / (255/1024)) = rint(4.016) = 4, rint(8.03) = 8;
    #    group 1: rint(-9.94) + 10 = 0, rint(4.97) + 10 = 15, rint(2.485) + 10 = 12, 10.
    spec = QuantSpec("asymmetric", 4, "group", 4)
    w = np.array([[0.0, 3825 / 1024, 1.0, 2.0, -1.0, 0.5, 0.25, 0.0]], np.float32)
    q, dq = quantize_dq(w, spec)
    np.testing.assert_array_equal(dq.codes, [[255, 103]])
    assert dq.codes.dtype == np.uint8
    np.testing.assert_array_equal(dq.row_scale, np.array([1 / 1024], np.float32))
    np.testing.assert_array_equal(dq.zero_point, [[0, 10]])
    np.testing.assert_array_equal(dq.scale, np.array([[255 / 1024, 103 / 1024]], np.float32))
    np.testing.assert_array_equal(q, [[0, 15, 4, 8, 0, 15, 12, 10]])
    w_hat = dequantize_dq(q, dq, 4)
    s0, s1 = 255 / 1024, 103 / 1024
    np.testing.assert_array_equal(
        w_hat, np.array([[0, 15 * s0, 4 * s0, 8 * s0, -10 * s1, 5 * s1, 2 * s1, 0]], np.float32))


def test_a_row_of_zeros_gets_code_1_and_row_scale_1_and_restores_exactly():
    spec = QuantSpec("asymmetric", 4, "group", 2)
    w = np.array([[0, 0, 0, 0], [0, 0, 1.5, -3]], np.float32)
    q, dq = quantize_dq(w, spec)
    assert dq.row_scale[0] == 1.0 and list(dq.codes[0]) == [1, 1]
    # row 1: its zero group also gets code 1, its other group code 255
    assert list(dq.codes[1]) == [1, 255]
    np.testing.assert_array_equal(dequantize_dq(q, dq, 2)[0], 0.0)
    assert np.all(dequantize_dq(q, dq, 2)[1, :2] == 0.0)


def test_stored_scales_is_the_float32_product():
    codes = np.array([[1, 7, 255]], np.uint8)
    d = np.array([0.1], np.float32)
    got = stored_scales(codes, d)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(
        got, [[np.float32(1) * np.float32(0.1), np.float32(7) * np.float32(0.1),
               np.float32(255) * np.float32(0.1)]])


def test_stored_bytes():
    # (8, 64) at 4-bit asymmetric g32: q 8 x 32 packed bytes = 256; codes 8 x 2 = 16;
    # row scales 8 x 4 = 32; zero points 8 rows x 2 four-bit values = 1 byte each = 8.
    assert stored_bytes_dq((8, 64), QuantSpec("asymmetric", 4, "group", 32)) == 312
    # symmetric: one zero-point byte for the tensor (format_version 2); 8-bit q unpacked
    assert stored_bytes_dq((2, 10), QuantSpec("symmetric", 8, "group", 4)) == 20 + 6 + 8 + 1


def test_refuses_what_it_cannot_represent():
    with pytest.raises(ValueError, match="gnmt"):
        double_quantize(np.zeros((1, 1)), np.zeros((1, 1)), QuantSpec("gnmt"))
    with pytest.raises(ValueError, match="NaN or infinite"):
        double_quantize(np.array([[-np.inf]]), np.zeros((1, 1)), QuantSpec("asymmetric"))
    with pytest.raises(ValueError, match="granularity group"):
        quantize_dq(np.zeros((2, 2), np.float32), QuantSpec("asymmetric"))


# Rows of different magnitudes (a log-uniform scale per row) and heavy-tailed values, so that
# group scales within a row differ by orders of magnitude and small codes occur.
@st.composite
def weights(draw):
    rows = draw(st.integers(1, 6))
    cols = draw(st.integers(1, 40))
    base = draw(hnp.arrays(np.float64, (rows, cols),
                           elements=st.floats(-50, 50, allow_nan=False)))
    mag = draw(hnp.arrays(np.float64, (rows, 1), elements=st.floats(-30, 30)))
    return (base * 10.0 ** mag).astype(np.float32)


SCHEMES = ("asymmetric", "symmetric", "symmetric-unsigned")


@settings(max_examples=200, deadline=None)
@given(w=weights(), scheme=st.sampled_from(SCHEMES), bits=st.integers(2, 8),
       g=st.integers(1, 17), rng=st.sampled_from(["minmax", "search"]))
def test_properties(w, scheme, bits, g, rng):
    if scheme == "symmetric-unsigned":
        w = np.abs(w)
    spec = QuantSpec(scheme, bits, "group", g, range=rng)
    q, dq = quantize_dq(w, spec)
    rows, cols = w.shape
    groups = -(-cols // g)
    assert q.shape == w.shape and q.dtype == spec.storage_dtype
    assert q.min() >= spec.qmin and q.max() <= spec.qmax
    assert dq.codes.shape == (rows, groups) and dq.codes.min() >= 1
    assert dq.row_scale.dtype == np.float32 and np.all(dq.row_scale >= np.finfo(np.float32).tiny)
    assert np.all(np.isfinite(dq.row_scale))
    s = dq.scale
    assert np.all((dq.zero_point >= 0) & (dq.zero_point <= spec.qmax))
    # Each group's range as the quantizer sets it: the full groups in one find_range call,
    # the short last group in another. (The search fit's float32 sums may round differently
    # for a group fitted alone, by an ulp of the range: the same call must be made.)
    lo = np.zeros((rows, groups))
    hi = np.zeros((rows, groups))
    full = cols // g
    if full:
        lf, hf = find_range(np.ascontiguousarray(w[:, :full * g]).reshape(-1, g), spec)
        lo[:, :full], hi[:, :full] = lf.reshape(rows, full), hf.reshape(rows, full)
    if full < groups:
        lo[:, full], hi[:, full] = find_range(np.ascontiguousarray(w[:, full * g:]), spec)
    if scheme == "asymmetric":
        lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)
        want = (hi - lo) / spec.qmax
    elif scheme == "symmetric":
        want = np.maximum(-lo, hi) / spec.qmax
    else:
        want = hi / spec.qmax
    # the stored scale covers the range (rounded up, never down)
    assert np.all(s.astype(np.float64) >= want)
    w_hat = dequantize_dq(q, dq, g)
    sc = np.repeat(s, g, axis=1)[:, :cols].astype(np.float64)
    inside = (w >= np.repeat(lo, g, axis=1)[:, :cols]) & (w <= np.repeat(hi, g, axis=1)[:, :cols])
    if rng == "minmax":
        assert inside.all()
    err = np.abs(w.astype(np.float64) - w_hat)
    # <= stored scale / 2, plus float32 rounding of the values involved
    tol = sc / 2 * (1 + 4e-7) + np.spacing(np.abs(w).astype(np.float32))
    assert np.all(err[inside] <= tol[inside]), (err - tol)[inside].max()
    # zeros restore exactly (asymmetric includes 0 in every range)
    if scheme == "asymmetric":
        assert np.all(w_hat[w == 0] == 0)


@pytest.fixture(params=["kernel", "numpy"])
def path(request, monkeypatch):
    import qtool.core.blocks as blocks

    if request.param == "numpy":
        monkeypatch.setattr(blocks, "_kernels", None)
    return request.param


@pytest.mark.parametrize("rng", ["minmax", "search"])
@pytest.mark.parametrize("shape, g", [((300, 1000), 32), ((7, 45), 16), ((3, 2, 10), 4)])
def test_the_quantizer_with_scale_bits_is_the_prototype(path, rng, shape, g):
    from concurrent.futures import ThreadPoolExecutor

    from qtool.core.quant import dequantize, quantize
    from qtool.core.shapes import stored_bytes

    w = (np.random.default_rng(3).standard_t(3, shape) * 0.02).astype(np.float32)
    spec = QuantSpec("asymmetric", 4, "group", g, range=rng, scale_bits=8)
    with ThreadPoolExecutor(2) as pool:
        t = quantize(w, spec, pool.map)
    q, dq = quantize_dq(w, spec)
    rows = shape[0]
    np.testing.assert_array_equal(t.values().reshape(rows, -1), q)
    np.testing.assert_array_equal(t.scale, dq.scale)
    np.testing.assert_array_equal(t.row_scale, dq.row_scale)
    np.testing.assert_array_equal(t.zero_point, dq.zero_point)
    w_hat = dequantize(t.data, t.scale, t.zero_point, t.shape, spec, np.float32)
    np.testing.assert_array_equal(w_hat.reshape(rows, -1), dequantize_dq(q, dq, g))
    assert stored_bytes(shape, spec) == stored_bytes_dq(shape, spec)


def test_codes_of_recovers_the_codes_and_refuses_other_scales():
    from qtool.core.double_quant import codes_of

    codes = np.array([[1, 200, 255], [3, 4, 5]], np.uint8)
    d = np.array([1e-3, 7.5], np.float32)
    np.testing.assert_array_equal(codes_of(stored_scales(codes, d), d), codes)
    with pytest.raises(ValueError, match="not 8-bit codes"):
        codes_of(np.array([[0.0015]], np.float32), np.array([1e-3], np.float32))


@pytest.mark.parametrize("kw, message", [
    ({"scale_bits": 4, "granularity": "group"}, "scale_bits must be 8"),
    ({"scale_bits": 8}, "needs granularity group"),
    ({"scale_bits": 8, "scheme": "gnmt", "granularity": "group"}, "other than gnmt"),
    ({"scale_bits": 8, "granularity": "group", "scale_dtype": "bfloat16"}, "must be float32"),
])
def test_spec_validation(kw, message):
    from qtool.core.schemes import SpecError

    with pytest.raises(SpecError, match=message):
        QuantSpec(**kw)
