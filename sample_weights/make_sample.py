#!/usr/bin/env python3
"""Regenerate ``sample_weights/sample.safetensors``: a small, deterministic checkpoint.

A 2-layer, Llama-shaped toy model (hidden 128, MLP 512, vocab 512) with the edge cases a
quantizer must handle: outlier rows and values, an all-zero row, an all-zero tensor, 1-D
norms and biases, an int64 buffer, bf16 and fp16 tensors, and a non-negative tensor.

Usage:  .venv/bin/python sample_weights/make_sample.py [OUT_PATH]      (or: make sample)

Size (the file must stay under 2 MB to be committed): everything is as specified except
  * no ``lm_head.weight``: the output embedding is tied to ``model.embed_tokens.weight``
    (recorded as ``tie_word_embeddings`` in the metadata), which saves 256 KiB;
  * layer 1 is narrower: grouped-query attention with k/v_proj (64, 128) (the shape of
    ``k_proj.lora_delta``) and an MLP width of 256 instead of 512.
Layer 0 keeps the full shapes. The result is about 1.83 MB.

Determinism: one ``numpy.random.default_rng(SEED)`` draws every tensor in a fixed order.
safetensors orders tensors deterministically, but it writes ``__metadata__`` from a Rust
HashMap, so with more than one key the key order changes from run to run. The header is
therefore rewritten with sorted metadata keys (same length, same offsets), so that two
runs give byte-identical files.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

SEED = 20261128
HIDDEN = 128
MLP = 512  # layer 0
MLP_L1 = 256  # layer 1 (narrowed to keep the file under 2 MB)
KV_L1 = 64  # layer 1 k/v_proj output rows (grouped-query attention)
VOCAB = 512
MAX_POS = 256
MAX_BYTES = 2_000_000

DEFAULT_OUT = Path(__file__).resolve().parent / "sample.safetensors"

METADATA = {
    "format": "pt",
    "source": "qtool sample_weights/make_sample.py",
    "seed": str(SEED),
    "tie_word_embeddings": "true",
}


def _matrix(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """(rows, cols) weight, i.e. (out_features, in_features), std = 1/sqrt(fan_in)."""
    return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)


def _norm(rng: np.random.Generator, n: int) -> np.ndarray:
    return (1.0 + 0.05 * rng.standard_normal(n)).astype(np.float32)


def _bias(rng: np.random.Generator, n: int) -> np.ndarray:
    return (0.02 * rng.standard_normal(n)).astype(np.float32)


def build_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(SEED)
    t: dict[str, np.ndarray] = {}

    t["model.embed_tokens.weight"] = _matrix(rng, VOCAB, HIDDEN)

    # ---- layer 0: full-size, all float32 ----
    p = "model.layers.0."
    t[p + "input_layernorm.weight"] = _norm(rng, HIDDEN)
    for name in ("q", "k", "v", "o"):
        t[p + f"self_attn.{name}_proj.weight"] = _matrix(rng, HIDDEN, HIDDEN)
    t[p + "self_attn.q_proj.bias"] = _bias(rng, HIDDEN)
    t[p + "mlp.gate_proj.weight"] = _matrix(rng, MLP, HIDDEN)
    t[p + "mlp.up_proj.weight"] = _matrix(rng, MLP, HIDDEN)
    down = _matrix(rng, HIDDEN, MLP)
    down[[3, 77], :] *= 20.0  # outlier output channels
    t[p + "mlp.down_proj.weight"] = down
    # non-negative tensor (for symmetric-unsigned): |N(0,1)| * 0.1
    t[p + "mlp.act_scale"] = (np.abs(rng.standard_normal((HIDDEN, 32))) * 0.1).astype(np.float32)

    # ---- layer 1: narrower, mixed dtypes ----
    p = "model.layers.1."
    t[p + "input_layernorm.weight"] = _norm(rng, HIDDEN)
    t[p + "self_attn.q_proj.weight"] = _matrix(rng, HIDDEN, HIDDEN)
    t[p + "self_attn.k_proj.weight"] = _matrix(rng, KV_L1, HIDDEN)
    t[p + "self_attn.v_proj.weight"] = _matrix(rng, KV_L1, HIDDEN)
    o = _matrix(rng, HIDDEN, HIDDEN)
    o[17, 42] = 2.5  # isolated outlier values (typical |w| here is ~0.09)
    o[93, 5] = -2.5
    t[p + "self_attn.o_proj.weight"] = o
    t[p + "self_attn.q_proj.bias"] = _bias(rng, HIDDEN)
    t[p + "self_attn.k_proj.lora_delta"] = np.zeros((KV_L1, HIDDEN), dtype=np.float32)
    t[p + "mlp.gate_proj.weight"] = _matrix(rng, MLP_L1, HIDDEN).astype(ml_dtypes.bfloat16)
    up = _matrix(rng, MLP_L1, HIDDEN)
    up[5, :] = 0.0  # an all-zero row
    t[p + "mlp.up_proj.weight"] = up
    t[p + "mlp.down_proj.weight"] = _matrix(rng, HIDDEN, MLP_L1).astype(np.float16)

    t["model.norm.weight"] = _norm(rng, HIDDEN)
    t["model.rotary_emb.position_ids"] = np.arange(MAX_POS, dtype=np.int64).reshape(1, MAX_POS)
    return t


def _canonicalize_header(path: Path) -> None:
    """Rewrite the JSON header with ``__metadata__`` first and its keys sorted.

    Only key order changes, so the header keeps its length and every data offset.
    """
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        raw = f.read(n)
        header = json.loads(raw)
        meta = header.pop("__metadata__", None)
        out = {}
        if meta is not None:
            out["__metadata__"] = dict(sorted(meta.items()))
        out.update(header)  # tensor entries keep safetensors' (deterministic) order
        new = json.dumps(out, separators=(",", ":")).encode("utf-8")
        if len(new) != len(raw.rstrip(b" ")):
            raise RuntimeError("canonical header length differs from the original")
        f.seek(8)
        f.write(new.ljust(n, b" "))


def _verify(path: Path, tensors: dict[str, np.ndarray]) -> None:
    with safe_open(str(path), framework="numpy") as f:
        if f.metadata() != METADATA:
            raise RuntimeError(f"metadata mismatch: {f.metadata()!r}")
        if set(f.keys()) != set(tensors):
            raise RuntimeError("tensor names differ after re-reading")
        for name, want in tensors.items():
            got = f.get_tensor(name)
            if got.dtype != want.dtype or got.shape != want.shape:
                raise RuntimeError(f"{name}: {got.dtype}{got.shape} != {want.dtype}{want.shape}")
            if got.tobytes() != want.tobytes():
                raise RuntimeError(f"{name}: data differs after re-reading")


def main(argv: list[str]) -> int:
    out = Path(argv[1]) if len(argv) > 1 else DEFAULT_OUT
    tensors = build_tensors()

    # Write next to the target, then rename, so readers never see a half-written file.
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=METADATA)
        _canonicalize_header(tmp)
        _verify(tmp, tensors)
        os.chmod(tmp, 0o644)  # safetensors creates the file 0600
        size = tmp.stat().st_size
        if size >= MAX_BYTES:
            raise RuntimeError(f"{size} bytes: over the {MAX_BYTES}-byte limit")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()

    for name, arr in tensors.items():
        print(f"{name:45s} {str(arr.dtype):9s} {arr.shape}")
    print(f"wrote {out} ({size} bytes, {len(tensors)} tensors)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
