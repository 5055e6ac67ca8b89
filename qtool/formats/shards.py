"""Input checkpoints: one safetensors file, a Hugging Face sharded index
(``*.safetensors.index.json``), or a directory holding one of those."""

from __future__ import annotations

import json
import os
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from qtool.formats import _common
from qtool.formats._common import (
    _INDEX_SUFFIX,
    CheckpointError,
    NotUnicodeError,
    TensorInfo,
    _dup_key,
    _json_kind,
    _Obj,
    _parse_json,
    _plain,
    _pread_exact,
    _short,
)
from qtool.formats.safeio import WHAT_QTOOL_READS, not_this_format, sniff
from qtool.formats.safeio import open_regular as _open_regular
from qtool.formats.safetensors import SafetensorsFile
from qtool.formats.tensor_table import TensorChain

# --------------------------------------------------------------------------------------------
# (sharded) checkpoints


@dataclass(frozen=True)
class Checkpoint:
    """A whole, possibly sharded, input checkpoint (validated by :func:`open_checkpoint`)."""

    root: Path
    index_path: Path | None
    index_metadata: dict | None
    shards: list[Path]
    # Every shard's tensors as compact tables (see qtool.formats.tensor_table), not objects.
    _tensors: Sequence[TensorInfo] | None = field(default=None, repr=False, compare=False)
    # The files validated while opening, still open: a run takes them (take_file) instead of
    # parsing every header again, which with very many tensors doubled the per-tensor state.
    _open: dict[Path, SafetensorsFile] = field(default_factory=dict, repr=False,
                                               compare=False)

    def tensors(self) -> list[TensorInfo]:
        """All tensors, shard by shard, each shard in data-offset order."""
        return list(self.tensor_infos())

    def tensor_infos(self) -> Sequence[TensorInfo]:
        """:meth:`tensors` as the checkpoint's own read-only sequence (TensorInfos made as
        they are read): no list or object of every tensor made."""
        if self._tensors is None:
            tables = []
            for shard in self.shards:
                with SafetensorsFile(shard) as f:
                    tables.append(f.tensors)
            object.__setattr__(self, "_tensors", TensorChain(tables))
        assert self._tensors is not None
        return self._tensors

    def take_file(self, shard: Path) -> SafetensorsFile:
        """``shard`` open, the caller's to close: the file validated at open time when it is
        still held (its tensors are :meth:`tensors`' own objects), else opened now."""
        f = self._open.pop(shard, None)
        return f if f is not None else SafetensorsFile(shard)

    @property
    def is_sharded(self) -> bool:
        return self.index_path is not None


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Resolve and validate a checkpoint: a ``*.safetensors`` file, a
    ``*.safetensors.index.json`` (Hugging Face sharded layout), or a directory holding exactly
    one of those (an index is preferred). Raises :class:`CheckpointError`."""
    p = Path(path)
    if p.is_dir():
        indexes = sorted(c for c in p.iterdir() if c.name.endswith(_INDEX_SUFFIX))
        if len(indexes) > 1:
            names = ", ".join(c.name for c in indexes)
            raise CheckpointError(f"{path}: several index files ({names}); pass one of them")
        if indexes:
            return _open_index(indexes[0])
        files = sorted(c for c in p.iterdir() if c.name.endswith(".safetensors") and not c.is_dir())
        if not files:
            raise CheckpointError(f"{path}: directory holds no .safetensors file or index"
                                  f"{_other_formats(p)}")
        if len(files) > 1:
            raise CheckpointError(
                f"{path}: directory holds {len(files)} .safetensors files and no "
                f"{_INDEX_SUFFIX}; pass a file or add an index"
            )
        return _open_single(files[0])
    if not p.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if p.name.endswith(".json"):
        return _open_index(p)
    return _open_single(p)


_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".gguf", ".onnx", ".npy", ".npz", ".h5")


def _other_formats(d: Path) -> str:
    """For a directory without safetensors: what its weight files are, when recognised
    (", but pytorch_model.bin is a PyTorch checkpoint ..."), so the user knows to convert."""
    for c in sorted(d.iterdir()):
        if not c.name.lower().endswith(_WEIGHT_SUFFIXES):
            continue
        try:
            fd = _open_regular(c)
        except CheckpointError:
            continue
        try:
            head = os.pread(fd, 4096, 0)
        except OSError:
            continue
        finally:
            os.close(fd)
        kind = sniff(head, c.name)
        if kind is not None:
            return f", but {c.name} is {kind}; {WHAT_QTOOL_READS}"
    return ""


def _open_single(p: Path) -> Checkpoint:
    f = SafetensorsFile(p)
    ckpt = Checkpoint(root=p.parent, index_path=None, index_metadata=None, shards=[p],
                      _tensors=f.tensors, _open={p: f})
    # A file no run took is closed with the checkpoint (the dict, not the checkpoint, is
    # referenced, so this keeps nothing alive).
    weakref.finalize(ckpt, _close_all, ckpt._open)
    return ckpt


def _close_all(files: dict[Path, SafetensorsFile]) -> None:
    while files:
        files.popitem()[1].close()


def _read_index(p: Path) -> bytearray:
    fd = _open_regular(p)
    try:
        size = os.fstat(fd).st_size
        if size > _common.INDEX_SIZE_LIMIT:
            raise CheckpointError(
                f"{p}: index is {size} bytes, over the {_common.INDEX_SIZE_LIMIT}-byte limit"
            )
        buf = bytearray(size)
        _pread_exact(fd, memoryview(buf), 0, p, "index")
        # Every entry of weight_map has a colon after its key (a colon inside a string only
        # counts too many): twice the tensor limit bounds what the parse may build.
        if buf.count(b":") > 2 * _common.TENSOR_COUNT_LIMIT + 1000:
            raise CheckpointError(f"{p}: index lists more tensors than qtool's limit of "
                                  f"{_common.TENSOR_COUNT_LIMIT} per checkpoint")
        return buf  # not copied to bytes: an index may be MBs
    finally:
        os.close(fd)


def _open_index(p: Path) -> Checkpoint:
    label = str(p)
    raw = _read_index(p)
    try:
        doc = _parse_json(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise CheckpointError(f"{label}: index is not valid UTF-8") from None
    except NotUnicodeError as exc:
        raise CheckpointError(f"{label}: index is not valid UTF-8: {exc}") from None
    except ValueError as exc:
        raise CheckpointError(
            f"{label}: index is not valid JSON: {_short(str(exc), 100)}"
        ) from None
    if not isinstance(doc, _Obj):
        raise CheckpointError(f"{label}: index JSON is a {_json_kind(doc)}, not an object")
    dup = _dup_key(doc)
    if dup is not None:
        raise CheckpointError(f"{label}: index has duplicate key {_short(dup)}")
    top = dict(doc)

    meta = top.get("metadata")
    if meta is not None and not isinstance(meta, _Obj):
        raise CheckpointError(f"{label}: index metadata is a {_json_kind(meta)}, not an object")
    try:
        index_metadata = _plain(meta) if meta is not None else None
    except RecursionError:
        raise CheckpointError(f"{label}: index metadata is nested too deeply") from None
    # Copied into every output index, like a file's __metadata__: bounded like it.
    if index_metadata is not None and (
            len(json.dumps(index_metadata, ensure_ascii=False)) > _common.METADATA_SIZE_LIMIT):
        raise CheckpointError(f"{label}: index metadata holds more than "
                              f"{_common.METADATA_SIZE_LIMIT} characters, qtool's limit")

    if "weight_map" not in top:
        kind = sniff(raw[:4096], p.name)
        if kind is not None and "config" in kind:
            raise CheckpointError(not_this_format(p, kind))
        raise CheckpointError(f"{label}: index has no weight_map")
    wm = top["weight_map"]
    if not isinstance(wm, _Obj):
        raise CheckpointError(f"{label}: weight_map is a {_json_kind(wm)}, not an object")
    if not wm:
        raise CheckpointError(f"{label}: weight_map is empty")
    if len(wm) > _common.TENSOR_COUNT_LIMIT:
        raise CheckpointError(f"{label}: weight_map lists {len(wm)} tensors, more than qtool's "
                              f"limit of {_common.TENSOR_COUNT_LIMIT} per checkpoint")

    root = p.parent
    real_root = root.resolve()
    canonical: dict[str, Path] = {}  # shard name as written -> path used for the shard
    by_real: dict[Path, Path] = {}  # resolved file -> path used for the shard
    placed: dict[str, Path] = {}  # tensor -> shard path
    shards: list[Path] = []
    for tensor, shard_name in wm:
        if tensor in placed:
            raise CheckpointError(f"{label}: weight_map lists tensor {_short(tensor)} twice")
        if not isinstance(shard_name, str):
            raise CheckpointError(
                f"{label}: tensor {_short(tensor)}: weight_map value is a "
                f"{_json_kind(shard_name)}, not a shard file name"
            )
        if shard_name not in canonical:
            shard = _check_shard_name(label, tensor, shard_name, root, real_root)
            real = shard.resolve()
            if real not in by_real:
                by_real[real] = shard
                shards.append(shard)
            canonical[shard_name] = by_real[real]
        placed[tensor] = canonical[shard_name]

    tables = []
    header_bytes = 0
    for shard in shards:
        with SafetensorsFile(shard) as f:
            # The limits hold for the checkpoint as a whole: its per-tensor state is kept
            # for all shards (each file was bounded by them before it was parsed).
            header_bytes += f.data_start - 8
            if header_bytes > _common.HEADER_SIZE_LIMIT:
                raise CheckpointError(
                    f"{label}: the shards' headers hold more than {_common.HEADER_SIZE_LIMIT} "
                    "bytes in all, qtool's limit per checkpoint (reached at "
                    f"{shard.name})")
            for name in f.keys():
                where = placed.get(name)
                if where is None:
                    raise CheckpointError(
                        f"{shard}: tensor {_short(name)} is not listed in index {p.name}"
                    )
                if where != shard:
                    raise CheckpointError(
                        f"{label}: tensor {_short(name)}: index places it in {where.name} "
                        f"but it is in {shard.name}"
                    )
            for tensor, where in placed.items():
                if where == shard and tensor not in f:
                    raise CheckpointError(
                        f"{label}: tensor {_short(tensor)}: index places it in {shard.name}, "
                        f"which does not contain it"
                    )
            tables.append(f.tensors)
    return Checkpoint(root=root, index_path=p, index_metadata=index_metadata, shards=shards,
                      _tensors=TensorChain(tables))


def _check_shard_name(label: str, tensor: str, name: str, root: Path, real_root: Path) -> Path:
    where = f"{label}: tensor {_short(tensor)}: shard {_short(name)}"
    if not name or "\x00" in name:
        raise CheckpointError(f"{where} is not a valid file name")
    pure = PurePosixPath(name)
    if pure.is_absolute() or name.startswith("\\") or (len(name) > 1 and name[1] == ":"):
        raise CheckpointError(f"{where} is an absolute path")
    if ".." in pure.parts or ".." in name.split("\\"):
        raise CheckpointError(f"{where} contains '..'")
    shard = root / name
    try:
        real = shard.resolve()
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(f"{where} cannot be resolved: {exc}") from None
    if not real.is_relative_to(real_root):
        raise CheckpointError(f"{where} resolves outside {root} (to {real})")
    if not shard.exists():
        raise CheckpointError(f"{where} is missing")
    if not shard.is_file():
        raise CheckpointError(f"{where} is not a regular file")
    return shard


