"""The on-disk artifact: file names, the qtool.json manifest, and loading with cheap checks.

See docs/FORMAT.md. For every input shard ``<stem>.safetensors`` the artifact directory holds
``<stem>.safetensors`` (integers and passthrough tensors), ``<stem>.scale.safetensors``
(scales: float32 in format_version 1, the spec's scale_dtype in 2) and
``<stem>.zero_point.safetensors`` (int32 zero points in 1; uint8, 0-d or packed, in 2), plus one
``qtool.json`` and, for a sharded input, an index named like the input's.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qtool.core import packing
from qtool.core.double_quant import scales_of_codes
from qtool.core.scales import scale_to_float32
from qtool.core.shapes import rows_cols, zero_point_from_stored
from qtool.formats import digest as _digest
from qtool.formats._common import (
    CheckpointError,
    check_strict_utf8,
    reject_constant,
    unique_object,
)
from qtool.formats.manifest import (
    MANIFEST,
    MANIFEST_SIZE_LIMIT,
    ArtifactError,
    Manifest,
    TensorRecord,
    is_plain_name,
    row_scale_name,
    sidecar_names,
    uses_row_scales,
)
from qtool.formats.safeio import open_regular, read_capped, regular_problem, stat_in
from qtool.formats.safetensors import SafetensorsFile


@dataclass
class Artifact:
    """An opened artifact directory whose manifest parsed and whose cheap checks passed."""

    root: Path
    manifest: Manifest

    @classmethod
    def open(cls, root: str | Path) -> Artifact:
        art = cls.load(root)
        art.check()
        return art

    @classmethod
    def load(cls, root: str | Path) -> Artifact:
        """Parse the manifest only (no checks of the other files; see :meth:`check`)."""
        root = Path(root)
        if not root.is_dir():
            raise ArtifactError(f"{root}: no such artifact directory")
        mpath = root / MANIFEST
        if stat_in(root, MANIFEST) is None:
            raise ArtifactError(f"{root}: not a qtool artifact (no {MANIFEST})")
        # Capped, non-blocking and not through a symlink: a hostile manifest must not make
        # us read gigabytes, hang on a FIFO, or read a file outside the artifact.
        raw = read_capped(mpath, MANIFEST_SIZE_LIMIT, "manifest", in_dir=root,
                          error=ArtifactError)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ArtifactError(f"{mpath}: cannot read ({e.reason} at byte {e.start})") from None
        del raw  # not beside the text while it is parsed (tens of MB for 200,000 tensors)
        return cls(root, Manifest.from_json(text, str(mpath)))

    def path(self, name: str) -> Path:
        # Manifest names are plain file names; anything else could point outside the artifact.
        if not is_plain_name(name):
            raise ArtifactError(f"{self.root / MANIFEST}: file name {name!r} is not a plain name")
        return self.root / name

    def open_file(self, name: str) -> SafetensorsFile:
        """One of the artifact's safetensors files, opened relative to its directory (a
        symlink or a non-regular file is refused)."""
        return SafetensorsFile(self.path(name), in_dir=self.root)

    def check(self) -> None:
        """Cheap checks: every file present with its recorded size; every quantized tensor has
        its integers, scale and zero point with the shapes and dtypes the manifest gives."""
        for name, info in self.manifest.files.items():
            p = self.path(name)
            problem = regular_problem(self.root, name)
            if problem is not None:
                if problem.startswith("missing"):
                    raise ArtifactError(f"{self.root}: missing file {name}")
                raise ArtifactError(f"{p}: {problem}")
            size = os.stat(p, follow_symlinks=False).st_size
            if "size" in info and size != info["size"]:
                raise ArtifactError(f"{p}: size {size} differs from the manifest's {info['size']}")
        by_file: dict[str, list[TensorRecord]] = {}
        for t in self.manifest.tensors:
            by_file.setdefault(t.file, []).append(t)
        for shard, records in by_file.items():
            scale_name, zp_name = sidecar_names(shard)
            with self.open_file(shard) as main, self.open_file(scale_name) as sc, \
                    self.open_file(zp_name) as zp, self._row_scales(shard) as rs:
                for t in records:
                    if t.name not in main:
                        raise ArtifactError(f"{main.path}: tensor {t.name!r} is missing")
                    info = main[t.name]
                    if t.quantized:
                        want = (t.quantized_dtype, t.stored_shape)
                    else:
                        want = (t.dtype, t.shape)
                    if (info.dtype, info.shape) != want:
                        raise ArtifactError(
                            f"{main.path}: tensor {t.name!r} is {info.dtype} {list(info.shape)}, "
                            f"the manifest says {want[0]} {list(want[1])}"
                        )
                    if not t.quantized:
                        continue
                    sides = [(sc, t.scale_code, t.param_shape),
                             (zp, t.zero_point_code, t.zero_point_shape)]
                    if t.spec is not None and t.spec.scale_bits is not None:
                        sides.append((rs, "F32", t.row_scale_shape))
                    for side, dt, shp in sides:
                        assert side is not None
                        if t.name not in side:
                            raise ArtifactError(f"{side.path}: tensor {t.name!r} is missing")
                        si = side[t.name]
                        if (si.dtype, si.shape) != (dt, shp):
                            raise ArtifactError(
                                f"{side.path}: tensor {t.name!r} is {si.dtype} {list(si.shape)}, "
                                f"expected {dt} {list(shp)}"
                            )
        if self.manifest.index is not None:
            self.read_index()

    def _row_scales(self, shard: str) -> contextlib.AbstractContextManager:
        """The shard's row-scale file, open (a context), or None when no tensor uses it."""
        if uses_row_scales(self.manifest.tensors, shard):
            return self.open_file(row_scale_name(shard))
        return contextlib.nullcontext()

    def read_index(self) -> tuple[dict[str, Any], dict[str, str]]:
        """The index of a sharded artifact as ``(metadata, weight_map)``, after checking that
        its weight_map places every tensor where the manifest does."""
        assert self.manifest.index is not None
        p = self.path(self.manifest.index)
        raw = read_capped(p, MANIFEST_SIZE_LIMIT, "index", in_dir=self.root, error=ArtifactError)
        try:
            text = raw.decode("utf-8")
            doc = json.loads(text, parse_constant=reject_constant, object_pairs_hook=unique_object)
            check_strict_utf8(text, doc)
        except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError
            raise ArtifactError(f"{p}: not a valid JSON index ({str(e):.80})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("weight_map"), dict) or \
                not isinstance(doc.get("metadata", {}), dict):
            raise ArtifactError(f"{p}: not an index (no weight_map object)")
        ts = self.manifest.tensors
        coded = {t.name: row_scale_name(t.file) for t in ts
                 if t.spec is not None and t.spec.scale_bits is not None}
        # The sidecar maps are for loaders that follow the index (docs/FORMAT.md): each must
        # say what the manifest says. row_scale_map is there exactly when a tensor has codes.
        maps = [("weight_map", {t.name: t.file for t in ts}, True),
                ("scale_map", {t.name: sidecar_names(t.file)[0] for t in ts if t.quantized},
                 False),
                ("zero_point_map", {t.name: sidecar_names(t.file)[1] for t in ts if t.quantized},
                 False),
                ("row_scale_map", coded, bool(coded))]
        for key, want, required in maps:
            if key not in doc and not required:
                continue
            got = doc.get(key)
            if not isinstance(got, dict):
                what = "missing" if got is None else "not an object"
                raise ArtifactError(f"{p}: {key} is {what}")
            if got != want:
                name = next(n for n in [*want, *got] if got.get(n) != want.get(n))
                raise ArtifactError(
                    f"{p}: {key} places tensor {name!r:.80} in {got.get(name)!r:.80}, "
                    f"the manifest in {want.get(name)!r:.80}"
                )
        return doc.get("metadata", {}), doc["weight_map"]

    # -- full verification (``qtool verify``) ----------------------------------------------

    def used_files(self) -> list[str]:
        """Every file the artifact's tensors and index live in, manifest excepted."""
        names: list[str] = []
        for shard in self.manifest.shards:
            names += [shard, *sidecar_names(shard)]
            if uses_row_scales(self.manifest.tensors, shard):
                names.append(row_scale_name(shard))
        if self.manifest.index is not None:
            names.append(self.manifest.index)
        return names

    def file_problems(self) -> list[str]:
        """Size and digest (the algorithm the manifest names) of every file against the
        manifest's ``files``, one line per problem. A file the artifact uses but the manifest
        does not list is a problem too: nothing would vouch for its contents."""
        problems: list[str] = []
        algorithm = self.manifest.digest
        for name, info in self.manifest.files.items():
            try:
                p = self.path(name)
                problem = regular_problem(self.root, name)
                if problem is not None:
                    problems.append(f"{p}: {problem}")
                    continue
                size = os.stat(p, follow_symlinks=False).st_size
                if size != info.get("size"):
                    # The hash cannot match either; reading the file would only cost time.
                    problems.append(
                        f"{p}: size {size} differs from the manifest's {info.get('size')!r:.40}"
                    )
                    continue
                want = info.get(algorithm)
                if not isinstance(want, str):
                    problems.append(f"{p}: the manifest records no {algorithm} for it")
                    continue
                # Hashed through a descriptor opened without following a symlink (a file
                # swapped for one after the check above is refused, not read).
                fd = open_regular(p, in_dir=self.root, error=ArtifactError)
                try:
                    got = _digest.of_file(_fd_path(fd, p), algorithm)
                finally:
                    os.close(fd)
                if got != want:
                    # The digest of the bytes found is not shown: nothing read from a file
                    # that failed its check is echoed.
                    problems.append(f"{p}: {algorithm} differs from the manifest's {want:.64}")
            except ArtifactError as e:
                problems.append(str(e))
            except OSError as e:
                problems.append(f"{self.root / name}: cannot read ({e.strerror or e})")
        for name in self.used_files():
            if name not in self.manifest.files:
                problems.append(
                    f"{self.root / name}: not listed in the manifest's files (no size or digest)"
                )
        return problems

    def verify_files(self) -> None:
        """Raise ArtifactError naming the first file whose size or digest is not as recorded."""
        problems = self.file_problems()
        if problems:
            n = len(problems) - 1
            more = f" (and {n} more problem{'s' if n > 1 else ''})" if n else ""
            raise ArtifactError(problems[0] + more)

    def tensor_problems(self) -> list[str]:
        """Every tensor present with the manifest's dtype and shape, every quantized one with
        its scale and zero point, and the values inside the ranges their scheme allows: q in
        [qmin, qmax] (packed rows with zero padding bits), finite scales > 0, zero points in
        [0, 2^bits - 1] (0 for the schemes without one). One line per problem."""
        problems: list[str] = []
        if self.manifest.index is not None:
            try:
                self.read_index()
            except ArtifactError as e:
                problems.append(str(e))
        for shard in self.manifest.shards:
            records = [t for t in self.manifest.tensors if t.file == shard]
            opened: list[SafetensorsFile | None] = []
            try:
                rs = [row_scale_name(shard)] if uses_row_scales(records, shard) else []
                for name in (shard, *sidecar_names(shard), *rs):
                    try:
                        opened.append(self.open_file(name))
                    except CheckpointError as e:
                        problems.append(str(e))
                        opened.append(None)
                problems += _shard_problems(records, *opened)
            finally:
                for f in opened:
                    if f is not None:
                        f.close()
        return problems


def _fd_path(fd: int, path: Path) -> str:
    """A path naming exactly the open file ``fd`` (Linux /proc/self/fd), for hashing APIs that
    take a path; elsewhere the path itself, already checked to be a regular file."""
    proc = f"/proc/self/fd/{fd}"
    return proc if os.path.exists(proc) else str(path)


def verify(root: str | Path) -> list[str]:
    """Full verification of the artifact in ``root``: :meth:`Artifact.file_problems` and
    :meth:`Artifact.tensor_problems`. Returns one line per problem, empty when all holds;
    raises ArtifactError only when the manifest itself is unreadable."""
    art = Artifact.load(root)
    return art.file_problems() + art.tensor_problems()


def _shard_problems(records: list[TensorRecord], main: SafetensorsFile | None,
                    sc: SafetensorsFile | None, zp: SafetensorsFile | None,
                    rs: SafetensorsFile | None = None) -> list[str]:
    problems: list[str] = []
    quantized = {t.name for t in records if t.quantized}
    coded = {t.name for t in records if t.spec is not None and t.spec.scale_bits is not None}
    for f, allowed in ((main, {t.name for t in records}), (sc, quantized), (zp, quantized),
                       (rs, coded)):
        extra = [] if f is None else [n for n in f.keys() if n not in allowed]
        if extra:
            problems.append(f"{f.path}: {len(extra)} tensor(s) the manifest does not list "
                            f"there, first {extra[0]!r:.80}")
    for t in records:
        problems += _tensor_problems(t, main, sc, zp, rs)
    return problems


def _tensor_problems(t: TensorRecord, main: SafetensorsFile | None,
                     sc: SafetensorsFile | None, zp: SafetensorsFile | None,
                     rs: SafetensorsFile | None = None) -> list[str]:
    problems: list[str] = []
    q = None
    if main is not None:
        want = (t.quantized_dtype, t.stored_shape) if t.quantized else (t.dtype, t.shape)
        if t.name not in main:
            problems.append(f"{main.path}: tensor {t.name!r} is missing")
        elif (main[t.name].dtype, main[t.name].shape) != want:
            info = main[t.name]
            problems.append(f"{main.path}: tensor {t.name!r} is {info.dtype} {list(info.shape)}, "
                            f"the manifest says {want[0]} {list(want[1])}")
        elif t.quantized:
            # A memory map of the page cache, read in place: no copy of the integers.
            q = main.view(t.name).reshape(main[t.name].shape)
    if t.spec is None:
        return problems
    spec = t.spec
    sides: dict[str, np.ndarray] = {}
    checks = [(sc, t.scale_code, t.param_shape, "scale"),
              (zp, t.zero_point_code, t.zero_point_shape, "zero point")]
    if spec.scale_bits is not None:  # the scales are U8 codes (>= 1), times F32 row scales
        checks.append((rs, "F32", t.row_scale_shape, "row scale"))
    for side, dt, shp, what in checks:
        if side is None:
            continue
        if t.name not in side:
            problems.append(f"{side.path}: tensor {t.name!r} ({what}) is missing")
            continue
        si = side[t.name]
        if (si.dtype, si.shape) != (dt, shp):
            problems.append(f"{side.path}: tensor {t.name!r} is {si.dtype} {list(si.shape)}, "
                            f"expected {dt} {list(shp)}")
            continue
        sides[what] = side.read(si)
    flagged = len(problems)
    for what, f in (("scale", sc), ("row scale", rs)):
        if what not in sides:
            continue
        s = scale_to_float32(sides[what], spec.scale_dtype)
        bad = s.size - int(np.count_nonzero(np.isfinite(s) & (s > 0)))
        if bad:
            problems.append(f"{f.path if f else ''}: tensor {t.name!r}: {bad} of {s.size} "
                            f"{what}s are not finite and > 0")
    if len(problems) == flagged and "scale" in sides and "row scale" in sides:
        # Codes and row scales each valid, their float32 product (the scale every reader
        # uses) may still overflow: a row scale near the float32 limit times a code > 1.
        s = scales_of_codes(sides["scale"], sides["row scale"])
        bad = s.size - int(np.count_nonzero(np.isfinite(s)))
        if bad:
            problems.append(f"{sc.path if sc else ''}: tensor {t.name!r}: {bad} of {s.size} "
                            "scales (codes x row scales) are not finite")
    if "zero point" in sides:
        z = sides["zero point"]
        if t.format_version >= 2:
            if zp is not None and spec.packed and z.ndim == 2 and z.size and not np.array_equal(
                    packing.pack(zero_point_from_stored(z, t.shape, spec), spec.bits), z):
                problems.append(f"{zp.path}: tensor {t.name!r}: packed zero points have "
                                "non-zero padding bits")
            z = zero_point_from_stored(z, t.shape, spec)
        # Only asymmetric has a zero point; the other schemes store zeros (docs/FORMAT.md).
        hi = 2**spec.bits - 1 if spec.scheme == "asymmetric" else 0
        bad = int(np.count_nonzero((z < 0) | (z > hi)))
        if bad:
            problems.append(f"{zp.path if zp else ''}: tensor {t.name!r}: {bad} of {z.size} "
                            f"zero points outside [0, {hi}] ({spec.scheme}, {spec.bits}-bit)")
    if q is not None and q.size:
        if spec.packed:
            rows, cols = rows_cols(t.shape)
            rows_q = q.reshape(rows, -1)
            values = packing.unpack(rows_q, spec.bits, cols, spec.signed)
            # The padding bits after each row's last value are zero (docs/FORMAT.md, Packing).
            if not np.array_equal(packing.pack(values, spec.bits), rows_q):
                assert main is not None
                problems.append(f"{main.path}: tensor {t.name!r}: packed rows have non-zero "
                                "padding bits")
        else:
            values = q
        # min and max first (vectorised, no temporaries): counting is only needed when a
        # value is out of range, which a valid artifact never has.
        inside = int(values.min()) >= spec.qmin and int(values.max()) <= spec.qmax
        bad = 0 if inside else int(np.count_nonzero((values < spec.qmin) |
                                                     (values > spec.qmax)))
        if bad:
            assert main is not None
            problems.append(f"{main.path}: tensor {t.name!r}: {bad} of {values.size} values "
                            f"outside [{spec.qmin}, {spec.qmax}] ({spec.scheme}, "
                            f"{spec.bits}-bit)")
    return problems
