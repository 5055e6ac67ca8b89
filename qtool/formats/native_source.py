"""The native artifact as a source: each stored tensor straight from the memory map of its
shard, with its scale and zero point read from the sidecars.

Scales are handed out as stored (float32, float16, or bfloat16; the core widens them with
``scales.scale_to_float32``); zero points one per range unit, or the one 0-d value of the
symmetric schemes (format_version 2 unpacks them here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from qtool.core.double_quant import scales_of_codes
from qtool.core.scales import scale_to_float32
from qtool.core.shapes import rows_cols, zero_point_from_stored
from qtool.formats._common import _dup_key, _Obj, _parse_json
from qtool.formats.manifest import (
    SOURCE_METADATA_KEY,
    ArtifactError,
    Manifest,
    TensorRecord,
)
from qtool.formats.native import Artifact
from qtool.formats.registry import InTensor


class NativeShard:
    """The three files of one shard, open for reading."""

    def __init__(self, art: Artifact, shard: str) -> None:
        # The files the artifact's check validated, when it kept them: each header is parsed
        # once a run (with very many tensors a second parse doubled the per-tensor state).
        self.main, self.scale, self.zero_point, self.row_scale = art.take_shard(shard)
        try:
            self.metadata = source_metadata(self.main.metadata, art.manifest.format_version,
                                            str(self.main.path))
        except BaseException:
            self.close()
            raise

    def read(self, record: TensorRecord) -> InTensor:
        info = self.main[record.name]
        main = self.main
        if record.spec is None:
            return InTensor(record, lambda a, b: main.view(info, a, b), None, None, main, info)
        rows, _ = rows_cols(record.shape)
        width = info.numel // rows if rows else 0

        def rows_of(a: int, b: int) -> np.ndarray:
            return main.view(info, a * width, b * width).reshape(b - a, width)

        zero = self.zero_point.read(record.name)
        if record.format_version >= 2:
            zero = zero_point_from_stored(zero, record.shape, record.spec)
        scale = self.scale.read(record.name)
        where = self.scale.path
        if record.spec.scale_bits is not None:
            # U8 codes x the row's F32 scale, multiplied in float32: the scales quantize used;
            # from here on the tensor reads like one with float32 scales.
            assert self.row_scale is not None
            rows_s = self.row_scale.read(record.name)
            if not _positive(rows_s):
                where = self.row_scale.path
            scale = scales_of_codes(scale, rows_s)
        # Every reader (dequantize, export, report --original/--against) gets scales that
        # are finite and > 0, as verify requires: a tampered sidecar whose digests were
        # updated (a zero or negative row scale, a zero code, a product beyond float32)
        # would otherwise be restored or exported as zeros or sign-flipped weights.
        widened = scale_to_float32(scale, record.spec.scale_dtype)
        if not _positive(widened):
            bad = widened.size - int(np.count_nonzero(np.isfinite(widened) & (widened > 0)))
            raise ArtifactError(
                f"{where}: tensor {record.name!r}: {bad} of {widened.size} scales are not "
                "finite and > 0; the artifact is corrupt (qtool verify lists its problems)")
        return InTensor(record, rows_of, scale, zero, main, info)

    def close(self) -> None:
        for f in (self.main, self.scale, self.zero_point, self.row_scale):
            if f is not None:
                f.close()

    def __enter__(self) -> NativeShard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _positive(a: np.ndarray) -> bool:
    """Whether every value of a float array is finite and > 0 (NaN fails both)."""
    return bool(np.all(a > 0)) and bool(np.isfinite(a.max(initial=0.0)))


def source_metadata(metadata: dict[str, str] | None, version: int,
                    where: str) -> dict[str, str] | None:
    """The source checkpoint's __metadata__, from the artifact's main file: kept as JSON
    under SOURCE_METADATA_KEY since format_version 2 (the file itself is marked as qtool's),
    the file's own metadata before."""
    if version < 2 or metadata is None or SOURCE_METADATA_KEY not in metadata:
        return metadata
    # Parsed as strictly as the header it comes from: no NaN/Infinity, no lone surrogate
    # (it is written back as UTF-8 into the restored file), no duplicate key, any nesting.
    doc: Any = False
    try:
        pairs = _parse_json(metadata[SOURCE_METADATA_KEY])
        if pairs is None or (isinstance(pairs, _Obj) and _dup_key(pairs) is None):
            doc = None if pairs is None else dict(pairs)
    except ValueError:  # also a lone surrogate, and nesting too deep
        pass
    if doc is not None and not (isinstance(doc, dict) and
                                all(isinstance(v, str) for v in doc.values())):
        raise ArtifactError(f"{where}: {SOURCE_METADATA_KEY} in __metadata__ is not a JSON "
                            "object of strings, nor null")
    return doc


class NativeSource:
    """An opened (and cheaply checked) qtool artifact."""

    def __init__(self, art: Artifact) -> None:
        self.art = art
        self.root: Path = art.root
        self.manifest: Manifest = art.manifest

    @classmethod
    def open(cls, root: Path) -> NativeSource:
        art = Artifact.load(root)
        art.check(defer=True)
        return cls(art)

    def open_shard(self, shard: str) -> NativeShard:
        """The shard's reader: the first shard's files are those opened and checked with the
        source; each later shard's are checked now (its tensors against the manifest)."""
        return NativeShard(self.art, shard)

    def index(self) -> tuple[dict[str, Any], dict[str, str]] | None:
        return self.art.read_index() if self.manifest.index is not None else None

    def verify_files(self) -> None:
        """Every file's size and digest against the manifest (ArtifactError otherwise)."""
        self.art.verify_files()
