"""qtool.core.quant: the notes' worked examples digit for digit, and properties of every scheme."""

from __future__ import annotations

import math
import zlib

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qtool.core.quant import dequantize, quantize, quantize_fixed
from qtool.core.schemes import QuantSpec, dequantize_values

# The example tensor of ../shared/quantization-notes.md
NOTES_W = np.array(
    [[0.0114, -0.0231, 0.0445], [0.0000, 0.0000, 0.0000], [-0.0409, -0.0435, -0.0400]],
    dtype=np.float32,
)


@pytest.fixture(params=["kernel", "numpy"])
def core(request, monkeypatch):
    """Run the test through qtool's C kernel, then again through its numpy code (the path of
    an install without a C compiler): the notes' numbers must come out of both."""
    import qtool.core.blocks as quant

    if request.param == "numpy":
        monkeypatch.setattr(quant, "_kernels", None)
    else:
        assert quant.kernels_available(), "qtool.core._kernels was not built by `pip install -e .`"
    return request.param


def test_gnmt_worked_example_from_notes(core):
    qt = quantize(NOTES_W, QuantSpec("gnmt"))
    assert qt.data.dtype == np.int8
    np.testing.assert_array_equal(
        qt.data, [[33, -66, 127], [0, 0, 0], [-119, -127, -117]]
    )
    # The notes' "scale" is 127/absmax, the reciprocal of the stored scale.
    np.testing.assert_allclose(
        1.0 / qt.scale.ravel().astype(np.float64), [2853.9326, 1.0, 2919.5403], rtol=1e-6
    )
    assert qt.scale.shape == (3, 1) and qt.scale.dtype == np.float32
    np.testing.assert_array_equal(qt.zero_point, np.zeros((3, 1), np.int32))


def test_gnmt_intermediate_products_match_notes(core):
    # "multiply weights and scale" in the notes, in float32, before rounding.
    absmax = np.abs(NOTES_W).max(axis=1)
    absmax[absmax == 0] = 127.0
    inv = np.float32(127.0) / absmax
    prod = NOTES_W * inv[:, None]
    np.testing.assert_allclose(prod[0], [32.534832, -65.92584, 127.0], rtol=1e-7)
    np.testing.assert_allclose(prod[2], [-119.409195, -127.0, -116.78161], rtol=1e-7)
    # and qtool's q is exactly the rounding of those products
    np.testing.assert_array_equal(quantize(NOTES_W, QuantSpec("gnmt")).data, np.rint(prod))


def test_fixed_scale_worked_example_from_notes():
    scale = 1 / 255
    q = quantize_fixed(NOTES_W, scale)
    np.testing.assert_array_equal(q, [[3, -6, 11], [0, 0, 0], [-10, -11, -10]])
    np.testing.assert_allclose(
        NOTES_W / np.float32(scale),
        [[2.9070, -5.8905, 11.3475], [0, 0, 0], [-10.4295, -11.0925, -10.2000]],
        atol=5e-5,
    )
    w_hat = dequantize_values(q, np.float32(scale), np.int32(0))
    np.testing.assert_array_equal(
        np.round(w_hat, 4),
        np.array([[0.0118, -0.0235, 0.0431], [0, 0, 0], [-0.0392, -0.0431, -0.0392]],
                 np.float32),
    )
    # The notes print this difference as "W-W^"; its signs are those of W^ - W.
    np.testing.assert_array_equal(
        np.round(w_hat - NOTES_W, 4),
        np.array([[0.0004, -0.0004, -0.0014], [0, 0, 0], [0.0017, 0.0004, 0.0008]],
                 np.float32),
    )


def _formula_reference(w: np.ndarray, scheme: str, bits: int, per_row: bool):
    """The issue's formulas written out independently, per tensor or per row, in float64."""
    rows = w.reshape(w.shape[0], -1).astype(np.float64)
    units = rows if per_row else rows.reshape(1, -1)
    qs, ss, zs = [], [], []
    for u in units:
        if scheme == "symmetric":
            s = np.abs(u).max() / (2 ** (bits - 1) - 1)
            s = np.float32(s if s > 0 else 1.0)
            z, lo_q, hi_q = 0, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        elif scheme == "symmetric-unsigned":
            s = np.float32(u.max() / (2**bits - 1) or 1.0)
            z, lo_q, hi_q = 0, 0, 2**bits - 1
        else:
            lo, hi = min(u.min(), 0.0), max(u.max(), 0.0)
            s = np.float32((hi - lo) / (2**bits - 1) or 1.0)
            z = int(np.clip(np.rint(-lo / np.float64(s)), 0, 2**bits - 1))
            lo_q, hi_q = 0, 2**bits - 1
        q = np.clip(np.rint(u.astype(np.float32) / s) + z, lo_q, hi_q)
        qs.append(q)
        ss.append(s)
        zs.append(z)
    return np.stack(qs).reshape(w.shape), np.array(ss, np.float32), np.array(zs, np.int32)


@pytest.mark.parametrize("scheme", ["symmetric", "symmetric-unsigned", "asymmetric"])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_matches_issue_formulas(scheme, granularity, core):
    rng = np.random.default_rng(7)
    w = rng.normal(0, 0.05, size=(16, 40)).astype(np.float32)
    if scheme == "symmetric-unsigned":
        w = np.abs(w)
    w[3] = 0.0  # an all-zero row
    qt = quantize(w, QuantSpec(scheme, granularity=granularity))
    q, s, z = _formula_reference(w, scheme, 8, granularity == "channel")
    np.testing.assert_array_equal(qt.data, q)
    np.testing.assert_array_equal(qt.scale.ravel(), s)
    np.testing.assert_array_equal(qt.zero_point.ravel(), z)
    assert qt.data.dtype == (np.int8 if scheme == "symmetric" else np.uint8)


# --------------------------------------------------------------------------- properties

finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)
tensors = hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=3, min_side=1, max_side=9),
                     elements=finite)
SPECS = [QuantSpec(s, granularity=g) for s in ("symmetric", "symmetric-unsigned", "asymmetric")
         for g in ("tensor", "channel")] + [QuantSpec("gnmt")]
F32_SPECS = list(SPECS)
# Scales stored in a narrower dtype (format_version 2): q comes from the rounded scale, and the
# bound error <= scale / 2 holds for the stored scale.
SPECS += [QuantSpec(s, bits=b, granularity=g, scale_dtype=d)
          for s, b, g in (("symmetric", 8, "channel"), ("asymmetric", 4, "channel"),
                          ("asymmetric", 8, "tensor"), ("symmetric-unsigned", 3, "channel"),
                          ("gnmt", 8, "channel"))
          for d in ("float16", "bfloat16")]


def _expand(qt):
    rows = qt.shape[0]
    return qt.scale.reshape(rows if qt.scale.ndim else 1, -1), qt.zero_point.reshape(
        rows if qt.zero_point.ndim else 1, -1)


@settings(max_examples=60, deadline=None)
@given(w=tensors, spec=st.sampled_from(SPECS))
def test_round_trip_properties(w, spec):
    if spec.scheme == "symmetric-unsigned":
        w = np.abs(w)
    qt = quantize(w, spec)
    q = qt.values().astype(np.int64)
    assert q.min() >= spec.qmin and q.max() <= spec.qmax
    assert np.all(qt.scale > 0) and np.all(np.isfinite(qt.scale))
    w_hat = dequantize(qt.data, qt.scale, qt.zero_point, qt.shape, spec, np.float32)
    assert np.all(np.isfinite(w_hat))
    s, _ = _expand(qt)
    w2, e2 = w.reshape(s.shape[0], -1), np.abs(w - w_hat).reshape(s.shape[0], -1)
    # |w - dequant(q)| <= scale / 2, plus one float32 ulp of the values involved
    tol = s / 2 * (1 + 4e-7) + np.spacing(np.abs(w2).astype(np.float32))
    assert np.all(e2 <= tol), (e2 - tol).max()
    # re-quantizing the dequantized tensor with the stored scale and zero point gives q again
    again = quantize_fixed_per_unit(w_hat, qt)
    np.testing.assert_array_equal(again, q)
    if spec.scheme == "asymmetric":
        zero_mask = w == 0
        assert np.all(w_hat[zero_mask] == 0.0)


def quantize_fixed_per_unit(w_hat, qt):
    rows = qt.shape[0]
    s, z = _expand(qt)
    x = w_hat.reshape(s.shape[0], -1).astype(np.float32)
    if qt.spec.scheme == "gnmt" and qt.spec.scale_dtype == "float32":  # else it divides
        inv = (np.float32(127) / (s * np.float32(127))).astype(np.float32)
        q = np.rint(x * inv)
    else:
        q = np.rint(x / s) + z
    return np.clip(q, qt.spec.qmin, qt.spec.qmax).reshape(qt.shape).astype(np.int64) if rows else q


@settings(max_examples=40, deadline=None)
@given(w=hnp.arrays(np.float32, (4, 6), elements=finite))
def test_asymmetric_zero_is_exact(w):
    w = w.copy()
    w[0, 0] = 0.0
    w[-1, -1] = 0.0
    for g in ("tensor", "channel"):
        qt = quantize(w, QuantSpec("asymmetric", granularity=g))
        w_hat = dequantize(qt.data, qt.scale, qt.zero_point, qt.shape, qt.spec, np.float32)
        assert w_hat[0, 0] == 0.0 and w_hat[-1, -1] == 0.0


# A constant is exact with a float32 scale (value / qmax rounds back); a scale rounded up to
# float16 or bfloat16 keeps only the error bound, checked by test_round_trip_properties.
@pytest.mark.parametrize("spec", F32_SPECS, ids=lambda s: f"{s.scheme}-{s.granularity}")
@pytest.mark.parametrize("value", [0.0, 0.5, 3e-30, 7.0])
def test_all_zero_and_constant_tensors(spec, value, core):
    w = np.full((5, 7), value, np.float32)
    qt = quantize(w, spec)
    assert np.all(qt.scale > 0) and np.all(np.isfinite(qt.scale))
    w_hat = dequantize(qt.data, qt.scale, qt.zero_point, qt.shape, spec, np.float32)
    assert np.all(np.isfinite(w_hat))
    np.testing.assert_allclose(w_hat, w, rtol=1e-6, atol=0)
    assert np.isfinite(qt.stats.cosine) and not np.isnan(qt.stats.sqnr_db)


def test_float64_is_computed_in_float64():
    w = np.random.default_rng(1).normal(size=(8, 8))
    qt = quantize(w, QuantSpec("symmetric"))
    w_hat = dequantize(qt.data, qt.scale, qt.zero_point, qt.shape, qt.spec, np.float64,
                       np.dtype(np.float64))
    s = qt.scale.astype(np.float64)
    assert np.all(np.abs(w - w_hat) <= s / 2 + 1e-15)


def test_results_independent_of_block_size(monkeypatch):
    import qtool.core.blocks as quant

    w = np.random.default_rng(3).standard_t(3, size=(300, 257)).astype(np.float32)
    spec = QuantSpec("asymmetric", granularity="tensor")
    ref = quantize(w, spec)
    monkeypatch.setattr(quant, "BLOCK_ELEMENTS", 700)
    small = quantize(w, spec)
    np.testing.assert_array_equal(ref.data, small.data)
    assert ref.scale == small.scale
    # float32 partial sums per block differ in the last bits only
    np.testing.assert_allclose(ref.stats.error_sq, small.stats.error_sq, rtol=1e-6)


def test_stats_match_numpy(core):
    w = np.random.default_rng(5).normal(0, 0.02, size=(64, 96)).astype(np.float32)
    qt = quantize(w, QuantSpec("symmetric"))
    w_hat = dequantize(qt.data, qt.scale, qt.zero_point, qt.shape, qt.spec, np.float32)
    w64, h64 = w.astype(np.float64), w_hat.astype(np.float64)
    err = h64 - w64
    assert qt.stats.mse == pytest.approx(np.mean(err**2), rel=1e-5)
    assert qt.stats.sqnr_db == pytest.approx(
        10 * np.log10(np.sum(w64**2) / np.sum(err**2)), rel=1e-5)
    assert qt.stats.max_abs_error == pytest.approx(np.abs(err).max(), rel=1e-6)
    cos = np.dot(w64.ravel(), h64.ravel()) / np.linalg.norm(w64) / np.linalg.norm(h64)
    assert qt.stats.cosine == pytest.approx(cos, rel=1e-7)


def test_symmetric_unsigned_rejects_negative_values(core):
    from qtool.core.blocks import NegativeValuesError

    w = np.array([[0.1, -0.2], [0.3, 0.4]], np.float32)
    for g in ("tensor", "channel"):
        with pytest.raises(NegativeValuesError):
            quantize(w, QuantSpec("symmetric-unsigned", granularity=g))


def test_nan_is_reported_with_count(core):
    from qtool.core.blocks import NonFiniteError

    w = np.ones((4, 4), np.float32)
    w[1, 2] = np.nan
    w[3, 3] = np.inf
    for g in ("tensor", "channel"):
        with pytest.raises(NonFiniteError) as e:
            quantize(w, QuantSpec("symmetric", granularity=g))
        assert e.value.count == 2


def test_stats_of_huge_values_do_not_overflow(core):
    # |w| ~ 1e18: w**2 summed in float32 would overflow to inf.
    w = (np.random.default_rng(9).normal(size=(64, 64)) * 1e18).astype(np.float32)
    qt = quantize(w, QuantSpec("symmetric"))
    w64 = w.astype(np.float64)
    w_hat = dequantize(qt.data, qt.scale, qt.zero_point, qt.shape, qt.spec, np.float32)
    err = w_hat.astype(np.float64) - w64
    assert qt.stats.signal_sq == pytest.approx(np.sum(w64**2), rel=1e-5)
    assert qt.stats.sqnr_db == pytest.approx(10 * np.log10(np.sum(w64**2) / np.sum(err**2)),
                                             rel=1e-4)


# --------------------------------------------------------------------------- the C kernel
#
# qtool/core/_kernels.c does the per-value work when it is built (it is on every machine with a C
# compiler, CI included); qtool/core/quant.py's numpy code does the same without it. Both must
# write the same bytes: these tests run each case through both and compare.


def _both_paths(fn, monkeypatch):
    import qtool.core.blocks as quant

    assert quant.kernels_available(), "qtool.core._kernels was not built by `pip install -e .`"
    with_kernel = fn()
    monkeypatch.setattr(quant, "_kernels", None)
    assert not quant.kernels_available()
    with_numpy = fn()
    monkeypatch.undo()
    return with_kernel, with_numpy


def _awkward_tensor(rng, rows, cols, dtype):
    """Normal weights with outliers, an all-zero row, -0.0 and exact ties for rounding."""
    w = rng.normal(0, 0.05, (rows, cols))
    w[rng.random((rows, cols)) < 0.01] *= 40.0
    w[0] = 0.0
    if rows > 1:
        w[1, ::3] = -0.0
    if rows > 2 and cols > 2:
        w[2, :2] = [1.0, -1.0]
        w[2, 2:] = np.linspace(-1.0, 1.0, cols - 2)  # values landing on x.5 steps
    return w.astype(dtype)


KERNEL_SPECS = [
    QuantSpec("symmetric"),
    QuantSpec("symmetric", granularity="tensor"),
    QuantSpec("symmetric", bits=4, granularity="group", group_size=32),
    QuantSpec("symmetric-unsigned", granularity="channel"),
    QuantSpec("asymmetric"),
    QuantSpec("asymmetric", bits=3, granularity="group", group_size=100),
    QuantSpec("asymmetric", granularity="tensor", range="percentile", percentile=99.0),
    QuantSpec("symmetric", bits=6, range="mse"),
    QuantSpec("gnmt"),
]
# Narrower stored scales: the kernel gets the rounded scale from qparams like numpy does.
LEAN_SPECS = [
    QuantSpec("symmetric", bits=8, granularity="group", group_size=32, scale_dtype="float16"),
    QuantSpec("asymmetric", bits=4, granularity="group", group_size=32, scale_dtype="bfloat16"),
    QuantSpec("asymmetric", granularity="tensor", scale_dtype="float16"),
    QuantSpec("gnmt", scale_dtype="float16"),
    QuantSpec("symmetric-unsigned", granularity="channel", scale_dtype="bfloat16"),
]


@pytest.mark.parametrize("spec", KERNEL_SPECS + LEAN_SPECS,
                         ids=lambda s: f"{s.scheme}-{s.bits}-{s.granularity}-{s.range}-"
                                       f"{s.scale_dtype}")
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", [(5, 1), (7, 13), (9, 1030), (3, 2100), (40, 257)])
def test_kernel_writes_the_bytes_numpy_writes(spec, dtype, shape, monkeypatch):
    # zlib.crc32, not hash(): hash() of a str differs per process, and so would the data.
    rng = np.random.default_rng(zlib.crc32(repr((shape, spec.scheme, spec.bits)).encode()))
    w = _awkward_tensor(rng, *shape, dtype)
    if spec.scheme == "symmetric-unsigned":
        w = np.abs(w.astype(np.float32)).astype(dtype)
    k, n = _both_paths(lambda: quantize(w, spec), monkeypatch)
    np.testing.assert_array_equal(k.data, n.data)
    assert k.data.dtype == n.data.dtype
    np.testing.assert_array_equal(k.scale, n.scale)
    np.testing.assert_array_equal(k.zero_point, n.zero_point)
    # The largest error is one float32 value, found exactly by both; the sums are float64 in
    # the kernel and float32 dots in numpy, so they agree to float32 precision.
    assert k.stats.count == n.stats.count == w.size
    assert k.stats.max_abs_error == n.stats.max_abs_error
    for key in ("signal_sq", "error_sq"):
        assert getattr(k.stats, key) == pytest.approx(getattr(n.stats, key), rel=1e-5, abs=1e-30)
    # cross = sum(w * err) can cancel to near 0, so a relative bound on it is luck; its
    # rounding error scales with |w| |err| (Cauchy-Schwarz bounds |cross| by the same).
    scale = math.sqrt(n.stats.signal_sq * n.stats.error_sq)
    assert k.stats.cross == pytest.approx(n.stats.cross, rel=1e-4, abs=1e-5 * scale)


@settings(max_examples=60, deadline=None)
@given(w=hnp.arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 40)),
                    elements=st.floats(-1e6, 1e6, width=32)),
       spec=st.sampled_from(KERNEL_SPECS[:6] + KERNEL_SPECS[-1:] + LEAN_SPECS))
def test_kernel_matches_numpy_on_any_values(w, spec):
    import qtool.core.blocks as quant

    if spec.scheme == "symmetric-unsigned":
        w = np.abs(w)
    k = quantize(w, spec)
    saved, quant._kernels = quant._kernels, None
    try:
        n = quantize(w, spec)
    finally:
        quant._kernels = saved
    np.testing.assert_array_equal(k.data, n.data)
    np.testing.assert_array_equal(k.scale, n.scale)
    np.testing.assert_array_equal(k.zero_point, n.zero_point)
    assert k.stats.max_abs_error == n.stats.max_abs_error


def test_kernel_statistics_are_the_float64_sums():
    rng = np.random.default_rng(11)
    w = rng.normal(0, 0.02, (33, 3001)).astype(np.float32)
    qt = quantize(w, QuantSpec("asymmetric", granularity="group", group_size=128))
    w_hat = dequantize(qt.data, qt.scale, qt.zero_point, qt.shape, qt.spec, np.float32)
    w64 = w.astype(np.float64)
    err = w_hat.astype(np.float64) - w64
    assert qt.stats.signal_sq == pytest.approx(np.sum(w64 * w64), rel=1e-6)
    assert qt.stats.error_sq == pytest.approx(np.sum(err * err), rel=1e-6)
    assert qt.stats.cross == pytest.approx(np.sum(w64 * err), rel=1e-5)
    assert qt.stats.max_abs_error == np.abs(err).max()


@pytest.mark.parametrize("out_dtype", [np.float32, ml_dtypes.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("spec", [QuantSpec("symmetric"), QuantSpec("asymmetric", bits=4,
                                  granularity="group", group_size=48),
                                  QuantSpec("symmetric-unsigned", granularity="tensor")],
                         ids=["sym", "asym4-group", "unsigned-tensor"])
def test_kernel_dequantizes_to_the_same_bytes(spec, out_dtype, monkeypatch):
    w = np.abs(_awkward_tensor(np.random.default_rng(4), 12, 1000, np.float32)) * 1e3
    if spec.scheme != "symmetric-unsigned":
        w[3::2] *= -1
    qt = quantize(w, spec)
    k, n = _both_paths(lambda: dequantize(qt.data, qt.scale, qt.zero_point, qt.shape, qt.spec,
                                          out_dtype), monkeypatch)
    assert k.dtype == n.dtype == np.dtype(out_dtype)
    np.testing.assert_array_equal(k.view(np.uint8), n.view(np.uint8))


def test_kernel_rounds_bfloat16_ties_to_even():
    # (q - 0) * s lands exactly halfway between two bfloat16 values: 1 + 2^-8 lies between
    # 1 and 1 + 2^-7 and must round to 1 (even); 1 + 3 * 2^-8 rounds up to 1 + 2^-6.
    s = np.array([[1 + 2**-8], [1 + 3 * 2**-8], [np.finfo(np.float32).max]], np.float32)
    q = np.ones((3, 16), np.int8)
    out = dequantize(q, s, np.zeros((3, 1), np.int32), (3, 16), QuantSpec("symmetric"),
                     ml_dtypes.bfloat16)
    assert out[0, 0] == 1.0
    assert out[1, 0] == np.float32(1 + 2**-6)
    assert out[2, 0] == s[2, 0].astype(ml_dtypes.bfloat16)  # ml_dtypes' own cast: inf
    assert np.isinf(out[2, 0].astype(np.float32))


def test_kernel_reports_nonfinite_values_with_the_tensor_count():
    from qtool.core.blocks import NonFiniteError

    w = np.ones((600, 1200), np.float32)  # several blocks: the count is the whole tensor's
    w[5, 7] = np.nan
    w[599, 0] = -np.inf
    w[300, 1199] = np.inf
    for dtype in (np.float32, ml_dtypes.bfloat16):
        with pytest.raises(NonFiniteError) as e:
            quantize(w.astype(dtype), QuantSpec("symmetric"))
        assert e.value.count == 3


def test_kernel_huge_values_fall_back_to_float64_sums(monkeypatch):
    # |w| ~ 1e19: the kernel's float32 partial sums of w**2 overflow; the block's statistics
    # are then redone by the numpy code, in float64.
    w = (np.random.default_rng(9).normal(size=(8, 300)) * 1e19).astype(np.float32)
    k, n = _both_paths(lambda: quantize(w, QuantSpec("symmetric")), monkeypatch)
    w64 = w.astype(np.float64)
    assert k.stats.signal_sq == pytest.approx(np.sum(w64**2), rel=1e-6)
    assert k.stats.signal_sq == n.stats.signal_sq
    assert k.stats.error_sq == n.stats.error_sq
    np.testing.assert_array_equal(k.data, n.data)


def test_kernel_refuses_buffers_that_do_not_fit_the_shape():
    from qtool.core import _kernels as k

    x = np.ones((2, 10), np.float32)
    q = np.empty((2, 10), np.uint8)
    one, zero = np.ones(1, np.float32), np.zeros(1, np.float32)
    cases = [
        # shared parameters (row_stride 0) with 2 groups per row need 2 of each, not 1
        lambda: k.quantize(x, 0, 2, 10, 5, one, None, zero, 0, -128.0, 127.0, q),
        lambda: k.quantize(x, 0, 3, 10, 10, one, None, zero, 0, -128.0, 127.0, q),  # x short
        lambda: k.quantize(x, 0, 2, 10, 10, np.ones(2, np.float32), None, np.zeros(2, np.float32),
                           1, -128.0, 127.0, q[:1]),  # q short
        lambda: k.quantize(x, 0, 2, 10, 10, np.ones(2, np.float32), None, np.zeros(2, np.float32),
                           3, -128.0, 127.0, q),  # row_stride is neither 0 nor the units
        lambda: k.minmax(x, 0, 2, 10, 5, np.empty(3, np.float32), np.empty(4, np.float32)),
        lambda: k.dequantize(q, True, 2, 10, 10, one, zero, 0, np.empty(19, np.float32), 0),
        lambda: k.minmax(x, 0, 2, 0, 1, np.empty(0, np.float32), np.empty(0, np.float32)),
        lambda: k.minmax(x, 0, 1 << 61, 1 << 2, 1, x, x),  # byte counts would overflow
    ]
    for i, call in enumerate(cases):
        with pytest.raises(ValueError):
            call()
        assert np.array_equal(x, np.ones((2, 10), np.float32)), i


def test_kernel_writes_into_an_output_with_gaps():
    # TensorQuantizer.run may be given any (n, cols) view to fill, e.g. every other row of a
    # larger array; the bytes must match those of a contiguous run.
    from qtool.core.quant import TensorQuantizer

    w = np.random.default_rng(2).normal(0, 1, (6, 40)).astype(np.float32)
    spec = QuantSpec("asymmetric")
    ref = quantize(w, spec)
    tq = TensorQuantizer(w.shape, w.dtype, spec)
    big = np.zeros((12, 40), np.uint8)
    tq.run(w, 0, big[::2])
    np.testing.assert_array_equal(big[::2], ref.data)
    assert not big[1::2].any()
    np.testing.assert_array_equal(tq.scale, ref.scale)


@pytest.mark.parametrize("spec", [QuantSpec("symmetric"),
                                  QuantSpec("asymmetric", bits=4, granularity="group",
                                            group_size=32)], ids=["sym8-channel", "asym4-g32"])
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["f32", "bf16"])
def test_run_rows_fetches_each_tasks_rows_on_its_worker(core, spec, dtype, monkeypatch):
    # run_rows hands each task only (a, b): the task fetches its rows itself, on the worker
    # that quantizes them, and may put them in a buffer that the thread's next task
    # overwrites. Every byte, scale and statistic must be those of quantize(w) in one go.
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import qtool.core.blocks as blocks
    from qtool.core.quant import TensorQuantizer

    monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", 200)  # 2 rows of 100 per block
    monkeypatch.setattr(blocks, "TASK_ELEMENTS", 400)  # 2 blocks per task
    w = np.random.default_rng(7).normal(0, 1, (23, 100)).astype(np.float32).astype(dtype)
    ref = quantize(w, spec)
    tq = TensorQuantizer(w.shape, w.dtype, spec)
    out = np.zeros(ref.data.shape, ref.data.dtype).reshape(tq.rows, tq.out_row_items)
    calls: list[tuple[int, int]] = []
    threads: set[int] = set()
    local = threading.local()

    def rows_of(a: int, b: int) -> np.ndarray:
        calls.append((a, b))
        threads.add(threading.get_ident())
        if not hasattr(local, "buf"):
            local.buf = np.empty((4, 100), w.dtype)
        local.buf[:] = 0  # whatever the previous task left there is gone
        local.buf[: b - a] = w[a:b]
        return local.buf[: b - a]

    with ThreadPoolExecutor(2) as pool:
        for a, b in tq.chunks(1000):  # runs of 10 rows: 10, 10, 3
            tq.run_rows(rows_of, a, b - a, out[a:b], pool.map)
    assert sorted(calls) == [(0, 4), (4, 8), (8, 10), (10, 14), (14, 18), (18, 20), (20, 23)]
    assert threading.get_ident() not in threads
    np.testing.assert_array_equal(out.reshape(ref.data.shape), ref.data)
    np.testing.assert_array_equal(tq.scale, ref.scale)
    np.testing.assert_array_equal(tq.zero_point, ref.zero_point)
    assert tq.stats == ref.stats
