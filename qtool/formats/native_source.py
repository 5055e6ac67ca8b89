"""The native artifact as a source: each stored tensor straight from the memory map of its
shard, with its scale and zero point read from the sidecars."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from qtool.core.shapes import rows_cols
from qtool.formats.manifest import Manifest, TensorRecord, sidecar_names
from qtool.formats.native import Artifact
from qtool.formats.registry import InTensor


class NativeShard:
    """The three files of one shard, open for reading."""

    def __init__(self, art: Artifact, shard: str) -> None:
        scale_name, zp_name = sidecar_names(shard)
        self.main = art.open_file(shard)
        try:
            self.scale = art.open_file(scale_name)
            self.zero_point = art.open_file(zp_name)
        except BaseException:
            self.main.close()
            raise
        self.metadata = self.main.metadata

    def read(self, record: TensorRecord) -> InTensor:
        info = self.main[record.name]
        main = self.main
        if record.spec is None:
            return InTensor(record, lambda a, b: main.view(info, a, b), None, None, main, info)
        rows, _ = rows_cols(record.shape)
        width = info.numel // rows if rows else 0

        def rows_of(a: int, b: int) -> np.ndarray:
            return main.view(info, a * width, b * width).reshape(b - a, width)

        return InTensor(record, rows_of, self.scale.read(record.name),
                        self.zero_point.read(record.name), main, info)

    def close(self) -> None:
        for f in (self.main, self.scale, self.zero_point):
            f.close()

    def __enter__(self) -> NativeShard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NativeSource:
    """An opened (and cheaply checked) qtool artifact."""

    def __init__(self, art: Artifact) -> None:
        self.art = art
        self.root: Path = art.root
        self.manifest: Manifest = art.manifest

    @classmethod
    def open(cls, root: Path) -> NativeSource:
        return cls(Artifact.open(root))

    def open_shard(self, shard: str) -> NativeShard:
        return NativeShard(self.art, shard)

    def index(self) -> tuple[dict[str, Any], dict[str, str]] | None:
        return self.art.read_index() if self.manifest.index is not None else None

    def verify_files(self) -> None:
        """Every file's size and digest against the manifest (ArtifactError otherwise)."""
        self.art.verify_files()
