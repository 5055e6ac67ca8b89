"""The seam between the pipeline and the layouts on disk: sinks, sources, and one table of them.

A **sink** takes quantized tensors and writes them in one layout; a **source** yields stored
tensors of one layout for dequantizing and reporting. The pipeline never knows file names or
sidecar dtypes: it plans, quantizes, and hands each tensor to the sink. A new layout is one
module in ``qtool/formats/`` plus one entry in :data:`SINKS` or :data:`SOURCES`.

The protocols are deliberately small (compare compressed-tensors' compressors):

* Sink: ``open(shard, metadata, tensors)`` starts one output shard, ``write(tensor)`` writes
  one tensor (its stored chunks are streamed), ``finish(...)`` completes everything, and
  ``abort()`` drops whatever was written.
* Source: ``open_shard(shard)`` gives a reader of one shard whose ``read(record)`` returns one
  stored tensor; the source's ``manifest`` describes every tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from qtool.core.metrics import ErrorStats
from qtool.core.schemes import QuantSpec
from qtool.formats._common import TensorInfo

if TYPE_CHECKING:
    from qtool.formats.manifest import Manifest, TensorRecord
    from qtool.formats.safetensors import SafetensorsFile

Chunk = tuple[np.ndarray, Callable[[], object] | None]
"""A piece of a tensor's stored bytes, in order, and the callback that releases its buffer
once it is written (None: nothing to release)."""


@dataclass
class OutTensor:
    """One tensor on its way to a sink.

    ``chunks`` yields the stored data in order: the integers (bit-packed below 8 bits) of a
    quantized tensor, or the source bytes of a tensor kept as it is (``spec`` None). The
    parameters (``scale``, ``zero_point``) and the error statistics are known only once
    every chunk has been produced: the producer fills them in as ``chunks`` ends.
    """

    info: TensorInfo
    spec: QuantSpec | None
    chunks: Iterator[Chunk]
    scale: np.ndarray | None = None
    zero_point: np.ndarray | None = None
    stats: ErrorStats = field(default_factory=ErrorStats)
    row_scale: np.ndarray | None = None  # float32 (rows,) with spec.scale_bits 8


@dataclass(frozen=True)
class PlannedTensor:
    """What a sink learns about a tensor before any data: enough to lay out its files."""

    info: TensorInfo
    spec: QuantSpec | None


class Sink(Protocol):
    """Writes quantized tensors in one layout into a staging directory (see module doc)."""

    def open(self, shard: Path, metadata: dict[str, str] | None,
             tensors: Sequence[PlannedTensor]) -> None: ...

    def write(self, tensor: OutTensor) -> int:
        """Write one tensor (consuming its chunks); returns the bytes it occupies on disk
        (integers plus parameters, or the bytes of a tensor kept as it is)."""
        ...

    def finish(self, records: list[TensorRecord], source: dict[str, Any],
               index_metadata: dict | None) -> None: ...

    def abort(self) -> None: ...


@dataclass
class InTensor:
    """One stored tensor from a source: ``rows(a, b)`` gives rows [a, b) as stored (the
    integers, bit-packed below 8 bits, as (b - a, width); or the kept tensor's values as a
    flat run). ``scale``/``zero_point`` are None for a tensor kept as it is."""

    record: TensorRecord
    rows: Callable[[int, int], np.ndarray]
    scale: np.ndarray | None
    zero_point: np.ndarray | None
    file: SafetensorsFile
    info: TensorInfo


class ShardReader(Protocol):
    metadata: dict[str, str] | None

    def read(self, record: TensorRecord) -> InTensor: ...

    def close(self) -> None: ...


class Source(Protocol):
    """Yields stored tensors of one layout, shard by shard (see module doc)."""

    root: Path
    manifest: Manifest

    def open_shard(self, shard: str) -> ShardReader: ...

    def index(self) -> tuple[dict[str, Any], dict[str, str]] | None:
        """(metadata, weight_map) of the source's sharded index, or None if unsharded."""
        ...

    def verify_files(self) -> None:
        """Check every file against the digests the source records; raise if one differs."""
        ...


def _native_sink(root: Path) -> Sink:
    from qtool.formats.native_sink import NativeSink

    return NativeSink(root)


def _native_source(root: Path) -> Source:
    from qtool.formats.native_source import NativeSource

    return NativeSource.open(root)


def _ct_sink(root: Path) -> Sink:
    from qtool.formats.compressed_tensors_sink import CompressedTensorsSink

    return CompressedTensorsSink(root)


# The table of formats: name -> factory. The native artifact is both; compressed-tensors is a
# sink (`qtool export`); its folders are read by pipeline/foreign.py (`dequantize`, `report`).
SINKS: dict[str, Callable[[Path], Sink]] = {"qtool": _native_sink,
                                           "compressed-tensors": _ct_sink}
SOURCES: dict[str, Callable[[Path], Source]] = {"qtool": _native_source}
