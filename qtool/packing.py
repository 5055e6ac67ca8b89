"""Bit packing of 2..8-bit integers, row by row (see docs/FORMAT.md, "Packing").

Each row of the (rows, cols) view is a little-endian bit stream: value j occupies bits
[j*bits, (j+1)*bits), bit k of the stream is bit k % 8 of byte k // 8, and the row is padded
with zero bits to a whole byte. Signed values are stored as their low ``bits`` bits
(two's complement). Numeric core: numpy only.
"""

from __future__ import annotations

import numpy as np


def packed_row_bytes(cols: int, bits: int) -> int:
    return -(-cols * bits // 8)


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack a 2-D int8/uint8 array of in-range values into uint8 (rows, packed_row_bytes)."""
    rows, cols = q.shape
    codes = q.view(np.uint8) & np.uint8((1 << bits) - 1)
    if bits == 8:
        return codes.copy()
    # (rows, cols, bits) little-endian bits of each value, then one bit stream per row.
    bitplanes = np.unpackbits(codes[..., None], axis=-1, bitorder="little")[..., :bits]
    stream = bitplanes.reshape(rows, cols * bits)
    return np.packbits(stream, axis=1, bitorder="little")


def unpack(packed: np.ndarray, bits: int, cols: int, signed: bool) -> np.ndarray:
    """Inverse of ``pack``: int8 (signed, sign-extended) or uint8 values of shape (rows, cols)."""
    rows = packed.shape[0]
    if bits == 8:
        out = packed.reshape(rows, -1)[:, :cols].copy()
        return out.view(np.int8) if signed else out
    stream = np.unpackbits(packed, axis=1, count=cols * bits, bitorder="little")
    bitplanes = stream.reshape(rows, cols, bits)
    weights = (1 << np.arange(bits, dtype=np.uint8)).astype(np.uint8)
    codes = (bitplanes * weights).sum(axis=-1, dtype=np.uint8)
    if not signed:
        return codes
    # Sign-extend: values with the top bit set are negative.
    vals = codes.astype(np.int16)
    vals -= (codes >> (bits - 1)).astype(np.int16) << bits
    return vals.astype(np.int8)
