"""Checkpoint I/O: a validating safetensors reader, sharded-checkpoint resolution and a
streaming safetensors writer.

The safetensors format is parsed here directly (not through the ``safetensors`` package) so
that hostile or broken inputs are rejected with a precise one-line message, tensors can be
read one at a time with ``os.preadv`` into page-congruent buffers, and outputs can be written
as a stream while their sha256 is computed on the fly.

Layout of a safetensors file::

    u64 little-endian N | N bytes of UTF-8 JSON header | data area

The header maps tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}`` with
offsets relative to the start of the data area (byte ``8 + N``); the optional
``"__metadata__"`` entry is a ``str -> str`` object.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import mmap
import os
import queue
import secrets
import stat
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Any

import ml_dtypes
import numpy as np

__all__ = [
    "DTYPES",
    "FLOAT_CODES",
    "HEADER_SIZE_LIMIT",
    "INDEX_SIZE_LIMIT",
    "Checkpoint",
    "CheckpointError",
    "SafetensorsFile",
    "SafetensorsWriter",
    "TensorInfo",
    "aligned_buffer",
    "dtype_code",
    "open_checkpoint",
]

HEADER_SIZE_LIMIT = 100_000_000
"""Largest accepted JSON header, in bytes (same cap as the reference implementation)."""

INDEX_SIZE_LIMIT = 100_000_000
"""Largest accepted ``*.safetensors.index.json`` file, in bytes."""

PAGE = 4096
_ALIGN_MIN_BYTES = PAGE  # below this, page-congruent buffers are not worth the extra page
_INDEX_SUFFIX = ".safetensors.index.json"
_ABSURD_BYTES = 1 << 64  # tensor sizes beyond this are reported without computing them exactly
_INTP_LIMIT = 1 << 63  # numpy's bound on (product of the non-zero dimensions) x item size
MAX_DIMS = 64 if np.lib.NumpyVersion(np.__version__) >= "2.0.0" else 32
"""Most dimensions a tensor may have: what numpy can represent (no checkpoint comes close)."""


class CheckpointError(Exception):
    """Bad input. ``str(e)`` is one line naming the file (and tensor where there is one) and
    what is wrong."""

    def __init__(self, message: str) -> None:
        super().__init__(message.replace("\r", "\\r").replace("\n", "\\n"))


# --------------------------------------------------------------------------------------------
# dtypes


def _build_dtypes() -> dict[str, np.dtype]:
    table: dict[str, Any] = {
        "F64": "<f8",
        "F32": "<f4",
        "F16": "<f2",
        "BF16": ml_dtypes.bfloat16,
        "I64": "<i8",
        "I32": "<i4",
        "I16": "<i2",
        "I8": "i1",
        "U64": "<u8",
        "U32": "<u4",
        "U16": "<u2",
        "U8": "u1",
        "BOOL": "?",
    }
    for code, attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
        if hasattr(ml_dtypes, attr):
            table[code] = getattr(ml_dtypes, attr)
    out: dict[str, np.dtype] = {}
    for code, spec in table.items():
        dt = np.dtype(spec)
        out[code] = dt.newbyteorder("<") if dt.itemsize > 1 else dt
    return out


DTYPES: dict[str, np.dtype] = _build_dtypes()
"""safetensors dtype code -> numpy dtype (little-endian)."""

FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16"})


def dtype_code(dt: np.dtype | type | str) -> str:
    """The safetensors code of a numpy dtype (inverse of :data:`DTYPES`).

    Raises ``ValueError`` for dtypes safetensors cannot hold (including big-endian ones).
    """
    d = np.dtype(dt)
    for code, known in DTYPES.items():
        if d == known:
            return code
    raise ValueError(f"dtype {d} has no safetensors code")


# --------------------------------------------------------------------------------------------
# helpers


def _short(value: object, limit: int = 60) -> str:
    """A one-line, length-capped repr for putting untrusted values into messages."""
    text = repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def _fmt_ints(values: list[int] | tuple[int, ...], limit: int = 80) -> str:
    text = "[" + ", ".join(str(v) for v in values) + "]"
    if len(text) > limit:
        text = text[: limit - 4] + "...]"
    return text


def _is_nonneg_int(value: object) -> bool:
    return type(value) is int and value >= 0


class _Obj(list):
    """A JSON object as its raw list of (key, value) pairs, so duplicates stay visible."""


def _pairs_hook(pairs: list[tuple[str, Any]]) -> _Obj:
    return _Obj(pairs)


def _parse_json(text: str) -> Any:
    """json.loads keeping objects as :class:`_Obj` pair lists. Raises ValueError."""
    try:
        return json.loads(text, object_pairs_hook=_pairs_hook)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _dup_key(pairs: _Obj) -> str | None:
    seen: set[Any] = set()
    for key, _ in pairs:
        if key in seen:
            return key
        seen.add(key)
    return None


def _plain(value: Any) -> Any:
    """Convert parsed JSON (with :class:`_Obj` objects) into ordinary dicts and lists."""
    if isinstance(value, _Obj):
        return {k: _plain(v) for k, v in value}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _open_regular(path: Path) -> int:
    """Open a regular file read-only; never blocks on FIFOs, rejects non-regular files."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot open: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{path}: not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _pread_exact(fd: int, buf: memoryview, offset: int, path: Path, what: str) -> None:
    """Fill ``buf`` from ``offset``; a short file raises CheckpointError."""
    done = 0
    total = buf.nbytes
    while done < total:
        try:
            got = os.preadv(fd, [buf[done:]], offset + done)
        except OSError as exc:
            raise CheckpointError(f"{path}: {what}: read failed: {exc.strerror or exc}") from None
        if got == 0:
            raise CheckpointError(
                f"{path}: {what}: file ended at byte {offset + done}, "
                f"expected {total - done} more bytes (truncated while open?)"
            )
        done += got


def aligned_buffer(nbytes: int, offset: int = 0) -> np.ndarray:
    """A fresh writable 1-D uint8 array of ``nbytes`` whose address is congruent to
    ``offset`` modulo 4096 (page-cache copies into such buffers are much faster)."""
    raw = np.empty(nbytes + PAGE, dtype=np.uint8)
    shift = (offset - raw.ctypes.data) % PAGE
    return raw[shift : shift + nbytes]


# --------------------------------------------------------------------------------------------
# reader


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives. ``offset`` is the absolute byte offset of its data in ``path``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    path: Path

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]


class SafetensorsFile:
    """A validated, read-only view of one safetensors file.

    Opening parses and validates the whole header (see the module docstring); tensor data is
    only read on :meth:`read` / :meth:`read_into`. The file is never modified. Reads use
    ``pread`` and are safe to issue from several threads.
    """

    path: Path
    size: int
    header_bytes: bytes
    metadata: dict[str, str] | None
    tensors: list[TensorInfo]

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._label = str(path)
        self._fd = -1
        fd = _open_regular(self.path)
        try:
            self.size = os.fstat(fd).st_size
            self._fd = fd
            self._parse()
        except BaseException:
            self._fd = -1
            os.close(fd)
            raise
        self._by_name = {t.name: t for t in self.tensors}

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
        if n > HEADER_SIZE_LIMIT:
            raise self._fail(f"header length {n} exceeds the {HEADER_SIZE_LIMIT}-byte limit")
        if n > self.size - 8:
            raise self._fail(
                f"header length {n} runs beyond the end of the file ({self.size} bytes)"
            )
        raw = bytearray(8 + n)
        raw[:8] = prefix
        _pread_exact(self._fd, memoryview(raw)[8:], 8, self.path, "header")
        self.header_bytes = bytes(raw)
        try:
            text = self.header_bytes[8:].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self._fail(f"header is not valid UTF-8 (byte {8 + exc.start})") from None
        try:
            doc = _parse_json(text)
        except ValueError as exc:
            raise self._fail(f"header is not valid JSON: {_short(str(exc), 100)}") from None
        if not isinstance(doc, _Obj):
            raise self._fail(f"header JSON is a {_json_kind(doc)}, not an object")

        data_start = 8 + n
        data_len = self.size - data_start
        seen: set[str] = set()
        metadata: dict[str, str] | None = None
        entries: list[tuple[int, int, TensorInfo]] = []
        for name, entry in doc:
            if not isinstance(name, str):  # cannot happen with valid JSON; be defensive
                raise self._fail(f"tensor name {_short(name)} is not a string")
            if name in seen:
                if name == "__metadata__":
                    raise self._fail("duplicate '__metadata__' entry")
                raise self._fail("duplicate tensor name", name)
            seen.add(name)
            if name == "__metadata__":
                metadata = self._parse_metadata(entry)
                continue
            entries.append(self._parse_entry(name, entry, data_start, data_len))

        # The tensors, sorted by offsets, must tile [0, data_len) exactly.
        entries.sort(key=lambda e: (e[0], e[1]))
        pos = 0
        prev: TensorInfo | None = None
        for begin, end, info in entries:
            if begin < pos:
                assert prev is not None
                raise self._fail(
                    f"data_offsets {_fmt_ints([begin, end])} overlap tensor "
                    f"{_short(prev.name)} which ends at {pos}",
                    info.name,
                )
            if begin > pos:
                raise self._fail(
                    f"data_offsets {_fmt_ints([begin, end])} leave a gap: bytes "
                    f"[{pos}, {begin}) of the data area belong to no tensor",
                    info.name,
                )
            pos = end
            prev = info
        if pos != data_len:
            raise self._fail(
                f"{data_len - pos} trailing bytes after the last tensor "
                f"(data area is {data_len} bytes, tensors cover {pos})"
            )
        self.metadata = metadata
        self.tensors = [e[2] for e in entries]

    def _parse_metadata(self, entry: Any) -> dict[str, str]:
        if not isinstance(entry, _Obj):
            raise self._fail(f"__metadata__ is a {_json_kind(entry)}, not an object")
        out: dict[str, str] = {}
        for key, value in entry:
            if key in out:
                raise self._fail(f"__metadata__ has duplicate key {_short(key)}")
            if not isinstance(value, str):
                raise self._fail(
                    f"__metadata__[{_short(key)}] is a {_json_kind(value)}, not a string"
                )
            out[key] = value
        return out

    def _parse_entry(
        self, name: str, entry: Any, data_start: int, data_len: int
    ) -> tuple[int, int, TensorInfo]:
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
        info = TensorInfo(
            name=name,
            dtype=code,
            shape=tuple(shape),
            offset=data_start + begin,
            nbytes=have,
            path=self.path,
        )
        return begin, end, info

    # -- access --------------------------------------------------------------------------

    @property
    def data_start(self) -> int:
        """Absolute offset of the data area (``8 + N``)."""
        return len(self.header_bytes)

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def __getitem__(self, name: str) -> TensorInfo:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"{self._label}: no tensor {name!r}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __len__(self) -> int:
        return len(self.tensors)

    def __iter__(self) -> Iterator[TensorInfo]:
        return iter(self.tensors)

    def keys(self) -> list[str]:
        return [t.name for t in self.tensors]

    def _resolve(self, info: TensorInfo | str) -> TensorInfo:
        if self._fd < 0:
            raise ValueError(f"{self._label}: file is closed")
        if isinstance(info, str):
            return self[info]
        mine = self._by_name.get(info.name)
        if mine is None or (mine.dtype, mine.shape, mine.offset, mine.nbytes) != (
            info.dtype,
            info.shape,
            info.offset,
            info.nbytes,
        ):
            raise ValueError(f"{self._label}: tensor {info.name!r} is not from this file")
        return mine

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

    def view(self, info: TensorInfo | str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Elements [start, stop) of the tensor, flat, as a read-only array over a memory map of
        just those bytes: no copy, and the pages leave the resident set when the array (and
        every view of it) is dropped. Use it for data read once, in runs, to bound memory.

        A file truncated by someone else while a view is in use makes the process fail with
        SIGBUS; the size is checked when the view is made, which catches the usual cases.
        """
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
        size = os.fstat(self._fd).st_size
        if offset + nbytes > size:
            raise CheckpointError(
                f"{self.path}: tensor {t.name!r}: file is now {size} bytes, the tensor ends at "
                f"byte {offset + nbytes} (truncated while open?)"
            )
        base = offset - offset % mmap.ALLOCATIONGRANULARITY
        try:
            mm = mmap.mmap(self._fd, offset + nbytes - base, offset=base, access=mmap.ACCESS_READ)
        except OSError as exc:
            raise CheckpointError(
                f"{self.path}: tensor {t.name!r}: cannot map: {exc.strerror or exc}"
            ) from None
        if hasattr(mm, "madvise"):
            # Read-ahead of the whole run now, in the background, while its start is computed.
            mm.madvise(mmap.MADV_WILLNEED)
        # The array keeps the map alive; it is unmapped when the last view of it goes.
        return np.frombuffer(mm, dtype=dt, count=stop - start, offset=offset - base)

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"SafetensorsFile({self._label!r}, {len(self.tensors)} tensors)"


def _json_kind(value: object) -> str:
    if isinstance(value, _Obj):
        return "object"
    if isinstance(value, list):
        return "list"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return "number"


# --------------------------------------------------------------------------------------------
# (sharded) checkpoints


@dataclass(frozen=True)
class Checkpoint:
    """A whole, possibly sharded, input checkpoint (validated by :func:`open_checkpoint`)."""

    root: Path
    index_path: Path | None
    index_metadata: dict | None
    shards: list[Path]
    _tensors: tuple[TensorInfo, ...] | None = field(default=None, repr=False, compare=False)

    def tensors(self) -> list[TensorInfo]:
        """All tensors, shard by shard, each shard in data-offset order."""
        if self._tensors is None:
            found: list[TensorInfo] = []
            for shard in self.shards:
                with SafetensorsFile(shard) as f:
                    found.extend(f.tensors)
            object.__setattr__(self, "_tensors", tuple(found))
        assert self._tensors is not None
        return list(self._tensors)

    @property
    def is_sharded(self) -> bool:
        return self.index_path is not None


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Resolve and validate a checkpoint: a ``*.safetensors`` file, a
    ``*.safetensors.index.json`` (Hugging Face sharded layout), or a directory holding exactly
    one of those (an index is preferred). Raises :class:`CheckpointError`."""
    p = Path(path)
    if p.is_dir():
        indexes = sorted(c for c in p.iterdir() if c.name.endswith(_INDEX_SUFFIX))
        if len(indexes) > 1:
            names = ", ".join(c.name for c in indexes)
            raise CheckpointError(f"{path}: several index files ({names}); pass one of them")
        if indexes:
            return _open_index(indexes[0])
        files = sorted(c for c in p.iterdir() if c.name.endswith(".safetensors") and not c.is_dir())
        if not files:
            raise CheckpointError(f"{path}: directory holds no .safetensors file or index")
        if len(files) > 1:
            raise CheckpointError(
                f"{path}: directory holds {len(files)} .safetensors files and no "
                f"{_INDEX_SUFFIX}; pass a file or add an index"
            )
        return _open_single(files[0])
    if not p.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if p.name.endswith(".json"):
        return _open_index(p)
    return _open_single(p)


def _open_single(p: Path) -> Checkpoint:
    with SafetensorsFile(p) as f:
        infos = tuple(f.tensors)
    return Checkpoint(
        root=p.parent, index_path=None, index_metadata=None, shards=[p], _tensors=infos
    )


def _read_index(p: Path) -> bytes:
    fd = _open_regular(p)
    try:
        size = os.fstat(fd).st_size
        if size > INDEX_SIZE_LIMIT:
            raise CheckpointError(
                f"{p}: index is {size} bytes, over the {INDEX_SIZE_LIMIT}-byte limit"
            )
        buf = bytearray(size)
        _pread_exact(fd, memoryview(buf), 0, p, "index")
        return bytes(buf)
    finally:
        os.close(fd)


def _open_index(p: Path) -> Checkpoint:
    label = str(p)
    raw = _read_index(p)
    try:
        doc = _parse_json(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise CheckpointError(f"{label}: index is not valid UTF-8") from None
    except ValueError as exc:
        raise CheckpointError(
            f"{label}: index is not valid JSON: {_short(str(exc), 100)}"
        ) from None
    if not isinstance(doc, _Obj):
        raise CheckpointError(f"{label}: index JSON is a {_json_kind(doc)}, not an object")
    dup = _dup_key(doc)
    if dup is not None:
        raise CheckpointError(f"{label}: index has duplicate key {_short(dup)}")
    top = dict(doc)

    meta = top.get("metadata")
    if meta is not None and not isinstance(meta, _Obj):
        raise CheckpointError(f"{label}: index metadata is a {_json_kind(meta)}, not an object")
    try:
        index_metadata = _plain(meta) if meta is not None else None
    except RecursionError:
        raise CheckpointError(f"{label}: index metadata is nested too deeply") from None

    if "weight_map" not in top:
        raise CheckpointError(f"{label}: index has no weight_map")
    wm = top["weight_map"]
    if not isinstance(wm, _Obj):
        raise CheckpointError(f"{label}: weight_map is a {_json_kind(wm)}, not an object")
    if not wm:
        raise CheckpointError(f"{label}: weight_map is empty")

    root = p.parent
    real_root = root.resolve()
    canonical: dict[str, Path] = {}  # shard name as written -> path used for the shard
    by_real: dict[Path, Path] = {}  # resolved file -> path used for the shard
    placed: dict[str, Path] = {}  # tensor -> shard path
    shards: list[Path] = []
    for tensor, shard_name in wm:
        if tensor in placed:
            raise CheckpointError(f"{label}: weight_map lists tensor {_short(tensor)} twice")
        if not isinstance(shard_name, str):
            raise CheckpointError(
                f"{label}: tensor {_short(tensor)}: weight_map value is a "
                f"{_json_kind(shard_name)}, not a shard file name"
            )
        if shard_name not in canonical:
            shard = _check_shard_name(label, tensor, shard_name, root, real_root)
            real = shard.resolve()
            if real not in by_real:
                by_real[real] = shard
                shards.append(shard)
            canonical[shard_name] = by_real[real]
        placed[tensor] = canonical[shard_name]

    infos: list[TensorInfo] = []
    for shard in shards:
        with SafetensorsFile(shard) as f:
            for t in f.tensors:
                where = placed.get(t.name)
                if where is None:
                    raise CheckpointError(
                        f"{shard}: tensor {_short(t.name)} is not listed in index {p.name}"
                    )
                if where != shard:
                    raise CheckpointError(
                        f"{label}: tensor {_short(t.name)}: index places it in {where.name} "
                        f"but it is in {shard.name}"
                    )
            for tensor, where in placed.items():
                if where == shard and tensor not in f:
                    raise CheckpointError(
                        f"{label}: tensor {_short(tensor)}: index places it in {shard.name}, "
                        f"which does not contain it"
                    )
            infos.extend(f.tensors)
    return Checkpoint(
        root=root, index_path=p, index_metadata=index_metadata, shards=shards, _tensors=tuple(infos)
    )


def _check_shard_name(label: str, tensor: str, name: str, root: Path, real_root: Path) -> Path:
    where = f"{label}: tensor {_short(tensor)}: shard {_short(name)}"
    if not name or "\x00" in name:
        raise CheckpointError(f"{where} is not a valid file name")
    pure = PurePosixPath(name)
    if pure.is_absolute() or name.startswith("\\") or (len(name) > 1 and name[1] == ":"):
        raise CheckpointError(f"{where} is an absolute path")
    if ".." in pure.parts or ".." in name.split("\\"):
        raise CheckpointError(f"{where} contains '..'")
    shard = root / name
    try:
        real = shard.resolve()
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(f"{where} cannot be resolved: {exc}") from None
    if not real.is_relative_to(real_root):
        raise CheckpointError(f"{where} resolves outside {root} (to {real})")
    if not shard.exists():
        raise CheckpointError(f"{where} is missing")
    if not shard.is_file():
        raise CheckpointError(f"{where} is not a regular file")
    return shard


# --------------------------------------------------------------------------------------------
# writer


class SafetensorsWriter:
    """Streaming safetensors writer.

    The full header is computed from ``entries`` (``(name, dtype code, shape)`` in write
    order) and written up front; tensors are then written one by one, in that order, with
    :meth:`write`, or in consecutive pieces with :meth:`write_chunk`. The sha256 of the file
    is computed as bytes go out (``digest=False`` skips it).

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
        entries: list[tuple[str, str, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
        *,
        digest: bool = True,
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
        self._entries: list[tuple[str, str, tuple[int, ...], int]] = []
        header: dict[str, Any] = {}
        if metadata is not None:
            if not isinstance(metadata, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
            ):
                raise ValueError("metadata must be a dict of str -> str")
            header["__metadata__"] = dict(metadata)
        pos = 0
        for entry in entries:
            name, code, shape = entry
            if not isinstance(name, str) or name == "__metadata__":
                raise ValueError(f"invalid tensor name {name!r}")
            if name in header:
                raise ValueError(f"duplicate tensor name {name!r}")
            if code not in DTYPES:
                raise ValueError(f"tensor {name!r}: unknown dtype code {code!r}")
            dims = tuple(int(d) for d in shape)
            if any(d < 0 for d in dims):
                raise ValueError(f"tensor {name!r}: negative dimension in shape {dims}")
            nbytes = math.prod(dims) * DTYPES[code].itemsize
            header[name] = {"dtype": code, "shape": list(dims), "data_offsets": [pos, pos + nbytes]}
            self._entries.append((name, code, dims, nbytes))
            pos += nbytes
        try:
            text = json.dumps(header, separators=(",", ":"), ensure_ascii=False)
            blob = text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"header is not encodable as UTF-8: {exc}") from None
        blob += b" " * (-len(blob) % 8)
        self.header_bytes = struct.pack("<Q", len(blob)) + blob
        self._size = len(self.header_bytes) + pos
        self._next = 0
        self._hash = hashlib.sha256() if digest else None
        self._sha256: str | None = None
        self._tmp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}.tmp")
        self._file = open(self._tmp, "xb")  # closed in close() / abort()
        try:
            self._reserve()
            if background:
                self._queue = queue.Queue(maxsize=max(1, queue_depth))
                self._thread = threading.Thread(
                    target=self._drain, name=f"write {self.path.name}", daemon=True
                )
                self._thread.start()
            self._emit(memoryview(self.header_bytes), None)
        except BaseException:
            self.abort()
            raise

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
    def sha256(self) -> str:
        """Hex sha256 of the whole file; available after :meth:`close` (with digest=True)."""
        if self._sha256 is None:
            raise ValueError(f"{self.path}: sha256 is only available after close()")
        return self._sha256

    @property
    def pending(self) -> list[str]:
        """Names of the entries not written yet, in order."""
        return [e[0] for e in self._entries[self._next :]]

    def _put(self, mv: memoryview) -> None:
        assert self._file is not None
        if self._hash is not None:
            self._hash.update(mv)
        self._file.write(mv)

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

    def _check_next(self, name: str) -> tuple[str, tuple[int, ...], int]:
        if self._file is None:
            raise ValueError(f"{self.path}: writer is closed")
        if self._next >= len(self._entries):
            raise ValueError(f"{self.path}: tensor {name!r}: all entries are already written")
        exp_name, code, shape, nbytes = self._entries[self._next]
        if name != exp_name:
            raise ValueError(
                f"{self.path}: tensor {name!r} written out of order; expected {exp_name!r}"
            )
        return code, shape, nbytes

    def write(
        self, name: str, data: np.ndarray | np.generic | bytes | bytearray | memoryview
    ) -> None:
        """Write the next tensor. ``data`` is an array (of the entry's dtype, or raw uint8
        bytes) or a bytes-like object; its byte length must match the entry's."""
        code, shape, nbytes = self._check_next(name)
        if self._partial:
            raise ValueError(f"{self.path}: tensor {name!r} is being written in chunks")
        if isinstance(data, np.ndarray | np.generic):
            arr = np.asarray(data)
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
                f"(shape {list(shape)} of {code})"
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
        code, shape, nbytes = self._check_next(name)
        arr = np.asarray(data)
        if not arr.flags.c_contiguous:
            raise ValueError(f"{self.path}: tensor {name!r}: chunks must be C-contiguous")
        mv = memoryview(arr.reshape(-1).view(np.uint8))
        if self._partial + mv.nbytes > nbytes:
            raise ValueError(
                f"{self.path}: tensor {name!r}: chunks add up to more than its {nbytes} bytes "
                f"(shape {list(shape)} of {code})"
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
        if self._next != len(self._entries):
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
            self._sha256 = self._hash.hexdigest()

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


def _unlink_quietly(p: Path) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass
