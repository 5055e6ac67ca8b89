"""Connects checkpoint I/O, the numeric core and the artifact format.

``quantize_checkpoint`` and ``dequantize_artifact`` are generators that yield one result per
tensor as plain data (so a caller can show progress), and publish their output atomically:
everything is written into a temporary directory beside the target and renamed into place
only after the last byte is written. An exception, or closing the generator early, leaves no
output (or the previous complete one).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fnmatch
import functools
import hashlib
import json
import math
import os
import queue
import re
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import ml_dtypes
import numpy as np

from qtool.artifact import (
    MANIFEST,
    Artifact,
    ArtifactError,
    Manifest,
    TensorRecord,
    sidecar_names,
)
from qtool.io import (
    DTYPES,
    FLOAT_CODES,
    Checkpoint,
    CheckpointError,
    SafetensorsFile,
    SafetensorsWriter,
    TensorInfo,
    open_checkpoint,
)
from qtool.metrics import ErrorStats
from qtool.quant import (
    Mapper,
    NegativeValuesError,
    NonFiniteError,
    TensorQuantizer,
    compute_dtype,
    dequantize,
    dequantize_rows,
    quantize,
    rows_cols,
)
from qtool.schemes import QuantSpec, SpecError


class OutputError(CheckpointError):
    """The output path cannot be used (exists, is the input, ...)."""


@dataclass(frozen=True)
class Rule:
    """One recipe rule: tensors whose name matches get these settings (or are skipped)."""

    match: str
    skip: bool = False
    settings: tuple[tuple[str, object], ...] = ()
    origin: str = ""  # where the rule was written, e.g. "recipe.toml rule 2", for messages

    @property
    def label(self) -> str:
        if self.origin:
            return f"{self.origin} (match {self.match!r})"
        return f"recipe rule {self.match!r}"

    def matches(self, name: str) -> bool:
        if self.match.startswith("re:"):
            return re.search(self.match[3:], name) is not None
        return fnmatch.fnmatchcase(name, self.match)


@dataclass(frozen=True)
class QuantizeOptions:
    """Everything `quantize` needs, built once at the edge (the CLI) and read-only after."""

    spec: QuantSpec = field(default_factory=QuantSpec)
    skip: tuple[str, ...] = ()
    only: tuple[str, ...] = ()
    rules: tuple[Rule, ...] = ()
    allow_unused_rules: bool = False
    jobs: int = 0  # 0: one per core
    source_digest: bool = False
    nan_policy: str = "error"
    force: bool = False


@dataclass(frozen=True)
class TensorResult:
    """One tensor done: what the manifest records, plus the input bytes it covered."""

    record: TensorRecord
    input_bytes: int


@dataclass
class Plan:
    """What will happen to each tensor, decided before anything is written."""

    checkpoint: Checkpoint
    items: list[tuple[TensorInfo, QuantSpec | None, str | None]]
    warnings: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(info.nbytes for info, _, _ in self.items)


# Scales are stored as float32 (docs/FORMAT.md): F64 weights beyond about 4e40 would need a
# larger one, which becomes inf and would restore as inf or NaN.
_SCALE_OVERFLOW = "has values too large for a float32 scale"


def _glob_any(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def decide(info: TensorInfo, opts: QuantizeOptions) -> tuple[QuantSpec | None, str | None]:
    """(spec, None) to quantize the tensor, or (None, reason) to copy it bit for bit."""
    if info.dtype not in FLOAT_CODES:
        return None, f"{info.dtype} is not a float dtype"
    if len(info.shape) == 0:
        return None, "scalar"
    if len(info.shape) == 1:
        return None, "1-D tensor (bias or norm)"
    if info.nbytes == 0:
        return None, "empty tensor"
    if _glob_any(info.name, opts.skip):
        return None, "matched --skip"
    if opts.only and not _glob_any(info.name, opts.only):
        return None, "not matched by --only"
    spec = opts.spec
    for rule in opts.rules:
        if rule.matches(info.name):
            if rule.skip:
                return None, f"recipe rule {rule.match!r}: skip"
            try:
                settings = dict(rule.settings)
                spec = spec.with_(**settings)
                if spec.scheme == "gnmt" and settings.get("granularity", "channel") != "channel":
                    raise SpecError(f"scheme gnmt is always per row, not {settings['granularity']}")
            except (SpecError, TypeError) as e:
                raise SpecError(f"{rule.label} on tensor {info.name!r}: {e}") from None
            break
    return spec, None


def make_plan(ckpt: Checkpoint, opts: QuantizeOptions) -> Plan:
    items = []
    used: set[int] = set()
    for info in ckpt.tensors():
        spec, reason = decide(info, opts)
        for i, rule in enumerate(opts.rules):
            if rule.matches(info.name):
                used.add(i)
                break
        items.append((info, spec, reason))
    plan = Plan(ckpt, items)
    for i, rule in enumerate(opts.rules):
        if i not in used:
            msg = f"{rule.label} matches no tensor"
            if not opts.allow_unused_rules:
                raise SpecError(msg + " (use --allow-unused-rules to allow it)")
            plan.warnings.append(msg)
    return plan


# --------------------------------------------------------------------------- output staging


def _check_output_dir(target: Path, inputs: list[Path], force: bool) -> None:
    resolved = target.resolve()
    for p in inputs:
        rp = p.resolve()
        if rp == resolved or resolved in rp.parents:
            raise OutputError(f"{target}: output would overwrite the input {p}")
    if target.exists():
        if not target.is_dir():
            raise OutputError(f"{target}: exists and is not a directory")
        if any(target.iterdir()):
            if not force:
                raise OutputError(
                    f"{target}: output directory is not empty (use --force to replace an "
                    "earlier qtool artifact)"
                )
            if not (target / MANIFEST).is_file():
                raise OutputError(
                    f"{target}: not a qtool artifact (no {MANIFEST}); --force replaces only those"
                )


class _Staging:
    """A temporary directory beside ``target``, renamed onto it by ``commit``."""

    def __init__(self, target: Path) -> None:
        self.target = target
        parent = target.parent
        # Remember the outermost directory this run creates, so a failure removes it again.
        self.created: Path | None = None
        for p in [parent, *parent.parents]:
            if p.exists():
                break
            self.created = p
        parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.qtool-tmp-", dir=parent))
        # mkdtemp makes the directory 0700; the published artifact gets the usual umask mode.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o777 & ~umask)

    def commit_dir(self) -> None:
        old = None
        if self.target.exists() and _exchange(self.tmp, self.target):
            # Swapped in one step: even a SIGKILL right here leaves a complete artifact (the
            # old or the new one) at the target. self.tmp now holds the old one.
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if self.target.exists():
            # Move the old artifact aside first: at every instant a complete one is in place
            # or nothing is, never a mix.
            old = self.target.with_name(f".{self.target.name}.qtool-old-{os.getpid()}")
            os.rename(self.target, old)
        os.rename(self.tmp, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def commit_file(self, name: str) -> None:
        os.replace(self.tmp / name, self.target)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        if self.created is not None:
            shutil.rmtree(self.created, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux renameat2 RENAME_EXCHANGE). False where
    the OS or the file system cannot, so the caller falls back to two renames."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- streaming
#
# Tensors are read in runs of rows from memory maps (SafetensorsFile.view: no copy, and the
# pages leave the resident set once a run is done) and written in runs through a background
# thread that writes and hashes while the next run is computed. Memory therefore stays near
# a few runs whatever the size of the tensors or the checkpoint (docs/PERFORMANCE.md).

# Bytes of input (quantize) or output (dequantize) per run: large enough that per-run costs
# (a map, a pool round, a queue hand-off) vanish, small enough for a few to sit in memory.
# Quantizing holds one run of input and three quarter-size runs of output at a time: its
# runs are larger, so that each gives the pool many tasks and the threads rarely wait for
# each other at the end of a run. Dequantizing holds three runs of float output.
CHUNK_BYTES = 16 << 20
QUANTIZE_CHUNK_BYTES = 64 << 20
# Output buffers in rotation: one being filled, one being written, one spare.
_BUFFERS = 3


class _Buffers:
    """Reusable output buffers. The writer thread gives each back once it is written, so
    steady state allocates (and page-faults) nothing, and at most _BUFFERS are in flight."""

    def __init__(self, count: int = _BUFFERS) -> None:
        self._free: queue.Queue[np.ndarray] = queue.Queue()
        for _ in range(count):
            self._free.put(np.empty(0, np.uint8))

    def get(self, nbytes: int) -> np.ndarray:
        buf = self._free.get()
        return buf if buf.size >= nbytes else np.empty(nbytes, np.uint8)

    def put(self, buf: np.ndarray) -> None:
        self._free.put(buf)


def _runs(count: int, itemsize: int) -> Iterator[tuple[int, int]]:
    """[a, b) element runs of about CHUNK_BYTES."""
    step = max(1, CHUNK_BYTES // max(itemsize, 1))
    for a in range(0, count, step):
        yield a, min(a + step, count)


def _copy_tensor(sf: SafetensorsFile, info: TensorInfo, w: SafetensorsWriter,
                 out_dtype: np.dtype | None = None) -> None:
    """Stream a tensor's bytes (or its values cast to ``out_dtype``) into ``w``: straight from
    the memory map to the file, never the whole tensor in memory."""
    if info.nbytes == 0:
        w.write(info.name, b"")
        return
    for a, b in _runs(info.numel, info.np_dtype.itemsize):
        run = sf.view(info, a, b)
        if out_dtype is not None:
            run = run.astype(out_dtype)
            _check_cast(run, sf.path, info.name, out_dtype)
        w.write_chunk(info.name, run)


def _check_cast(out: np.ndarray, path: Path, name: str, out_dtype: np.dtype) -> None:
    # A narrower float (float16 tops out at 65504) turns large values into inf: refuse that
    # rather than write a checkpoint that silently holds inf.
    if out.size and not np.isfinite(out).all():
        raise CheckpointError(
            f"{path}: tensor {name!r} has values beyond the range of {out_dtype.name}; "
            "restore it with a wider --dtype"
        )


def _count_nonfinite(sf: SafetensorsFile, info: TensorInfo) -> int:
    bad = 0
    for a, b in _runs(info.numel, info.np_dtype.itemsize):
        run = sf.view(info, a, b)
        if run.dtype not in (np.float32, np.float64):
            run = run.astype(np.float32)
        bad += int(run.size - np.count_nonzero(np.isfinite(run)))
    return bad


def _absmax(sf: SafetensorsFile, info: TensorInfo) -> float:
    return max((float(np.abs(sf.view(info, a, b).astype(np.float64)).max())
                for a, b in _runs(info.numel, 8)), default=0.0)


def _find_nonfinite(ckpt_files: dict[Path, SafetensorsFile], plan: Plan) -> set[str]:
    return {info.name for info, spec, _ in plan.items
            if spec is not None and _count_nonfinite(ckpt_files[info.path], info)}


def _quantize_streamed(sf: SafetensorsFile, info: TensorInfo, spec: QuantSpec,
                       w: SafetensorsWriter, buffers: _Buffers,
                       mapper: Mapper) -> TensorQuantizer:
    """Quantize one tensor run by run from its memory map into ``w``; the sidecars are
    returned (small: one value per row or group) for the caller to write."""
    tq = TensorQuantizer(info.shape, info.np_dtype, spec)
    cols = tq.cols

    def rows_of(a: int, b: int) -> np.ndarray:
        return sf.view(info, a * cols, b * cols).reshape(b - a, cols)

    max_elements = max(1, QUANTIZE_CHUNK_BYTES // info.np_dtype.itemsize)
    if tq.needs_tensor_range:
        tq.set_tensor_range(rows_of, mapper, max_elements)
    width = tq.out_row_items
    for a, b in tq.chunks(max_elements):
        nbytes = (b - a) * width * tq.out_dtype.itemsize
        buf = buffers.get(nbytes)
        out = buf[:nbytes].view(tq.out_dtype).reshape(b - a, width)
        tq.run(rows_of(a, b), a, out, mapper)
        w.write_chunk(info.name, out, release=functools.partial(buffers.put, buf))
    return tq


def _check_output_names(ckpt: Checkpoint) -> None:
    """The artifact is flat: each shard's files are named after the shard's file name alone.
    Shards in different subdirectories of an index with the same name, or a shard named like
    another's sidecar or like the manifest or index, would overwrite each other: refuse."""
    owner: dict[str, Path] = {MANIFEST: Path(MANIFEST)}
    if ckpt.index_path is not None:
        owner[ckpt.index_path.name] = ckpt.index_path
    for shard in ckpt.shards:
        for name in (shard.name, *sidecar_names(shard.name)):
            if name in owner:
                raise CheckpointError(
                    f"{ckpt.index_path or shard}: shard {shard} would be written as {name}, "
                    f"which {owner[name]} also needs in the output; rename one of them"
                )
            owner[name] = shard


def _jobs(n: int) -> int:
    return n if n > 0 else (os.cpu_count() or 1)


def _openblas_thread_controls() -> list[tuple[Callable[[], int], Callable[[int], None]]]:
    """(get, set) of the thread count of every OpenBLAS loaded in this process (numpy's own,
    whatever its symbol prefix); empty where there is none or it cannot be found."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            paths = sorted({line.split()[-1] for line in f
                            if "openblas" in line.lower() and ".so" in line})
    except OSError:
        return []
    controls = []
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in ("scipy_openblas", "openblas"):
            for suffix in ("64_", ""):
                get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                put = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                if get is not None and put is not None:
                    get.restype, put.argtypes = ctypes.c_int, [ctypes.c_int]
                    controls.append((get, put))
    return controls


@contextlib.contextmanager
def _blas_single_threaded() -> Iterator[None]:
    """Run BLAS on one thread meanwhile. The error statistics' dot products go to OpenBLAS,
    which splits any dot product of more than 10,000 values over threads of its own and leaves
    them spinning afterwards: on top of our pool they took the cores our workers and the
    writer thread needed (measured in docs/PERFORMANCE.md). One thread gives the same sums."""
    controls = _openblas_thread_controls()
    saved = [get() for get, _ in controls]
    for _, put in controls:
        put(1)
    try:
        yield
    finally:
        for (_, put), n in zip(controls, saved, strict=True):
            put(n)


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


# --------------------------------------------------------------------------- dequantize

OUT_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def dequantize_artifact(
    art_dir: str | Path, out: str | Path, dtype: str = "original", jobs: int = 0,
    verify: bool = False, force: bool = False,
) -> Iterator[TensorResult]:
    """Restore a float checkpoint from an artifact. For a sharded artifact ``out`` is a
    directory that receives the shards and the index under their original names. ``verify``
    checks every file's size and sha256 against the manifest first."""
    art = Artifact.open(art_dir)
    if verify:
        art.verify_files()
    out = Path(out)
    if dtype != "original" and dtype not in OUT_DTYPES:
        raise SpecError(f"unknown --dtype {dtype!r}; choose original, {', '.join(OUT_DTYPES)}")
    if out.resolve() == art.root.resolve() or art.root.resolve() in out.resolve().parents:
        raise OutputError(f"{out}: output would be written inside the artifact {art.root}")
    if art.manifest.index is not None:
        _check_output_dir(out, [art.root], force=False)
    elif out.is_dir():
        raise OutputError(f"{out}: is a directory; give the restored .safetensors file's path")
    elif out.exists() and not force:
        # It could be the user's original checkpoint: never replace a file unasked.
        raise OutputError(f"{out}: file exists (use --force to replace it)")
    return _dequantize_run(art, out, dtype, jobs)


def _dequantize_run(art: Artifact, out: Path, dtype: str, jobs: int) -> Iterator[TensorResult]:
    m = art.manifest
    sharded = m.index is not None
    stage = _Staging(out)
    pool = ThreadPoolExecutor(max_workers=_jobs(jobs))
    try:
        for shard in m.shards:
            records = [t for t in m.tensors if t.file == shard]
            yield from _dequantize_shard(art, shard, records, stage.tmp, dtype, pool)
        if sharded:
            assert m.index is not None
            metadata, weight_map = art.read_index()
            doc = {"metadata": metadata, "weight_map": weight_map}
            (stage.tmp / m.index).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
            stage.commit_dir()
        else:
            stage.commit_file(m.shards[0])
    except BaseException:
        stage.discard()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _dequantize_shard(
    art: Artifact, shard: str, records: list[TensorRecord], tmp: Path, dtype: str,
    pool: ThreadPoolExecutor,
) -> Iterator[TensorResult]:
    scale_name, zp_name = sidecar_names(shard)
    with SafetensorsFile(art.path(shard)) as main, \
            SafetensorsFile(art.path(scale_name)) as sc, \
            SafetensorsFile(art.path(zp_name)) as zp:

        def out_code(rec: TensorRecord) -> str:
            if dtype != "original" and rec.dtype in FLOAT_CODES:
                return OUT_DTYPES[dtype]
            return rec.dtype

        entries = [(r.name, out_code(r), r.shape) for r in records]
        # A restored checkpoint is not an artifact: no digest. A thread writes behind the
        # compute, from a few recycled buffers.
        buffers = _Buffers()
        with SafetensorsWriter(tmp / shard, entries, main.metadata, digest=False,
                               background=True) as w:
            for rec in records:
                code = out_code(rec)
                if rec.spec is None:
                    _copy_tensor(main, main[rec.name], w,
                                 None if code == rec.dtype else DTYPES[code])
                else:
                    _dequantize_streamed(main, sc, zp, rec, DTYPES[code], w, buffers, pool.map)
                # Progress counts the restored tensor's original bytes, like its total.
                yield TensorResult(rec, rec.original_bytes)


def _dequantize_streamed(main: SafetensorsFile, sc: SafetensorsFile, zp: SafetensorsFile,
                         rec: TensorRecord, out_dtype: np.dtype, w: SafetensorsWriter,
                         buffers: _Buffers, mapper: Mapper) -> None:
    """Dequantize one tensor run by run from the artifact's memory map into ``w``."""
    assert rec.spec is not None
    info = main[rec.name]
    rows, cols = rows_cols(rec.shape)
    width = info.numel // rows if rows else 0
    scale, zero = sc.read(rec.name), zp.read(rec.name)
    compute = compute_dtype(DTYPES[rec.dtype])
    step = max(1, CHUNK_BYTES // max(1, cols * out_dtype.itemsize))
    if rows == 0 or cols == 0:
        w.write(rec.name, b"")
        return
    # Only when the largest value scale * (q - zero_point) could exceed the output dtype's
    # range is each chunk checked for inf (a pass that is skipped otherwise).
    reach = float(np.max(scale.astype(np.float64) * np.maximum(
        np.abs(rec.spec.qmin - zero.astype(np.float64)),
        np.abs(rec.spec.qmax - zero.astype(np.float64)))))
    check = reach >= float(ml_dtypes.finfo(out_dtype).max)  # numpy's finfo lacks bfloat16
    for a in range(0, rows, step):
        b = min(a + step, rows)
        q = main.view(info, a * width, b * width).reshape(b - a, width)
        nbytes = (b - a) * cols * out_dtype.itemsize
        buf = buffers.get(nbytes)
        out = buf[:nbytes].view(out_dtype).reshape(b - a, cols)
        dequantize_rows(q, scale, zero, a, rec.shape, rec.spec, out, compute, mapper)
        if check:
            _check_cast(out, main.path, rec.name, out_dtype)
        w.write_chunk(rec.name, out, release=functools.partial(buffers.put, buf))


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
        files = {p: SafetensorsFile(p) for p in self.ckpt.shards}
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
            return kept(f"{spec.scheme}: {_SCALE_OVERFLOW}")
        stored = qt.data.nbytes + qt.scale.nbytes + qt.zero_point.nbytes
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


def match_original(art: Artifact, original: str | Path) -> dict[str, Path]:
    """Check that ``original`` (file, index or directory) is what ``art`` was made from: the
    same number of shards, each with the manifest's size and header sha256 (and full sha256
    when the manifest has one). Returns {shard name in the manifest: file of the original}."""
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
    for entry, path in pairs:
        what = f"the artifact {art.root} was made from {entry['name']!r}"
        with SafetensorsFile(path) as sf:
            size, header_bytes = sf.size, sf.header_bytes
        if size != entry.get("size"):
            raise CheckpointError(
                f"{path}: size {size} differs from the {entry.get('size')!r:.30} bytes of the "
                f"source ({what}); is this the original?"
            )
        digest = hashlib.sha256(header_bytes).hexdigest()
        if digest != entry.get("header_sha256"):
            raise CheckpointError(
                f"{path}: header sha256 {digest} differs from the source's ({what}); "
                "is this the original?"
            )
        if "sha256" in entry and _sha256_file(path) != entry["sha256"]:
            raise CheckpointError(
                f"{path}: sha256 differs from the source's ({what}); its tensor data changed"
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

    def __init__(self, art: Artifact, originals: dict[str, Path], jobs: int) -> None:
        self.art, self.originals, self.jobs = art, originals, jobs

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
                scale_name, zp_name = sidecar_names(shard)
                with SafetensorsFile(self.art.path(shard)) as main, \
                        SafetensorsFile(self.art.path(scale_name)) as sc, \
                        SafetensorsFile(self.art.path(zp_name)) as zp, \
                        SafetensorsFile(self.originals[shard]) as orig:
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
                        w = orig.read(rec.name)
                        cdt = compute_dtype(w.dtype)
                        w_hat = dequantize(main.read(rec.name), sc.read(rec.name),
                                           zp.read(rec.name), rec.shape, rec.spec, cdt, cdt,
                                           pool.map)
                        stats = _stats_by_blocks(w, w_hat)
                        if not math.isfinite(stats.signal_sq):
                            raise CheckpointError(
                                f"{orig.path}: tensor {rec.name!r} has NaN/inf values")
                        if not all(math.isfinite(v) for v in (stats.error_sq, stats.cross,
                                                              stats.max_abs_error)):
                            # NaN or infinite scales: a damaged artifact, not a figure.
                            raise ArtifactError(
                                f"{sc.path}: tensor {rec.name!r} dequantizes to NaN or "
                                "infinite values (see qtool verify)"
                            )
                        yield TensorResult(replace(rec, stats=stats), rec.original_bytes)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _stats_by_blocks(w: np.ndarray, w_hat: np.ndarray) -> ErrorStats:
    """ErrorStats.between in row blocks: its float64 copies stay small for large tensors."""
    rows, cols = rows_cols(tuple(w.shape))
    w2, h2 = w.reshape(rows, cols), w_hat.reshape(rows, cols)
    step = max(1, (1 << 18) // max(cols, 1))
    stats = ErrorStats()
    for i in range(0, rows, step):
        stats = stats.merge(ErrorStats.between(w2[i:i + step], h2[i:i + step]))
    return stats


def measure_artifact(art_dir: str | Path, original: str | Path, jobs: int = 0) -> MeasureRun:
    """Measure an artifact's error against ``original`` again (see :class:`MeasureRun`). The
    artifact's cheap checks and the original's identity (:func:`match_original`) are checked
    here, before any tensor is read."""
    art = Artifact.open(art_dir)
    return MeasureRun(art, match_original(art, original), jobs)


__all__ = [
    "ArtifactError",
    "DryRun",
    "DryRunResult",
    "MeasureRun",
    "OutputError",
    "Plan",
    "QuantizeOptions",
    "Rule",
    "TensorResult",
    "decide",
    "dequantize_artifact",
    "dry_run",
    "make_plan",
    "match_original",
    "measure_artifact",
    "quantize_checkpoint",
]
