"""The file names inside a qtool artifact: plain names (nothing outside the artifact can be
named) and the sidecars that belong to each shard."""

from __future__ import annotations

import os


def is_plain_name(name: object) -> bool:
    """A file name with no directory part, so that it cannot point outside the artifact."""
    return (isinstance(name, str) and os.sep not in name and "\0" not in name
            and not (os.altsep and os.altsep in name) and name not in ("", ".", ".."))


def stem_of(shard_name: str) -> str:
    return shard_name[: -len(".safetensors")] if shard_name.endswith(".safetensors") else shard_name


def sidecar_names(shard_name: str) -> tuple[str, str]:
    """(scale file, zero-point file) for a shard file name."""
    stem = stem_of(shard_name)
    return f"{stem}.scale.safetensors", f"{stem}.zero_point.safetensors"


def row_scale_name(shard_name: str) -> str:
    """The file of the per-row float32 scales of ``scale_bits`` 8 tensors (format_version 3);
    it exists only for a shard holding such a tensor."""
    return f"{stem_of(shard_name)}.row_scale.safetensors"
