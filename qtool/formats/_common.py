"""What every format module shares: the input error type, the safetensors dtype table and
strict JSON parsing helpers."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qtool.core import bf16

# The limits below are where docs/SECURITY.md's memory bound (2x the largest tensor as
# float32 + 150 MB) still holds for every command, measured by bench/many_tensors.py at their
# corners; each is far above what real checkpoints need (DeepSeek-V3: about 92 000 tensors
# and an estimated 13 MB of headers over 163 shards; per file far less).

HEADER_SIZE_LIMIT = 16 << 20
"""Largest accepted JSON header of one safetensors file, and of all of a checkpoint's files
together, in bytes (the reference implementation caps one file at 100 MB, but the per-tensor
state of such a header would exceed the memory bound)."""

TENSOR_COUNT_LIMIT = 100_000
"""Most tensors a checkpoint may hold, all its shards together (and so any one file, index
or manifest). It is counted in a header before the header is parsed, so that a hostile
header of millions of empty tensors is refused at once."""

METADATA_SIZE_LIMIT = 1 << 20
"""Most characters of ``__metadata__`` (keys and values) one file may carry, and of an
index's ``metadata``. qtool copies it into every output; real files carry a few bytes."""

INDEX_SIZE_LIMIT = 16 << 20
"""Largest accepted ``*.safetensors.index.json`` file, in bytes (an index lists each tensor
once, in fewer bytes than its header entry)."""

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


OPAQUE_CODES = ("F8_E4M3", "F8_E5M2")


def _build_dtypes() -> dict[str, np.dtype]:
    # No ml_dtypes (its import alone took 0.8-1.3 s): BF16 is held as uint16 bit patterns
    # (qtool.core.bf16 converts), and the float8 types as opaque bytes, which qtool only ever
    # copies (they are not quantized, and dequantize --dtype leaves them as they are).
    table: dict[str, Any] = {
        "F64": "<f8",
        "F32": "<f4",
        "F16": "<f2",
        "BF16": bf16.BITS,
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
    for code in OPAQUE_CODES:
        table[code] = "u1"
    out: dict[str, np.dtype] = {}
    for code, spec in table.items():
        dt = np.dtype(spec)
        out[code] = dt.newbyteorder("<") if dt.itemsize > 1 else dt
    return out


DTYPES: dict[str, np.dtype] = _build_dtypes()
"""safetensors dtype code -> numpy dtype (little-endian)."""

FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16"})

# Codes that share their numpy dtype with another code: not the answer of dtype_code.
_SHARED = frozenset({"BF16", *OPAQUE_CODES})


def dtype_code(dt: np.dtype | type | str) -> str:
    """The safetensors code of a numpy dtype (inverse of :data:`DTYPES`).

    Raises ``ValueError`` for dtypes safetensors cannot hold (including big-endian ones).
    """
    d = np.dtype(dt)
    by_name = {"bfloat16": "BF16", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}
    if d.name in by_name:  # ml_dtypes' types, when a caller has them
        return by_name[d.name]
    for code, known in DTYPES.items():
        if d == known and code not in _SHARED:
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


def reject_constant(name: str) -> Any:
    """``parse_constant`` for json.loads: NaN, Infinity and -Infinity are not JSON (Python
    accepts them by default, and would copy them into outputs other readers refuse)."""
    raise ValueError(f"{name} is not a JSON value")


def unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` for json.loads: a dict, refusing (ValueError) a key given twice,
    which json would resolve silently to the last value (another reader may take the first)."""
    d = dict(pairs)
    if len(d) != len(pairs):
        raise ValueError(f"duplicate key {_short(_dup_key(_Obj(pairs)), 40)}")
    return d


def _parse_json(text: str) -> Any:
    """json.loads keeping objects as :class:`_Obj` pair lists. Raises ValueError, also for
    a string holding a lone surrogate (see :func:`check_strict_utf8`)."""
    try:
        doc = json.loads(text, object_pairs_hook=_pairs_hook, parse_constant=reject_constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    check_strict_utf8(text, doc)
    return doc


_WS = re.compile(r"[ \t\n\r]*")  # JSON's whitespace
_PAIRS_DECODER = json.JSONDecoder(object_pairs_hook=_pairs_hook, parse_constant=reject_constant)


def stream_pairs(text: str) -> Iterator[tuple[str, Any]] | None:
    """The (key, value) pairs of a JSON object text one at a time, values as
    :func:`_parse_json` gives them, or None when the text needs the whole parse: it is not a
    valid JSON object, or it holds a surrogate escape. The text is checked to be valid JSON
    first (values parsed and dropped), so a caller that validates the pairs as they come
    meets exactly the documents, and the errors, that the whole parse would give it; only the
    whole document is never held at once (a header of 200,000 tensors is ~100 MB of pairs)."""
    if _SURROGATE_ESCAPE.search(text):
        return None
    try:
        for _ in _walk_pairs(text):
            pass
    except (ValueError, RecursionError):
        return None
    return _walk_pairs(text)


def _walk_pairs(text: str) -> Iterator[tuple[str, Any]]:
    ws = _WS.match
    pos = ws(text, 0).end()
    if not text.startswith("{", pos):
        raise ValueError("not an object")
    pos = ws(text, pos + 1).end()
    if text.startswith("}", pos):
        pos += 1
    else:
        while True:
            if not text.startswith('"', pos):
                raise ValueError("expecting a key")
            key, pos = json.decoder.scanstring(text, pos + 1, True)
            pos = ws(text, pos).end()
            if not text.startswith(":", pos):
                raise ValueError("expecting ':'")
            value, pos = _PAIRS_DECODER.raw_decode(text, ws(text, pos + 1).end())
            yield key, value
            pos = ws(text, pos).end()
            if text.startswith(",", pos):
                pos = ws(text, pos + 1).end()
                continue
            if text.startswith("}", pos):
                pos += 1
                break
            raise ValueError("expecting ',' or '}'")
    if ws(text, pos).end() != len(text):
        raise ValueError("extra data")


# A JSON escape of a UTF-16 surrogate (\ud800-\udfff). Text decoded from UTF-8 cannot hold a
# surrogate itself, so only such an escape can put one into a parsed string.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class NotUnicodeError(ValueError):
    """A parsed JSON string is not valid Unicode (a lone surrogate)."""


def check_strict_utf8(text: str, doc: Any) -> None:
    """Refuse (NotUnicodeError) a parsed JSON document with a string or key that is not valid
    Unicode: a lone surrogate escape such as ``"\\ud800"``. json accepts it, but such a name
    cannot be encoded as UTF-8 (the safetensors library refuses it; writing it would crash).
    Only documents whose text holds a surrogate escape at all are walked."""
    if not _SURROGATE_ESCAPE.search(text):
        return
    stack = [doc]
    while stack:  # iterative: the document may be deeply nested
        v = stack.pop()
        if isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):  # also _Obj, whose items are (key, value) tuples
            stack.extend(v)
        elif isinstance(v, tuple):
            stack.extend(v)
        elif isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                raise NotUnicodeError(f"string {_short(v)} holds a lone surrogate "
                                 f"(\\u{ord(v[e.start]):04x}); it is not valid UTF-8") from None


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


def _pread_exact(fd: int, buf: memoryview, offset: int, path: Path, what: str) -> None:
    """Fill ``buf`` from ``offset``; a short file raises CheckpointError."""
    done = 0
    total = buf.nbytes
    while done < total:
        try:
            got = os.preadv(fd, [buf[done:]], offset + done)
        except OSError as exc:
            raise CheckpointError(f"{path}: {what}: read failed: {exc.strerror or exc}") from None
        if got == 0:  # the size now, not where this read began (that may be far past it)
            raise CheckpointError(
                f"{path}: {what}: the file now ends at byte {os.fstat(fd).st_size}, short of "
                f"the data at bytes [{offset}, {offset + total}) (truncated while open?)"
            )
        done += got


def aligned_buffer(nbytes: int, offset: int = 0, raw: np.ndarray | None = None) -> np.ndarray:
    """A writable 1-D uint8 array of ``nbytes`` whose address is congruent to ``offset``
    modulo 4096 (page-cache copies into such buffers are much faster): a slice of ``raw``, a
    caller's reusable uint8 buffer of at least ``nbytes + PAGE`` bytes, or else fresh."""
    if raw is None or raw.size < nbytes + PAGE:
        raw = np.empty(nbytes + PAGE, dtype=np.uint8)
    shift = (offset - raw.ctypes.data) % PAGE
    return raw[shift : shift + nbytes]


@dataclass(frozen=True, slots=True)
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


_SHAPES: dict[tuple[int, ...], tuple[int, ...]] = {}


def shared_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """One tuple object per distinct shape: the experts of a large model share a few shapes
    across 100,000 tensors (64 bytes a tuple)."""
    if len(_SHAPES) > 10_000:  # hostile headers: every shape distinct
        _SHAPES.clear()
    return _SHAPES.setdefault(shape, shape)
