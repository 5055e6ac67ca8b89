"""Connects checkpoint I/O, the numeric core and the artifact format.

``quantize_checkpoint`` and ``dequantize_artifact`` are generators that yield one result per
tensor as plain data (so a caller can show progress), and publish their output atomically:
everything is written into a temporary directory beside the target and renamed into place
only after the last byte is written. An exception, or closing the generator early, leaves no
output (or the previous complete one).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from qtool.core import bf16
from qtool.core.blocks import NegativeValuesError, NonFiniteError
from qtool.core.schemes import QuantSpec
from qtool.core.shapes import compute_dtype
from qtool.formats import digest as _digest
from qtool.formats import hf_folder
from qtool.formats._common import DTYPES, CheckpointError, TensorInfo
from qtool.formats.manifest import TensorRecord
from qtool.formats.registry import SINKS, OutTensor, PlannedTensor, Sink
from qtool.formats.safetensors import SafetensorsFile
from qtool.formats.shards import Checkpoint, open_checkpoint
from qtool.pipeline.mixed import MixedPlan, Target, plan_mixed
from qtool.pipeline.mixed import apply as apply_mixed
from qtool.pipeline.plan import Item, Plan, QuantizeOptions, TensorResult, make_plan
from qtool.pipeline.staging import _check_output_dir, _Staging
from qtool.pipeline.streams import (
    _blas_single_threaded,
    _Buffers,
    _check_output_names,
    _count_nonfinite,
    _find_nonfinite,
    _jobs,
    quantized_chunks,
    raw_chunks,
)

ALGORITHM = _digest.DEFAULT  # of the source's digests: the one the manifest names

# --------------------------------------------------------------------------- quantize


def quantize_checkpoint(src: str | Path, out_dir: str | Path, opts: QuantizeOptions,
                        target: Target | None = None) -> QuantizeRun:
    """Quantize ``src`` (file, index or directory) into the artifact directory ``out_dir``.

    Bad input and a bad output path raise here, before anything is written. With ``target``
    (``--target-bits`` / ``--target-sqnr``) the candidates are measured here too, and the run
    quantizes with the chosen settings (``run.mixed``; ``run.opts.rules`` are its rules).
    Iterating the returned run does the work, yielding one TensorResult per tensor;
    ``run.plan`` says beforehand what will happen to each tensor.
    """
    ckpt = open_checkpoint(src)
    plan = make_plan(ckpt, opts)
    run = QuantizeRun(ckpt, plan, Path(out_dir), opts)  # checks the output path first
    if target is not None:
        run.mixed = plan_mixed(ckpt, plan, opts, target)
        run.opts, run.plan = apply_mixed(ckpt, opts, run.mixed)
    return run


class QuantizeRun:
    mixed: MixedPlan | None = None

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
        files = {p: self.ckpt.take_file(p) for p in self.ckpt.shards}
        stage = _Staging(self.out, replace=self.opts.force)
        sink = SINKS[self.opts.output_format](stage.tmp)
        pool = ThreadPoolExecutor(max_workers=_jobs(self.opts.jobs))
        digests: dict[Path, str] = {}
        digest_thread = None
        try:
            items = self.plan.items
            if self.opts.nan_policy == "skip":
                bad = _find_nonfinite(files, self.plan)
                if bad:
                    items = [(i, None, "NaN/inf values (--nan-policy skip)") if i.name in bad
                             else (i, s, r) for i, s, r in items]
            if self.opts.source_digest:
                def digest_all() -> None:
                    for p in self.ckpt.shards:
                        digests[p] = _digest.of_file(p, ALGORITHM)
                digest_thread = threading.Thread(target=digest_all, daemon=True)
                digest_thread.start()
            records: list[TensorRecord] = []
            spans = _shard_spans(items)
            for shard in self.ckpt.shards:
                sf = files[shard]
                # The shard's items and what the sink plans from them are read lazily, twice,
                # from the plan: never a list (or a PlannedTensor) of every tensor at once.
                shard_items = _Span(items, *spans.get(shard, (0, 0)))
                sink.open(shard, sf.metadata, _Planned(shard_items))
                yield from self._shard_tensors(sf, shard_items, sink, pool, records)
            if digest_thread is not None:
                digest_thread.join()
            source_files = []
            for p in self.ckpt.shards:
                sf = files[p]
                entry: dict[str, object] = {
                    "name": p.name, "size": sf.size,
                    f"header_{ALGORITHM}": sf.header_digest(ALGORITHM),
                }
                if p in digests:
                    entry[ALGORITHM] = digests[p]
                source_files.append(entry)
            source = {"files": source_files,
                      "index": self.ckpt.index_path.name if self.ckpt.index_path else None}
            if hf_folder.is_model_folder(self.ckpt.root):
                # Where the model's config and tokenizer are, for `qtool export` (not copied).
                source["model_folder"] = hf_folder.describe(self.ckpt.root)
            sink.finish(records, source, self.ckpt.index_metadata)
            stage.commit_dir()
        except OSError as e:
            # A full disk, a read-only file system, ...: named by the target the user gave.
            sink.abort()
            stage.discard()
            raise stage.error(e) from None
        except BaseException:
            sink.abort()
            stage.discard()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            for f in files.values():
                f.close()

    def _shard_tensors(
        self,
        sf: SafetensorsFile,
        items: Iterable[Item],
        sink: Sink,
        pool: ThreadPoolExecutor,
        records: list[TensorRecord],
    ) -> Iterator[TensorResult]:
        """Each tensor of one shard through the sink: copied as it is, or quantized."""
        name = sf.path.name
        buffers = _Buffers()
        for info, spec, reason in items:
            if spec is None:
                stored = sink.write(OutTensor(info, None, raw_chunks(sf, info)))
                rec = TensorRecord(info.name, name, info.dtype, info.shape, passthrough=reason,
                                   original_bytes=info.nbytes, stored_bytes=stored)
            else:
                t = OutTensor(info, spec, iter(()))
                t.chunks = quantized_chunks(sf, info, spec, buffers, pool.map, t)
                try:
                    stored = sink.write(t)
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
                _check_restorable(sf.path, info, spec, t)
                rec = TensorRecord(info.name, name, info.dtype, info.shape, spec,
                                   stats=t.stats, original_bytes=info.nbytes,
                                   stored_bytes=stored)
            records.append(rec)
            yield TensorResult(rec, info.nbytes)


def _shard_spans(items: Sequence[Item]) -> dict[Path, tuple[int, int]]:
    """{shard: (start, stop)} of the items of each shard. A plan lists the checkpoint's
    tensors shard by shard, so each shard's items are one run of consecutive items."""
    spans: dict[Path, tuple[int, int]] = {}
    path, start = None, 0
    for k, (info, _, _) in enumerate(items):
        if info.path != path:
            if path is not None:
                spans[path] = (start, k)
            if info.path in spans:  # cannot happen for a plan; refuse rather than misorder
                raise AssertionError(f"plan items of {info.path} are not consecutive")
            path, start = info.path, k
    if path is not None:
        spans[path] = (start, len(items))
    return spans


class _Span:
    """Items [start, stop) of a plan, re-iterable, made as they are read."""

    def __init__(self, items: Sequence[Item], start: int, stop: int) -> None:
        self.items, self.start, self.stop = items, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self) -> Iterator[Item]:
        items = self.items
        for k in range(self.start, self.stop):
            yield items[k]


class _Planned(Sequence[PlannedTensor]):
    """What the sink plans from a shard's items: PlannedTensors made as they are read."""

    def __init__(self, items: _Span) -> None:
        self._items = items

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, k: int) -> PlannedTensor:  # type: ignore[override]
        if not -len(self) <= k < len(self):
            raise IndexError(k)
        info, spec, _ = self._items.items[self._items.start + k % len(self)]
        return PlannedTensor(info, spec)

    def __iter__(self) -> Iterator[PlannedTensor]:
        for info, spec, _ in self._items:
            yield PlannedTensor(info, spec)


def _check_restorable(path: Path, info: TensorInfo, spec: QuantSpec, t: OutTensor) -> None:
    """Refuse a tensor whose restoration in its own dtype would overflow to inf (finite
    values at the edge of float32, or float16/bfloat16 maxima under asymmetric, whose
    zero-point offset reaches past them), rather than write an artifact no --dtype restores.

    The extreme restored values are computed exactly as dequantize computes them: (q - z) * s
    in the compute dtype, cast to the tensor's dtype, for the extreme integers quantize
    produces (the symmetric schemes never produce qmin = -qmax - 1)."""
    assert t.scale is not None and t.zero_point is not None
    if t.scale.size == 0:
        return
    dtype = DTYPES[info.dtype]
    compute = compute_dtype(dtype)
    lo = -spec.qmax if spec.signed else spec.qmin
    s = np.asarray(t.scale, np.float32).astype(compute)
    z = np.asarray(t.zero_point, np.int32).astype(compute)
    with np.errstate(over="ignore", invalid="ignore"):
        ends = [(q - z) * s for q in (compute.type(lo), compute.type(spec.qmax))]
        if info.dtype == "BF16":  # bit patterns: rounded as dequantize rounds them
            finite = all(bf16.isfinite(bf16.from_float32(e)).all() for e in ends)
        else:
            finite = all(np.isfinite(e.astype(dtype)).all() for e in ends)
    if finite:
        return
    hint = " or --scheme symmetric" if spec.scheme == "asymmetric" else ""
    raise CheckpointError(
        f"{path}: tensor {info.name!r} holds values so close to the largest {info.dtype} that "
        f"its {spec.scheme} restoration would overflow to inf; keep it in float with --skip"
        f"{hint}"
    )
