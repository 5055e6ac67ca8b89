"""The native artifact's manifest (qtool.json): per-tensor records, file digests, the source.

See docs/FORMAT.md. Parsing is strict: a manifest that does not match its schema is an
ArtifactError naming the field.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, TextIO

from qtool import __version__
from qtool.core.metrics import ErrorStats
from qtool.core.scales import SCALE_CODES
from qtool.core.schemes import QuantSpec, SpecError
from qtool.core.shapes import param_shape, row_scale_shape, stored_shape, zero_point_shape
from qtool.formats import _common
from qtool.formats import digest as _digest
from qtool.formats._common import (
    _INTP_LIMIT,
    DTYPES,
    FLOAT_CODES,
    MAX_DIMS,
    CheckpointError,
    check_strict_utf8,
    reject_constant,
    shared_shape,
    unique_object,
)
from qtool.formats.artifact_files import (  # noqa: F401  (re-exported)
    is_plain_name,
    row_scale_name,
    sidecar_names,
    stem_of,
)
from qtool.formats.manifest_text import (  # noqa: F401  (seal* and _serialize: re-exported)
    _is_hex,
    _serialize,
    canonical_digest,
    read_streamed,
    seal,
    seal_streamed,
    write_sealed,
)

FORMAT_VERSION = 2
# Written instead of 2 when a tensor has scale_bits 8, so that a qtool that reads only 1 and 2
# refuses the artifact by its version instead of misreading its scale codes.
SCALE_BITS_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
"""Version 1 recorded SHA-256 file digests and had no manifest digest, F32 scales and I32
zero points of param_shape for every quantized tensor; it stays readable. Version 2: BLAKE3
digests and a manifest digest; scales in the spec's scale_dtype, zero points U8 of
zero_point_shape (0-d for the symmetric schemes, bit-packed below 8 bits), safetensors files
marked as qtool's (docs/FORMAT.md). Version 3: version 2, plus tensors with ``scale_bits`` 8
(group scales as U8 codes, one F32 scale per row in ``<stem>.row_scale.safetensors``)."""

# The main file's __metadata__ (format_version 2): "format" is "qtool", so that model loaders
# (which expect "pt", "tf", "flax" or "np") refuse it, and the source's own metadata is kept,
# as JSON, under this key for dequantize to restore.
SOURCE_METADATA_KEY = "qtool_source_metadata"
MANIFEST = "qtool.json"
MANIFEST_SIZE_LIMIT = 64 << 20  # bytes; a record is ~250 bytes: 2x the tensor limit's


class _TooMany(Exception):
    pass


def _too_many() -> str:
    return f"lists more tensors than the limit of {_common.TENSOR_COUNT_LIMIT}"


class ArtifactError(CheckpointError):
    """A qtool artifact that is missing, corrupt or inconsistent."""


def uses_row_scales(records: list[TensorRecord], shard: str) -> bool:
    return any(t.file == shard and t.spec is not None and t.spec.scale_bits is not None
               for t in records)


@dataclass(slots=True)  # no per-record __dict__: artifacts may hold 200,000 records
class TensorRecord:
    """What the manifest says about one tensor."""

    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    spec: QuantSpec | None = None
    passthrough: str | None = None
    stats: ErrorStats | None = None
    original_bytes: int = 0
    stored_bytes: int = 0  # integers + scales + zero points, as stored (passthrough: original)
    format_version: int = FORMAT_VERSION  # of the manifest it belongs to: the sidecar layout

    @property
    def quantized(self) -> bool:
        return self.spec is not None

    @property
    def quantized_dtype(self) -> str:
        assert self.spec is not None
        if self.spec.packed:
            return "U8"
        return "I8" if self.spec.signed else "U8"

    @property
    def stored_shape(self) -> tuple[int, ...]:
        assert self.spec is not None
        return stored_shape(self.shape, self.spec)

    @property
    def param_shape(self) -> tuple[int, ...]:
        assert self.spec is not None
        return param_shape(self.shape, self.spec)

    @property
    def scale_code(self) -> str:
        """dtype code of the stored scales: F32 in version 1, the spec's scale_dtype after,
        U8 codes with scale_bits 8 (their row scales are F32, in the row-scale file)."""
        assert self.spec is not None
        if self.spec.scale_bits is not None:
            return "U8"
        return "F32" if self.format_version == 1 else SCALE_CODES[self.spec.scale_dtype]

    @property
    def row_scale_shape(self) -> tuple[int, ...]:
        return row_scale_shape(self.shape)

    @property
    def zero_point_code(self) -> str:
        return "I32" if self.format_version == 1 else "U8"

    @property
    def zero_point_shape(self) -> tuple[int, ...]:
        """Shape of the stored zero points: param_shape in version 1; 0-d (symmetric) or
        bit-packed per row (asymmetric below 8 bits) after."""
        assert self.spec is not None
        if self.format_version == 1:
            return self.param_shape
        return zero_point_shape(self.shape, self.spec)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "file": self.file, "dtype": self.dtype,
                             "shape": list(self.shape)}
        if self.spec is None:
            d["passthrough"] = self.passthrough
        else:
            d.update(self.spec.as_dict())
            if self.format_version >= 2:
                d["scale_dtype"] = self.spec.scale_dtype
            d["quantized_dtype"] = self.quantized_dtype
            d["packed"] = self.spec.packed
            d["stored_shape"] = list(self.stored_shape)
            d["param_shape"] = list(self.param_shape)
            st = self.stats
            # Sums of squares of F64 weights beyond ~1e154 overflow to inf (quantize refuses
            # such tensors, whose scale would not fit in float32, but this record must never
            # be unreadable): JSON has no inf (json.dumps would write the non-standard
            # Infinity) and readers refuse it, so such metrics are left out, as unrecorded.
            if st is not None and all(math.isfinite(v) for v in (
                    st.signal_sq, st.error_sq, st.cross, st.max_abs_error)):
                d["metrics"] = st.to_dict()
        d["bytes"] = {"original": self.original_bytes, "stored": self.stored_bytes}
        return d

    @classmethod
    def from_json(cls, d: Any, where: str, version: int = FORMAT_VERSION) -> TensorRecord:
        try:
            name, file, dtype, shape = d["name"], d["file"], d["dtype"], d["shape"]
            # A manifest may be hostile: everything later code relies on is checked here, so
            # that it fails as bad input rather than as a crash in the writer or the math.
            if not all(isinstance(v, str) for v in (name, file, dtype)):
                raise TypeError("name, file and dtype must be strings")
            if dtype not in DTYPES:
                raise ValueError(f"unknown dtype {dtype!r:.20}")
            if not isinstance(shape, list) or not all(
                    type(x) is int and x >= 0 for x in shape):
                raise ValueError("shape is not a list of non-negative integers")
            if len(shape) > MAX_DIMS or math.prod(d or 1 for d in shape) * DTYPES[dtype].itemsize \
                    >= _INTP_LIMIT:
                # What the reader refuses in a safetensors header: no array has that shape.
                raise ValueError(f"shape {shape!r:.60} is too large to represent")
            # File names, dtypes, reasons and specs repeat across records: one object each.
            # The name interned: one str with the artifact's safetensors headers (read too).
            rec = cls(name=sys.intern(name), file=_shared(file), dtype=_shared(dtype),
                      shape=shared_shape(tuple(shape)),
                      format_version=version)
            sizes = (d["bytes"]["original"], d["bytes"]["stored"])
            if not all(type(v) is int and v >= 0 for v in sizes):
                raise ValueError("bytes must hold non-negative integers")
            rec.original_bytes, rec.stored_bytes = sizes
            if "passthrough" in d:
                rec.passthrough = _shared(str(d["passthrough"]))
                return rec
            if dtype not in FLOAT_CODES:
                raise ValueError(f"a quantized tensor must be a float dtype, not {dtype}")
            # Every key the spec depends on must be there: a missing one is an error, never
            # QuantSpec's default (which would silently change how the integers are read).
            spec_keys = ["scheme", "bits", "granularity", "range"]
            spec_keys += ["group_size"] if d["granularity"] == "group" else []
            spec_keys += ["percentile"] if d["range"] == "percentile" else []
            if version >= 2:
                spec_keys.append("scale_dtype")  # it sets the sidecars' layout
            elif "scale_dtype" in d:
                raise ValueError("scale_dtype is not part of format_version 1")
            if "scale_bits" in d:
                if version < SCALE_BITS_VERSION:
                    raise ValueError(f"scale_bits is not part of format_version {version}")
                spec_keys.append("scale_bits")
            missing = [k for k in spec_keys if k not in d]
            if missing:
                raise KeyError(missing[0])
            rec.spec = _spec(tuple((k, d[k]) for k in spec_keys))
            if "metrics" in d:
                rec.stats = ErrorStats.from_dict(d["metrics"])  # validates the values
            return rec
        except KeyError as e:
            raise ArtifactError(
                f"{where}: tensor entry {d.get('name')!r:.80} has no {str(e):.40}") from None
        except (TypeError, ValueError, OverflowError, SpecError, AttributeError) as e:
            raise ArtifactError(
                f"{where}: malformed tensor entry {d!r:.80}: {str(e):.100}") from None


_SHARED: dict[str, str] = {}
_SPECS: dict[tuple[tuple[str, type, Any], ...], QuantSpec] = {}


def _shared(value: str) -> str:
    if len(_SHARED) > 10_000:  # hostile manifests: every value distinct
        _SHARED.clear()
    return _SHARED.setdefault(value, value)


def _spec(items: tuple[tuple[str, Any], ...]) -> QuantSpec:
    key = tuple((k, type(v), v) for k, v in items)  # 8 and 8.0 are not the same entry
    try:
        spec = _SPECS.get(key)
    except TypeError:  # an unhashable (so invalid) value: QuantSpec says what is wrong
        return QuantSpec(**dict(items))
    if spec is None:
        spec = QuantSpec(**dict(items))
        if len(_SPECS) < 1000:
            _SPECS[key] = spec
    return spec


@dataclass
class Manifest:
    source: dict[str, Any]
    tensors: list[TensorRecord]
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    shards: list[str] = field(default_factory=list)  # main files, in order
    index: str | None = None  # the index file name, for sharded artifacts
    qtool_version: str = __version__
    format_version: int = FORMAT_VERSION
    digest: str = _digest.DEFAULT  # the algorithm of every digest in the manifest

    def to_json(self) -> str:
        return seal_streamed(self._head(), (t.to_json() for t in self.tensors))

    def write(self, out: TextIO) -> None:
        """``to_json()`` written to ``out`` a record at a time (never the whole text)."""
        write_sealed(out, self._head(), lambda: (t.to_json() for t in self.tensors))

    def _head(self) -> dict[str, Any]:
        return {
            "format": "qtool",
            "format_version": self.format_version,
            "qtool_version": self.qtool_version,
            "digest": self.digest,
            "source": self.source,
            "shards": self.shards,
            "index": self.index,
            "files": self.files,
        }

    @classmethod
    def from_pieces(cls, text: str | Iterable[str], where: str) -> Manifest | None:
        """The manifest of a text exactly as qtool writes it (the whole text, or its pieces
        in order), read record by record: memory for very many tensors is their records, not
        the text. None for any other text: :meth:`from_json` of the whole then says what is
        wrong."""
        count = iter(range(_common.TENSOR_COUNT_LIMIT))  # bounded as read, like a header

        def record(t: dict[str, Any], v: int) -> TensorRecord:
            if next(count, None) is None:  # not an error read_streamed takes for "not ours"
                raise _TooMany(f"{where}: {_too_many()}")
            return TensorRecord.from_json(t, where, v)

        try:
            fast = read_streamed(text, record, tuple(v for v in READABLE_VERSIONS if v >= 2))
        except _TooMany as e:
            raise ArtifactError(str(e)) from None
        if fast is None:
            return None
        head, records = fast
        return cls._build(head, records, head["format_version"], head["digest"], where)

    @classmethod
    def from_json(cls, text: str, where: str) -> Manifest:
        fast = cls.from_pieces(text, where)
        if fast is not None:
            return fast
        # The whole parse builds every record at once: a record has at least 8 colons
        # outside strings (a colon inside one only counts too many).
        if text.count(":") > 16 * _common.TENSOR_COUNT_LIMIT + 1000:
            raise ArtifactError(f"{where}: {_too_many()}")
        try:
            doc = json.loads(text, parse_constant=reject_constant, object_pairs_hook=unique_object)
            check_strict_utf8(text, doc)  # a lone surrogate in a name cannot be written back
        except (ValueError, UnicodeDecodeError) as e:
            msg = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
            raise ArtifactError(f"{where}: not valid JSON ({msg})") from None
        except RecursionError:
            raise ArtifactError(f"{where}: not valid JSON (nested too deeply)") from None
        if not isinstance(doc, dict) or doc.get("format") != "qtool":
            raise ArtifactError(f"{where}: not a qtool manifest")
        version = doc.get("format_version")
        # `true == 1` in Python: the type is checked too, so that only an integer passes.
        if type(version) is not int or version not in READABLE_VERSIONS:
            raise ArtifactError(
                f"{where}: unknown format_version {version!r:.40}; this qtool ({__version__}) "
                f"reads format_version {', '.join(map(str, READABLE_VERSIONS))}"
            )
        algorithm = _check_guard(doc, text, where) if version >= 2 else "sha256"
        return cls._build(doc, None, version, algorithm, where)

    @classmethod
    def _build(cls, doc: dict[str, Any], tensors: list[TensorRecord] | None, version: int,
               algorithm: str, where: str) -> Manifest:
        """The manifest of a checked document (``tensors``: its records, when already
        converted one by one)."""
        try:
            missing = [k for k in _REQUIRED if k not in doc]
            if missing:
                raise ArtifactError(f"{where}: required field {missing[0]!r} is missing")
            if tensors is None:
                if len(doc["tensors"]) > _common.TENSOR_COUNT_LIMIT:
                    raise ArtifactError(f"{where}: {_too_many()}")
                tensors = [TensorRecord.from_json(t, where, version) for t in doc["tensors"]]
            m = cls(
                source=dict(doc["source"]),
                tensors=tensors,
                files={str(k): dict(v) for k, v in doc["files"].items()},
                shards=list(doc["shards"]),
                index=doc["index"],
                qtool_version=str(doc["qtool_version"]),
                format_version=version,
                digest=algorithm,
            )
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise ArtifactError(f"{where}: missing or malformed field {str(e):.100}") from None
        m._check_consistent(where)
        return m

    def _check_consistent(self, where: str) -> None:
        """What dequantize relies on: plain file names (nothing outside the artifact is ever
        opened), unique names, known shards, one shard unless indexed."""
        if not all(isinstance(s, str) for s in self.shards) or \
                len(set(self.shards)) != len(self.shards):
            raise ArtifactError(f"{where}: shards must be distinct file names")
        if self.index is not None and not isinstance(self.index, str):
            raise ArtifactError(f"{where}: index must be a file name or null")
        for name in [*self.files, *self.shards, *([self.index] if self.index else [])]:
            if not is_plain_name(name):
                raise ArtifactError(f"{where}: file name {name!r:.80} is not a plain name")
        for name, info in self.files.items():
            if set(info) != {"size", self.digest} or type(info["size"]) is not int or \
                    info["size"] < 0 or not _is_hex(info[self.digest], self.digest):
                raise ArtifactError(f"{where}: file {name!r:.80} needs exactly a size and a "
                                    f"{self.digest} digest, not {info!r:.80}")
        if self.index is None and len(self.shards) != 1:
            raise ArtifactError(
                f"{where}: {len(self.shards)} shards but no index (a single-file artifact "
                "has exactly one)"
            )
        seen: set[str] = set()
        for t in self.tensors:
            if t.name in seen:
                raise ArtifactError(f"{where}: tensor {t.name!r:.80} is listed twice")
            seen.add(t.name)
            if t.file not in self.shards:
                raise ArtifactError(
                    f"{where}: tensor {t.name!r:.80} is in {t.file!r:.80}, which is not one of "
                    "the shards"
                )


_REQUIRED = ("qtool_version", "source", "shards", "index", "files", "tensors")


def _check_guard(doc: dict[str, Any], text: str, where: str) -> str:
    """The manifest's guard (format_version 2): its algorithm is known, its manifest_digest is
    the digest of its canonical content, and the file is exactly as qtool writes it. Returns
    the algorithm."""
    algorithm = doc.get("digest")
    if algorithm not in _digest.ALGORITHMS:
        raise ArtifactError(f"{where}: unknown or missing digest algorithm {algorithm!r:.40} "
                            f"(known: {', '.join(_digest.ALGORITHMS)})")
    want = doc.get("manifest_digest")
    if not _is_hex(want, algorithm):
        raise ArtifactError(f"{where}: manifest_digest is missing or not a {algorithm} digest")
    got = canonical_digest(doc, algorithm)
    if got != want:
        raise ArtifactError(f"{where}: the manifest was changed after it was written (its "
                            f"content does not match its manifest_digest)")
    if _serialize(doc) != text:
        raise ArtifactError(f"{where}: the manifest was changed after it was written (same "
                            "content, different bytes than qtool writes)")
    return algorithm
