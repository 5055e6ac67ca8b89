"""Measuring without writing: the dry run (quantize in memory with several specs) and the
measuring run (an artifact against its original float checkpoint)."""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from qtool.core import bf16
from qtool.core.blocks import NegativeValuesError, NonFiniteError
from qtool.core.metrics import ErrorStats
from qtool.core.quant import dequantize, quantize
from qtool.core.schemes import QuantSpec, SpecError
from qtool.core.shapes import compute_dtype, rows_cols, stored_bytes
from qtool.formats import digest as _digest
from qtool.formats._common import CheckpointError, TensorInfo
from qtool.formats.manifest import MANIFEST, ArtifactError, Manifest, TensorRecord
from qtool.formats.native import Artifact
from qtool.formats.native_source import NativeShard
from qtool.formats.safetensors import SafetensorsFile
from qtool.formats.shards import Checkpoint, open_checkpoint
from qtool.pipeline.plan import QuantizeOptions, TensorResult, make_plan, scale_overflow
from qtool.pipeline.run import _check_restorable
from qtool.pipeline.streams import _jobs

# --------------------------------------------------------------------------- measuring (report)


@dataclass(frozen=True)
class DryRunResult:
    """One tensor of a dry run: one record per spec, in the order the specs were given."""

    info: TensorInfo
    records: tuple[TensorRecord, ...]

    @property
    def input_bytes(self) -> int:
        return self.info.nbytes


class DryRun:
    """`qtool report`'s dry run over a plain checkpoint: each tensor is read once and
    quantized in memory with every spec; nothing is written. Iterate it for the results."""

    def __init__(self, ckpt: Checkpoint, specs: list[QuantSpec], opts: QuantizeOptions) -> None:
        self.ckpt, self.specs, self.opts = ckpt, specs, opts
        # One plan per spec, so every passthrough decision (and every recipe or --skip
        # mistake) is exactly the one `quantize` would make with that spec.
        self.plans = [make_plan(ckpt, replace(opts, spec=s)) for s in specs]

    @property
    def total(self) -> int:
        return len(self.plans[0].items)

    @property
    def total_bytes(self) -> int:
        return self.plans[0].total_bytes

    def __iter__(self) -> Iterator[DryRunResult]:
        files = {p: self.ckpt.take_file(p) for p in self.ckpt.shards}
        pool = ThreadPoolExecutor(max_workers=_jobs(self.opts.jobs))
        try:
            for i, (info, _, _) in enumerate(self.plans[0].items):
                decisions = [plan.items[i][1:] for plan in self.plans]
                arr = None
                if any(spec is not None for spec, _ in decisions):
                    arr = files[info.path].read(info)
                records = []
                for spec, reason in decisions:
                    if spec is not None:
                        assert arr is not None
                        rec = self._quantize(files[info.path], info, arr, spec, pool)
                    else:
                        rec = TensorRecord(info.name, info.path.name, info.dtype, info.shape,
                                           passthrough=reason, original_bytes=info.nbytes,
                                           stored_bytes=info.nbytes)
                    records.append(rec)
                del arr
                yield DryRunResult(info, tuple(records))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            for f in files.values():
                f.close()

    def _quantize(self, sf: SafetensorsFile, info: TensorInfo, arr: np.ndarray,
                  spec: QuantSpec, pool: ThreadPoolExecutor) -> TensorRecord:
        def kept(reason: str) -> TensorRecord:
            return TensorRecord(info.name, info.path.name, info.dtype, info.shape,
                                passthrough=reason, original_bytes=info.nbytes,
                                stored_bytes=info.nbytes)

        try:
            qt = quantize(arr, spec, pool.map)
        except NonFiniteError as e:
            if self.opts.nan_policy == "skip":
                return kept("NaN/inf values (--nan-policy skip)")
            raise CheckpointError(f"{sf.path}: tensor {info.name!r} has {e}") from None
        except NegativeValuesError as e:
            # `quantize` refuses this tensor; a comparison of schemes shows it as "not
            # possible with this scheme" instead of giving up on every other scheme too.
            return kept(f"{spec.scheme}: {e}")
        if not np.isfinite(qt.scale).all():
            return kept(f"{spec.scheme}: {scale_overflow(spec)}")
        try:  # quantize refuses such a tensor; the dry run shows it as not possible
            _check_restorable(sf.path, info, spec, qt)  # type: ignore[arg-type]
        except CheckpointError:
            return kept(f"{spec.scheme}: its restoration in {info.dtype} would overflow to inf")
        stored = stored_bytes(info.shape, spec)  # as the artifact would store it
        return TensorRecord(info.name, info.path.name, info.dtype, info.shape, spec,
                            stats=qt.stats, original_bytes=info.nbytes, stored_bytes=stored)


def dry_run(src: str | Path, specs: list[QuantSpec], opts: QuantizeOptions) -> DryRun:
    """What quantizing ``src`` with each of ``specs`` would do (``opts.spec`` is ignored).
    Bad input raises here, before any tensor is read."""
    if not specs:
        raise SpecError("a dry run needs at least one scheme")
    return DryRun(open_checkpoint(src), list(specs), opts)


def _source_entries(m: Manifest, where: str) -> list[dict]:
    files = m.source.get("files") if isinstance(m.source, dict) else None
    if not isinstance(files, list) or not files or not all(
            isinstance(f, dict) and isinstance(f.get("name"), str) for f in files):
        raise ArtifactError(f"{where}: source.files is missing or malformed")
    return files


def match_original(art: Artifact, original: str | Path,
                   keep: dict[Path, SafetensorsFile] | None = None) -> dict[str, Path]:
    """Check that ``original`` (file, index or directory) is what ``art`` was made from: the
    same number of shards, each with the manifest's size and header digest (and full digest
    when the manifest has one). Returns {shard name in the manifest: file of the original}.
    With ``keep``, the checked files stay open in it (the caller's to close), so that a run
    does not parse their headers again."""
    where = str(art.root / MANIFEST)
    entries = _source_entries(art.manifest, where)
    ckpt = open_checkpoint(original)
    if len(ckpt.shards) != len(entries):
        raise CheckpointError(
            f"{original}: has {len(ckpt.shards)} shard(s); the artifact {art.root} was made "
            f"from {len(entries)}"
        )
    if len(entries) == 1:
        # A single file may have been renamed or moved since: its digest identifies it.
        pairs = [(entries[0], ckpt.shards[0])]
    else:
        by_name = {p.name: p for p in ckpt.shards}
        missing = [e["name"] for e in entries if e["name"] not in by_name]
        if missing:
            raise CheckpointError(
                f"{original}: has no shard {missing[0]!r}, which the artifact {art.root} was "
                "made from"
            )
        pairs = [(e, by_name[e["name"]]) for e in entries]
    found: dict[str, Path] = {}
    alg = art.manifest.digest  # the source's digests are in the manifest's algorithm
    for entry, path in pairs:
        what = f"the artifact {art.root} was made from {entry['name']!r}"
        # The file the checkpoint validated when it still holds it (one parse, not two);
        # the header hashed from the file piece by piece (never whole in memory).
        sf = ckpt.take_file(path)
        try:
            size, digest = sf.size, sf.header_digest(alg)
        finally:
            if keep is None:
                sf.close()
            else:
                keep[path] = sf
        if size != entry.get("size"):
            raise CheckpointError(
                f"{path}: size {size} differs from the {entry.get('size')!r:.30} bytes of the "
                f"source ({what}); is this the original?"
            )
        if digest != entry.get(f"header_{alg}"):
            raise CheckpointError(
                f"{path}: header {alg} {digest} differs from the source's ({what}); "
                "is this the original?"
            )
        if alg in entry and _digest.of_file(path, alg) != entry[alg]:
            raise CheckpointError(
                f"{path}: {alg} differs from the source's ({what}); its tensor data changed"
            )
        found[entry["name"]] = path
    if len(entries) == 1 and len(art.manifest.shards) == 1:
        # quantize names the artifact's shard after the source file; a damaged manifest may
        # not, and there is only one way to pair one shard with one file anyway.
        found = {art.manifest.shards[0]: ckpt.shards[0]}
    missing = [s for s in art.manifest.shards if s not in found]
    if missing:
        raise ArtifactError(f"{where}: shard {missing[0]!r:.80} is not among source.files")
    return found


class MeasureRun:
    """`qtool report --original`: every quantized tensor of an artifact dequantized and
    compared with the original again. Iterating yields one TensorResult per tensor whose
    record carries the measured statistics (passthrough records as they are)."""

    def __init__(self, art: Artifact, originals: dict[str, Path], jobs: int,
                 files: dict[Path, SafetensorsFile] | None = None) -> None:
        self.art, self.originals, self.jobs = art, originals, jobs
        # Originals already open (match_original's): taken, not parsed again, when run.
        self._files = files if files is not None else {}
        weakref.finalize(self, _close_all, self._files)

    @property
    def total(self) -> int:
        return len(self.art.manifest.tensors)

    @property
    def total_bytes(self) -> int:
        return sum(t.original_bytes for t in self.art.manifest.tensors)

    def __iter__(self) -> Iterator[TensorResult]:
        m = self.art.manifest
        pool = ThreadPoolExecutor(max_workers=_jobs(self.jobs))
        try:
            for shard in m.shards:
                records = [t for t in m.tensors if t.file == shard]
                # The shard reader hands out the sidecars of either format version.
                path = self.originals[shard]
                with NativeShard(self.art, shard) as reader, \
                        (self._files.pop(path, None) or SafetensorsFile(path)) as orig:
                    for rec in records:
                        if rec.spec is None:
                            yield TensorResult(rec, rec.original_bytes)
                            continue
                        if rec.name not in orig or orig[rec.name].dtype != rec.dtype or \
                                orig[rec.name].shape != rec.shape:
                            raise CheckpointError(
                                f"{orig.path}: tensor {rec.name!r} is missing or differs from "
                                "the manifest's dtype and shape"
                            )
                        info = orig[rec.name]
                        cdt = compute_dtype(info.np_dtype)
                        t = reader.read(rec)
                        assert t.scale is not None and t.zero_point is not None
                        # w_hat whole (the stored integers freed before the original is read);
                        # the original block by block, so that only one float copy is whole.
                        q = t.file.read(t.info)
                        w_hat = dequantize(q, t.scale, t.zero_point, rec.shape, rec.spec, cdt,
                                           cdt, pool.map)
                        del q
                        stats = _stats_of_file(orig, info, w_hat)
                        del w_hat
                        if not math.isfinite(stats.signal_sq):
                            raise CheckpointError(
                                f"{orig.path}: tensor {rec.name!r} has NaN/inf values")
                        if not all(math.isfinite(v) for v in (stats.error_sq, stats.cross,
                                                              stats.max_abs_error)):
                            # NaN or infinite scales: a damaged artifact, not a figure.
                            raise ArtifactError(
                                f"{reader.scale.path}: tensor {rec.name!r} dequantizes to NaN or "
                                "infinite values (see qtool verify)"
                            )
                        yield TensorResult(replace(rec, stats=stats), rec.original_bytes)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


# Values per block of the error statistics: the float64 copies of a block stay small.
STATS_BLOCK_ELEMENTS = 1 << 18


def _stat_blocks(rows: int, cols: int) -> Iterator[tuple[int, int]]:
    """Flat element ranges [a, b) of the statistics' blocks, in order: runs of whole rows of
    at most STATS_BLOCK_ELEMENTS values (at least one row), and a row longer than that in
    column chunks of STATS_BLOCK_ELEMENTS, so that a one-row tensor is not copied whole."""
    if cols <= STATS_BLOCK_ELEMENTS:
        step = max(1, STATS_BLOCK_ELEMENTS // max(cols, 1)) * cols
        total = rows * cols
        for a in range(0, total, max(step, 1)):
            yield a, min(a + step, total)
        return
    for r in range(rows):
        for c in range(0, cols, STATS_BLOCK_ELEMENTS):
            yield r * cols + c, r * cols + min(c + STATS_BLOCK_ELEMENTS, cols)


def _stats_by_blocks(w: np.ndarray, w_hat: np.ndarray) -> ErrorStats:
    """ErrorStats.between of two float arrays of one shape, block by block (_stat_blocks)."""
    flat = w.reshape(-1)
    return _stats_read(lambda a, b: flat[a:b], tuple(w.shape), w_hat)


def _stats_of_file(orig: SafetensorsFile, info: TensorInfo, w_hat: np.ndarray) -> ErrorStats:
    """The same with the original read from its file block by block (bfloat16 widened)."""
    def read(a: int, b: int) -> np.ndarray:
        w = orig.view(info, a, b)
        return bf16.to_float32(w) if info.dtype == "BF16" else w  # float32 holds it exactly
    return _stats_read(read, tuple(info.shape), w_hat)


def _stats_read(read: Callable[[int, int], np.ndarray], shape: tuple[int, ...],
                w_hat: np.ndarray) -> ErrorStats:
    """ErrorStats.between of the original (``read(a, b)``: flat values [a, b)) and ``w_hat``,
    merged in block order: the same blocks whatever the thread count, so the figures are
    deterministic; those of rows up to STATS_BLOCK_ELEMENTS values are the figures of earlier
    versions (blocks of whole rows), longer rows go in column chunks."""
    rows, cols = rows_cols(shape)
    flat = w_hat.reshape(-1)
    stats = ErrorStats()
    for a, b in _stat_blocks(rows, cols):
        stats = stats.merge(ErrorStats.between(read(a, b), flat[a:b]))
    return stats


def measure_artifact(art_dir: str | Path, original: str | Path, jobs: int = 0) -> MeasureRun:
    """Measure an artifact's error against ``original`` again (see :class:`MeasureRun`). The
    artifact's cheap checks and the original's identity (:func:`match_original`) are checked
    here, before any tensor is read."""
    art = Artifact.open(art_dir)
    files: dict[Path, SafetensorsFile] = {}
    try:
        originals = match_original(art, original, keep=files)
    except BaseException:
        _close_all(files)
        raise
    return MeasureRun(art, originals, jobs, files)


def _close_all(files: dict[Path, SafetensorsFile]) -> None:
    while files:
        files.popitem()[1].close()
