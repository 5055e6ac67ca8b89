"""compressed-tensors as a sink: quantized module weights in the library's layout (docs/EXPORT.md).

Per input shard one ``.safetensors`` file (the caller names it: ``model.safetensors`` for a
single file, the source's shard names when sharded), in the source's tensor order:

* a quantized 2-D ``<module>.weight`` that compressed-tensors can express becomes the module's
  ``weight`` (8 bits) or ``weight_packed`` + ``weight_shape`` (below 8 bits), ``weight_scale``
  and, when asymmetric, ``weight_zero_point`` (:func:`compressed_tensors_layout.qtool_to_ct`);
* any other quantized tensor (not a module weight, not 2-D, a short last group) is written
  dequantized in its source dtype, and named in :attr:`warnings`;
* a tensor kept as it is stays as it is (and is not targeted by any config group).

The parameters may come in any of the native artifact's sidecar forms: scales float32,
float16 or bfloat16 (ml_dtypes' type or uint16 bit patterns), zero points of the parameter
shape, 0-d (symmetric schemes), or bit-packed along rows (asymmetric below 8 bits).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qtool.core import packing
from qtool.core.quant import dequantize
from qtool.core.schemes import QuantSpec
from qtool.core.shapes import param_shape, rows_cols, stored_shape
from qtool.formats import compressed_tensors_layout as L
from qtool.formats._common import DTYPES, CheckpointError
from qtool.formats.manifest import TensorRecord
from qtool.formats.registry import OutTensor, PlannedTensor
from qtool.formats.writer import SafetensorsWriter

INDEX_NAME = "model.safetensors.index.json"
SCALE_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def expressible(name: str, shape: tuple[int, ...], spec: QuantSpec) -> str | None:
    """Why this quantized tensor cannot be written in the compressed-tensors layout (None: it
    can): only 2-D module ``.weight`` tensors, whose columns the group size divides."""
    if not name.endswith(".weight") or len(shape) != 2:
        return "not a 2-D module .weight"
    if spec.granularity == "group" and shape[1] % spec.group_size:
        return (f"its {shape[1]} columns are not a multiple of the group size "
                f"{spec.group_size} (compressed-tensors has no shorter last group)")
    return None


def looks_like_embedding(module: str) -> bool:
    """An embedding module by its name (the checkpoint does not say which class a module is):
    ``embed_tokens``, ``word_embeddings``, GPT-2's ``wte``/``wpe``, T5's ``shared``."""
    last = module.rpartition(".")[2]
    return "embed" in last or last in ("wte", "wpe", "shared")


def ct_format(name: str, spec: QuantSpec) -> str:
    """int-quantized (int8 ``weight``) at 8 bits, and for embeddings at any width; packed
    int32 below 8 bits otherwise. transformers 5.24 cannot load a pack-quantized Embedding
    (its weight init reads ``module.weight``, which the packed module no longer has), and
    int8 holds every narrower value exactly."""
    if spec.bits == 8 or looks_like_embedding(name.removesuffix(".weight")):
        return L.INT_QUANTIZED
    return L.PACK_QUANTIZED


def ct_entries(name: str, shape: tuple[int, ...], spec: QuantSpec
               ) -> list[tuple[str, str, tuple[int, ...]]]:
    """The compressed-tensors tensors (full names, codes, shapes) of one module weight."""
    module = name.removesuffix(".weight")
    rows, cols = shape
    p = (1,) if spec.granularity == "tensor" else param_shape(shape, spec)
    out: list[tuple[str, str, tuple[int, ...]]] = []
    if ct_format(name, spec) == L.INT_QUANTIZED:
        out.append((f"{module}.weight", "I8", (rows, cols)))
    else:
        out.append((f"{module}.weight_packed", "I32", (rows, -(-cols * spec.bits // 32))))
        out.append((f"{module}.weight_shape", "I64", (2,)))
    out.append((f"{module}.weight_scale", SCALE_CODES[spec.scale_dtype], p))
    if spec.scheme in ("asymmetric", "symmetric-unsigned"):
        if ct_format(name, spec) == L.INT_QUANTIZED or spec.granularity == "tensor":
            out.append((f"{module}.weight_zero_point", "I8", p))
        else:  # int32 words along the rows, as the library packs zero points
            out.append((f"{module}.weight_zero_point", "I32", (-(-rows * spec.bits // 32), p[1])))
    return out


def native_params(scale: np.ndarray, zero_point: np.ndarray, shape: tuple[int, ...],
                  spec: QuantSpec, where: str) -> tuple[np.ndarray, np.ndarray]:
    """A native tensor's scale (as stored; bfloat16 as uint16 bits) and zero point (int32 of
    the parameter shape), whatever form the artifact's sidecars hold them in."""
    p = param_shape(shape, spec)
    s = np.asarray(scale)
    if s.dtype.name == "bfloat16":
        s = s.view(np.uint16)
    want = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}[spec.scale_dtype]
    if s.dtype != want or s.shape != p:
        raise CheckpointError(f"{where}: scale is {s.dtype} of shape {list(s.shape)}, expected "
                              f"{spec.scale_dtype} of shape {list(p)}")
    z = np.asarray(zero_point)
    if z.shape == p:
        return s, z.astype(np.int32)
    if z.size == 1 and spec.scheme != "asymmetric":
        return s, np.full(p, int(z.reshape(-1)[0]), np.int32)
    if spec.scheme == "asymmetric" and spec.packed and len(p) == 2 and z.dtype == np.uint8 \
            and z.shape == (p[0], packing.packed_row_bytes(p[1], spec.bits)):
        return s, packing.unpack(z, spec.bits, p[1], signed=False).astype(np.int32)
    raise CheckpointError(f"{where}: zero point of shape {list(z.shape)} does not fit "
                          f"parameters of shape {list(p)}")


def scale_as_float32(s: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """Scales exactly in float32 (bfloat16 bits widened)."""
    if spec.scale_dtype == "bfloat16":
        return (s.astype(np.uint32) << 16).view(np.float32)
    return s.astype(np.float32)


class CompressedTensorsSink:
    """Writes a Hugging Face model's weights in the compressed-tensors layout into ``root``.

    ``optional_prefix`` (a model's ``base_model_prefix``) makes the targets also match the
    module names without it. After :meth:`finish`, :meth:`quantization_config` is the
    config.json entry and :attr:`warnings` the tensors written dequantized.
    """

    def __init__(self, root: Path, optional_prefix: str | None = None) -> None:
        self.root = root
        self.prefix = optional_prefix
        self.warnings: list[str] = []
        self.groups: dict[tuple[L.WeightArgs, str], list[str]] = {}
        self.weight_map: dict[str, str] = {}
        self.files: dict[str, int] = {}
        # Weights another module shares (tied embeddings): written dequantized, with the reason.
        self.keep_float: dict[str, str] = {}
        self._writer: SafetensorsWriter | None = None
        self._shard = ""

    def open(self, shard: Path, metadata: dict[str, str] | None,
             tensors: Sequence[PlannedTensor]) -> None:
        self._close_shard()
        self._shard = shard.name
        entries: list[tuple[str, str, tuple[int, ...]]] = []
        for t in tensors:
            if t.spec is not None and self._why_float(t.info.name, t.info.shape, t.spec) is None:
                entries.extend(ct_entries(t.info.name, t.info.shape, t.spec))
            else:
                entries.append((t.info.name, t.info.dtype, t.info.shape))
        for name, _, _ in entries:
            self.weight_map[name] = shard.name
        # transformers refuses safetensors files whose metadata has no (known) "format".
        meta = dict(metadata or {})
        meta.setdefault("format", "pt")
        self._writer = SafetensorsWriter(self.root / shard.name, entries, meta)

    def write(self, tensor: OutTensor) -> int:
        assert self._writer is not None
        info, spec = tensor.info, tensor.spec
        parts = [np.ascontiguousarray(a).reshape(-1).view(np.uint8) for a, _ in tensor.chunks]
        data = np.concatenate(parts) if parts else np.zeros(0, np.uint8)
        if spec is None:
            self._writer.write(info.name, data)
            return info.nbytes
        assert tensor.scale is not None and tensor.zero_point is not None
        where = f"tensor {info.name!r}"
        scale, zp = native_params(tensor.scale, tensor.zero_point, info.shape, spec, where)
        stored = data.view(spec.storage_dtype if not spec.packed else np.uint8)
        stored = stored.reshape(stored_shape(info.shape, spec))
        why = self._why_float(info.name, info.shape, spec)
        if why is not None:
            out = dequantize(stored, scale_as_float32(scale, spec), zp, info.shape, spec,
                             DTYPES[info.dtype])
            self._writer.write(info.name, out)
            self.warnings.append(f"tensor {info.name!r} is written dequantized "
                                 f"({info.dtype}): {why}")
            return info.nbytes
        rows, cols = rows_cols(info.shape)
        scheme = spec.scheme
        try:
            args, ct = L.qtool_to_ct(stored, scale, zp, scheme=scheme, bits=spec.bits,
                                     granularity=spec.granularity, shape=(rows, cols),
                                     group_size=spec.group_size)
        except ValueError as e:
            raise CheckpointError(f"{where}: {e}") from None
        module = info.name.removesuffix(".weight")
        fmt = ct_format(info.name, spec)
        if fmt == L.INT_QUANTIZED and "weight_packed" in ct:  # an embedding below 8 bits
            ct = _unpacked(ct, spec.bits, rows, cols)
        nbytes = 0
        for local, arr in ct.items():
            # bfloat16 scales travel as uint16 bit patterns: written as raw bytes.
            raw = arr.view(np.uint8) if arr.dtype == np.uint16 else arr
            self._writer.write(f"{module}.{local}", raw)
            nbytes += arr.nbytes
        self.groups.setdefault((args, fmt), []).append(L.exact_target(module, self.prefix))
        return nbytes

    def _why_float(self, name: str, shape: tuple[int, ...], spec: QuantSpec) -> str | None:
        """Why this quantized tensor is written dequantized (None: it is exported quantized)."""
        return self.keep_float.get(name) or expressible(name, shape, spec)

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self.files[self._shard] = self._writer.size
            self._writer = None

    def finish(self, records: list[TensorRecord], source: dict[str, Any],
               index_metadata: dict | None) -> None:
        """Close the last shard; with several shards, write the index (its ``total_size``
        is the bytes of tensor data, as transformers writes it)."""
        self._close_shard()
        if len(self.files) > 1:
            meta = dict(index_metadata or {})
            meta["total_size"] = sum(self._data_bytes(f) for f in self.files)
            doc = {"metadata": meta, "weight_map": self.weight_map}
            (self.root / INDEX_NAME).write_text(json.dumps(doc, indent=2) + "\n",
                                                encoding="utf-8")

    def _data_bytes(self, name: str) -> int:
        with open(self.root / name, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
        return self.files[name] - 8 - n

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None

    def quantization_config(self) -> dict[str, object]:
        """config.json's ``quantization_config``: one group per distinct setting, in the order
        the settings first appear."""
        if not self.groups:
            raise CheckpointError("no tensor can be exported as a compressed-tensors module "
                                  "(no quantized 2-D .weight)")
        return L.build_quantization_config([(t, a) for (a, _), t in self.groups.items()],
                                           formats=[f for _, f in self.groups])


def _unpacked(ct: dict[str, np.ndarray], bits: int, rows: int, cols: int
              ) -> dict[str, np.ndarray]:
    """pack-quantized tensors of one module as int-quantized ones (int8, same values)."""
    out = {"weight": L.unpack_from_int32(ct["weight_packed"], bits, (rows, cols)),
           "weight_scale": ct["weight_scale"]}
    zp = ct.get("weight_zero_point")
    if zp is not None:
        scale = ct["weight_scale"]
        out["weight_zero_point"] = zp if zp.dtype == np.int8 else \
            L.unpack_from_int32(zp, bits, (rows, scale.shape[1]), packed_dim=0)
    return out

