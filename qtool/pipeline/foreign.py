"""Reading compressed-tensors model folders: `qtool dequantize` and `qtool report --against`.

A folder is recognised by its config.json's ``quantization_config.quant_method``. Each
compressed module (one with ``weight_scale``) is decompressed as the library does
(formats/compressed_tensors_read.py): float values in the scale's dtype. Every other tensor
passes through. Output is atomic; a bad folder is a CheckpointError naming the file and module.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qtool.core.schemes import QuantSpec, SpecError
from qtool.formats import compressed_tensors_layout as L
from qtool.formats import compressed_tensors_read as R
from qtool.formats import hf_folder
from qtool.formats._common import DTYPES, FLOAT_CODES, CheckpointError, TensorInfo
from qtool.formats.safetensors import SafetensorsFile
from qtool.formats.shards import open_checkpoint
from qtool.formats.writer import SafetensorsWriter
from qtool.pipeline.dequantize import restore_target
from qtool.pipeline.staging import OutputError, _check_output_dir, _Staging
from qtool.pipeline.streams import _check_cast

OUT_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
_SCALE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def is_ct_folder(path: Path) -> bool:
    """A directory whose config.json says quant_method compressed-tensors."""
    cfg = path / hf_folder.CONFIG
    if not path.is_dir() or not cfg.is_file():
        return False
    try:
        qc = json.loads(hf_folder.config_text(cfg)).get("quantization_config")
    except (CheckpointError, ValueError, AttributeError, RecursionError):
        return False
    return isinstance(qc, dict) and qc.get("quant_method") == "compressed-tensors"


@dataclass(frozen=True)
class Module:
    """One compressed module: its tensors by local name, its config group, the output name."""

    name: str
    tensors: dict[str, TensorInfo]
    group: R.ConfigGroup

    @property
    def weight_name(self) -> str:
        return f"{self.name}.weight"

    def scale_code(self) -> str:
        return self.tensors["weight_scale"].dtype

    def stored_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def spec(self) -> QuantSpec:
        """The module's settings in qtool's terms (for the report's labels and bits)."""
        a = self.group.weights
        try:
            return QuantSpec("symmetric" if a.symmetric else "asymmetric", a.num_bits,
                             a.strategy, a.group_size or 128,
                             scale_dtype=_SCALE_NAMES.get(self.scale_code(), "float32"))
        except SpecError as e:
            raise CheckpointError(f"module {self.name}: {e}") from None


class CTFolder:
    """An opened compressed-tensors folder: config parsed, every shard's header validated, the
    compressed modules found. Close it (or use ``with``)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        cfg_path = root / hf_folder.CONFIG
        try:
            self.config = R.parse_quantization_config(hf_folder.read_config(root))
        except ValueError as e:
            raise CheckpointError(f"{cfg_path}: {e}") from None
        ckpt = open_checkpoint(root)
        self.index_path = ckpt.index_path
        self.index_metadata = ckpt.index_metadata
        self.files: dict[str, SafetensorsFile] = {}
        try:
            # the file the checkpoint validated, when it still holds it (no second parse)
            for p in ckpt.shards:
                self.files[p.name] = ckpt.take_file(p)
            self.shards = list(self.files)
            located: dict[str, tuple[str, TensorInfo]] = {}
            for shard, sf in self.files.items():
                for info in sf.tensors:
                    located[info.name] = (shard, info)
            self.located = located
            self.modules = self._find_modules()
            self._check_scales()
        except BaseException:
            self.close()
            raise

    def _check_scales(self) -> None:
        """Every module's weight shape and scales (finite and > 0), checked before anything is
        written or measured (one module's scales at a time: small beside its weight)."""
        for m in self.modules.values():
            self.weight_shape(m)  # checked here too: the output is sized from it
            info = m.tensors["weight_scale"]
            problem = L.scale_problem(self.read(info))
            if problem is not None:
                raise CheckpointError(f"{info.path}: tensor {info.name!r}: {problem}")

    def _find_modules(self) -> dict[str, Module]:
        names = {n.rpartition(".")[0] for n in self.located if n.endswith(".weight_scale")}
        modules: dict[str, Module] = {}
        for n, (shard, _) in self.located.items():
            module, _, local = n.rpartition(".")
            if local in L.QPARAM_NAMES and module not in names:
                raise CheckpointError(f"{self.files[shard].path}: {n} has no {module}."
                                      "weight_scale beside it (missing scales)")
        for module in sorted(names):
            try:
                group = self.config.group_for(module)
            except ValueError as e:
                raise CheckpointError(f"{self.root / hf_folder.CONFIG}: {e}") from None
            if group is None:
                raise CheckpointError(f"{self.root}: module {module} holds compressed tensors "
                                      "but no config group targets it (or it is ignored)")
            mine = {loc: self.located[f"{module}.{loc}"][1] for loc in ("weight", *L.QPARAM_NAMES)
                    if f"{module}.{loc}" in self.located}
            if mine["weight_scale"].dtype not in FLOAT_CODES:
                raise CheckpointError(f"{self.root}: {module}.weight_scale is "
                                      f"{mine['weight_scale'].dtype}, not a float")
            modules[module] = Module(module, mine, group)
        return modules

    def close(self) -> None:
        for f in self.files.values():
            f.close()

    def __enter__(self) -> CTFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read(self, info: TensorInfo) -> np.ndarray:
        arr = self.files[info.path.name].read(info)
        # bfloat16 goes to the layout code as uint16 bit patterns, whatever DTYPES maps it to
        return arr.view(np.uint16) if info.dtype == "BF16" else arr

    def weight_shape(self, m: Module) -> tuple[int, int]:
        """The module's [rows, cols]: its int8 weight's shape, or (pack-quantized) its
        weight_shape, which must be what the packed words hold: the output is sized from it
        before a value is unpacked (a hostile [2**40, 2**40] would reserve terabytes)."""
        pack = m.group.format == L.PACK_QUANTIZED
        need = ("weight_packed", "weight_shape") if pack else ("weight",)
        if any(n not in m.tensors for n in need):
            raise CheckpointError(f"{self.root}: module {m.name} has no {'/'.join(need)} "
                                  f"(format {m.group.format})")
        if not pack:
            shape = m.tensors["weight"].shape
        else:
            info = m.tensors["weight_shape"]
            if info.dtype[0] not in "IU":
                raise CheckpointError(f"{info.path}: tensor {info.name!r} is {info.dtype}, "
                                      "not integers")
            shape = tuple(int(v) for v in self.read(info).reshape(-1))
        if len(shape) != 2 or min(shape) < 0:
            raise CheckpointError(f"{self.root}: module {m.name}: weight shape {list(shape)} "
                                  "is not 2-D")
        if pack:
            packed, bits = m.tensors["weight_packed"], m.group.weights.num_bits
            want = (shape[0], -(-shape[1] * bits // 32))
            if tuple(packed.shape) != want:
                raise CheckpointError(
                    f"{packed.path}: tensor {packed.name!r}: {list(shape)} values of {bits} bits "
                    f"(weight_shape) pack to int32 of shape {list(want)}, got "
                    f"{list(packed.shape)}")
        return shape[0], shape[1]

    def decompress(self, m: Module) -> np.ndarray:
        """The module's float weight, exactly the library's values, as float32 (float64 for
        float64 scales)."""
        tensors = {loc: self.read(info) for loc, info in m.tensors.items()}
        try:
            return R.decompress_weight(tensors, m.group.weights, m.group.format, m.name)
        except ValueError as e:
            raise CheckpointError(f"{self.root}: {e}") from None

    def entries(self, shard: str) -> list[tuple[str, Module | TensorInfo]]:
        """The output tensors of one shard in order: a module's weight where its first tensor
        was, other tensors as they are."""
        out: list[tuple[str, Module | TensorInfo]] = []
        done: set[str] = set()
        for info in self.files[shard].tensors:
            module, _, local = info.name.rpartition(".")
            if module in self.modules and local in ("weight", *L.QPARAM_NAMES):
                if module not in done:
                    done.add(module)
                    out.append((f"{module}.weight", self.modules[module]))
            else:
                out.append((info.name, info))
        return out


def as_code(values: np.ndarray, code: str) -> np.ndarray:
    """Float values in the dtype ``code``, rounded to nearest even; bfloat16 as uint16 bits."""
    if code == "BF16":
        y = values.astype(np.float32)
        return (L._round_to(y, "bfloat16").view(np.uint32) >> np.uint32(16)).astype(np.uint16)
    return values.astype(DTYPES[code])


def widen(arr: np.ndarray, code: str) -> np.ndarray:
    """Float values of dtype ``code`` exactly as float32 (bfloat16 from its bits), or as they
    are."""
    if code == "BF16":
        return (np.ascontiguousarray(arr).view(np.uint16).astype(np.uint32)
                << np.uint32(16)).view(np.float32)
    return arr


class CTRestore:
    """A restore run: iterate it for each written tensor's name. ``out`` is where it writes
    (a directory given becomes the file in it), ``total_bytes`` the tensor bytes written."""

    def __init__(self, ct: CTFolder, out: Path, dtype: str, replace: bool) -> None:
        self.out, self.total_bytes = out, 0
        self._run = _dequantize_run(ct, out, dtype, replace, self)

    def __iter__(self) -> Iterator[str]:
        return self._run


def dequantize_ct(folder: str | Path, out: str | Path, dtype: str = "original",
                  force: bool = False) -> CTRestore:
    """Restore a compressed-tensors folder's float weights into ``out`` (a .safetensors file,
    existing directory or ``DIR/`` as for artifacts, or a directory of shards and index for a
    sharded folder). Each decompressed weight is in its scale's dtype (as the library returns
    it) unless ``dtype`` says otherwise. Bad input raises before anything is written."""
    root = Path(folder)
    if dtype != "original" and dtype not in OUT_CODES:
        raise SpecError(f"unknown --dtype {dtype!r}; choose original, {', '.join(OUT_CODES)}")
    ct = CTFolder(root)
    try:
        # into an existing directory or one given as DIR/, as cp would (and as for artifacts)
        out = restore_target(out, ct.shards[0] if ct.index_path is None else None)
        if out.resolve() == root.resolve() or root.resolve() in out.resolve().parents:
            raise OutputError(f"{out}: output would be written inside the model folder {root}")
        if ct.index_path is not None:
            _check_output_dir(out, [root], force=False)
        elif out.is_dir():
            raise OutputError(f"{out}: is a directory; give the restored .safetensors file's path")
        elif out.exists() and not force:
            raise OutputError(f"{out}: file exists (use --force to replace it)")
    except BaseException:
        ct.close()
        raise
    return CTRestore(ct, out, dtype, force and ct.index_path is None)


def _restored(ct: CTFolder, m: Module, name: str, code: str, path: Path) -> np.ndarray:
    """The module's weight in ``code``; never a silent inf (as for artifacts): values the
    library's own arithmetic overflows, or that a narrower --dtype cannot hold, are refused."""
    w_hat = ct.decompress(m)
    if not np.isfinite(w_hat).all():
        raise CheckpointError(f"{path}: tensor {name!r} dequantizes to NaN or infinite values "
                              f"(its {_SCALE_NAMES.get(m.scale_code(), m.scale_code())} "
                              "scales times its integers overflow); no --dtype can hold them")
    arr = as_code(w_hat, code)
    _check_cast(arr, path, name, code)
    return arr


def _dequantize_run(ct: CTFolder, out: Path, dtype: str, replace: bool,
                    counts: CTRestore) -> Iterator[str]:
    stage = _Staging(out, replace=replace)
    try:
        weight_map: dict[str, str] = {}
        for shard in ct.shards:
            plan = ct.entries(shard)
            entries = []
            for name, what in plan:
                if isinstance(what, Module):
                    code = OUT_CODES.get(dtype) or what.scale_code()
                    entries.append((name, code, ct.weight_shape(what)))
                else:
                    code = OUT_CODES[dtype] if dtype != "original" and \
                        what.dtype in FLOAT_CODES else what.dtype
                    entries.append((name, code, what.shape))
                weight_map[name] = shard
            meta = ct.files[shard].metadata
            with SafetensorsWriter(stage.tmp / shard, entries, meta, digest=False) as w:
                for (name, what), (_, code, _) in zip(plan, entries, strict=True):
                    if isinstance(what, Module):
                        arr = _restored(ct, what, name, code, ct.files[shard].path)
                    else:
                        arr = ct.files[shard].read(what)
                        if code != what.dtype:
                            arr = as_code(widen(arr, what.dtype), code)
                            if not np.isfinite(widen(arr, code)).all():
                                raise CheckpointError(f"{what.path}: tensor {name!r} has values "
                                                      f"beyond the range of {dtype}")
                    w.write(name, arr.view(np.uint8) if arr.dtype == np.uint16 else arr)
                    counts.total_bytes += arr.nbytes
                    yield name
        if ct.index_path is not None:
            doc = {"metadata": ct.index_metadata or {}, "weight_map": weight_map}
            (stage.tmp / ct.index_path.name).write_text(json.dumps(doc, indent=2) + "\n",
                                                        encoding="utf-8")
            stage.commit_dir()
        else:
            stage.commit_file(ct.shards[0])
    except BaseException:
        stage.discard()
        raise
    finally:
        ct.close()
