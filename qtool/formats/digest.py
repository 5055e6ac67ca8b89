"""File digests. Artifacts of format_version 2 record BLAKE3 (the `blake3` package: several
GB/s, and several threads when a whole file is hashed); format_version 1 recorded SHA-256,
which stays readable. The manifest names the algorithm; readers check whichever it names."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Protocol

import blake3

DEFAULT = "blake3"
ALGORITHMS = ("blake3", "sha256")
HEX_LENGTH = {"blake3": 64, "sha256": 64}

# Whole files (verify, --source-digest) are hashed with blake3's own threads: on these machines
# 3.1 GB/s on one thread, 5.3 on two. Writers hash on their one thread, behind the compute.
_FILE_THREADS = blake3.blake3.AUTO


class Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> object: ...
    def hexdigest(self) -> str: ...


def new(algorithm: str = DEFAULT) -> Hasher:
    """An incremental hasher (one thread)."""
    if algorithm == "blake3":
        return blake3.blake3()
    if algorithm == "sha256":
        return hashlib.sha256()
    raise ValueError(f"unknown digest algorithm {algorithm!r:.40}")


def of_bytes(data: bytes, algorithm: str = DEFAULT) -> str:
    h = new(algorithm)
    h.update(data)
    return h.hexdigest()


def of_file(path: str | Path, algorithm: str = DEFAULT) -> str:
    """Hex digest of a whole file. OSError if it cannot be read."""
    if algorithm == "blake3":
        h = blake3.blake3(max_threads=_FILE_THREADS)
        if os.path.getsize(path) == 0:  # an empty file cannot be memory-mapped
            return h.hexdigest()
        h.update_mmap(path)
        return h.hexdigest()
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown digest algorithm {algorithm!r:.40}")
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()
