"""Hugging Face model folders: which files are weights and which are the model's other files
(config, tokenizer, generation config, ...), which quantize records and export copies."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qtool.formats import digest as _digest
from qtool.formats._common import CheckpointError

CONFIG = "config.json"
# Weight files in the layouts Hugging Face folders use: never copied into an export.
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json",
                   ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
MANIFEST_NAMES = ("qtool.json",)


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
        h = _digest.of_bytes(p.read_bytes(), _digest.DEFAULT)
        files.append({"name": p.relative_to(root).as_posix(), "size": p.stat().st_size,
                      _digest.DEFAULT: h})
    return {"path": str(root.resolve()), "files": files}


def read_config(root: Path) -> dict[str, Any]:
    """config.json as a JSON object (CheckpointError naming the file otherwise)."""
    path = root / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{root}: no {CONFIG}; a Hugging Face model folder's {CONFIG} is "
                              "needed (pass --model-dir DIR)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return doc
