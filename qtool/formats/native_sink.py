"""The native artifact as a sink: per input shard, ``<stem>.safetensors`` (integers and kept
tensors), ``<stem>.scale.safetensors`` and ``<stem>.zero_point.safetensors``; at the end the
index (for a sharded input) and ``qtool.json`` (docs/FORMAT.md, format_version 2: scales in
the spec's scale_dtype, zero points U8 of zero_point_shape, files marked as qtool's)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qtool.core.double_quant import codes_of
from qtool.core.scales import SCALE_CODES, scale_to_stored
from qtool.core.shapes import (
    param_shape,
    row_scale_shape,
    stored_shape,
    zero_point_shape,
    zero_point_to_stored,
)
from qtool.formats import digest as _digest
from qtool.formats.manifest import (
    FORMAT_VERSION,
    MANIFEST,
    SCALE_BITS_VERSION,
    SOURCE_METADATA_KEY,
    Manifest,
    TensorRecord,
    row_scale_name,
    sidecar_names,
)
from qtool.formats.registry import OutTensor, PlannedTensor
from qtool.formats.writer import SafetensorsWriter

ZERO_POINT_CODE = "U8"
# Every safetensors file of the artifact says it is qtool's: model loaders check "format"
# ("pt", "tf", "flax", "np") and refuse another value, instead of loading integers as weights.
MARK = {"format": "qtool"}


def marked_metadata(source: dict[str, str] | None) -> dict[str, str]:
    """The main file's __metadata__: the mark, and the source's metadata (JSON, "null" when
    the source had none) for dequantize to restore."""
    return {**MARK, SOURCE_METADATA_KEY: json.dumps(source, sort_keys=True)}


def quantized_code(t: PlannedTensor) -> str:
    """dtype code of the stored integers: U8 bytes when packed, else the scheme's int type."""
    assert t.spec is not None
    if t.spec.packed:
        return "U8"
    return "I8" if t.spec.signed else "U8"


class NativeSink:
    """Writes the qtool artifact into ``root`` (a staging directory)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files: dict[str, dict[str, object]] = {}
        self.shards: list[str] = []
        self._writers: tuple[SafetensorsWriter, ...] = ()
        self._names: tuple[str, ...] = ()

    def open(self, shard: Path, metadata: dict[str, str] | None,
             tensors: Sequence[PlannedTensor]) -> None:
        self._close_shard()
        name = shard.name
        scale_name, zp_name = sidecar_names(name)
        # Each writer's entries are generated from ``tensors`` as the writer reads them: no
        # list of (name, code, shape) per tensor per file (with 200,000 tensors, lists of
        # them and of ``tensors`` itself were the peak of a quantize run).
        coded = any(t.spec is not None and t.spec.scale_bits is not None for t in tensors)
        # The main file is the large one: a thread writes and hashes it behind the compute.
        self._writers = (
            SafetensorsWriter(self.root / name, _main_entries(tensors),
                              marked_metadata(metadata), background=True),
            SafetensorsWriter(self.root / scale_name, _scale_entries(tensors), MARK),
            SafetensorsWriter(self.root / zp_name, _zero_point_entries(tensors), MARK),
        )
        self._names = (name, scale_name, zp_name)
        if coded:  # only a shard with a scale_bits tensor has the row-scale file
            self._writers += (SafetensorsWriter(self.root / row_scale_name(name),
                                                _row_scale_entries(tensors), MARK),)
            self._names += (row_scale_name(name),)
        self.shards.append(name)

    def write(self, tensor: OutTensor) -> int:
        main_w, scale_w, zp_w = self._writers[:3]
        name = tensor.info.name
        pieces = 0
        for arr, release in tensor.chunks:
            pieces += 1
            main_w.write_chunk(name, arr, release=release)
        if not pieces:  # an empty tensor: its header entry still needs its (empty) data
            main_w.write(name, b"")
        if tensor.spec is None:
            return tensor.info.nbytes
        assert tensor.scale is not None and tensor.zero_point is not None
        spec, shape = tensor.spec, tensor.info.shape
        row = b""
        if spec.scale_bits is not None:
            # The quantizer used code x row scale (float32): the codes come back exactly.
            assert tensor.row_scale is not None
            scale = codes_of(tensor.scale.reshape(len(tensor.row_scale), -1), tensor.row_scale)
            row = np.ascontiguousarray(tensor.row_scale, np.float32).view(np.uint8)
            self._writers[3].write(name, row)
        else:
            # bfloat16 scales are uint16 bit patterns: written as their raw bytes.
            scale = scale_to_stored(tensor.scale, spec.scale_dtype).view(np.uint8)
        zero = zero_point_to_stored(tensor.zero_point, shape, spec)
        scale_w.write(name, scale)
        zp_w.write(name, zero)
        stored = math.prod(stored_shape(shape, spec))  # one byte per item
        return stored + scale.nbytes + zero.nbytes + len(row)

    def _close_shard(self) -> None:
        for w, fname in zip(self._writers, self._names, strict=True):
            w.close()
            self.files[fname] = {"size": w.size, w.algorithm: w.digest}
        self._writers, self._names = (), ()

    def finish(self, records: list[TensorRecord], source: dict[str, Any],
               index_metadata: dict | None) -> None:
        self._close_shard()
        index_name = source.get("index")
        if index_name is not None:
            self.files[index_name] = _write_index(self.root / index_name, records,
                                                  index_metadata)
        coded = any(r.spec is not None and r.spec.scale_bits is not None for r in records)
        manifest = Manifest(source=source, tensors=records, files=self.files,
                            shards=self.shards, index=index_name,
                            format_version=SCALE_BITS_VERSION if coded else FORMAT_VERSION)
        with open(self.root / MANIFEST, "w", encoding="utf-8") as f:
            manifest.write(f)  # record by record: never the whole text of 200,000 records

    def abort(self) -> None:
        for w in self._writers:
            w.abort()
        self._writers, self._names = (), ()


Entry = tuple[str, str, tuple[int, ...]]


def _main_entries(tensors: Iterable[PlannedTensor]) -> Iterator[Entry]:
    for t in tensors:
        if t.spec is None:
            yield t.info.name, t.info.dtype, t.info.shape
        else:
            yield t.info.name, quantized_code(t), stored_shape(t.info.shape, t.spec)


def _scale_entries(tensors: Iterable[PlannedTensor]) -> Iterator[Entry]:
    for t in tensors:
        if t.spec is not None:
            coded = t.spec.scale_bits is not None  # U8 codes (their row scales F32)
            yield (t.info.name, "U8" if coded else SCALE_CODES[t.spec.scale_dtype],
                   param_shape(t.info.shape, t.spec))


def _zero_point_entries(tensors: Iterable[PlannedTensor]) -> Iterator[Entry]:
    for t in tensors:
        if t.spec is not None:
            yield t.info.name, ZERO_POINT_CODE, zero_point_shape(t.info.shape, t.spec)


def _row_scale_entries(tensors: Iterable[PlannedTensor]) -> Iterator[Entry]:
    for t in tensors:
        if t.spec is not None and t.spec.scale_bits is not None:
            yield t.info.name, "F32", row_scale_shape(t.info.shape)


def _write_index(path: Path, records: list[TensorRecord], metadata: dict | None) -> dict:
    """Write the output index (the input's layout, plus where each tensor's sidecars live):
    the bytes of ``json.dumps(doc, indent=2) + "\\n"`` written map by map, entry by entry, so
    that neither the maps of every tensor nor the whole text is held (with 200,000 tensors
    they were the peak of a sharded quantize). Returns its files entry (size and digest)."""
    maps: list[tuple[str, Callable[[TensorRecord], str | None]]] = [
        ("weight_map", lambda r: r.file),
        ("scale_map", lambda r: sidecar_names(r.file)[0] if r.quantized else None),
        ("zero_point_map", lambda r: sidecar_names(r.file)[1] if r.quantized else None),
    ]
    if any(r.spec is not None and r.spec.scale_bits is not None for r in records):
        # format_version 3: where the row scales of scale_bits tensors live
        maps.append(("row_scale_map", lambda r: row_scale_name(r.file)
                     if r.spec is not None and r.spec.scale_bits is not None else None))
    hasher = _digest.new(_digest.DEFAULT)
    size = 0
    with open(path, "wb") as f:
        def put(text: str) -> None:
            nonlocal size
            data = text.encode()
            f.write(data)
            hasher.update(data)
            size += len(data)

        # Inside the top-level object every line is two spaces deeper (JSON strings never
        # hold a raw newline, so only line breaks are replaced).
        put('{\n  "metadata": ' + json.dumps(metadata or {}, indent=2).replace("\n", "\n  "))
        for key, where in maps:
            put(f",\n  {json.dumps(key)}: ")
            first = True
            for r in records:
                value = where(r)
                if value is None:
                    continue
                put(("{\n    " if first else ",\n    ")
                    + f"{json.dumps(r.name)}: {json.dumps(value)}")
                first = False
            put("{}" if first else "\n  }")
        put("\n}\n")
    return {"size": size, _digest.DEFAULT: hasher.hexdigest()}
