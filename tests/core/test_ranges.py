"""Tests for qtool.core.ranges: every expected value is recomputed here with plain numpy."""

from __future__ import annotations

import zlib
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qtool.core import ranges
from qtool.core.ranges import find_range
from qtool.core.schemes import QParams, QuantSpec, dequantize_values, qparams, quantize_values

SCHEMES_BITS = [("symmetric", b) for b in range(2, 9)] + [
    ("symmetric-unsigned", b) for b in range(2, 9)
] + [("asymmetric", b) for b in range(2, 9)] + [("gnmt", 8)]


def reconstruct(w: np.ndarray, lo: np.ndarray, hi: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """The round trip a quantizer does with this range, written out independently."""
    p = qparams(lo, hi, spec)
    inv = None if p.inv_scale is None else p.inv_scale[:, None]
    rp = QParams(p.scale[:, None], p.zero_point[:, None], inv)
    q = quantize_values(w.copy(), rp, spec)
    return dequantize_values(q, rp.scale, rp.zero_point, w.dtype)


def row_sq_error(w: np.ndarray, lo: np.ndarray, hi: np.ndarray, spec: QuantSpec) -> np.ndarray:
    d = w.astype(np.float64) - reconstruct(w, lo, hi, spec).astype(np.float64)
    return np.sum(d * d, axis=1)


def sqnr_db(w: np.ndarray, lo: np.ndarray, hi: np.ndarray, spec: QuantSpec) -> float:
    w64 = w.astype(np.float64)
    d = w64 - reconstruct(w, lo, hi, spec).astype(np.float64)
    return float(10.0 * np.log10(np.sum(w64**2) / np.sum(d**2)))


def check_shape_invariants(w: np.ndarray, lo: np.ndarray, hi: np.ndarray, spec: QuantSpec):
    assert lo.shape == hi.shape == (w.shape[0],)
    assert lo.dtype == hi.dtype == np.float64
    assert np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))
    assert np.all(lo <= 0.0) and np.all(hi >= 0.0)
    if spec.scheme in ("symmetric", "gnmt"):
        np.testing.assert_array_equal(lo, -hi)
    if spec.scheme == "symmetric-unsigned":
        np.testing.assert_array_equal(lo, 0.0)
    # Never wider than minmax.
    if w.size:
        mn = w.min(axis=1).astype(np.float64)
        mx = w.max(axis=1).astype(np.float64)
        if spec.scheme in ("symmetric", "gnmt"):
            assert np.all(hi <= np.maximum(mx, -mn))
        elif spec.scheme == "symmetric-unsigned":
            assert np.all(hi <= np.maximum(mx, 0.0))
        else:
            assert np.all(lo >= np.minimum(mn, 0.0)) and np.all(hi <= np.maximum(mx, 0.0))


def sample(kind: str, rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    if kind == "normal":
        return rng.standard_normal(shape)
    if kind == "uniform":
        return rng.uniform(-1.0, 3.0, shape)
    if kind == "t2":  # heavy tails: infinite variance
        return rng.standard_t(2, shape)
    if kind == "cauchy":
        return rng.standard_cauchy(shape)
    if kind == "positive":
        return np.abs(rng.standard_t(3, shape))
    raise AssertionError(kind)


# ---------------------------------------------------------------------------------- minmax


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_minmax_equals_numpy(dtype):
    w = np.random.default_rng(1).standard_normal((37, 53)).astype(dtype) + 0.3
    mn, mx = np.min(w, axis=1), np.max(w, axis=1)
    lo, hi = find_range(w, QuantSpec("symmetric", 4))
    np.testing.assert_array_equal(hi, np.maximum(np.abs(mn), np.abs(mx)))
    np.testing.assert_array_equal(lo, -hi)
    lo, hi = find_range(w, QuantSpec("gnmt", 8))
    np.testing.assert_array_equal(hi, np.maximum(np.abs(mn), np.abs(mx)))
    lo, hi = find_range(w, QuantSpec("symmetric-unsigned", 4))
    np.testing.assert_array_equal(lo, 0.0)
    np.testing.assert_array_equal(hi, np.maximum(mx, 0.0))
    lo, hi = find_range(w, QuantSpec("asymmetric", 4))
    np.testing.assert_array_equal(lo, np.minimum(mn, 0.0))
    np.testing.assert_array_equal(hi, np.maximum(mx, 0.0))


def test_asymmetric_minmax_includes_zero():
    w = np.array([[1.0, 2.0, 3.0], [-3.0, -2.0, -1.0], [-1.0, 0.5, 2.0]], np.float32)
    lo, hi = find_range(w, QuantSpec("asymmetric", 8))
    np.testing.assert_array_equal(lo, [0.0, -3.0, -1.0])
    np.testing.assert_array_equal(hi, [3.0, 0.0, 2.0])


# ------------------------------------------------------------------------------ percentile


@pytest.mark.parametrize("p", [99.99, 99.0, 90.0, 100.0, 50.5])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_percentile_equals_numpy(p, dtype):
    w = np.random.default_rng(2).standard_t(3, (64, 1000)).astype(dtype)
    spec = QuantSpec("symmetric", 4, range="percentile", percentile=p)
    # The contract is float64 interpolation between the row's order statistics.
    w64 = w.astype(np.float64)
    a = np.percentile(np.abs(w64), p, axis=1)
    lo, hi = find_range(w, spec)
    np.testing.assert_array_equal(hi, a)
    np.testing.assert_array_equal(lo, -a)

    lo, hi = find_range(np.abs(w), spec.with_(scheme="symmetric-unsigned"))
    np.testing.assert_array_equal(hi, a)
    np.testing.assert_array_equal(lo, 0.0)

    lo, hi = find_range(w, spec.with_(scheme="asymmetric"))
    np.testing.assert_array_equal(lo, np.minimum(np.percentile(w64, 100.0 - p, axis=1), 0.0))
    np.testing.assert_array_equal(hi, np.maximum(np.percentile(w64, p, axis=1), 0.0))


def test_percentile_chunking_matches_unchunked():
    # Tiny chunks force many row chunks, including a ragged last one.
    w = np.random.default_rng(3).standard_normal((23, 41)).astype(np.float32)
    spec = QuantSpec("asymmetric", 4, range="percentile", percentile=97.0)
    want = find_range(w, spec)
    with mock.patch.object(ranges, "_PERCENTILE_CHUNK_ELEMS", 100):
        got = find_range(w, spec)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(want[1], np.percentile(w.astype(np.float64), 97.0, axis=1))


def test_percentile_100_is_minmax():
    w = np.random.default_rng(4).standard_normal((8, 100))
    for scheme, bits in SCHEMES_BITS:
        spec = QuantSpec(scheme, bits)
        got = find_range(w, spec.with_(range="percentile", percentile=100.0))
        want = find_range(w, spec)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


def test_percentile_unsigned_never_past_positive_max():
    # |w| is dominated by negatives here; the unsigned range still ends at max(w, 0).
    w = np.array([[-5.0, -4.0, 1.0, 0.5], [-1.0, -2.0, -3.0, -4.0]], np.float32)
    lo, hi = find_range(w, QuantSpec("symmetric-unsigned", 4, range="percentile", percentile=90))
    np.testing.assert_array_equal(hi, [1.0, 0.0])


# ------------------------------------------------------------------------------------- mse


@pytest.mark.parametrize("kind", ["normal", "uniform", "t2", "cauchy", "positive"])
@pytest.mark.parametrize("scheme,bits", SCHEMES_BITS)
def test_mse_never_worse_than_minmax_fixed_seeds(kind, scheme, bits):
    rng = np.random.default_rng(zlib.crc32(f"{kind}/{scheme}/{bits}".encode()))
    w = sample(kind, rng, (24, 200)).astype(np.float32)
    spec = QuantSpec(scheme, bits, range="mse")
    lo, hi = find_range(w, spec)
    check_shape_invariants(w, lo, hi, spec)
    e_mse = row_sq_error(w, lo, hi, spec)
    e_mm = row_sq_error(w, *find_range(w, spec.with_(range="minmax")), spec)
    assert np.all(e_mse <= e_mm)
    bell_shaped = kind in ("normal", "t2") or (kind == "positive" and scheme != "asymmetric")
    if bits <= 4 and bell_shaped:
        # At low bits clipping the tails of bell-shaped data pays: most rows strictly improve
        # (so the search is not just returning minmax).
        assert np.mean(e_mse < e_mm) > 0.5


@st.composite
def mse_cases(draw):
    scheme, bits = draw(st.sampled_from(SCHEMES_BITS))
    kind = draw(st.sampled_from(["normal", "uniform", "t2", "cauchy", "positive"]))
    units = draw(st.integers(1, 6))
    n = draw(st.integers(1, 300))
    seed = draw(st.integers(0, 2**32 - 1))
    log_scale = draw(st.sampled_from([-30, -5, 0, 3, 20]))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    w = (sample(kind, np.random.default_rng(seed), (units, n)) * 10.0**log_scale).astype(dtype)
    block = draw(st.sampled_from([None, 16, 64]))
    return w, QuantSpec(scheme, bits, range="mse"), block


@settings(max_examples=200, deadline=None)
@given(mse_cases())
def test_mse_never_worse_than_minmax_property(case):
    w, spec, block = case
    # A small block forces the column-split path (rows longer than a block) too.
    with mock.patch.object(ranges, "_MSE_BLOCK_ELEMS", block or ranges._MSE_BLOCK_ELEMS):
        lo, hi = find_range(w, spec)
    check_shape_invariants(w, lo, hi, spec)
    e_mm = row_sq_error(w, *find_range(w, spec.with_(range="minmax")), spec)
    assert np.all(row_sq_error(w, lo, hi, spec) <= e_mm)


finite_rows = hnp.arrays(
    dtype=np.float32,
    shape=hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=12),
    elements=st.floats(-(2.0**100), 2.0**100, width=32, allow_subnormal=True),
)


@settings(max_examples=300, deadline=None)
@given(finite_rows, st.sampled_from(SCHEMES_BITS), st.sampled_from(["minmax", "percentile", "mse"]))
def test_arbitrary_values_give_finite_valid_ranges(w, scheme_bits, method):
    # Adversarial values: zeros, repeats, subnormals, mixed magnitudes.
    spec = QuantSpec(*scheme_bits, range=method, percentile=99.0)
    lo, hi = find_range(w, spec)
    check_shape_invariants(w, lo, hi, spec)
    if method == "mse":
        with np.errstate(all="ignore"):
            e_mm = row_sq_error(w, *find_range(w, spec.with_(range="minmax")), spec)
            e_mse = row_sq_error(w, lo, hi, spec)
        ok = np.ones(w.shape[0], bool)
        if spec.scheme == "gnmt":
            # schemes.qparams gnmt bug (see test_gnmt_tiny_absmax_schemes_bug): rows whose
            # absmax is below 127 / float32 max reconstruct as NaN whatever the range.
            ok = np.abs(w).max(axis=1) >= GNMT_TINY
        assert np.all(e_mse[ok] <= e_mm[ok])


def test_mse_blocking_does_not_change_result():
    w = np.random.default_rng(5).standard_t(3, (9, 200)).astype(np.float32)
    spec = QuantSpec("asymmetric", 3, range="mse")
    want = find_range(w, spec)
    for block in (7, 150, 200, 500):  # column split, ragged, one row, several rows
        with mock.patch.object(ranges, "_MSE_BLOCK_ELEMS", block):
            got = find_range(w, spec)
        # Column blocks change the summation order of the error, which may move a near-tie;
        # the quantized error must agree to rounding either way.
        np.testing.assert_allclose(
            row_sq_error(w, *got, spec), row_sq_error(w, *want, spec), rtol=1e-6
        )


def test_mse_grid():
    r = ranges.MSE_RATIOS
    assert r[0] == 1.0  # minmax is a candidate and is tried first, so it wins ties
    assert np.all(np.diff(r) < 0) and r[-1] > 0


def student_t_weights() -> np.ndarray:
    return np.random.default_rng(0).standard_t(3, (256, 1024)).astype(np.float32)


@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
def test_mse_gains_at_least_1db_on_student_t_4bit(scheme):
    """The claim: per-channel 4-bit on Student-t(3) weights, mse beats minmax by >= 1 dB."""
    w = student_t_weights()
    spec = QuantSpec(scheme, 4, granularity="channel", range="mse")
    s_mse = sqnr_db(w, *find_range(w, spec), spec)
    s_mm = sqnr_db(w, *find_range(w, spec.with_(range="minmax")), spec)
    print(f"{scheme} 4-bit t(3): minmax {s_mm:.2f} dB, mse {s_mse:.2f} dB, "
          f"gain {s_mse - s_mm:.2f} dB")
    assert s_mse - s_mm >= 1.0


def test_mse_keeps_minmax_at_8bit_on_uniform_data():
    # Uniform data has no tails worth clipping; any change must still not hurt.
    w = np.random.default_rng(6).uniform(-1, 1, (16, 512)).astype(np.float32)
    spec = QuantSpec("symmetric", 8, range="mse")
    lo, hi = find_range(w, spec)
    mm = find_range(w, spec.with_(range="minmax"))
    assert np.all(row_sq_error(w, lo, hi, spec) <= row_sq_error(w, *mm, spec))
    assert np.all(hi >= 0.9 * mm[1])


# ------------------------------------------------------------------------------ edge cases


EDGE_ROWS = {
    "zeros": np.zeros((3, 5)),
    "constant_pos": np.full((2, 7), 0.37),
    "constant_neg": np.full((2, 7), -2.5),
    "single_value": np.array([[0.0, 0.0, 4.0, 0.0]]),
    "n1": np.array([[1.5], [-0.25], [0.0]]),
    "tiny": np.array([[0.0, 1e-30, -3e-31, 0.0], [1e-20, 1e-20, 1e-20, 1e-20]]),
    "mixed": np.array([[0.0] * 8, [3.0] * 8, [1.0, -1.0] * 4]),
}


# Below this absmax, schemes.qparams' gnmt branch computes 127 / absmax = inf in float32.
GNMT_TINY = 127.0 / float(np.finfo(np.float32).max)


def test_gnmt_tiny_absmax_stays_finite():
    # 127 / absmax overflows float32 below GNMT_TINY; qparams clamps absmax so that the
    # inverse scale stays finite and the scale never underflows to 0.
    w = np.array([[0.0, 1e-38, -1e-40]], np.float32)
    spec = QuantSpec("gnmt", 8)
    lo, hi = find_range(w, spec)
    assert np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))
    with np.errstate(all="ignore"):
        assert np.all(np.isfinite(reconstruct(w, lo, hi, spec)))


@pytest.mark.parametrize("name", sorted(EDGE_ROWS))
@pytest.mark.parametrize("method", ["minmax", "percentile", "mse"])
@pytest.mark.parametrize("scheme,bits", SCHEMES_BITS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_degenerate_rows(name, method, scheme, bits, dtype):
    w = EDGE_ROWS[name].astype(dtype)
    spec = QuantSpec(scheme, bits, range=method)
    lo, hi = find_range(w, spec)
    check_shape_invariants(w, lo, hi, spec)
    w_hat = reconstruct(w, lo, hi, spec)
    assert np.all(np.isfinite(w_hat))
    if method == "mse":
        # Constant rows are represented exactly (or as well as minmax does): ties keep 1.0.
        mm = find_range(w, spec.with_(range="minmax"))
        assert np.all(row_sq_error(w, lo, hi, spec) <= row_sq_error(w, *mm, spec))


def test_constant_row_keeps_full_range_under_mse():
    w = np.full((1, 16), 0.75, np.float32)
    lo, hi = find_range(w, QuantSpec("symmetric", 4, range="mse"))
    assert hi[0] == 0.75 and lo[0] == -0.75


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (0, 0)])
def test_empty(shape):
    for method in ("minmax", "percentile", "mse"):
        lo, hi = find_range(np.zeros(shape, np.float32), QuantSpec(range=method))
        assert lo.shape == hi.shape == (shape[0],)
        assert not np.any(lo) and not np.any(hi)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("method", ["minmax", "percentile", "mse"])
def test_non_finite_rows_are_rejected(bad, method):
    w = np.ones((4, 6), np.float32)
    w[2, 3] = bad
    with pytest.raises(ValueError, match=r"1 row\(s\) contain NaN or inf \(2\)"):
        find_range(w, QuantSpec(range=method))


def test_rejects_wrong_rank_and_dtype():
    with pytest.raises(ValueError, match="2-D"):
        find_range(np.zeros(4, np.float32), QuantSpec())
    with pytest.raises(TypeError, match="float32 or float64"):
        find_range(np.zeros((2, 2), np.int8), QuantSpec())


def test_does_not_modify_input():
    w = np.random.default_rng(7).standard_normal((5, 300)).astype(np.float32)
    before = w.copy()
    for method in ("minmax", "percentile", "mse"):
        for scheme, bits in [("symmetric", 4), ("asymmetric", 4), ("symmetric-unsigned", 3)]:
            find_range(w, QuantSpec(scheme, bits, range=method))
    np.testing.assert_array_equal(w, before)


# ------------------------------------------------- percentile of rows longer than a chunk
# A row longer than _PERCENTILE_CHUNK_ELEMS (a one-row tensor) is measured from a float32 copy
# instead of a float64 one; its figures must be np.percentile's of the float64 values, bit for
# bit (the expectations below are computed with np.percentile directly).


@settings(max_examples=300, deadline=None)
@given(
    hnp.arrays(np.float32, st.tuples(st.integers(1, 3), st.integers(1, 400)),
               elements=st.floats(width=32, allow_nan=False, allow_infinity=False)),
    st.sampled_from([50.0001, 75.5, 99.0, 99.99, 99.999999, 100.0]),
    st.sampled_from(["symmetric", "asymmetric", "symmetric-unsigned", "gnmt"]),
)
def test_long_row_percentiles_are_numpys_float64_ones(w, p, scheme):
    spec = QuantSpec(scheme, range="percentile", percentile=p)
    with mock.patch.object(ranges, "_PERCENTILE_CHUNK_ELEMS", 0):  # every row is "long"
        lo, hi = find_range(w, spec)
    w64 = w.astype(np.float64)
    mn, mx = w64.min(axis=1), w64.max(axis=1)
    if scheme == "asymmetric":
        want_lo = np.clip(np.percentile(w64, 100.0 - p, axis=1), np.minimum(mn, 0.0), 0.0)
        want_hi = np.clip(np.percentile(w64, p, axis=1), 0.0, np.maximum(mx, 0.0))
    else:
        a = np.percentile(np.abs(w64), p, axis=1)
        if scheme == "symmetric-unsigned":
            want_lo, want_hi = np.zeros_like(mx), np.minimum(a, np.maximum(mx, 0.0))
        else:
            absmax = np.maximum(mx, -mn)
            want_lo, want_hi = -np.minimum(a, absmax), np.minimum(a, absmax)
    assert lo.tobytes() == want_lo.tobytes() and hi.tobytes() == want_hi.tobytes()


def test_a_long_row_gives_the_ranges_of_the_chunked_path():
    rng = np.random.default_rng(4)
    w = rng.standard_t(3, (2, 5000)).astype(np.float32)
    for scheme in ("symmetric", "asymmetric"):
        spec = QuantSpec(scheme, range="percentile", percentile=99.9)
        short = find_range(w, spec)  # rows shorter than a chunk: np.percentile on float64
        with mock.patch.object(ranges, "_PERCENTILE_CHUNK_ELEMS", 1000):
            long = find_range(w, spec)
        assert all(a.tobytes() == b.tobytes() for a, b in zip(short, long, strict=True))
