"""The streaming safetensors writer: the header is known up front, tensors are written in
order (whole or in pieces), optionally from a background thread that writes and hashes while
the caller computes the next piece."""

from __future__ import annotations

import array
import errno
import json
import math
import os
import queue
import secrets
import struct
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from qtool.formats import digest as _digest
from qtool.formats._common import DTYPES

# --------------------------------------------------------------------------------------------
# writer

# Bytes hashed and written at a time: well inside a core's L2 cache (docs/PERFORMANCE.md).
_PIECE_BYTES = 1 << 20

# ml_dtypes' types a caller may still pass (qtool itself holds these as bit patterns)
_BIT_TYPES = {"bfloat16": "BF16", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}

# Dtype codes by index: the writer keeps one byte per entry for its code.
_CODES = tuple(DTYPES)
_CODE_INDEX = {code: i for i, code in enumerate(_CODES)}


class SafetensorsWriter:
    """Streaming safetensors writer.

    The full header is computed from ``entries`` (``(name, dtype code, shape)`` in write
    order) and written up front; tensors are then written one by one, in that order, with
    :meth:`write`, or in consecutive pieces with :meth:`write_chunk`. The digest of the file
    (``algorithm``, BLAKE3 by default) is computed as bytes go out (``digest=False`` skips it).

    With ``background=True`` a thread of the writer's own writes and hashes the data while the
    caller computes the next piece (both release the GIL): ``write``/``write_chunk`` only
    queue the data, keep a reference to it until it is written, then call the piece's
    ``release`` callback (e.g. to recycle the buffer). The caller must not modify queued data.
    At most ``queue_depth`` pieces wait, which bounds the memory they hold. An error of the
    thread (a full disk) is raised by the next write, or by :meth:`close`.

    Data goes to a temporary file next to ``path`` which is renamed over ``path`` only by a
    successful :meth:`close`; an exception inside a ``with`` block (or :meth:`abort`) removes
    it, so a partial file never appears under ``path``.
    """

    def __init__(
        self,
        path: str | Path,
        entries: Iterable[tuple[str, str, Sequence[int]]],
        metadata: dict[str, str] | None = None,
        *,
        digest: bool = True,
        algorithm: str = _digest.DEFAULT,
        background: bool = False,
        queue_depth: int = 3,
    ) -> None:
        self.path = Path(path)
        self._digest = digest
        self._partial = 0  # bytes of the current entry written by write_chunk so far
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue[Any] | None = None
        self._error: BaseException | None = None
        self._stop = False
        # What the write-order and size checks need, and no more (with 200,000 tensors a
        # tuple per entry, a set of names and the header kept in memory cost ~60 MB): the
        # names in order (the caller's own str objects), each entry's dtype code as an index
        # into _CODES, and its byte size.
        self._names: list[str] = []
        self._codes = bytearray()
        self._sizes = array.array("q")
        if metadata is not None and (not isinstance(metadata, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
            raise ValueError("metadata must be a dict of str -> str")
        self._next = 0
        self.algorithm = algorithm
        self._hash = _digest.new(algorithm) if digest else None
        self._hexdigest: str | None = None
        self._tmp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}.tmp")
        self._file = open(self._tmp, "xb")  # closed in close() / abort()
        try:
            self.header_size = self._write_header(entries, metadata)
            self._size = self.header_size + sum(self._sizes)
            self._reserve()
            if background:
                self._queue = queue.Queue(maxsize=max(1, queue_depth))
                self._thread = threading.Thread(
                    target=self._drain, name=f"write {self.path.name}", daemon=True
                )
                self._thread.start()
        except BaseException:
            self.abort()
            raise

    def _write_header(self, entries: Iterable[tuple[str, str, Sequence[int]]],
                      metadata: dict[str, str] | None) -> int:
        """Write the header entry by entry, exactly as json.dumps(header, separators=(",",
        ":"), ensure_ascii=False) writes the dict, straight into the file: it is never held
        whole (a dict of every entry was ~350 bytes a tensor; its text is ~120). The length
        prefix is filled in at the end, and the header then hashed from the file, read
        back. Returns the header's size with its prefix."""
        assert self._file is not None
        f = self._file
        f.write(bytes(8))  # the length prefix, filled in below
        length = 0
        piece = bytearray(b"{")
        if metadata is not None:
            piece += _utf8('"__metadata__":' + json.dumps(
                dict(metadata), separators=(",", ":"), ensure_ascii=False))
        names, codes, sizes = self._names, self._codes, self._sizes
        pos = 0
        for entry in entries:
            name, code, shape = entry
            if not isinstance(name, str) or name == "__metadata__":
                raise ValueError(f"invalid tensor name {name!r}")
            if code not in _CODE_INDEX:
                raise ValueError(f"tensor {name!r}: unknown dtype code {code!r}")
            dims = shape if type(shape) is tuple and all(type(d) is int for d in shape) \
                else tuple(int(d) for d in shape)
            if any(d < 0 for d in dims):
                raise ValueError(f"tensor {name!r}: negative dimension in shape {dims}")
            nbytes = math.prod(dims) * DTYPES[code].itemsize
            if names or metadata is not None:
                piece += b","
            piece += _utf8(f'{json.dumps(name, ensure_ascii=False)}:{{"dtype":"{code}",'
                           f'"shape":[{",".join(map(str, dims))}],'
                           f'"data_offsets":[{pos},{pos + nbytes}]}}')
            names.append(name)
            codes.append(_CODE_INDEX[code])
            sizes.append(nbytes)
            pos += nbytes
            if len(piece) >= _PIECE_BYTES:
                f.write(piece)
                length += len(piece)
                piece.clear()
        _check_unique(names)
        piece += b"}"
        piece += b" " * (-(length + len(piece)) % 8)
        f.write(piece)
        length += len(piece)
        del piece
        f.flush()
        prefix = struct.pack("<Q", length)
        os.pwrite(f.fileno(), prefix, 0)
        if self._hash is not None:
            self._hash.update(prefix)
            with open(self._tmp, "rb") as back:
                back.seek(8)
                for _ in range(0, length, _PIECE_BYTES):
                    self._hash.update(back.read(_PIECE_BYTES))
        return 8 + length

    def _reserve(self) -> None:
        """Allocate the file's blocks up front, its size being known: buffered writes into
        allocated blocks ran faster and steadier (ext4, 1 GB: 0.27-0.28 s, against 0.36-1.4 s
        when each write allocates), and a full disk is reported before any work is done.
        Where the file system cannot preallocate, the writes allocate as they go."""
        if self._size < 1 << 20 or not hasattr(os, "posix_fallocate"):
            return
        try:
            os.posix_fallocate(self._file.fileno(), 0, self._size)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise
        # A file system without fallocate reports EOPNOTSUPP (or EINVAL): nothing lost.

    @property
    def size(self) -> int:
        """Total size of the file in bytes (known up front)."""
        return self._size

    @property
    def digest(self) -> str:
        """Hex digest (:attr:`algorithm`) of the whole file; available after :meth:`close`
        (with digest=True)."""
        if self._hexdigest is None:
            raise ValueError(f"{self.path}: the digest is only available after close()")
        return self._hexdigest

    @property
    def pending(self) -> list[str]:
        """Names of the entries not written yet, in order."""
        return self._names[self._next :]

    def _put(self, mv: memoryview) -> None:
        assert self._file is not None
        # Hashed and written a piece at a time, each piece written while the hash has just
        # left it in the core's cache: writing a 12 MB run after hashing all of it cost
        # 2-5x the CPU (0.14-0.37 s against 0.055 s for quantize's 269 MB; 4 MB pieces
        # were as slow).
        for i in range(0, mv.nbytes, _PIECE_BYTES):
            piece = mv[i : i + _PIECE_BYTES]
            if self._hash is not None:
                self._hash.update(piece)
            self._file.write(piece)

    def _emit(self, mv: memoryview, release: Callable[[], object] | None) -> None:
        if self._queue is None:
            try:
                self._put(mv)
            finally:
                if release is not None:
                    release()
            return
        self._raise_thread_error()
        self._queue.put((mv, release))

    def _drain(self) -> None:
        """The background thread: write and hash queued pieces in order until told to stop.
        After an error (or an abort) it keeps taking pieces, only to release them, so that a
        producer waiting for a free buffer is never stranded."""
        assert self._queue is not None
        while True:
            item = self._queue.get()
            if item is None:
                return
            mv, release = item
            try:
                if self._error is None and not self._stop:
                    self._put(mv)
            except BaseException as exc:  # reported to the producer by the next call
                self._error = exc
            finally:
                del mv, item
                if release is not None:
                    release()

    def _raise_thread_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _join(self) -> None:
        thread, self._thread = self._thread, None
        # An interrupt (Ctrl-C) can land inside Thread.start(): a thread that never started
        # cannot be joined, and must not turn the KeyboardInterrupt into a RuntimeError.
        if thread is not None and thread.ident is not None:
            assert self._queue is not None
            self._queue.put(None)
            thread.join()

    def _check_next(self, name: str) -> tuple[str, int]:
        if self._file is None:
            raise ValueError(f"{self.path}: writer is closed")
        i = self._next
        if i >= len(self._names):
            raise ValueError(f"{self.path}: tensor {name!r}: all entries are already written")
        exp_name = self._names[i]
        if name != exp_name:
            raise ValueError(
                f"{self.path}: tensor {name!r} written out of order; expected {exp_name!r}"
            )
        return _CODES[self._codes[i]], self._sizes[i]

    def write(
        self, name: str, data: np.ndarray | np.generic | bytes | bytearray | memoryview
    ) -> None:
        """Write the next tensor. ``data`` is an array (of the entry's dtype, or raw uint8
        bytes) or a bytes-like object; its byte length must match the entry's."""
        code, nbytes = self._check_next(name)
        if self._partial:
            raise ValueError(f"{self.path}: tensor {name!r} is being written in chunks")
        if isinstance(data, np.ndarray | np.generic):
            arr = np.asarray(data)
            if arr.dtype.name in _BIT_TYPES and _BIT_TYPES[arr.dtype.name] == code:
                arr = arr.view(DTYPES[code])  # ml_dtypes' type: its bit patterns
            if arr.dtype != np.uint8 and arr.dtype != DTYPES[code]:
                swapped = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else None
                if swapped is not None and swapped == DTYPES[code]:
                    arr = arr.astype(swapped)
                else:
                    raise ValueError(
                        f"{self.path}: tensor {name!r}: array dtype {arr.dtype} does not "
                        f"match {code} (pass uint8 for raw bytes)"
                    )
            arr = np.ascontiguousarray(arr)
            mv = memoryview(arr.reshape(-1).view(np.uint8))
        else:
            mv = memoryview(data)
            if not mv.c_contiguous:
                mv = memoryview(mv.tobytes())
            mv = mv.cast("B")
        if mv.nbytes != nbytes:
            raise ValueError(
                f"{self.path}: tensor {name!r}: got {mv.nbytes} bytes, expected {nbytes} "
                f"({code})"
            )
        self._emit(mv, None)
        self._next += 1

    def write_chunk(
        self, name: str, data: np.ndarray, release: Callable[[], object] | None = None
    ) -> None:
        """Write the next bytes of tensor ``name``: a C-contiguous array whose bytes continue
        the tensor's data. The entry is complete once all its bytes have been given, and the
        next call starts the next entry. ``release`` is called once the bytes are written
        (at once without a background thread)."""
        code, nbytes = self._check_next(name)
        arr = np.asarray(data)
        if not arr.flags.c_contiguous:
            raise ValueError(f"{self.path}: tensor {name!r}: chunks must be C-contiguous")
        mv = memoryview(arr.reshape(-1).view(np.uint8))
        if self._partial + mv.nbytes > nbytes:
            raise ValueError(
                f"{self.path}: tensor {name!r}: chunks add up to more than its {nbytes} bytes "
                f"({code})"
            )
        self._emit(mv, release)
        self._partial += mv.nbytes
        if self._partial == nbytes:
            self._partial = 0
            self._next += 1

    def close(self) -> None:
        """Finish: check every entry was written, flush, and move the file into place."""
        if self._file is None:
            return
        if self._next != len(self._names):
            missing = self.pending
            self.abort()
            raise ValueError(
                f"{self.path}: closed with {len(missing)} tensor(s) not written, "
                f"first {missing[0]!r}"
            )
        try:
            self._join()
            self._raise_thread_error()
        except BaseException:
            self.abort()
            raise
        f, self._file = self._file, None
        try:
            f.close()
            os.replace(self._tmp, self.path)
        except BaseException:
            _unlink_quietly(self._tmp)
            raise
        if self._hash is not None:
            self._hexdigest = self._hash.hexdigest()

    def abort(self) -> None:
        """Discard the output (removes the temporary file); idempotent."""
        self._stop = True  # the background thread skips what is still queued
        self._join()
        f, self._file = self._file, None
        if f is not None:
            try:
                f.close()
            finally:
                _unlink_quietly(self._tmp)

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()

    def __del__(self) -> None:
        try:
            if getattr(self, "_file", None) is not None:
                self.abort()
        except Exception:
            pass


def _check_unique(names: list[str]) -> None:
    """Refuse (ValueError) a name given twice. A sorted copy of the list (8 bytes a name)
    rather than a set of every name (~40 bytes a name, the writer's largest cost)."""
    ordered = sorted(names)
    for a, b in zip(ordered, ordered[1:], strict=False):
        if a == b:
            raise ValueError(f"duplicate tensor name {a!r}")


def _unlink_quietly(p: Path) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"header is not encodable as UTF-8: {exc}") from None
