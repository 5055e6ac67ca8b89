"""A safetensors file's tensors held compactly: a few arrays instead of an object per tensor.

A checkpoint of 200,000 tensors held a TensorInfo (80 bytes), its offset (a 32-byte int) and
a dict entry by name (about 40 bytes) per tensor, in every reader of it, besides the name
itself. Here a tensor is its name and 25 bytes of arrays (offset, size, dtype, shape, place
in offset order) plus 4 to 8 bytes of a name index; TensorInfo objects are made as they are
read and dropped by the caller (issue 15, docs/SECURITY.md's bound with very many tensors).
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar, overload

import numpy as np

from qtool.formats._common import DTYPES, TensorInfo, _fmt_ints, _short

_CODE_LIST = list(DTYPES)  # a dtype is stored as its position here (one byte)
_CODE_AT = {code: k for k, code in enumerate(_CODE_LIST)}


class NameIndex:
    """name -> position in a list of names: an open-addressing hash table of 4-byte positions
    (linear probing, at most half full), not a dict (40 bytes an entry, and an int object for
    every position past 256)."""

    __slots__ = ("_names", "_table", "_mask", "_count")

    def __init__(self, names: list[str]) -> None:
        self._names = names
        self._table = array("i", [-1]) * 8
        self._mask = 7
        self._count = 0

    def get(self, name: str) -> int:
        """The position of ``name``, or -1."""
        table, names, mask = self._table, self._names, self._mask
        i = hash(name) & mask
        while True:
            k = table[i]
            if k < 0 or names[k] == name:
                return k
            i = (i + 1) & mask

    def add(self, k: int) -> int:
        """Index position ``k`` (``names[k]`` is set); returns -1, or the position of an
        earlier equal name (then nothing is added)."""
        if 2 * (self._count + 1) > len(self._table):
            self._grow()
        table, names, mask = self._table, self._names, self._mask
        name = names[k]
        i = hash(name) & mask
        while True:
            j = table[i]
            if j < 0:
                table[i] = k
                self._count += 1
                return -1
            if names[j] == name:
                return j
            i = (i + 1) & mask

    def _grow(self) -> None:
        size = len(self._table) * 4
        table = array("i", [-1]) * size
        mask = size - 1
        names = self._names
        for k in self._table:
            if k >= 0:
                i = hash(names[k]) & mask
                while table[i] >= 0:
                    i = (i + 1) & mask
                table[i] = k
        self._table, self._mask = table, mask


T = TypeVar("T")


class IndexedSequence(Sequence[T]):
    """A read-only sequence whose items are made when read (:meth:`_at`, given an index in
    range): indexing, slicing and equality with any sequence of equal items, as a list."""

    __slots__ = ()

    def _at(self, i: int) -> T:
        raise NotImplementedError

    @overload
    def __getitem__(self, i: int) -> T: ...
    @overload
    def __getitem__(self, i: slice) -> list[T]: ...

    def __getitem__(self, i: int | slice) -> T | list[T]:
        if isinstance(i, slice):
            return [self._at(k) for k in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError("index out of range")
        return self._at(i % len(self))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]  (a sequence equal to a list: no hash)


class TensorTable(IndexedSequence[TensorInfo]):
    """The tensors of one file, in data-offset order, as a read-only sequence of TensorInfo
    (each made when it is read; equal to, not the same object as, the one read before).
    Built with :meth:`add` in header order, then :meth:`seal`."""

    __slots__ = ("path", "_names", "_offsets", "_nbytes", "_dtypes", "_shape_ids", "_shapes",
                 "_shape_of", "_index", "_order")

    def __init__(self, path: Path) -> None:
        self.path = path
        self._names: list[str] = []
        self._offsets = array("q")
        self._nbytes = array("q")
        self._dtypes = bytearray()
        self._shape_ids = array("i")
        self._shapes: list[tuple[int, ...]] = []
        self._shape_of: dict[tuple[int, ...], int] | None = {}  # while building only
        self._index = NameIndex(self._names)
        self._order: array | None = None  # header positions in offset order; None: the same

    # -- building --------------------------------------------------------------------------

    def add(self, name: str, code: str, shape: tuple[int, ...], offset: int,
            nbytes: int) -> bool:
        """Append a tensor (absolute ``offset``); False, adding nothing, if ``name`` is
        already there."""
        self._names.append(name)
        if self._index.add(len(self._names) - 1) >= 0:
            self._names.pop()
            return False
        assert self._shape_of is not None, "table already sealed"
        sid = self._shape_of.get(shape)
        if sid is None:
            sid = self._shape_of[shape] = len(self._shapes)
            self._shapes.append(shape)
        self._offsets.append(offset)
        self._nbytes.append(nbytes)
        self._dtypes.append(_CODE_AT[code])
        self._shape_ids.append(sid)
        return True

    def seal(self, data_start: int, data_len: int, fail: Callable[..., Exception]) -> None:
        """Order by (offset, size) and check that the tensors tile [0, data_len) of the data
        area exactly; ``fail(msg, name=None)`` makes the error to raise."""
        self._shape_of = None
        n = len(self._names)
        offsets = np.frombuffer(self._offsets, np.int64) if n else np.zeros(0, np.int64)
        nbytes = np.frombuffer(self._nbytes, np.int64) if n else np.zeros(0, np.int64)
        in_order = bool(np.all((offsets[1:] > offsets[:-1]) | (
            (offsets[1:] == offsets[:-1]) & (nbytes[1:] >= nbytes[:-1]))))
        if not in_order:  # by (offset, nbytes), stable: the order the header gives ties
            self._order = array("i", np.lexsort((nbytes, offsets)).astype(np.int32).tobytes())
        del offsets, nbytes
        pos = 0
        prev = -1
        for p in (self._order if self._order is not None else range(n)):
            begin = self._offsets[p] - data_start
            end = begin + self._nbytes[p]
            if begin < pos:
                raise fail(f"data_offsets {_fmt_ints([begin, end])} overlap tensor "
                           f"{_short(self._names[prev])} which ends at {pos}", self._names[p])
            if begin > pos:
                raise fail(f"data_offsets {_fmt_ints([begin, end])} leave a gap: bytes "
                           f"[{pos}, {begin}) of the data area belong to no tensor",
                           self._names[p])
            pos = end
            prev = p
        if pos != data_len:
            raise fail(f"{data_len - pos} trailing bytes after the last tensor "
                       f"(data area is {data_len} bytes, tensors cover {pos})")

    # -- reading ---------------------------------------------------------------------------

    def _info(self, p: int) -> TensorInfo:
        """The tensor at header position ``p``."""
        return TensorInfo(self._names[p], _CODE_LIST[self._dtypes[p]],
                          self._shapes[self._shape_ids[p]], self._offsets[p], self._nbytes[p],
                          self.path)

    def find(self, name: str) -> TensorInfo | None:
        p = self._index.get(name)
        return None if p < 0 else self._info(p)

    def holds(self, info: TensorInfo) -> bool:
        """``info`` is one of these tensors (every field equal)."""
        p = self._index.get(info.name)
        return p >= 0 and (self._offsets[p], self._nbytes[p], self._shapes[self._shape_ids[p]],
                           _CODE_LIST[self._dtypes[p]], self.path) == (
            info.offset, info.nbytes, info.shape, info.dtype, info.path)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._index.get(name) >= 0

    def names(self) -> list[str]:
        """The names in offset order."""
        if self._order is None:
            return list(self._names)
        return [self._names[p] for p in self._order]

    def __len__(self) -> int:
        return len(self._names)

    def _at(self, i: int) -> TensorInfo:
        return self._info(self._order[i] if self._order is not None else i)

    def __iter__(self) -> Iterator[TensorInfo]:
        for p in (self._order if self._order is not None else range(len(self._names))):
            yield self._info(p)

    def __repr__(self) -> str:
        return f"TensorTable({str(self.path)!r}, {len(self)} tensors)"


class TensorChain(IndexedSequence[TensorInfo]):
    """Several files' tables as one sequence (a sharded checkpoint: shard by shard)."""

    __slots__ = ("_tables", "_starts")

    def __init__(self, tables: Sequence[TensorTable]) -> None:
        self._tables = tuple(tables)
        starts, n = [], 0
        for t in self._tables:
            starts.append(n)
            n += len(t)
        self._starts = (*starts, n)

    def __len__(self) -> int:
        return self._starts[-1]

    def _at(self, i: int) -> TensorInfo:
        from bisect import bisect_right

        t = bisect_right(self._starts, i) - 1
        return self._tables[t][i - self._starts[t]]

    def __iter__(self) -> Iterator[TensorInfo]:
        for t in self._tables:
            yield from t
