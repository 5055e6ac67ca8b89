"""`qtool report QUANTIZED --against ORIGINAL`: any quantized checkpoint qtool reads (its own
artifact, or a compressed-tensors folder) measured against the original float checkpoint.

Each quantized tensor is dequantized as its own reader does (qtool's ``scale * (q - zp)``,
the library's decompression for compressed-tensors) and compared with the original tensor of
the same name: MSE, SQNR, max error and cosine (ErrorStats), with the bytes it really
occupies. Unlike ``--original``, the original is matched by tensor names and shapes, not by
digests: it may come from anywhere.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np

from qtool.core.metrics import ErrorStats
from qtool.core.quant import dequantize
from qtool.core.shapes import compute_dtype, rows_cols
from qtool.formats._common import CheckpointError, TensorInfo
from qtool.formats.compressed_tensors_sink import native_params, scale_as_float32
from qtool.formats.manifest import MANIFEST, TensorRecord
from qtool.formats.registry import SOURCES
from qtool.formats.safetensors import SafetensorsFile
from qtool.formats.shards import open_checkpoint
from qtool.pipeline.foreign import CTFolder, Module, is_ct_folder, widen
from qtool.pipeline.measure import _stats_by_blocks
from qtool.pipeline.plan import TensorResult


class Original:
    """The original checkpoint's tensors by name, read on demand."""

    def __init__(self, path: Path) -> None:
        self.path = path
        ckpt = open_checkpoint(path)
        self.files = [SafetensorsFile(p) for p in ckpt.shards]
        self.by_name: dict[str, tuple[SafetensorsFile, TensorInfo]] = {}
        for f in self.files:
            for info in f.tensors:
                self.by_name[info.name] = (f, info)

    def read(self, name: str, shape: tuple[int, ...], where: Path) -> np.ndarray:
        if name not in self.by_name:
            raise CheckpointError(f"{self.path}: has no tensor {name!r}, which {where} holds")
        f, info = self.by_name[name]
        if tuple(info.shape) != tuple(shape):
            raise CheckpointError(f"{f.path}: tensor {name!r} has shape {list(info.shape)}; "
                                  f"{where} holds it as {list(shape)}")
        w = f.read(info)
        if not np.issubdtype(w.dtype, np.floating) and info.dtype != "BF16":
            raise CheckpointError(f"{f.path}: tensor {name!r} is {info.dtype}, not a float")
        return widen(w, info.dtype)

    def info(self, name: str) -> TensorInfo | None:
        return self.by_name[name][1] if name in self.by_name else None

    def close(self) -> None:
        for f in self.files:
            f.close()


def _checked(stats: ErrorStats, name: str, where: Path) -> ErrorStats:
    if not math.isfinite(stats.signal_sq):
        raise CheckpointError(f"{where}: tensor {name!r} has NaN/inf values")
    if not all(math.isfinite(v) for v in (stats.error_sq, stats.cross, stats.max_abs_error)):
        raise CheckpointError(f"{where}: tensor {name!r} dequantizes to NaN or infinite values")
    return stats


class AgainstRun:
    """Iterate for one TensorResult per tensor (quantized ones carry measured statistics)."""

    def __init__(self, quantized: Path, original: Path) -> None:
        self.quantized, self.original = quantized, original
        self.kind = "compressed-tensors" if is_ct_folder(quantized) and \
            not (quantized / MANIFEST).exists() else "qtool"
        if self.kind == "qtool":
            self.src = SOURCES["qtool"](quantized)
            self.total = len(self.src.manifest.tensors)
            self.total_bytes = sum(t.original_bytes for t in self.src.manifest.tensors)
        else:
            with CTFolder(quantized) as ct:  # every bad-input check, before any tensor is read
                self.total = sum(len(ct.entries(s)) for s in ct.shards)
                self.total_bytes = sum(i.nbytes for _, (_, i) in ct.located.items())
        Original(original).close()

    def __iter__(self) -> Iterator[TensorResult]:
        orig = Original(self.original)
        try:
            yield from (self._native(orig) if self.kind == "qtool" else self._ct(orig))
        finally:
            orig.close()

    def _native(self, orig: Original) -> Iterator[TensorResult]:
        m = self.src.manifest
        for shard in m.shards:
            reader = self.src.open_shard(shard)
            try:
                for rec in (t for t in m.tensors if t.file == shard):
                    if rec.spec is None:
                        yield TensorResult(rec, rec.original_bytes)
                        continue
                    w = orig.read(rec.name, tuple(rec.shape), self.quantized)
                    t = reader.read(rec)
                    scale, zp = native_params(t.scale, t.zero_point, tuple(rec.shape),
                                              rec.spec, f"{self.quantized}: {rec.name!r}")
                    cdt = compute_dtype(w.dtype)
                    w_hat = dequantize(t.rows(0, rows_cols(rec.shape)[0]),
                                       scale_as_float32(scale, rec.spec), zp, tuple(rec.shape),
                                       rec.spec, cdt, cdt)
                    stats = _checked(_stats_by_blocks(w, w_hat), rec.name, self.quantized)
                    yield TensorResult(replace(rec, stats=stats), rec.original_bytes)
            finally:
                reader.close()

    def _ct(self, orig: Original) -> Iterator[TensorResult]:
        with CTFolder(self.quantized) as ct:
            for shard in ct.shards:
                for name, what in ct.entries(shard):
                    if isinstance(what, Module):
                        shape = ct.weight_shape(what)
                        w = orig.read(name, shape, self.quantized)
                        w_hat = ct.decompress(what)
                        info = orig.info(name)
                        assert info is not None
                        stats = _checked(_stats_by_blocks(w, w_hat), name, self.quantized)
                        rec = TensorRecord(name, shard, info.dtype, shape, what.spec(),
                                           stats=stats, original_bytes=info.nbytes,
                                           stored_bytes=what.stored_bytes())
                    else:
                        rec = TensorRecord(name, shard, what.dtype, tuple(what.shape),
                                           passthrough="not quantized",
                                           original_bytes=what.nbytes,
                                           stored_bytes=what.nbytes)
                    yield TensorResult(rec, rec.original_bytes)
