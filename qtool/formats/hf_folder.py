"""Hugging Face model folders: which files are weights and which are the model's other files
(config, tokenizer, generation config, ...), which quantize records and export copies."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from qtool.formats import digest as _digest
from qtool.formats._common import CheckpointError, reject_constant
from qtool.formats.safeio import open_regular, read_capped

CONFIG = "config.json"
# Weight files in the layouts Hugging Face folders use: never copied into an export.
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json",
                   ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
MANIFEST_NAMES = ("qtool.json",)
CONFIG_SIZE_LIMIT = 10_000_000  # bytes; real configs are a few kB


def is_model_folder(root: Path) -> bool:
    return (root / CONFIG).is_file()


def other_files(root: Path) -> list[Path]:
    """The folder's files that are not weights, at any depth, hidden ones (``.git``,
    ``.cache``) left out; sorted."""
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        if p.name.endswith(WEIGHT_SUFFIXES) or p.name in MANIFEST_NAMES:
            continue
        out.append(p)
    return out


def describe(root: Path) -> dict[str, Any]:
    """What a manifest records of a model folder: its absolute path and each non-weight
    file's relative name, size and digest (the manifest's algorithm, BLAKE3), so that an export
    can tell it changed."""
    files = []
    for p in other_files(root):
        # Streamed, and through a non-blocking open of a regular file (a FIFO, or a symlink
        # to a device, must not hang or fill memory).
        h = file_digest(p, _digest.DEFAULT)
        files.append({"name": p.relative_to(root).as_posix(), "size": p.stat().st_size,
                      _digest.DEFAULT: h})
    return {"path": str(root.resolve()), "files": files}


def file_digest(p: Path, algorithm: str) -> str:
    """Digest of a model folder's file, streamed through a non-blocking open of a regular
    file (a FIFO, or a symlink to a device, must not hang or fill memory)."""
    hasher = _digest.new(algorithm)
    with os.fdopen(open_regular(p), "rb") as fh:
        while chunk := fh.read(1 << 22):
            hasher.update(chunk)
    return hasher.hexdigest()


def config_text(path: Path) -> str:
    """A config.json's text, capped and without blocking (CheckpointError otherwise)."""
    try:
        return read_capped(path, CONFIG_SIZE_LIMIT, CONFIG).decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 ({e.reason})") from None


def read_config(root: Path) -> dict[str, Any]:
    """config.json as a JSON object (CheckpointError naming the file otherwise)."""
    path = root / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{root}: no {CONFIG}; a Hugging Face model folder's {CONFIG} is "
                              "needed (pass --model-dir DIR)")
    text = config_text(path)
    try:
        doc = json.loads(text, parse_constant=reject_constant)
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return doc
