"""--range search through the C kernel (qtool/core/_fit.c, _fit_long.c): the same scales,
zero points and errors as fit.py's numpy fit, bit for bit, on any data and units of any
length; and the quantize pipeline sends every search fit to it (groups, channels, the whole
tensor) and stores the same bytes either way."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import qtool.core.blocks as blocks
from qtool.core import bf16, fit_kernel
from qtool.core import fit as F
from qtool.core.quant import dequantize, quantize
from qtool.core.schemes import QuantSpec

SCHEMES = ("asymmetric", "symmetric", "symmetric-unsigned")
K = blocks._kernels


@pytest.fixture(autouse=True)
def kernel_built():
    assert K is not None, "qtool.core._kernels was not built by `pip install -e .`"


def assert_same_fit(a: F.Fit, b: F.Fit) -> None:
    # Bit for bit: the fitted parameters, and the errors the fit measured for them.
    np.testing.assert_array_equal(a.scale.view(np.uint32), b.scale.view(np.uint32))
    np.testing.assert_array_equal(a.zero_point, b.zero_point)
    np.testing.assert_array_equal(a.error, b.error)
    np.testing.assert_array_equal(a.minmax_error, b.minmax_error)


def both(x: np.ndarray, bits: int, scheme: str) -> tuple[F.Fit, F.Fit]:
    return F.fit_search(x, bits, scheme), fit_kernel.fit_search_kernel(K, x, bits, scheme)


@st.composite
def units(draw: st.DrawFn) -> np.ndarray:
    shape = draw(st.tuples(st.integers(1, 20), st.integers(1, 64)))
    scale = draw(st.sampled_from([1e-40, 1e-30, 1e-3, 1.0, 1e20, 1e37]))
    x = draw(hnp.arrays(np.float32, shape, elements=st.floats(-1, 1, width=32)))
    return (x * np.float32(scale)).astype(np.float32)


@settings(max_examples=300, deadline=None)
@given(units(), st.integers(2, 8), st.sampled_from(SCHEMES))
def test_kernel_fit_is_the_numpy_fit_on_any_values(x, bits, scheme):
    assert_same_fit(*both(x, bits, scheme))


@pytest.mark.parametrize("n", [1, 2, 7, 8, 9, 31, 32, 33, 48, 64, 65, 128, 200, 256])
@pytest.mark.parametrize("dist", ["normal", "student-t", "positive", "integers"])
def test_kernel_fit_is_the_numpy_fit_on_random_and_heavy_tailed_data(n, dist):
    rng = np.random.default_rng(n)
    units = 8 * 37 + 5  # batches of 8 units and a partial one
    x = {"normal": lambda: rng.standard_normal((units, n)),
         "student-t": lambda: rng.standard_t(4, (units, n)) * 0.02,
         "positive": lambda: np.abs(rng.standard_t(4, (units, n))),
         "integers": lambda: np.rint(rng.standard_normal((units, n)) * 3)}[dist]()
    x = x.astype(np.float32)
    for bits in (2, 3, 4, 8):
        for scheme in SCHEMES:
            assert_same_fit(*both(x, bits, scheme))


def test_kernel_fit_edge_units():
    big = np.finfo(np.float32).max
    rows = [
        [0.0] * 32,  # all zeros
        [3.0] * 32,  # constant
        [-2.0] * 32,  # constant negative
        [1e-42] * 32,  # subnormal
        [-1e-42, 1e-42] * 16,
        [big, -big] * 16,  # the float32 extremes
        [big] + [0.0] * 31,
        [-big] * 32,
        [0.0] * 31 + [1e-3],  # one value away from zero
        list(np.linspace(-1, 1, 32)),
        [-0.0] * 32,
    ]
    x = np.array(rows, np.float32)
    for bits in range(2, 9):
        for scheme in SCHEMES:
            a, b = both(x, bits, scheme)
            assert_same_fit(a, b)
            assert np.all(np.isfinite(b.scale)) and np.all(b.scale > 0)
            assert b.error[0] == 0 and b.error[-1] == 0
    # One unit, and units of one value.
    for y in (x[:1], x[5:6], x[:, :1], x[:, :2]):
        assert_same_fit(*both(np.ascontiguousarray(y), 4, "asymmetric"))


@pytest.mark.parametrize("n", [257, 1408, 2048, 2049, 2304, 5000])
def test_kernel_fit_is_the_numpy_fit_on_long_units(n):
    # Up to 2048 values the batch path (transposed); longer units one at a time, in
    # fit_tile.py's 256 lanes, the values past the last whole row of lanes in the first ones.
    rng = np.random.default_rng(n)
    x = (rng.standard_t(4, (5, n)) * 0.02).astype(np.float32)
    x[3] = 0.25  # constant
    x[4, : n // 2] = 0.0
    for bits in (2, 4, 8):
        for scheme in SCHEMES:
            assert_same_fit(*both(x, bits, scheme))


def test_kernel_fit_is_the_numpy_fit_on_units_longer_than_a_tile(monkeypatch):
    # fit.py sums a unit longer than TILE_ELEMS tile by tile (float64 across tiles); the
    # kernel is given the tile size and does the same.
    monkeypatch.setattr(F, "TILE_ELEMS", 1000)
    rng = np.random.default_rng(9)
    x = (rng.standard_t(4, (3, 4500)) * 0.02).astype(np.float32)
    x[2, 4000:] = 1e-42  # a last tile of subnormal values: its error summed in float64
    for scheme in SCHEMES:
        assert_same_fit(*both(x, 4, scheme))


def test_a_row_is_fitted_alike_alone_and_among_others():
    # numpy sums a single row's tile in another order than a tile of several; fit.py gives
    # such a tile a twin column so that each row's fit is the same however it is tiled.
    rng = np.random.default_rng(5)
    x = rng.standard_t(4, (9, 32)).astype(np.float32)
    whole = F.fit_search(x, 4)
    for i in range(x.shape[0]):
        one = F.fit_search(x[i : i + 1], 4)
        assert one.scale[0] == whole.scale[i] and one.zero_point[0] == whole.zero_point[i]
        assert one.error[0] == whole.error[i]


def test_kernel_rejects_nan_inf_and_bad_arguments():
    x = np.zeros((3, 32), np.float32)
    for bad in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[2, 17] = bad
        with pytest.raises(ValueError, match="NaN or inf"):
            fit_kernel.fit_search_kernel(K, y, 4)
        spec = QuantSpec("asymmetric", 4, "group", 32, range="search")
        assert fit_kernel.fit_units(K, y, 0, 3, 32, 32, spec) is None
    for i in (100, 2650):  # in a long unit: in its rows of lanes, and past the last one
        y = np.zeros((2, 2700), np.float32)
        y[1, i] = np.inf
        with pytest.raises(ValueError, match="NaN or inf"):
            fit_kernel.fit_search_kernel(K, y, 4)
    with pytest.raises(ValueError):
        fit_kernel.fit_search_kernel(K, x, 8, "gnmt")
    with pytest.raises(ValueError):
        K.fit_search(x, 0, 3, 32, 32, 0, 0.0, 15.0, (), 3, 1000, np.empty(2, np.float32),
                     np.empty(3, np.int32), np.empty(3), np.empty(3))  # a buffer too short


def _misaligned(a: np.ndarray) -> np.ndarray:
    """A copy of ``a`` one byte off its element alignment (as a numpy view of a file's bytes
    at an odd offset is): C-contiguous, flags.aligned False."""
    buf = np.empty(a.nbytes + 1, np.uint8)[1:]
    buf[:] = a.reshape(-1).view(np.uint8)
    out = buf.view(a.dtype).reshape(a.shape)
    assert not out.flags.aligned and out.flags.c_contiguous
    return out


@pytest.mark.parametrize("shape", [(5, 3), (40, 64), (3, 2049), (2, 5000)])
def test_misaligned_input_is_fitted_as_aligned(shape):
    """The kernel reads its input through memcpy: a float32 (or bfloat16) block at any byte
    offset gives the aligned block's fit (a typed load of it was undefined behaviour, which
    UBSan reported in _fit.c's gather)."""
    rng = np.random.default_rng(shape[1])
    x = rng.standard_t(3, shape).astype(np.float32)
    assert_same_fit(fit_kernel.fit_search_kernel(K, _misaligned(x), 4),
                    fit_kernel.fit_search_kernel(K, x, 4))
    bits = bf16.from_float32(x)
    spec = QuantSpec("symmetric", 8, "group", 16, range="search")
    a = fit_kernel.fit_units(K, _misaligned(bits), 1, *shape, 16, spec)
    b = fit_kernel.fit_units(K, bits, 1, *shape, 16, spec)
    assert a is not None and b is not None
    assert_same_fit(a[0], b[0])


def test_kernel_refuses_misaligned_outputs_and_overflowing_sizes():
    """Outputs are written through typed pointers: one off its alignment is refused before
    anything is written. rows * units * 8 (the float64 outputs) must not overflow even where
    rows * cols * 4 does not (g = 1 has as many units as values)."""
    x = np.zeros((3, 32), np.float32)
    outs = [np.empty(6, np.float32), np.empty(6, np.int32), np.empty(6), np.empty(6)]
    for i, dt in enumerate((np.float32, np.int32, np.float64, np.float64)):
        bad = list(outs)
        bad[i] = _misaligned(np.zeros(6, dt))
        with pytest.raises(ValueError, match="not aligned"):
            K.fit_search(x, 0, 3, 32, 16, 0, 0.0, 15.0, (), 3, 1000, *bad)
    K.fit_search(x, 0, 3, 32, 16, 0, 0.0, 15.0, (), 3, 1000, *outs)  # aligned: accepted
    one = [np.empty(1, np.float32), np.empty(1, np.int32), np.empty(1), np.empty(1)]
    for rows, cols in ((2**29, 2**31), (2**61, 1)):
        with pytest.raises(ValueError, match="bad block shape"):
            K.fit_search(x, 0, rows, cols, 1, 0, 0.0, 15.0, (), 3, 1000, *one)


# ---------------------------------------------------------------- through the quantizer


def quantize_both(w: np.ndarray, spec: QuantSpec, monkeypatch) -> tuple:
    calls = []
    real = fit_kernel.fit_units

    def counting(*args, **kw):
        got = real(*args, **kw)
        if got is not None:
            calls.append(args[3:6])  # rows, cols, group
        return got

    monkeypatch.setattr(fit_kernel, "fit_units", counting)
    k = quantize(w, spec)
    monkeypatch.setattr(blocks, "_kernels", None)
    n = quantize(w, spec)
    monkeypatch.undo()
    return k, n, calls


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("gran,g,cols", [
    ("group", 32, 256), ("group", 32, 100),  # a ragged last group of 4 values per row
    ("group", 64, 200), ("group", 128, 300), ("group", 256, 512),
    ("group", 16, 16), ("group", 8, 3),  # a group longer than the row
    ("channel", 128, 48),  # rows of 48 values: per channel, through the kernel
])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_quantize_through_the_kernel_writes_the_numpy_bytes(scheme, gran, g, cols, dtype,
                                                             monkeypatch):
    rng = np.random.default_rng(cols)
    w = (rng.standard_t(4, (37, cols)) * 0.02).astype(np.float32)
    if scheme == "symmetric-unsigned":
        w = np.abs(w)
    if dtype == "bfloat16":
        w = bf16.from_float32(w)
    elif dtype == "float16":  # widened to float32 for numpy's quantizer; the fit still in C
        w = w.astype(np.float16)
    spec = QuantSpec(scheme, 4, gran, g, range="search")
    k, n, calls = quantize_both(w, spec, monkeypatch)
    assert calls, "the kernel fit was not used"
    np.testing.assert_array_equal(k.data, n.data)
    np.testing.assert_array_equal(k.scale.view(np.uint32), n.scale.view(np.uint32))
    np.testing.assert_array_equal(k.zero_point, n.zero_point)
    # A valid artifact: integers in range, zero points integers in range, and every value
    # inside its unit's grid restored within half a step.
    q = k.values().astype(np.int64)
    assert q.min() >= spec.qmin and q.max() <= spec.qmax
    assert np.all((k.zero_point >= 0) & (k.zero_point <= spec.qmax))
    wf = bf16.as_float(w, np.dtype(np.float32)) if dtype == "bfloat16" else \
        w.astype(np.float32)
    w_hat = dequantize(k.data, k.scale, k.zero_point, wf.shape, spec, np.float32)
    unit = np.minimum(np.arange(cols) // (g if gran == "group" else cols),
                      k.scale.shape[1] - 1)
    s = k.scale[:, unit].astype(np.float64)
    zp = k.zero_point[:, unit].astype(np.float64)
    inside = (wf >= (spec.qmin - zp) * s) & (wf <= (spec.qmax - zp) * s)
    err = np.abs(w_hat.astype(np.float64) - wf)
    assert np.all(err[inside] <= s[inside] * (0.5 + 1e-6))


@pytest.mark.parametrize("extra", [{"scale_dtype": "float16"}, {"scale_bits": 8},
                                   {"scale_dtype": "bfloat16", "bits": 3}])
def test_narrow_or_double_quantized_scales_through_the_kernel(extra, monkeypatch):
    # The stored scale is then qparams' (or double quantization's) of the fitted range, not
    # the fit's own float32 scale: the kernel path must take the same turn.
    w = (np.random.default_rng(4).standard_t(4, (40, 96)) * 0.02).astype(np.float32)
    spec = QuantSpec(**{"scheme": "asymmetric", "bits": 4, "granularity": "group",
                        "group_size": 32, "range": "search", **extra})
    k, n, calls = quantize_both(w, spec, monkeypatch)
    assert calls
    np.testing.assert_array_equal(k.data, n.data)
    np.testing.assert_array_equal(k.scale, n.scale)
    np.testing.assert_array_equal(k.zero_point, n.zero_point)


@pytest.mark.parametrize("gran,g,cols", [("group", 512, 1100), ("group", 4096, 4500),
                                         ("channel", 128, 300), ("channel", 128, 2100),
                                         ("tensor", 128, 32), ("tensor", 128, 700)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_long_units_and_whole_tensors_through_the_kernel(gran, g, cols, dtype, monkeypatch):
    w = (np.random.default_rng(2).standard_t(4, (12, cols)) * 0.02).astype(np.float32)
    if dtype == "bfloat16":
        w = bf16.from_float32(w)
    k, n, calls = quantize_both(w, QuantSpec("asymmetric", 4, gran, g, range="search"),
                                monkeypatch)
    assert calls
    np.testing.assert_array_equal(k.data, n.data)
    np.testing.assert_array_equal(k.scale, n.scale)


def test_quantize_reports_nan_and_negative_values_through_the_kernel():
    w = np.ones((4, 64), np.float32)
    w[1, 3] = np.nan
    w[2, 60] = np.inf
    with pytest.raises(blocks.NonFiniteError) as e:
        quantize(w, QuantSpec("asymmetric", 4, "group", 32, range="search"))
    assert e.value.count == 2
    w = np.ones((4, 64), np.float32)
    w[3, 5] = -0.25
    with pytest.raises(blocks.NegativeValuesError) as neg:
        quantize(w, QuantSpec("symmetric-unsigned", 4, "group", 32, range="search"))
    assert neg.value.minimum == -0.25
