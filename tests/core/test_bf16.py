"""bfloat16 as uint16 bit patterns (qtool.core.bf16) against ml_dtypes, bit for bit: every one
of the 65536 patterns widened, and float32 / float64 values narrowed."""

from __future__ import annotations

import ml_dtypes
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qtool.core import bf16

ALL = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)


def _ml(bits: np.ndarray) -> np.ndarray:
    return bits.view(ml_dtypes.bfloat16)


def test_every_pattern_widens_as_ml_dtypes_does():
    got = bf16.to_float32(ALL)
    want = _ml(ALL).astype(np.float32)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    # ...and it is the shift the format defines
    assert np.array_equal(got.view(np.uint32), ALL.astype(np.uint32) << 16)
    assert np.array_equal(bf16.isfinite(ALL), np.isfinite(want))


def test_every_pattern_narrows_back_to_itself():
    wide = bf16.to_float32(ALL)
    back = bf16.from_float32(wide)
    finite = np.isfinite(wide)
    assert np.array_equal(back[finite | np.isinf(wide)], ALL[finite | np.isinf(wide)])
    nan = np.isnan(wide)
    # NaN stays NaN: the quiet NaN with its sign, the bits ml_dtypes gives
    assert np.array_equal(back[nan], np.where(ALL[nan] & 0x8000, 0xFFC0, 0x7FC0))
    assert np.array_equal(back, wide.astype(ml_dtypes.bfloat16).view(np.uint16))


def _f32_from_bits(u: np.ndarray) -> np.ndarray:
    return np.asarray(u, np.uint32).view(np.float32)


@settings(max_examples=300, deadline=None)
@given(hnp.arrays(np.uint32, st.integers(1, 300), elements=st.integers(0, 2**32 - 1)))
def test_random_float32_narrow_as_ml_dtypes(u):
    x = _f32_from_bits(u)
    got = bf16.from_float32(x)
    want = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    assert np.array_equal(got, want)
    assert np.isnan(bf16.to_float32(got[np.isnan(x)])).all()


def test_ties_round_to_even_and_overflow_to_infinity():
    u = np.array([0x3F808000, 0x3F818000, 0x3F808001, 0x7F7FFFFF, 0xFF7F8000, 0x00008000,
                  0x00018000, 0x7F7F7FFF], np.uint32)
    got = bf16.from_float32(_f32_from_bits(u))
    assert got.tolist() == [0x3F80, 0x3F82, 0x3F81, 0x7F80, 0xFF80, 0x0000, 0x0002, 0x7F7F]
    assert np.array_equal(got, _f32_from_bits(u).astype(ml_dtypes.bfloat16).view(np.uint16))


@settings(max_examples=300, deadline=None)
@given(hnp.arrays(np.float64, st.integers(1, 200),
                  elements=st.floats(allow_nan=True, allow_infinity=True, width=64)))
def test_float64_narrows_with_one_rounding_as_ml_dtypes(x):
    got = bf16.from_float64(x)
    want = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    assert np.array_equal(got, want)


def test_float64_double_rounding_case():
    # Just above a bfloat16 tie: rounding to float32 first would land on the tie and round
    # to even (down); one rounding goes up.
    x = np.array([1.0 + 2.0**-8 + 2.0**-40, -(1.0 + 2.0**-8 + 2.0**-40)])
    assert bf16.from_float64(x).tolist() == [0x3F81, 0xBF81]
    assert np.array_equal(bf16.from_float64(x), x.astype(ml_dtypes.bfloat16).view(np.uint16))


def test_ml_dtypes_arrays_are_accepted_as_bits():
    x = np.array([1.5, -2.25], ml_dtypes.bfloat16)
    assert bf16.is_bf16(x) and bf16.is_bf16(x.view(np.uint16))
    assert bf16.to_float32(x).tolist() == [1.5, -2.25]
    assert bf16.as_float(x, np.float64).dtype == np.float64
    assert not bf16.is_bf16(np.zeros(2, np.float16))
