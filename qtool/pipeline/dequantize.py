"""Restore a float checkpoint from an artifact, tensor by tensor, in bounded memory."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from qtool.core import bf16
from qtool.core.blocks import Mapper
from qtool.core.quant import dequantize_rows
from qtool.core.scales import scale_to_float32
from qtool.core.schemes import SpecError
from qtool.core.shapes import compute_dtype, rows_cols
from qtool.formats._common import DTYPES, FLOAT_CODES, CheckpointError
from qtool.formats.manifest import Manifest, TensorRecord
from qtool.formats.registry import SOURCES, InTensor, Source
from qtool.formats.writer import SafetensorsWriter
from qtool.pipeline import streams
from qtool.pipeline.plan import TensorResult
from qtool.pipeline.staging import OutputError, _check_output_dir, _Staging
from qtool.pipeline.streams import _Buffers, _check_cast, _copy_tensor, _jobs

# --------------------------------------------------------------------------- dequantize

OUT_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
# The largest finite value of each float code (numpy's finfo has no bfloat16).
FLOAT_MAX = {"F64": float(np.finfo(np.float64).max), "F32": float(np.finfo(np.float32).max),
             "F16": float(np.finfo(np.float16).max), "BF16": bf16.MAX}


class Restore(Iterator[TensorResult]):
    """A dequantize run: one result per tensor as it is restored. Its ``manifest`` and its
    ``out`` (the restored file, or the directory of a sharded restore) are known at once, so
    that a caller need not open the artifact a second time (a second parse of the manifest
    and the headers, which with very many tensors is tens of MB)."""

    def __init__(self, manifest: Manifest, out: Path, results: Iterator[TensorResult]) -> None:
        self.manifest, self.out, self._results = manifest, out, results

    def __next__(self) -> TensorResult:
        return next(self._results)

    def close(self) -> None:
        """Stop the run early: the staged output is discarded."""
        close = getattr(self._results, "close", None)
        if close is not None:
            close()


def dequantize_artifact(
    art_dir: str | Path, out: str | Path, dtype: str = "original", jobs: int = 0,
    verify: bool = False, force: bool = False,
) -> Restore:
    """Restore a float checkpoint from an artifact. For a sharded artifact ``out`` is a
    directory that receives the shards and the index under their original names. ``verify``
    checks every file's size and digest against the manifest first."""
    src = open_source(art_dir)
    if verify:
        src.verify_files()
    out = restore_target(out, src.manifest.shards[0] if src.manifest.index is None else None)
    if dtype != "original" and dtype not in OUT_DTYPES:
        raise SpecError(f"unknown --dtype {dtype!r}; choose original, {', '.join(OUT_DTYPES)}")
    if out.resolve() == src.root.resolve() or src.root.resolve() in out.resolve().parents:
        raise OutputError(f"{out}: output would be written inside the artifact {src.root}")
    if src.manifest.index is not None:
        _check_output_dir(out, [src.root], force=False)
    elif out.is_dir():  # dir/<name> that is itself a directory
        raise OutputError(f"{out}: is a directory; give the restored .safetensors file's path")
    elif out.exists() and not force:
        # It could be the user's original checkpoint: never replace a file unasked.
        raise OutputError(f"{out}: file exists (use --force to replace it)")
    return Restore(src.manifest, out, _dequantize_run(src, out, dtype, jobs, force))


def restore_target(out: str | Path, file_name: str | None) -> Path:
    """Where a restored single file goes, as ``cp`` would put it: into an existing
    directory, or into a directory given with a trailing slash, under the artifact's file
    name ``file_name``; else at ``out`` itself. A sharded artifact (``file_name`` None) is
    always restored into the directory ``out``."""
    text = os.fspath(out)
    path = Path(text)
    if file_name is not None and (text.endswith(("/", os.sep)) or path.is_dir()):
        return path / file_name
    return path


def open_source(path: str | Path, kind: str = "qtool") -> Source:
    """The stored tensors at ``path``, through the source registered as ``kind``."""
    return SOURCES[kind](Path(path))


def _dequantize_run(src: Source, out: Path, dtype: str, jobs: int,
                    force: bool = False) -> Iterator[TensorResult]:
    m = src.manifest
    # A sharded restore is a new directory (never replaced); one file may be, with --force.
    stage = _Staging(out, replace=force and m.index is None)
    pool = ThreadPoolExecutor(max_workers=_jobs(jobs))
    try:
        for shard in m.shards:
            # One shard holds every record: no list of them all (8 bytes a tensor).
            records = m.tensors if len(m.shards) == 1 else \
                [t for t in m.tensors if t.file == shard]
            yield from _dequantize_shard(src, shard, records, stage.tmp, dtype, pool)
        index = src.index()
        if index is not None:
            assert m.index is not None
            metadata, weight_map = index
            doc = {"metadata": metadata, "weight_map": weight_map}
            # json.dumps(doc, indent=2)'s bytes, written piece by piece, not as one text.
            with open(stage.tmp / m.index, "w", encoding="utf-8") as f:
                f.writelines(json.JSONEncoder(indent=2).iterencode(doc))
                f.write("\n")
            stage.commit_dir()
        else:
            stage.commit_file(m.shards[0])
    except OSError as e:
        stage.discard()
        raise stage.error(e) from None
    except BaseException:
        stage.discard()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _dequantize_shard(
    src: Source, shard: str, records: list[TensorRecord], tmp: Path, dtype: str,
    pool: ThreadPoolExecutor,
) -> Iterator[TensorResult]:
    reader = src.open_shard(shard)
    try:
        def out_code(rec: TensorRecord) -> str:
            if dtype != "original" and rec.dtype in FLOAT_CODES:
                return OUT_DTYPES[dtype]
            return rec.dtype

        entries = ((r.name, out_code(r), r.shape) for r in records)  # read once, by the writer
        # A restored checkpoint is not an artifact: no digest. A thread writes behind the
        # compute, from a few recycled buffers.
        buffers = _Buffers()
        with SafetensorsWriter(tmp / shard, entries, reader.metadata, digest=False,
                               background=True) as w:
            for rec in records:
                code = out_code(rec)
                t = reader.read(rec)
                if rec.spec is None:
                    _copy_tensor(t.file, t.info, w, None if code == rec.dtype else code)
                else:
                    _dequantize_streamed(t, code, w, buffers, pool.map)
                # Progress counts the restored tensor's original bytes, like its total.
                yield TensorResult(rec, rec.original_bytes)
    finally:
        reader.close()


def _dequantize_streamed(t: InTensor, out_code: str, w: SafetensorsWriter,
                         buffers: _Buffers, mapper: Mapper) -> None:
    """Dequantize one tensor run by run from its source into ``w`` (float code ``out_code``;
    bfloat16 as bit patterns)."""
    rec = t.record
    out_dtype = DTYPES[out_code]
    assert rec.spec is not None and t.scale is not None and t.zero_point is not None
    rows, cols = rows_cols(rec.shape)
    scale, zero = t.scale, t.zero_point
    compute = compute_dtype(DTYPES[rec.dtype])
    step = max(1, streams.CHUNK_BYTES // max(1, cols * out_dtype.itemsize))
    if rows == 0 or cols == 0:
        w.write(rec.name, b"")
        return
    if not np.isfinite(scale).all():
        # Not a range problem a wider --dtype could solve: the artifact itself is broken.
        raise CheckpointError(
            f"{t.file.path}: tensor {rec.name!r} has scales that are not finite; the artifact "
            "is corrupt (qtool verify lists its problems)")
    # Only when the largest value scale * (q - zero_point) could exceed the output dtype's
    # range is each chunk checked for inf (a pass that is skipped otherwise).
    s64 = scale_to_float32(scale, rec.spec.scale_dtype).astype(np.float64)
    z64 = zero.astype(np.float64)
    reach = float(np.max(s64 * np.maximum(np.abs(rec.spec.qmin - z64),
                                          np.abs(rec.spec.qmax - z64))))
    check = reach >= FLOAT_MAX[out_code]
    for a in range(0, rows, step):
        b = min(a + step, rows)
        q = t.rows(a, b)
        nbytes = (b - a) * cols * out_dtype.itemsize
        buf = buffers.get(nbytes)
        out = buf[:nbytes].view(out_dtype).reshape(b - a, cols)
        dequantize_rows(q, scale, zero, a, rec.shape, rec.spec, out, compute, mapper)
        if check:
            _check_cast(out, t.file.path, rec.name, out_code)
        w.write_chunk(rec.name, out, release=functools.partial(buffers.put, buf))


