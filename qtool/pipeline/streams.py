"""Streaming helpers shared by the runs: tensors are read in runs of rows with pread and
written through a background writer thread, so memory stays near a few runs whatever the
size of the tensors (docs/PERFORMANCE.md); worker threads and BLAS thread control."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from qtool.core import bf16
from qtool.core.blocks import Mapper
from qtool.core.quant import TensorQuantizer
from qtool.core.schemes import QuantSpec
from qtool.formats._common import DTYPES, PAGE, CheckpointError, TensorInfo
from qtool.formats.manifest import MANIFEST, row_scale_name, sidecar_names
from qtool.formats.registry import Chunk, OutTensor
from qtool.formats.safetensors import SafetensorsFile
from qtool.formats.shards import Checkpoint
from qtool.formats.writer import SafetensorsWriter
from qtool.pipeline.plan import Plan, scale_overflow

# --------------------------------------------------------------------------- streaming
#
# Tensors are read in runs of rows with pread (SafetensorsFile.view; not a memory map, which
# dies of SIGBUS when another process truncates the file): quantize's workers each read
# their own task's rows into a buffer of their thread (_read_buffer below), the other runs
# go into a fresh buffer freed once the run is done. Output is written in runs through a
# background thread that writes and hashes while the next run is computed. Memory therefore
# stays near a few runs whatever the size of the tensors or the checkpoint
# (docs/PERFORMANCE.md).

# Bytes of input (quantize) or output (dequantize) per run: large enough that per-run costs
# (a map, a pool round, a queue hand-off) vanish, small enough for a few to sit in memory.
# Quantizing holds a task's rows per worker and three quarter-size runs of output at a time:
# its runs are larger, so that each gives the pool many tasks and the threads rarely wait for
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


# Input is read by the worker threads themselves, each task's rows (a few MB: the core's
# TASK_ELEMENTS) into a buffer of the thread's own that the next task reuses: the values are
# then still in the core's cache when the kernel reads them, no fresh pages are faulted in
# for every tensor, and the two cores read in parallel. Larger buffers (one very long row)
# are not kept.
_READ_KEEP_BYTES = 16 << 20
_reader = threading.local()


def _read_buffer(nbytes: int) -> np.ndarray:
    """This thread's reusable read buffer, large enough for ``nbytes`` at any page offset."""
    need = nbytes + PAGE
    buf: np.ndarray | None = getattr(_reader, "buf", None)
    if buf is None or buf.size < need:
        # The old buffer goes first: a very long row's buffer never stacks on a kept one.
        _reader.buf = buf = None
        buf = np.empty(need, np.uint8)
        if need <= _READ_KEEP_BYTES:
            _reader.buf = buf
    return buf


def _runs(count: int, itemsize: int) -> Iterator[tuple[int, int]]:
    """[a, b) element runs of about CHUNK_BYTES."""
    step = max(1, CHUNK_BYTES // max(itemsize, 1))
    for a in range(0, count, step):
        yield a, min(a + step, count)


def _copy_tensor(sf: SafetensorsFile, info: TensorInfo, w: SafetensorsWriter,
                 out_code: str | None = None) -> None:
    """Stream a tensor's bytes (or its float values cast to the float code ``out_code``) into
    ``w``: straight from the memory map to the file, never the whole tensor in memory."""
    if info.nbytes == 0:
        w.write(info.name, b"")
        return
    for a, b in _runs(info.numel, info.np_dtype.itemsize):
        run = sf.view(info, a, b)
        if out_code is not None:
            run = cast_values(run, info.dtype, out_code)
            _check_cast(run, sf.path, info.name, out_code)
        w.write_chunk(info.name, run)


def cast_values(values: np.ndarray, code: str, out_code: str) -> np.ndarray:
    """Float values of safetensors code ``code`` as ``out_code``, with one rounding to nearest
    even (bfloat16 as bit patterns, both ways)."""
    if code == "BF16":
        values = bf16.to_float32(values)  # exact
    if out_code == "BF16":
        return bf16.from_float64(values) if values.dtype == np.float64 else \
            bf16.from_float32(values)
    return values.astype(DTYPES[out_code])


def _check_cast(out: np.ndarray, path: Path, name: str, out_code: str) -> None:
    # A narrower float (float16 tops out at 65504) turns large values into inf: refuse that
    # rather than write a checkpoint that silently holds inf.
    finite = bf16.isfinite(out) if out_code == "BF16" else np.isfinite(out)
    if out.size and not finite.all():
        # Advice only where it can help: float32 is the widest restored dtype there is.
        hint = ("restore it with --dtype float32" if DTYPES[out_code].itemsize < 4
                else "no --dtype can hold them")
        name_of = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
        raise CheckpointError(
            f"{path}: tensor {name!r} has values beyond the range of "
            f"{name_of.get(out_code, out_code)}; {hint}"
        )


def _count_nonfinite(sf: SafetensorsFile, info: TensorInfo) -> int:
    bad = 0
    for a, b in _runs(info.numel, info.np_dtype.itemsize):
        run = sf.view(info, a, b)
        finite = bf16.isfinite(run) if info.dtype == "BF16" else np.isfinite(run)
        bad += int(run.size - np.count_nonzero(finite))
    return bad


def _absmax(sf: SafetensorsFile, info: TensorInfo) -> float:
    return max((float(np.abs(_values(sf.view(info, a, b), info.dtype)).max())
                for a, b in _runs(info.numel, 8)), default=0.0)


def _values(run: np.ndarray, code: str) -> np.ndarray:
    """Float values as float64 (bfloat16 from its bits)."""
    return bf16.to_float32(run).astype(np.float64) if code == "BF16" else run.astype(np.float64)


def _find_nonfinite(ckpt_files: dict[Path, SafetensorsFile], plan: Plan) -> set[str]:
    return {info.name for info, spec, _ in plan.items
            if spec is not None and _count_nonfinite(ckpt_files[info.path], info)}


def raw_chunks(sf: SafetensorsFile, info: TensorInfo) -> Iterator[Chunk]:
    """A tensor's bytes as they are, in runs straight from the memory map."""
    if info.nbytes == 0:
        return
    for a, b in _runs(info.numel, info.np_dtype.itemsize):
        yield sf.view(info, a, b), None


def quantized_chunks(sf: SafetensorsFile, info: TensorInfo, spec: QuantSpec, buffers: _Buffers,
                     mapper: Mapper, out: OutTensor) -> Iterator[Chunk]:
    """Quantize one tensor run by run from its memory map, yielding the stored integers; at
    the end ``out`` gets the parameters (small: one value per row or group) and statistics.

    Raises NonFiniteError / NegativeValuesError from the core, and CheckpointError when a
    scale overflows its dtype (spec.scale_dtype, the stored sidecar's)."""
    tq = TensorQuantizer(info.shape, info.np_dtype, spec)
    cols = tq.cols

    def rows_of(a: int, b: int) -> np.ndarray:
        return sf.view(info, a * cols, b * cols).reshape(b - a, cols)

    def task_rows(a: int, b: int) -> np.ndarray:  # on the worker that quantizes them
        buf = _read_buffer((b - a) * cols * info.np_dtype.itemsize)
        return sf.view(info, a * cols, b * cols, buf).reshape(b - a, cols)

    max_elements = max(1, QUANTIZE_CHUNK_BYTES // info.np_dtype.itemsize)
    if tq.needs_tensor_range:
        tq.set_tensor_range(rows_of, mapper, max_elements)
    width = tq.out_row_items
    for a, b in tq.chunks(max_elements):
        nbytes = (b - a) * width * tq.out_dtype.itemsize
        buf = buffers.get(nbytes)
        q = buf[:nbytes].view(tq.out_dtype).reshape(b - a, width)
        if b - a == 1 and info.np_dtype == np.float16:
            # One long row is one block, and the quantizer would widen it into a float32
            # scratch copy while this float16 copy lives on: widened here instead, the float16
            # copy is gone before the quantizer's own scratch exists (same values, same path).
            tq.run(rows_of(a, b).astype(np.float32), a, q, mapper)
        else:
            tq.run_rows(task_rows, a, b - a, q, mapper)
        yield q, functools.partial(buffers.put, buf)
    if not np.isfinite(tq.scale).all():
        raise CheckpointError(
            f"{sf.path}: tensor {info.name!r} {scale_overflow(spec)} (absmax "
            f"{_absmax(sf, info):.4g}); --skip it to keep it in float")
    out.scale, out.zero_point, out.stats = tq.scale, tq.zero_point, tq.stats
    out.row_scale = tq.row_scale


def _check_output_names(ckpt: Checkpoint) -> None:
    """The artifact is flat: each shard's files are named after the shard's file name alone.
    Shards in different subdirectories of an index with the same name, or a shard named like
    another's sidecar or like the manifest or index, would overwrite each other: refuse."""
    owner: dict[str, Path] = {MANIFEST: Path(MANIFEST)}
    if ckpt.index_path is not None:
        owner[ckpt.index_path.name] = ckpt.index_path
    for shard in ckpt.shards:
        for name in (shard.name, *sidecar_names(shard.name), row_scale_name(shard.name)):
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


