"""Shared fixtures: small real checkpoints written with the safetensors library."""

from __future__ import annotations

import json
import os
import struct
import traceback
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, settings
from safetensors.numpy import save_file

from qtool.cli import cli

# Health checks judge the test data generation (too slow on a loaded 2-core machine), not
# qtool. In CI (CI=true) examples are derandomized: every run checks the same examples, so a
# red build always points at a change, never at a lucky draw; local runs keep exploring.
settings.register_profile("qtool", suppress_health_check=[HealthCheck.too_slow,
                                                          HealthCheck.data_too_large])
settings.register_profile("ci", parent=settings.get_profile("qtool"), derandomize=True,
                          database=None)
settings.load_profile("ci" if os.environ.get("CI") else "qtool")

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample_weights" / "sample.safetensors"


def raw_file(header: object, data: bytes = b"", *, pad: bool = True,
             length: int | None = None) -> bytes:
    """safetensors bytes with full control: the header (a JSON-able object, str or bytes),
    its space padding to 8 bytes, and the 8-byte length prefix (default: the header's)."""
    if isinstance(header, bytes):
        blob = header
    elif isinstance(header, str):
        blob = header.encode()
    else:
        blob = json.dumps(header).encode()
    if pad:
        blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob) if length is None else length) + blob + data


def make_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "layers.0.attn.q.weight": rng.normal(0, 0.05, (32, 48)).astype(np.float32),
        "layers.0.attn.q.bias": rng.normal(0, 0.01, (32,)).astype(np.float32),
        "layers.0.mlp.up.weight": rng.normal(0, 0.05, (64, 32)).astype(ml_dtypes.bfloat16),
        "layers.0.mlp.down.weight": rng.normal(0, 0.05, (32, 64)).astype(np.float16),
        "layers.0.conv.weight": rng.normal(0, 0.1, (8, 4, 3, 3)).astype(np.float32),
        "layers.0.norm.weight": np.ones(32, np.float32),
        "layers.0.scalar": np.array(0.5, np.float32),
        "buffer.ids": np.arange(10, dtype=np.int64).reshape(2, 5),
        "zeros.weight": np.zeros((4, 4), np.float32),
        "head.weight64": rng.normal(0, 0.05, (16, 8)),
    }


def write_checkpoint(path: Path, tensors: dict[str, np.ndarray] | None = None,
                     metadata: dict[str, str] | None = None) -> Path:
    save_file(tensors if tensors is not None else make_tensors(), str(path),
              metadata=metadata if metadata is not None else {"format": "pt", "who": "test"})
    return path


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return write_checkpoint(tmp_path / "model.safetensors")


def header(path: Path) -> dict:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n))


def tensor_order(path: Path) -> list[str]:
    h = header(path)
    h.pop("__metadata__", None)
    return [k for k, _ in sorted(h.items(), key=lambda kv: kv[1]["data_offsets"][0])]


def run(*args: str | Path, expect: int | None = 0) -> Result:
    """Run the CLI in-process as a user would; the exit code is checked with the output
    shown in the failure message."""
    runner = CliRunner()
    result = runner.invoke(cli, [str(a) for a in args], catch_exceptions=True)
    if expect is not None:
        tb = "".join(traceback.format_exception(*result.exc_info)) if result.exc_info else ""
        assert result.exit_code == expect, (
            f"exit {result.exit_code}, expected {expect}\nstdout:\n{result.stdout}\n"
            f"stderr:\n{result.stderr}\n{tb}"
        )
    return result
