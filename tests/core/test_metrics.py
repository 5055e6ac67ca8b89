"""ErrorStats against the textbook definitions, computed here with numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from qtool.core.metrics import ErrorStats, sqnr_db


def _reference(w: np.ndarray, w_hat: np.ndarray) -> dict[str, float]:
    w = w.astype(np.float64).ravel()
    w_hat = w_hat.astype(np.float64).ravel()
    e = w_hat - w
    return {
        "mse": float(np.mean(e * e)),
        "sqnr_db": float(10 * np.log10(np.sum(w * w) / np.sum(e * e))),
        "max_abs_error": float(np.max(np.abs(e))),
        "cosine": float(np.dot(w, w_hat) / (np.linalg.norm(w) * np.linalg.norm(w_hat))),
    }


def test_golden_numbers():
    # w = (3, 4), w_hat = (3, 3): Σw² = 25, Σe² = 1, so SQNR = 10·log10(25) dB.
    s = ErrorStats.between(np.array([3.0, 4.0]), np.array([3.0, 3.0]))
    assert (s.count, s.signal_sq, s.error_sq, s.cross) == (2, 25.0, 1.0, -4.0)
    assert s.mse == 0.5
    assert s.sqnr_db == pytest.approx(13.979400086720377, abs=1e-12)
    assert s.max_abs_error == 1.0
    assert s.cosine == pytest.approx(21 / (5 * math.sqrt(18)), abs=1e-15)


def test_matches_numpy_on_a_random_round_trip():
    rng = np.random.default_rng(7)
    w = rng.normal(0, 0.05, (64, 48)).astype(np.float32)
    scale = np.abs(w).max(axis=1, keepdims=True) / 127
    w_hat = (np.rint(w / scale) * scale).astype(np.float32)
    s = ErrorStats.between(w, w_hat)
    ref = _reference(w, w_hat)
    assert s.count == w.size
    assert s.mse == pytest.approx(ref["mse"], rel=1e-12)
    assert s.sqnr_db == pytest.approx(ref["sqnr_db"], abs=1e-9)
    assert s.max_abs_error == pytest.approx(ref["max_abs_error"], rel=1e-12)
    assert s.cosine == pytest.approx(ref["cosine"], abs=1e-12)


def test_exact_round_trip_is_infinite_never_nan():
    w = np.array([[1.0, -2.0], [0.5, 0.0]])
    s = ErrorStats.between(w, w.copy())
    assert s.sqnr_db == math.inf
    assert s.mse == 0.0 and s.max_abs_error == 0.0 and s.cosine == 1.0
    assert s.to_dict()["sqnr_db"] is None  # the manifest's JSON has no infinity
    assert sqnr_db(w, w) == math.inf


def test_all_zero_tensor_and_degenerate_cases():
    z = np.zeros((4, 4))
    both_zero = ErrorStats.between(z, z)
    assert both_zero.sqnr_db == math.inf and both_zero.cosine == 1.0
    # A zero signal with a non-zero error: -inf dB (documented), cosine 0, no NaN.
    s = ErrorStats.between(z, np.full((4, 4), 0.5))
    assert s.sqnr_db == -math.inf and s.cosine == 0.0 and s.mse == 0.25
    # A round trip that flushes everything to zero.
    s = ErrorStats.between(np.ones(3), np.zeros(3))
    assert s.sqnr_db == 0.0 and s.cosine == 0.0
    assert ErrorStats().mse == 0.0  # no values at all


def test_dict_round_trip():
    s = ErrorStats.between(np.arange(6.0), np.arange(6.0) + 0.25)
    d = s.to_dict()
    assert set(d) == {"count", "signal_sq", "error_sq", "cross", "max_abs_error", "mse",
                      "sqnr_db", "cosine"}
    assert ErrorStats.from_dict(d) == s


finite = st.floats(-1e3, 1e3, allow_nan=False, width=64)


@settings(max_examples=60, deadline=None)
@given(arrays(np.float64, st.integers(2, 40), elements=finite),
       arrays(np.float64, 40, elements=st.floats(-1, 1, width=64)),
       st.integers(1, 39))
def test_merge_of_blocks_equals_the_whole(w, noise, cut):
    """The blockwise accumulation quantize uses gives the statistics of the whole tensor."""
    w_hat = w + noise[: w.size]
    cut = min(cut, w.size - 1)
    whole = ErrorStats.between(w, w_hat)
    merged = ErrorStats.between(w[:cut], w_hat[:cut]).merge(
        ErrorStats.between(w[cut:], w_hat[cut:]))
    assert merged.count == whole.count
    assert merged.max_abs_error == whole.max_abs_error
    for a, b in ((merged.signal_sq, whole.signal_sq), (merged.error_sq, whole.error_sq),
                 (merged.cross, whole.cross)):
        assert a == pytest.approx(b, rel=1e-9, abs=1e-9)
    ref_err = float(np.max(np.abs(w_hat - w)))
    assert whole.max_abs_error == ref_err
    c = whole.cosine
    assert -1.0 <= c <= 1.0 and not math.isnan(c)
    assert not math.isnan(whole.sqnr_db)
