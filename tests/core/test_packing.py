"""qtool.core.packing against hand-computed bytes and an independent plain-Python reader."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qtool.core import packing
from qtool.core.packing import pack, packed_row_bytes, unpack

BITS = list(range(2, 9))


def value_range(bits: int, signed: bool) -> tuple[int, int]:
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def random_q(rng: np.random.Generator, shape: tuple[int, int], bits: int, signed: bool):
    lo, hi = value_range(bits, signed)
    return rng.integers(lo, hi, size=shape, endpoint=True).astype(np.int8 if signed else np.uint8)


def reference_unpack_row(row_bytes: list[int], bits: int, cols: int, signed: bool) -> list[int]:
    """The format text, literally: stream bit k is bit k % 8 of byte k // 8; value j is
    stream bits [j*bits, (j+1)*bits), LSB first; signed values are two's complement."""
    values = []
    for j in range(cols):
        v = 0
        for i in range(bits):
            k = j * bits + i
            v |= ((row_bytes[k // 8] >> (k % 8)) & 1) << i
        if signed and v >= 1 << (bits - 1):
            v -= 1 << bits
        values.append(v)
    return values


def reference_pack_row(values: list[int], bits: int) -> list[int]:
    out = [0] * ((len(values) * bits + 7) // 8)
    for j, v in enumerate(values):
        code = v & ((1 << bits) - 1)
        for i in range(bits):
            k = j * bits + i
            out[k // 8] |= ((code >> i) & 1) << (k % 8)
    return out


# ---------------------------------------------------------------------------- golden bytes


@pytest.mark.parametrize(
    "bits,q,expected",
    [
        # 4 bits: value 2i in the low nibble, 2i+1 in the high nibble; -2 -> 0b1110.
        (4, np.array([[1, -2, 3]], np.int8), [[0xE1, 0x03]]),
        (4, np.array([[1, -2, 7]], np.int8), [[0xE1, 0x07]]),  # docs/FORMAT.md example
        (4, np.array([[-8, -1], [7, 0]], np.int8), [[0xF8], [0x07]]),
        (4, np.array([[15, 0, 9, 10]], np.uint8), [[0x0F, 0xA9]]),
        # 2 bits: four per byte, value 4i+k at bits 2k..2k+1.
        # 0,1,2,3 -> 0b11_10_01_00 = 0xE4; then 3 alone -> 0x03.
        (2, np.array([[0, 1, 2, 3, 3]], np.uint8), [[0xE4, 0x03]]),
        # signed -2,-1,0,1 -> codes 10,11,00,01 -> 0b01_00_11_10 = 0x4E; -1 -> 0b11.
        (2, np.array([[-2, -1, 0, 1, -1]], np.int8), [[0x4E, 0x03]]),
        # 3 bits: 5 + 3*2^3 + 6*2^6 = 413 = 0x019D, straddling the byte boundary.
        (3, np.array([[5, 3, 6]], np.uint8), [[0x9D, 0x01]]),
        # signed 3 bits: -1 -> 111, -4 -> 100, 3 -> 011: 7 + 4*8 + 3*64 = 231 = 0xE7 (0x00 pad).
        (3, np.array([[-1, -4, 3]], np.int8), [[0xE7, 0x00]]),
        # 5 bits: 31 + 1*32 + 16*1024 = 16447 = 0x403F -> bytes 0x3F 0x40.
        (5, np.array([[31, 1, 16]], np.uint8), [[0x3F, 0x40]]),
        # 7 bits: -64 -> 1000000, then 1: 0x40 + (1 << 7) = 0xC0, 0x00.
        (7, np.array([[-64, 1]], np.int8), [[0xC0, 0x00]]),
        # 8 bits: identity bytes.
        (8, np.array([[-1, 2, -128]], np.int8), [[0xFF, 0x02, 0x80]]),
    ],
)
def test_golden_bytes(bits, q, expected):
    got = pack(q, bits)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, np.array(expected, np.uint8))
    back = unpack(got, bits, q.shape[1], signed=q.dtype == np.int8)
    assert back.dtype == q.dtype
    np.testing.assert_array_equal(back, q)


def test_golden_bytes_match_reference_packer():
    # The hand-computed bytes above and the reference agree, so the reference is trustworthy.
    assert reference_pack_row([1, -2, 3], 4) == [0xE1, 0x03]
    assert reference_pack_row([0, 1, 2, 3, 3], 2) == [0xE4, 0x03]
    assert reference_pack_row([5, 3, 6], 3) == [0x9D, 0x01]
    assert reference_unpack_row([0xE1, 0x03], 4, 3, True) == [1, -2, 3]


# ------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("cols", [0, 1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 100, 4096, 4097])
def test_packed_sizes(bits, cols):
    expected = -(-cols * bits // 8)
    assert packed_row_bytes(cols, bits) == expected
    q = np.zeros((3, cols), np.uint8)
    assert pack(q, bits).shape == (3, expected)
    assert unpack(pack(q, bits), bits, cols, signed=False).shape == (3, cols)


def test_packed_size_examples():
    assert packed_row_bytes(3, 4) == 2
    assert packed_row_bytes(5, 2) == 2
    assert packed_row_bytes(3, 3) == 2
    assert packed_row_bytes(8, 3) == 3
    assert packed_row_bytes(1, 7) == 1
    assert packed_row_bytes(4096, 4) == 2048


# --------------------------------------------------------------------------- round trips


@settings(max_examples=400, deadline=None)
@given(
    bits=st.sampled_from(BITS),
    signed=st.booleans(),
    rows=st.integers(0, 6),
    cols=st.one_of(st.just(1), st.integers(0, 70)),
    seed=st.integers(0, 2**32 - 1),
    chunk=st.sampled_from([None, 1, 13]),
)
def test_round_trip_and_reference(bits, signed, rows, cols, seed, chunk):
    q = random_q(np.random.default_rng(seed), (rows, cols), bits, signed)
    # Small chunks exercise the row-chunked general path's ragged last chunk.
    with mock.patch.object(packing, "_GENERAL_CHUNK_VALUES",
                           chunk or packing._GENERAL_CHUNK_VALUES):
        p = pack(q, bits)
        back = unpack(p, bits, cols, signed)
    assert p.dtype == np.uint8 and p.shape == (rows, packed_row_bytes(cols, bits))
    assert back.dtype == (np.int8 if signed else np.uint8) and back.shape == (rows, cols)
    np.testing.assert_array_equal(back, q)
    for r in range(rows):
        row_bytes = [int(b) for b in p[r]]
        assert reference_unpack_row(row_bytes, bits, cols, signed) == [int(v) for v in q[r]]
        assert reference_pack_row([int(v) for v in q[r]], bits) == row_bytes


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("signed", [False, True])
def test_reference_agrees_on_larger_random_data(bits, signed):
    rng = np.random.default_rng(bits * 2 + signed)
    q = random_q(rng, (5, 301), bits, signed)
    p = pack(q, bits)
    for r in range(q.shape[0]):
        assert reference_pack_row([int(v) for v in q[r]], bits) == [int(b) for b in p[r]]
    np.testing.assert_array_equal(unpack(p, bits, q.shape[1], signed), q)


@pytest.mark.parametrize("bits", BITS)
def test_extremes_round_trip(bits):
    for signed in (False, True):
        lo, hi = value_range(bits, signed)
        q = np.array([[lo, hi, lo, hi, 0, lo, hi]], np.int8 if signed else np.uint8)
        np.testing.assert_array_equal(unpack(pack(q, bits), bits, 7, signed), q)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7])
def test_padding_bits_are_zero(bits):
    # All-ones values: every padding bit of the last byte must still be 0.
    cols = 5
    q = np.full((2, cols), (1 << bits) - 1, np.uint8)
    p = pack(q, bits)
    used = cols * bits % 8
    if used:
        assert np.all(p[:, -1] >> used == 0)


def test_unpack_ignores_padding_bits():
    p = np.array([[0xE1, 0xF3]], np.uint8)  # 4-bit [1, -2, 3] with a dirty high nibble
    np.testing.assert_array_equal(unpack(p, 4, 3, signed=True), [[1, -2, 3]])


def test_non_contiguous_input():
    for bits in (2, 3, 4):
        q = random_q(np.random.default_rng(9), (8, 30), bits, True)[::2, ::3]
        np.testing.assert_array_equal(unpack(pack(q, bits), bits, q.shape[1], True), q)


def test_does_not_modify_input():
    q = random_q(np.random.default_rng(10), (4, 33), 4, True)
    before = q.copy()
    p = pack(q, 4)
    pb = p.copy()
    unpack(p, 4, 33, True)
    np.testing.assert_array_equal(q, before)
    np.testing.assert_array_equal(p, pb)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("bits,q", [
    (4, np.array([[8]], np.int8)),
    (4, np.array([[-9]], np.int8)),
    (4, np.array([[16]], np.uint8)),
    (2, np.array([[0, 4]], np.uint8)),
    (3, np.array([[-5]], np.int8)),
])
def test_out_of_range_values_are_rejected(bits, q):
    with pytest.raises(ValueError, match="do not fit"):
        pack(q, bits)


def test_bad_arguments():
    with pytest.raises(ValueError, match="bits"):
        pack(np.zeros((1, 1), np.int8), 1)
    with pytest.raises(ValueError, match="bits"):
        packed_row_bytes(3, 9)
    with pytest.raises(TypeError, match="int8 or uint8"):
        pack(np.zeros((1, 1), np.int16), 4)
    with pytest.raises(ValueError, match="2-D"):
        pack(np.zeros(3, np.int8), 4)
    with pytest.raises(ValueError, match="bytes per row"):
        unpack(np.zeros((1, 3), np.uint8), 4, 3, signed=True)
    with pytest.raises(TypeError, match="uint8"):
        unpack(np.zeros((1, 2), np.int8), 4, 3, signed=True)
