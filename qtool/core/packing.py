"""Bit packing of 2..8-bit quantized values into bytes.

Format (documented for outside readers; do not change without a format version bump):

* A tensor is viewed as (rows, cols) = (shape[0], prod(shape[1:])).
* Each ROW is packed independently as a little-endian bit stream: value j of the row occupies
  stream bits [j*bits, (j+1)*bits), and stream bit k is bit (k % 8) (LSB = 0) of byte k // 8.
* Each value is stored as its low ``bits`` bits (two's complement for signed values, i.e.
  ``q & (2**bits - 1)``).
* Each row is padded with zero bits to a whole byte, so the packed tensor is uint8 of shape
  (rows, ceil(cols * bits / 8)).

So at 4 bits value 2i is the low nibble of byte i and value 2i+1 the high nibble; at 2 bits
value 4i+k sits in bits [2k, 2k+2) of byte i. At 8 bits the bytes are the values themselves.

This module is part of the numeric core: numpy in, numpy out, no files, no terminal.
"""

from __future__ import annotations

import numpy as np

# The general (3, 5, 6, 7-bit) path expands every value to `bits` bytes of single bits; rows
# are processed in chunks of about this many values to keep that expansion to a few MB.
_GENERAL_CHUNK_VALUES = 1 << 19


def packed_row_bytes(cols: int, bits: int) -> int:
    """Bytes per packed row: ceil(cols * bits / 8)."""
    _check_bits(bits)
    if cols < 0:
        raise ValueError(f"cols must be >= 0, got {cols}")
    return (cols * bits + 7) // 8


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack 2-D int8 (signed) or uint8 (unsigned) values into uint8 (rows, packed_row_bytes).

    Values must already lie in the ``bits``-bit range of their signedness (int8: -2**(bits-1)
    .. 2**(bits-1)-1, uint8: 0 .. 2**bits-1); out-of-range values raise ``ValueError`` rather
    than being silently truncated. At 8 bits the result is ``q``'s bytes reinterpreted as
    uint8 (a view when ``q`` is contiguous, so it shares memory with ``q``).
    """
    _check_bits(bits)
    q = np.asarray(q)
    if q.ndim != 2:
        raise ValueError(f"pack expects a 2-D (rows, cols) array, got shape {q.shape}")
    if q.dtype not in (np.int8, np.uint8):
        raise TypeError(f"pack expects int8 or uint8 values, got {q.dtype}")
    _check_range(q, bits)
    rows, cols = q.shape
    if bits == 8:
        return np.ascontiguousarray(q).view(np.uint8)
    # Reinterpreting int8 as uint8 gives the two's complement bytes, whose low bits are
    # exactly the stored field.
    u = q.view(np.uint8)
    if q.size == 0:
        return np.zeros((rows, packed_row_bytes(cols, bits)), np.uint8)
    if bits in (2, 4):
        return _pack_byte_aligned(u, bits)
    return _pack_general(u, bits)


def unpack(packed: np.ndarray, bits: int, cols: int, signed: bool) -> np.ndarray:
    """Inverse of ``pack``: uint8 (rows, packed_row_bytes(cols, bits)) -> (rows, cols).

    Returns int8 with each value sign-extended from ``bits`` bits when ``signed``, else uint8.
    Padding bits are ignored. At 8 bits the result is a view of ``packed``'s bytes.
    """
    _check_bits(bits)
    packed = np.asarray(packed)
    if packed.ndim != 2 or packed.dtype != np.uint8:
        raise TypeError(
            f"unpack expects 2-D uint8 bytes, got {packed.dtype} of shape {packed.shape}"
        )
    nbytes = packed_row_bytes(cols, bits)
    if packed.shape[1] != nbytes:
        raise ValueError(
            f"{cols} values of {bits} bits need {nbytes} bytes per row, "
            f"got {packed.shape[1]}"
        )
    out_dtype = np.int8 if signed else np.uint8
    rows = packed.shape[0]
    if bits == 8:
        return np.ascontiguousarray(packed).view(out_dtype)
    if rows == 0 or cols == 0:
        return np.zeros((rows, cols), out_dtype)
    if bits in (2, 4):
        return _unpack_byte_aligned(packed, bits, cols, signed)
    return _unpack_general(packed, bits, cols, signed)


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int | np.integer) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer from 2 to 8, got {bits!r}")


def _check_range(q: np.ndarray, bits: int) -> None:
    if q.size == 0 or bits == 8:
        return
    if q.dtype == np.int8:
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    else:
        lo, hi = 0, (1 << bits) - 1
    # Two cheap reductions; masking out-of-range values instead would corrupt them silently.
    qmin, qmax = int(q.min()), int(q.max())
    if qmin < lo or qmax > hi:
        raise ValueError(
            f"{q.dtype} values in [{qmin}, {qmax}] do not fit {bits} bits ([{lo}, {hi}])"
        )


def _pack_byte_aligned(u: np.ndarray, bits: int) -> np.ndarray:
    # 2 and 4 divide 8, so value j lands in byte j // per at shift (j % per) * bits: the
    # strided slice u[:, k::per] holds exactly the values at shift k * bits. A fixed loop of
    # `per` (2 or 4) whole-array operations, no per-element Python.
    per = 8 // bits
    mask = np.uint8((1 << bits) - 1)
    out = u[:, 0::per] & mask  # ceil(cols / per) columns: one per output byte
    for k in range(1, per):
        part = u[:, k::per]
        # The last byte of a row may be short of values; its missing fields stay zero.
        out[:, : part.shape[1]] |= (part & mask) << np.uint8(k * bits)
    return out


def _unpack_byte_aligned(packed: np.ndarray, bits: int, cols: int, signed: bool) -> np.ndarray:
    per = 8 // bits
    rows = packed.shape[0]
    out = np.empty((rows, cols), np.int8 if signed else np.uint8)
    mask = np.uint8((1 << bits) - 1)
    for k in range(per):
        dst = out[:, k::per]
        src = packed[:, : dst.shape[1]]
        if signed:
            # Move field k to the top of the byte, then an arithmetic right shift of the
            # int8 view brings it back down sign-extended: two operations per field.
            top = src << np.uint8(8 - (k + 1) * bits)
            dst[...] = top.view(np.int8) >> np.int8(8 - bits)
        else:
            dst[...] = (src >> np.uint8(k * bits)) & mask
    return out


def _pack_general(u: np.ndarray, bits: int) -> np.ndarray:
    # packbits with bitorder="little" implements the format literally: each value becomes its
    # `bits` low bits, LSB first; a row's bits are concatenated and packbits zero-pads the
    # row's last byte.
    rows, cols = u.shape
    out = np.empty((rows, packed_row_bytes(cols, bits)), np.uint8)
    step = max(1, _GENERAL_CHUNK_VALUES // cols)
    for r0 in range(0, rows, step):
        chunk = u[r0:r0 + step]
        # Bit plane i of every value, laid out so that value j's bits are stream bits
        # j*bits .. j*bits+bits-1 (a fixed loop over bit positions, not over values).
        planes = np.empty((chunk.shape[0], cols, bits), np.uint8)
        for i in range(bits):
            np.bitwise_and(chunk >> np.uint8(i), np.uint8(1), out=planes[:, :, i])
        out[r0:r0 + step] = np.packbits(
            planes.reshape(chunk.shape[0], cols * bits), axis=1, bitorder="little"
        )
    return out


def _unpack_general(packed: np.ndarray, bits: int, cols: int, signed: bool) -> np.ndarray:
    rows = packed.shape[0]
    out = np.empty((rows, cols), np.uint8)
    step = max(1, _GENERAL_CHUNK_VALUES // cols)
    for r0 in range(0, rows, step):
        chunk = packed[r0:r0 + step]
        # count drops the padding bits; each group of `bits` stream bits is one value, LSB
        # first. Reassembling with a fixed loop over the `bits` bit planes measured ~10x
        # faster than np.packbits along a short last axis.
        stream = np.unpackbits(chunk, axis=1, count=cols * bits, bitorder="little")
        planes = stream.reshape(chunk.shape[0], cols, bits)
        dst = out[r0:r0 + step]
        np.copyto(dst, planes[:, :, 0])
        for i in range(1, bits):
            dst |= planes[:, :, i] << np.uint8(i)
    if signed:
        # Sign-extend in place: shift the field to the top, arithmetic-shift it back.
        s = out.view(np.int8)
        np.left_shift(out, np.uint8(8 - bits), out=out)
        np.right_shift(s, np.int8(8 - bits), out=s)
        return s
    return out
