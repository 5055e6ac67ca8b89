"""The validating safetensors reader.

The safetensors format is parsed here directly (not through the ``safetensors`` package) so
that hostile or broken inputs are rejected with a precise one-line message, and tensors are
read one at a time with ``os.preadv`` into page-congruent buffers (never a memory map).

Layout of a safetensors file::

    u64 little-endian N | N bytes of UTF-8 JSON header | data area

The header maps tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}`` with
offsets relative to the start of the data area (byte ``8 + N``); the optional
``"__metadata__"`` entry is a ``str -> str`` object.
"""

from __future__ import annotations

import os
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from qtool.formats import _common
from qtool.formats import digest as _digest
from qtool.formats._common import (
    _ABSURD_BYTES,
    _ALIGN_MIN_BYTES,
    _INTP_LIMIT,
    DTYPES,
    MAX_DIMS,
    CheckpointError,
    NotUnicodeError,
    TensorInfo,
    _dup_key,
    _fmt_ints,
    _is_nonneg_int,
    _json_kind,
    _Obj,
    _parse_json,
    _pread_exact,
    _short,
    aligned_buffer,
    shared_shape,
    stream_pairs,
)
from qtool.formats.safeio import not_this_format, open_regular, sniff
from qtool.formats.tensor_table import TensorTable

# --------------------------------------------------------------------------------------------
# reader

_CODES = {code: code for code in DTYPES}
_HEADER_PIECE = 1 << 20  # bytes of the header hashed at a time by header_digest


class SafetensorsFile:
    """A validated, read-only view of one safetensors file: opening parses and validates the
    whole header; tensor data is read (``pread``, safe from several threads) only on
    :meth:`read`, :meth:`read_into` and :meth:`view`. The file is never modified."""

    path: Path
    size: int
    metadata: dict[str, str] | None
    tensors: TensorTable  # a read-only sequence of TensorInfo, in data-offset order

    def __init__(self, path: str | Path, *, in_dir: Path | None = None) -> None:
        """``in_dir``: the file is one of an artifact's, opened relative to that directory
        and refused if it is a symlink (see :func:`qtool.formats.safeio.open_regular`)."""
        self.path = Path(path)
        self._label = str(path)
        self._fd = -1
        fd = open_regular(self.path, in_dir=in_dir)
        try:
            self.size = os.fstat(fd).st_size
            self._fd = fd
            try:
                self._parse()
            except CheckpointError:
                # A model file of another format fails the first checks with a confusing
                # message ("header length ... exceeds"): say what it is instead.
                head = bytearray(min(self.size, 4096))
                _pread_exact(fd, memoryview(head), 0, self.path, "file")
                kind = sniff(bytes(head), self.path.name)
                if kind is None:
                    raise
                raise CheckpointError(not_this_format(self.path, kind)) from None
        except BaseException:
            self._fd = -1
            os.close(fd)
            raise

    # -- header parsing ------------------------------------------------------------------

    def _fail(self, msg: str, tensor: object = None) -> CheckpointError:
        if tensor is None:
            return CheckpointError(f"{self._label}: {msg}")
        return CheckpointError(f"{self._label}: tensor {_short(tensor)}: {msg}")

    def _parse(self) -> None:
        if self.size < 8:
            raise self._fail(f"file is {self.size} bytes, too short for the 8-byte header length")
        prefix = bytearray(8)
        _pread_exact(self._fd, memoryview(prefix), 0, self.path, "header length")
        (n,) = struct.unpack("<Q", prefix)
        if n > _common.HEADER_SIZE_LIMIT:
            # The value itself is not shown: the bytes of a file that fails validation are
            # never echoed (it could be any file, not a checkpoint at all). One that fits the
            # file and opens a JSON object is likely a real, very large header.
            big = n <= self.size - 8 and os.pread(self._fd, 1, 8) == b"{"
            raise self._fail(f"header length (first 8 bytes) exceeds the "
                             f"{_common.HEADER_SIZE_LIMIT}-byte limit; " + (
                                 "qtool's limit per checkpoint (docs/SECURITY.md)" if big
                                 else "not a safetensors file?"))
        if n > self.size - 8:
            raise self._fail(
                f"header length (first 8 bytes) runs beyond the end of the file "
                f"({self.size} bytes); truncated, or not a safetensors file?"
            )
        raw = bytearray(n)  # the header alone: decoded in place, no copy of a slice of it
        _pread_exact(self._fd, memoryview(raw), 8, self.path, "header")
        self._header_len = 8 + n
        # Each entry has a "data_offsets" key: counting them bounds the tensors before parsing.
        declared = raw.count(b'"data_offsets"')
        if declared > _common.TENSOR_COUNT_LIMIT:
            raise self._fail(f"header declares {declared} tensors, more than the limit of "
                             f"{_common.TENSOR_COUNT_LIMIT}")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self._fail(f"header is not valid UTF-8 (byte {8 + exc.start})") from None
        del raw
        # Entry by entry: the parsed header of very many tensors is far larger than their
        # TensorInfo records (see stream_pairs); anything unusual takes the whole parse.
        pairs = stream_pairs(text)
        doc = None
        if pairs is None:
            # The whole parse builds every entry at once: bound it before it starts. Each
            # entry has at least four colons outside strings (a colon inside one only counts
            # too many), so this admits at most twice the limit.
            if text.count(":") > 8 * _common.TENSOR_COUNT_LIMIT + 1000:
                raise self._fail(f"header has too many entries to parse (the limit is "
                                 f"{_common.TENSOR_COUNT_LIMIT} tensors)")
            try:
                doc = _parse_json(text)
            except NotUnicodeError as exc:
                raise self._fail(f"header is not valid UTF-8: {exc}") from None
            except ValueError as exc:
                raise self._fail(f"header is not valid JSON: {_short(str(exc), 100)}") from None
            if not isinstance(doc, _Obj):
                raise self._fail(f"header JSON is a {_json_kind(doc)}, not an object")
            pairs = iter(doc)

        data_start = 8 + n
        data_len = self.size - data_start
        metadata: dict[str, str] | None = None
        seen_metadata = False
        table = TensorTable(self.path)
        for name, entry in pairs:
            if not isinstance(name, str):  # cannot happen with valid JSON; be defensive
                raise self._fail(f"tensor name {_short(name)} is not a string")
            if name == "__metadata__":
                if seen_metadata:
                    raise self._fail("duplicate '__metadata__' entry")
                seen_metadata = True
                metadata = self._parse_metadata(entry)
                continue
            if name in table:
                raise self._fail("duplicate tensor name", name)
            if len(table) >= _common.TENSOR_COUNT_LIMIT:
                # (the count above misses a key written with escapes: "data\u005foffsets")
                raise self._fail(f"header declares more tensors than the limit of "
                                 f"{_common.TENSOR_COUNT_LIMIT}")
            name = sys.intern(name)  # one str for the checkpoint's and the run's parse
            table.add(*self._parse_entry(name, entry, data_start, data_len))
        del pairs, text, doc  # the header's text goes before the table is sorted and checked
        table.seal(data_start, data_len, self._fail)
        self.metadata = metadata
        self.tensors = table

    def _parse_metadata(self, entry: Any) -> dict[str, str]:
        if not isinstance(entry, _Obj):
            raise self._fail(f"__metadata__ is a {_json_kind(entry)}, not an object")
        out: dict[str, str] = {}
        size = 0
        for key, value in entry:
            if key in out:
                raise self._fail(f"__metadata__ has duplicate key {_short(key)}")
            if not isinstance(value, str):
                raise self._fail(
                    f"__metadata__[{_short(key)}] is a {_json_kind(value)}, not a string"
                )
            # Copied into every output, several times on the way: bounded like the header.
            size += len(key) + len(value)
            if size > _common.METADATA_SIZE_LIMIT:
                raise self._fail(f"__metadata__ holds more than {_common.METADATA_SIZE_LIMIT} "
                                 "characters, qtool's limit")
            out[key] = value
        return out

    def _parse_entry(self, name: str, entry: Any, data_start: int,
                     data_len: int) -> tuple[str, str, tuple[int, ...], int, int]:
        """(name, dtype code, shape, absolute offset, size) of a checked header entry."""
        if not isinstance(entry, _Obj):
            raise self._fail(f"entry is a {_json_kind(entry)}, not an object", name)
        dup = _dup_key(entry)
        if dup is not None:
            raise self._fail(f"entry has duplicate key {_short(dup)}", name)
        fields = dict(entry)

        if "dtype" not in fields:
            raise self._fail("missing dtype", name)
        code = fields["dtype"]
        if not isinstance(code, str) or code not in DTYPES:
            raise self._fail(f"unknown dtype {_short(code)}", name)

        if "shape" not in fields:
            raise self._fail("missing shape", name)
        shape = fields["shape"]
        if not isinstance(shape, list) or not all(_is_nonneg_int(d) for d in shape):
            raise self._fail(f"shape {_short(shape)} is not a list of non-negative integers", name)
        if len(shape) > MAX_DIMS:
            raise self._fail(f"shape has {len(shape)} dimensions, more than {MAX_DIMS}", name)

        if "data_offsets" not in fields:
            raise self._fail("missing data_offsets", name)
        offs = fields["data_offsets"]
        if not isinstance(offs, list) or len(offs) != 2 or not all(_is_nonneg_int(o) for o in offs):
            raise self._fail(
                f"data_offsets {_short(offs)} is not a pair of non-negative integers", name
            )
        begin, end = offs
        if begin > end:
            raise self._fail(f"data_offsets {_fmt_ints(offs)} end before they begin", name)
        if end > data_len:
            raise self._fail(
                f"data_offsets {_fmt_ints(offs)} extend beyond the data area ({data_len} bytes)",
                name,
            )

        # prod(shape) * itemsize in Python ints; stop once it is absurd (hostile shapes).
        itemsize = DTYPES[code].itemsize
        needed = 0
        too_big = False
        if 0 not in shape:
            needed = itemsize
            for d in shape:
                needed *= d
                if needed > _ABSURD_BYTES:
                    too_big = True
                    break
        else:
            # An empty tensor holds no bytes, but numpy still needs the product of its other
            # dimensions (times the item size) to fit in an intp to represent it at all.
            span = itemsize
            for d in shape:
                span *= d or 1
                if span >= _INTP_LIMIT:
                    raise self._fail(
                        f"shape {_fmt_ints(shape)} of {code} is too large to represent "
                        "(even though it is empty)", name)
        have = end - begin
        if too_big or needed != have:
            need_text = f"more than {_ABSURD_BYTES}" if too_big else str(needed)
            raise self._fail(
                f"data_offsets {_fmt_ints(offs)} hold {have} bytes but shape "
                f"{_fmt_ints(shape)} of {code} needs {need_text}",
                name,
            )
        return name, code, shared_shape(tuple(shape)), data_start + begin, have

    # -- access --------------------------------------------------------------------------

    @property
    def data_start(self) -> int:
        """Absolute offset of the data area (``8 + N``)."""
        return self._header_len

    @property
    def header_bytes(self) -> bytes:
        """The length prefix and the header, as validated, read again from the open file
        (not kept: with very many tensors the header is tens of MB)."""
        if self._fd < 0:
            raise ValueError(f"{self._label}: file is closed")
        buf = bytearray(self._header_len)
        _pread_exact(self._fd, memoryview(buf), 0, self.path, "header")
        return bytes(buf)

    def header_digest(self, algorithm: str) -> str:
        """The digest of :attr:`header_bytes`, read again from the open file and hashed a
        piece at a time (the header of 200,000 tensors is over 20 MB; never held here)."""
        if self._fd < 0:
            raise ValueError(f"{self._label}: file is closed")
        hasher = _digest.new(algorithm)
        buf = bytearray(min(self._header_len, _HEADER_PIECE))
        for start in range(0, self._header_len, _HEADER_PIECE):
            view = memoryview(buf)[: min(_HEADER_PIECE, self._header_len - start)]
            _pread_exact(self._fd, view, start, self.path, "header")
            hasher.update(view)
        return hasher.hexdigest()

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def __getitem__(self, name: str) -> TensorInfo:
        info = self.tensors.find(name)
        if info is None:
            raise KeyError(f"{self._label}: no tensor {name!r}")
        return info

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __len__(self) -> int:
        return len(self.tensors)

    def __iter__(self) -> Iterator[TensorInfo]:
        return iter(self.tensors)

    def keys(self) -> list[str]:
        return self.tensors.names()

    def _resolve(self, info: TensorInfo | str) -> TensorInfo:
        if self._fd < 0:
            raise ValueError(f"{self._label}: file is closed")
        if isinstance(info, str):
            return self[info]
        if not self.tensors.holds(info):
            raise ValueError(f"{self._label}: tensor {info.name!r} is not from this file")
        return info

    def read(self, info: TensorInfo | str) -> np.ndarray:
        """The tensor as a fresh, writable array of its dtype and shape.

        Data is read with ``preadv`` into a buffer whose address is congruent to the file
        offset modulo 4096 (unless that would leave the array misaligned for its dtype).
        """
        t = self._resolve(info)
        dt = DTYPES[t.dtype]
        if t.nbytes == 0:
            return np.empty(t.shape, dtype=dt)
        if t.nbytes >= _ALIGN_MIN_BYTES and t.offset % dt.itemsize == 0:
            buf = aligned_buffer(t.nbytes, t.offset)
        else:
            buf = np.empty(t.nbytes, dtype=np.uint8)
        _pread_exact(self._fd, memoryview(buf), t.offset, self.path, f"tensor {t.name!r}")
        return buf.view(dt).reshape(t.shape)

    def read_into(self, info: TensorInfo | str, out: np.ndarray) -> np.ndarray:
        """Read the tensor into the caller's C-contiguous uint8 buffer of at least ``nbytes``
        (see :func:`aligned_buffer`); returns a view of it with the tensor's dtype/shape."""
        t = self._resolve(info)
        if not isinstance(out, np.ndarray) or out.dtype != np.uint8:
            raise ValueError("read_into needs a numpy uint8 buffer")
        if not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError("read_into needs a C-contiguous, writable buffer")
        flat = out.reshape(-1)
        if flat.size < t.nbytes:
            raise ValueError(
                f"buffer of {flat.size} bytes is too small for tensor {t.name!r} ({t.nbytes} bytes)"
            )
        region = flat[: t.nbytes]
        if t.nbytes:
            _pread_exact(self._fd, memoryview(region), t.offset, self.path, f"tensor {t.name!r}")
        return region.view(DTYPES[t.dtype]).reshape(t.shape)

    def view(self, info: TensorInfo | str, start: int = 0, stop: int | None = None,
             buffer: np.ndarray | None = None) -> np.ndarray:
        """Elements [start, stop) of the tensor, flat, as a fresh array read with ``pread``
        into a page-congruent buffer. Use it for data read once, in runs, to bound memory:
        the buffer goes when the array (and every view of it) is dropped. With ``buffer`` (a
        caller's reusable uint8 array, see :func:`aligned_buffer`) the data goes into it. Not a
        memory map, whose truncation by another process kills the reader with SIGBUS: a short
        read is a one-line CheckpointError ("truncated while open?")."""
        t = self._resolve(info)
        dt = DTYPES[t.dtype]
        count = t.numel if t.nbytes else 0
        stop = count if stop is None else stop
        if not 0 <= start <= stop <= count:
            raise ValueError(
                f"{self._label}: tensor {t.name!r}: bad element range [{start}, {stop})"
            )
        nbytes = (stop - start) * dt.itemsize
        if nbytes == 0:
            return np.empty(0, dtype=dt)
        offset = t.offset + start * dt.itemsize
        if nbytes >= _ALIGN_MIN_BYTES and offset % dt.itemsize == 0:
            buf = aligned_buffer(nbytes, offset, buffer)
        elif buffer is not None and buffer.size >= nbytes:
            buf = buffer[:nbytes]
        else:
            buf = np.empty(nbytes, dtype=np.uint8)
        _pread_exact(self._fd, memoryview(buf), offset, self.path, f"tensor {t.name!r}")
        out = buf.view(dt)
        out.flags.writeable = False  # as the map was: runs are input, only ever read
        return out

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"SafetensorsFile({self._label!r}, {len(self.tensors)} tensors)"
