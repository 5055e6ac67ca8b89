"""Connects checkpoint I/O, the numeric core and the artifact format.

``quantize_checkpoint`` and ``dequantize_artifact`` are generators that yield one result per
tensor as plain data (so a caller can show progress), and publish their output atomically:
everything is written into a temporary directory beside the target and renamed into place
only after the last byte is written. An exception, or closing the generator early, leaves no
output (or the previous complete one).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

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
from qtool.quant import NegativeValuesError, NonFiniteError, compute_dtype, dequantize, quantize
from qtool.schemes import QuantSpec, SpecError


class OutputError(CheckpointError):
    """The output path cannot be used (exists, is the input, ...)."""


@dataclass(frozen=True)
class Rule:
    """One recipe rule: tensors whose name matches get these settings (or are skipped)."""

    match: str
    skip: bool = False
    settings: tuple[tuple[str, object], ...] = ()

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
                spec = spec.with_(**dict(rule.settings))
            except (SpecError, TypeError) as e:
                raise SpecError(
                    f"recipe rule {rule.match!r} on tensor {info.name!r}: {e}"
                ) from None
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
            msg = f"recipe rule {rule.match!r} matches no tensor"
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
        parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.qtool-tmp-", dir=parent))
        # mkdtemp makes the directory 0700; the published artifact gets the usual umask mode.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o777 & ~umask)

    def commit_dir(self) -> None:
        old = None
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


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _find_nonfinite(ckpt_files: dict[Path, SafetensorsFile], plan: Plan) -> set[str]:
    bad = set()
    for info, spec, _ in plan.items:
        if spec is not None:
            arr = ckpt_files[info.path].read(info)
            if not np.isfinite(arr.astype(np.float32) if arr.dtype.itemsize < 4 else arr).all():
                bad.add(info.name)
    return bad


def _jobs(n: int) -> int:
    return n if n > 0 else (os.cpu_count() or 1)


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
        _check_output_dir(out, inputs, opts.force)

    def run(self) -> Iterator[TensorResult]:
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
        writers = (
            SafetensorsWriter(tmp / name, main_entries, sf.metadata),
            SafetensorsWriter(tmp / scale_name, [(n, "F32", s) for n, s in side_entries]),
            SafetensorsWriter(tmp / zp_name, [(n, "I32", s) for n, s in side_entries]),
        )
        main_w, scale_w, zp_w = writers
        for info, spec, reason in items:
            arr = sf.read(info)
            if spec is None:
                main_w.write(info.name, arr)
                rec = TensorRecord(info.name, name, info.dtype, info.shape, passthrough=reason,
                                   original_bytes=info.nbytes, stored_bytes=info.nbytes)
            else:
                try:
                    qt = quantize(arr, spec, pool.map)
                except NonFiniteError as e:
                    raise CheckpointError(
                        f"{sf.path}: tensor {info.name!r} has {e} (use --nan-policy skip to keep "
                        "it in float)"
                    ) from None
                except NegativeValuesError as e:
                    raise CheckpointError(
                        f"{sf.path}: tensor {info.name!r} {e}; symmetric-unsigned needs values "
                        ">= 0: use --scheme asymmetric, or --skip it"
                    ) from None
                main_w.write(info.name, qt.data)
                scale_w.write(info.name, qt.scale)
                zp_w.write(info.name, qt.zero_point)
                stored = qt.data.nbytes + qt.scale.nbytes + qt.zero_point.nbytes
                rec = TensorRecord(info.name, name, info.dtype, info.shape, spec,
                                   stats=qt.stats, original_bytes=info.nbytes,
                                   stored_bytes=stored)
            del arr
            records.append(rec)
            yield TensorResult(rec, info.nbytes)
        for w, fname in zip(writers, (name, scale_name, zp_name), strict=True):
            w.close()
            file_info[fname] = {"size": w.size, "sha256": w.sha256}


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
    art_dir: str | Path, out: str | Path, dtype: str = "original", jobs: int = 0
) -> Iterator[TensorResult]:
    """Restore a float checkpoint from an artifact. For a sharded artifact ``out`` is a
    directory that receives the shards and the index under their original names."""
    art = Artifact.open(art_dir)
    out = Path(out)
    if dtype != "original" and dtype not in OUT_DTYPES:
        raise SpecError(f"unknown --dtype {dtype!r}; choose original, {', '.join(OUT_DTYPES)}")
    if out.resolve() == art.root.resolve() or art.root.resolve() in out.resolve().parents:
        raise OutputError(f"{out}: output would be written inside the artifact {art.root}")
    return _dequantize_run(art, out, dtype, jobs)


def _dequantize_run(art: Artifact, out: Path, dtype: str, jobs: int) -> Iterator[TensorResult]:
    m = art.manifest
    sharded = m.index is not None
    if sharded:
        _check_output_dir(out, [], force=False)
    elif out.is_dir():
        raise OutputError(f"{out}: is a directory; give the restored .safetensors file's path")
    stage = _Staging(out)
    pool = ThreadPoolExecutor(max_workers=_jobs(jobs))
    try:
        for shard in m.shards:
            records = [t for t in m.tensors if t.file == shard]
            yield from _dequantize_shard(art, shard, records, stage.tmp, dtype, pool)
        if sharded:
            assert m.index is not None
            idx = json.loads(art.path(m.index).read_text(encoding="utf-8"))
            doc = {"metadata": idx.get("metadata", {}), "weight_map": idx["weight_map"]}
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
        with SafetensorsWriter(tmp / shard, entries, main.metadata) as w:
            for rec in records:
                data = main.read(rec.name)
                code = out_code(rec)
                if rec.spec is None:
                    w.write(rec.name, data if code == rec.dtype else data.astype(DTYPES[code]))
                else:
                    restored = dequantize(
                        data, sc.read(rec.name), zp.read(rec.name), rec.shape, rec.spec,
                        DTYPES[code], compute_dtype(DTYPES[rec.dtype]), pool.map,
                    )
                    w.write(rec.name, restored)
                yield TensorResult(rec, data.nbytes)


__all__ = [
    "ArtifactError",
    "OutputError",
    "Plan",
    "QuantizeOptions",
    "Rule",
    "TensorResult",
    "decide",
    "dequantize_artifact",
    "make_plan",
    "quantize_checkpoint",
]


def load_recipe(path: str | Path) -> tuple[Rule, ...]:
    """Placeholder until recipes land (issue 4)."""
    raise SpecError(f"{path}: recipes are not supported yet")
