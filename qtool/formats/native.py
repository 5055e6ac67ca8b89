"""The on-disk artifact: file names, the qtool.json manifest, and loading with cheap checks.

See docs/FORMAT.md. For every input shard ``<stem>.safetensors`` the artifact directory holds
``<stem>.safetensors`` (integers and passthrough tensors), ``<stem>.scale.safetensors``
(scales: float32 in format_version 1, the spec's scale_dtype in 2) and
``<stem>.zero_point.safetensors`` (int32 zero points in 1; uint8, 0-d or packed, in 2), plus one
``qtool.json`` and, for a sharded input, an index named like the input's.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
from qtool.formats.manifest_text import text_pieces
from qtool.formats.native_check import ShardFiles, check_shard, close_all, shard_problems
from qtool.formats.safeio import open_regular, read_capped, regular_problem, stat_in
from qtool.formats.safetensors import SafetensorsFile


@dataclass
class Artifact:
    """An opened artifact directory whose manifest parsed and whose cheap checks passed."""

    root: Path
    manifest: Manifest
    # The shard files check(defer=True) validated, open until a reader takes them, and the
    # shards it left to be checked when taken.
    _kept: dict[str, ShardFiles] = field(default_factory=dict, repr=False, compare=False)
    _unchecked: set[str] = field(default_factory=set, repr=False, compare=False)

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
        # us read gigabytes, hang on a FIFO, or read a file outside the artifact. Read a piece
        # at a time first (never the whole text: 50 MB for 200,000 tensors); a manifest not
        # exactly as qtool writes it is read whole, and its whole parse says what is wrong.
        fd = open_regular(mpath, in_dir=root, error=ArtifactError, what="manifest")
        try:
            fast = Manifest.from_pieces(text_pieces(fd, MANIFEST_SIZE_LIMIT), str(mpath))
        finally:
            os.close(fd)
        if fast is not None:
            return cls(root, fast)
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

    def check(self, defer: bool = False) -> None:
        """Cheap checks: every file present with its recorded size; every quantized tensor has
        its integers, scale and zero point with the shapes and dtypes the manifest gives.

        With ``defer`` (a reader's run) the first shard's files stay open, their headers
        parsed, for :meth:`take_shard`, and each later shard is checked when it is taken:
        a header is parsed once a run, and only one shard's at a time (with very many
        tensors a second parse doubled the per-tensor state)."""
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
        try:
            if defer and self.manifest.shards:
                first, *later = self.manifest.shards
                self._kept[first] = self._checked_files(first)
                self._unchecked.update(later)
            else:
                by_file: dict[str, list[TensorRecord]] = {}
                for t in self.manifest.tensors:
                    by_file.setdefault(t.file, []).append(t)
                for shard, records in by_file.items():
                    close_all(self._checked_files(shard, records))
                del by_file
            if self.manifest.index is not None:
                self.read_index()
        except BaseException:
            self.release()
            raise

    def _checked_files(self, shard: str,
                       records: list[TensorRecord] | None = None) -> ShardFiles:
        """The shard's files, open, after checking the manifest's ``records`` of the shard
        (by default, all of them) against them."""
        files = self._open_shard_files(shard)
        try:
            if records is None:
                ts = self.manifest.tensors
                records = ts if len(self.manifest.shards) == 1 else \
                    [t for t in ts if t.file == shard]
            check_shard(records, *files)
        except BaseException:
            close_all(files)
            raise
        return files

    def _open_shard_files(self, shard: str) -> ShardFiles:
        """The shard's main file and sidecars, open (the row-scale file only when a tensor
        uses it)."""
        scale_name, zp_name = sidecar_names(shard)
        opened: list[SafetensorsFile] = []
        try:
            for name in (shard, scale_name, zp_name):
                opened.append(self.open_file(name))
            if uses_row_scales(self.manifest.tensors, shard):
                opened.append(self.open_file(row_scale_name(shard)))
        except BaseException:
            close_all(opened)
            raise
        rs = opened[3] if len(opened) > 3 else None
        return opened[0], opened[1], opened[2], rs

    def take_shard(self, shard: str) -> ShardFiles:
        """The shard's files, open, the caller's to close: those :meth:`check` validated and
        kept when it still holds them (taken once), else opened now, and checked first when
        :meth:`check` deferred it."""
        files = self._kept.pop(shard, None)
        if files is not None:
            return files
        if shard in self._unchecked:
            files = self._checked_files(shard)
            self._unchecked.discard(shard)
            return files
        return self._open_shard_files(shard)

    def release(self) -> None:
        """Close the files :meth:`check` kept and no reader took."""
        kept, self._kept = self._kept, {}
        for files in kept.values():
            close_all(files)

    def read_index(self) -> tuple[dict[str, Any], dict[str, str]]:
        """The index of a sharded artifact as ``(metadata, weight_map)``, after checking that
        its weight_map places every tensor where the manifest does."""
        assert self.manifest.index is not None
        p = self.path(self.manifest.index)
        raw = read_capped(p, MANIFEST_SIZE_LIMIT, "index", in_dir=self.root, error=ArtifactError)
        try:
            text = raw.decode("utf-8")
            del raw  # with very many tensors, the bytes, text and maps are each MBs
            doc = json.loads(text, parse_constant=reject_constant, object_pairs_hook=unique_object)
            check_strict_utf8(text, doc)
            del text
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
        # Each expected map is built when it is compared, and a sidecar map is dropped once it
        # has been: only the weight_map is kept (a map of 100,000 tensors is ~10 MB).
        maps = [("weight_map", lambda: {t.name: t.file for t in ts}, True),
                ("scale_map", lambda: {t.name: sidecar_names(t.file)[0] for t in ts
                                       if t.quantized}, False),
                ("zero_point_map", lambda: {t.name: sidecar_names(t.file)[1] for t in ts
                                            if t.quantized}, False),
                ("row_scale_map", lambda: coded, bool(coded))]
        for key, make, required in maps:
            if key not in doc and not required:
                continue
            want = make()
            got = doc.get(key) if key == "weight_map" else doc.pop(key, None)
            if not isinstance(got, dict):
                what = "missing" if got is None else "not an object"
                raise ArtifactError(f"{p}: {key} is {what}")
            if got != want:
                name = next(n for n in [*want, *got] if got.get(n) != want.get(n))
                raise ArtifactError(
                    f"{p}: {key} places tensor {name!r:.80} in {got.get(name)!r:.80}, "
                    f"the manifest in {want.get(name)!r:.80}"
                )
            del want, got
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
                problems += shard_problems(records, *opened)
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
