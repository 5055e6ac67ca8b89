"""Connects checkpoint I/O, the numeric core and the artifact format.

``quantize_checkpoint`` and ``dequantize_artifact`` are generators that yield one result per
tensor as plain data (so a caller can show progress), and publish their output atomically:
everything is written into a temporary directory beside the target and renamed into place
only after the last byte is written. An exception, or closing the generator early, leaves no
output (or the previous complete one).
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from qtool.core.blocks import NegativeValuesError, NonFiniteError
from qtool.core.schemes import QuantSpec
from qtool.formats._common import CheckpointError, TensorInfo
from qtool.formats.manifest import MANIFEST, Manifest, TensorRecord, sidecar_names
from qtool.formats.safetensors import SafetensorsFile
from qtool.formats.shards import Checkpoint, open_checkpoint
from qtool.formats.writer import SafetensorsWriter
from qtool.pipeline.plan import _SCALE_OVERFLOW, Plan, QuantizeOptions, TensorResult, make_plan
from qtool.pipeline.staging import _check_output_dir, _sha256_file, _Staging
from qtool.pipeline.streams import (
    _absmax,
    _blas_single_threaded,
    _Buffers,
    _check_output_names,
    _copy_tensor,
    _count_nonfinite,
    _find_nonfinite,
    _jobs,
    _quantize_streamed,
)

# --------------------------------------------------------------------------- quantize


def quantize_checkpoint(src: str | Path, out_dir: str | Path, opts: QuantizeOptions) -> QuantizeRun:
    """Quantize ``src`` (file, index or directory) into the artifact directory ``out_dir``.

    Bad input and a bad output path raise here, before anything is written. Iterating the
    returned run does the work, yielding one TensorResult per tensor; ``run.plan`` says
    beforehand what will happen to each tensor.
    """
    ckpt = open_checkpoint(src)
    plan = make_plan(ckpt, opts)
    return QuantizeRun(ckpt, plan, Path(out_dir), opts)


class QuantizeRun:
    def __iter__(self) -> Iterator[TensorResult]:
        return self.run()

    def __init__(self, ckpt: Checkpoint, plan: Plan, out: Path, opts: QuantizeOptions) -> None:
        self.ckpt, self.plan, self.out, self.opts = ckpt, plan, out, opts
        inputs = list(ckpt.shards) + ([ckpt.index_path] if ckpt.index_path else [])
        _check_output_names(ckpt)
        _check_output_dir(out, inputs, opts.force)

    def run(self) -> Iterator[TensorResult]:
        with _blas_single_threaded():
            yield from self._run()

    def _run(self) -> Iterator[TensorResult]:
        files = {p: SafetensorsFile(p) for p in self.ckpt.shards}
        stage = _Staging(self.out)
        pool = ThreadPoolExecutor(max_workers=_jobs(self.opts.jobs))
        digests: dict[Path, str] = {}
        digest_thread = None
        try:
            items = self.plan.items
            if self.opts.nan_policy == "skip":
                bad = _find_nonfinite(files, self.plan)
                items = [(i, None, "NaN/inf values (--nan-policy skip)") if i.name in bad
                         else (i, s, r) for i, s, r in items]
            if self.opts.source_digest:
                def digest_all() -> None:
                    for p in self.ckpt.shards:
                        digests[p] = _sha256_file(p)
                digest_thread = threading.Thread(target=digest_all, daemon=True)
                digest_thread.start()
            records: list[TensorRecord] = []
            file_info: dict[str, dict[str, object]] = {}
            for shard in self.ckpt.shards:
                sf = files[shard]
                shard_items = [it for it in items if it[0].path == shard]
                yield from self._shard(sf, shard_items, stage.tmp, pool, records, file_info)
            if digest_thread is not None:
                digest_thread.join()
            source_files = []
            for p in self.ckpt.shards:
                sf = files[p]
                entry: dict[str, object] = {
                    "name": p.name, "size": sf.size,
                    "header_sha256": hashlib.sha256(sf.header_bytes).hexdigest(),
                }
                if p in digests:
                    entry["sha256"] = digests[p]
                source_files.append(entry)
            source = {"files": source_files,
                      "index": self.ckpt.index_path.name if self.ckpt.index_path else None}
            index_name = None
            if self.ckpt.index_path is not None:
                index_name = self.ckpt.index_path.name
                data = _write_index(stage.tmp / index_name, self.ckpt, records)
                file_info[index_name] = {"size": len(data),
                                         "sha256": hashlib.sha256(data).hexdigest()}
            manifest = Manifest(source=source, tensors=records, files=file_info,
                                shards=[p.name for p in self.ckpt.shards], index=index_name)
            (stage.tmp / MANIFEST).write_text(manifest.to_json(), encoding="utf-8")
            stage.commit_dir()
        except BaseException:
            stage.discard()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            for f in files.values():
                f.close()

    def _shard(
        self,
        sf: SafetensorsFile,
        items: list[tuple[TensorInfo, QuantSpec | None, str | None]],
        tmp: Path,
        pool: ThreadPoolExecutor,
        records: list[TensorRecord],
        file_info: dict[str, dict[str, object]],
    ) -> Iterator[TensorResult]:
        name = sf.path.name
        scale_name, zp_name = sidecar_names(name)
        main_entries, side_entries = [], []
        for info, spec, _ in items:
            if spec is None:
                main_entries.append((info.name, info.dtype, info.shape))
            else:
                rec = TensorRecord(info.name, name, info.dtype, info.shape, spec)
                main_entries.append((info.name, rec.quantized_dtype, rec.stored_shape))
                side_entries.append((info.name, rec.param_shape))
        # The main file is the large one: a thread writes and hashes it behind the compute.
        writers = (
            SafetensorsWriter(tmp / name, main_entries, sf.metadata, background=True),
            SafetensorsWriter(tmp / scale_name, [(n, "F32", s) for n, s in side_entries]),
            SafetensorsWriter(tmp / zp_name, [(n, "I32", s) for n, s in side_entries]),
        )
        try:
            yield from self._shard_tensors(sf, items, writers, pool, records)
            for w, fname in zip(writers, (name, scale_name, zp_name), strict=True):
                w.close()
                file_info[fname] = {"size": w.size, "sha256": w.sha256}
        except BaseException:
            for w in writers:
                w.abort()
            raise

    def _shard_tensors(
        self,
        sf: SafetensorsFile,
        items: list[tuple[TensorInfo, QuantSpec | None, str | None]],
        writers: tuple[SafetensorsWriter, SafetensorsWriter, SafetensorsWriter],
        pool: ThreadPoolExecutor,
        records: list[TensorRecord],
    ) -> Iterator[TensorResult]:
        name = sf.path.name
        main_w, scale_w, zp_w = writers
        buffers = _Buffers()
        for info, spec, reason in items:
            if spec is None:
                _copy_tensor(sf, info, main_w)
                rec = TensorRecord(info.name, name, info.dtype, info.shape, passthrough=reason,
                                   original_bytes=info.nbytes, stored_bytes=info.nbytes)
            else:
                try:
                    qt = _quantize_streamed(sf, info, spec, main_w, buffers, pool.map)
                except NonFiniteError:
                    # The kernel stops at the first bad block; count them all for the message.
                    e = NonFiniteError(_count_nonfinite(sf, info))
                    raise CheckpointError(
                        f"{sf.path}: tensor {info.name!r} has {e} (use --nan-policy skip to keep "
                        "it in float)"
                    ) from None
                except NegativeValuesError as e:
                    raise CheckpointError(
                        f"{sf.path}: tensor {info.name!r} {e}; symmetric-unsigned needs values "
                        ">= 0: use --scheme asymmetric, or --skip it"
                    ) from None
                if not np.isfinite(qt.scale).all():
                    raise CheckpointError(
                        f"{sf.path}: tensor {info.name!r} {_SCALE_OVERFLOW} (absmax "
                        f"{_absmax(sf, info):.4g}); --skip it to keep it in float")
                scale_w.write(info.name, qt.scale)
                zp_w.write(info.name, qt.zero_point)
                data_bytes = math.prod(qt.shape[:1]) * qt.out_row_items * qt.out_dtype.itemsize
                stored = data_bytes + qt.scale.nbytes + qt.zero_point.nbytes
                rec = TensorRecord(info.name, name, info.dtype, info.shape, spec,
                                   stats=qt.stats, original_bytes=info.nbytes,
                                   stored_bytes=stored)
            records.append(rec)
            yield TensorResult(rec, info.nbytes)


def _write_index(path: Path, ckpt: Checkpoint, records: list[TensorRecord]) -> bytes:
    """The output index: the input's layout, plus where each tensor's sidecars live."""
    weight_map = {r.name: r.file for r in records}
    scale_map = {r.name: sidecar_names(r.file)[0] for r in records if r.quantized}
    zp_map = {r.name: sidecar_names(r.file)[1] for r in records if r.quantized}
    doc = {"metadata": ckpt.index_metadata or {}, "weight_map": weight_map,
           "scale_map": scale_map, "zero_point_map": zp_map}
    data = (json.dumps(doc, indent=2) + "\n").encode()
    path.write_bytes(data)
    return data


