"""The on-disk artifact: file names, the qtool.json manifest, and loading with cheap checks.

See docs/FORMAT.md. For every input shard ``<stem>.safetensors`` the artifact directory holds
``<stem>.safetensors`` (integers and passthrough tensors), ``<stem>.scale.safetensors``
(float32 scales) and ``<stem>.zero_point.safetensors`` (int32 zero points), plus one
``qtool.json`` and, for a sharded input, an index named like the input's.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qtool import __version__
from qtool.io import CheckpointError, SafetensorsFile
from qtool.metrics import ErrorStats
from qtool.quant import param_shape, stored_shape
from qtool.schemes import QuantSpec, SpecError

FORMAT_VERSION = 1
MANIFEST = "qtool.json"


class ArtifactError(CheckpointError):
    """A qtool artifact that is missing, corrupt or inconsistent."""


def stem_of(shard_name: str) -> str:
    return shard_name[: -len(".safetensors")] if shard_name.endswith(".safetensors") else shard_name


def sidecar_names(shard_name: str) -> tuple[str, str]:
    """(scale file, zero-point file) for a shard file name."""
    stem = stem_of(shard_name)
    return f"{stem}.scale.safetensors", f"{stem}.zero_point.safetensors"


@dataclass
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

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "file": self.file, "dtype": self.dtype,
                             "shape": list(self.shape)}
        if self.spec is None:
            d["passthrough"] = self.passthrough
        else:
            d.update(self.spec.as_dict())
            d["quantized_dtype"] = self.quantized_dtype
            d["packed"] = self.spec.packed
            d["stored_shape"] = list(self.stored_shape)
            d["param_shape"] = list(self.param_shape)
            if self.stats is not None:
                d["metrics"] = self.stats.to_dict()
        d["bytes"] = {"original": self.original_bytes, "stored": self.stored_bytes}
        return d

    @classmethod
    def from_json(cls, d: Any, where: str) -> TensorRecord:
        try:
            name = d["name"]
            rec = cls(name=name, file=d["file"], dtype=d["dtype"],
                      shape=tuple(int(x) for x in d["shape"]))
            rec.original_bytes = int(d["bytes"]["original"])
            rec.stored_bytes = int(d["bytes"]["stored"])
            if "passthrough" in d:
                rec.passthrough = str(d["passthrough"])
                return rec
            spec_keys = ("scheme", "bits", "granularity", "group_size", "range", "percentile")
            rec.spec = QuantSpec(**{k: d[k] for k in spec_keys if k in d})
            if "metrics" in d:
                rec.stats = ErrorStats.from_dict(d["metrics"])
            return rec
        except (KeyError, TypeError, ValueError, SpecError) as e:
            raise ArtifactError(f"{where}: malformed tensor entry {d!r:.80}: {e}") from None


@dataclass
class Manifest:
    source: dict[str, Any]
    tensors: list[TensorRecord]
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    shards: list[str] = field(default_factory=list)  # main files, in order
    index: str | None = None  # the index file name, for sharded artifacts
    qtool_version: str = __version__
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        doc = {
            "format": "qtool",
            "format_version": self.format_version,
            "qtool_version": self.qtool_version,
            "source": self.source,
            "shards": self.shards,
            "index": self.index,
            "files": self.files,
            "tensors": [t.to_json() for t in self.tensors],
        }
        return json.dumps(doc, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> Manifest:
        try:
            doc = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            msg = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
            raise ArtifactError(f"{where}: not valid JSON ({msg})") from None
        if not isinstance(doc, dict) or doc.get("format") != "qtool":
            raise ArtifactError(f"{where}: not a qtool manifest")
        version = doc.get("format_version")
        if version != FORMAT_VERSION:
            raise ArtifactError(
                f"{where}: unknown format_version {version!r}; "
                f"this qtool ({__version__}) reads format_version {FORMAT_VERSION}"
            )
        try:
            tensors = [TensorRecord.from_json(t, where) for t in doc["tensors"]]
            return cls(
                source=dict(doc["source"]),
                tensors=tensors,
                files={str(k): dict(v) for k, v in doc["files"].items()},
                shards=[str(s) for s in doc["shards"]],
                index=doc.get("index"),
                qtool_version=str(doc.get("qtool_version", "?")),
            )
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise ArtifactError(f"{where}: missing or malformed field {e}") from None


@dataclass
class Artifact:
    """An opened artifact directory whose manifest parsed and whose cheap checks passed."""

    root: Path
    manifest: Manifest

    @classmethod
    def open(cls, root: str | Path) -> Artifact:
        root = Path(root)
        if not root.is_dir():
            raise ArtifactError(f"{root}: no such artifact directory")
        mpath = root / MANIFEST
        if not mpath.is_file():
            raise ArtifactError(f"{root}: not a qtool artifact (no {MANIFEST})")
        try:
            text = mpath.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ArtifactError(f"{mpath}: cannot read ({e})") from None
        art = cls(root, Manifest.from_json(text, str(mpath)))
        art.check()
        return art

    def path(self, name: str) -> Path:
        # Manifest names are plain file names; anything else could point outside the artifact.
        if os.sep in name or (os.altsep and os.altsep in name) or name in ("", ".", ".."):
            raise ArtifactError(f"{self.root / MANIFEST}: file name {name!r} is not a plain name")
        return self.root / name

    def check(self) -> None:
        """Cheap checks: every file present with its recorded size; every quantized tensor has
        its integers, scale and zero point with the shapes and dtypes the manifest gives."""
        for name, info in self.manifest.files.items():
            p = self.path(name)
            if not p.is_file():
                raise ArtifactError(f"{self.root}: missing file {name}")
            if "size" in info and p.stat().st_size != info["size"]:
                raise ArtifactError(
                    f"{p}: size {p.stat().st_size} differs from the manifest's {info['size']}"
                )
        by_file: dict[str, list[TensorRecord]] = {}
        for t in self.manifest.tensors:
            by_file.setdefault(t.file, []).append(t)
        for shard, records in by_file.items():
            scale_name, zp_name = sidecar_names(shard)
            with SafetensorsFile(self.path(shard)) as main, \
                    SafetensorsFile(self.path(scale_name)) as sc, \
                    SafetensorsFile(self.path(zp_name)) as zp:
                for t in records:
                    if t.name not in main:
                        raise ArtifactError(f"{main.path}: tensor {t.name!r} is missing")
                    info = main[t.name]
                    if t.quantized:
                        want = (t.quantized_dtype, t.stored_shape)
                    else:
                        want = (t.dtype, t.shape)
                    if (info.dtype, info.shape) != want:
                        raise ArtifactError(
                            f"{main.path}: tensor {t.name!r} is {info.dtype} {list(info.shape)}, "
                            f"the manifest says {want[0]} {list(want[1])}"
                        )
                    if not t.quantized:
                        continue
                    for side, dt in ((sc, "F32"), (zp, "I32")):
                        if t.name not in side:
                            raise ArtifactError(f"{side.path}: tensor {t.name!r} is missing")
                        si = side[t.name]
                        if (si.dtype, si.shape) != (dt, t.param_shape):
                            raise ArtifactError(
                                f"{side.path}: tensor {t.name!r} is {si.dtype} {list(si.shape)}, "
                                f"expected {dt} {list(t.param_shape)}"
                            )
