"""Reading compressed-tensors checkpoints: parse ``quantization_config``, decompress in numpy.

The float weights equal those compressed-tensors 0.20.1 itself reconstructs (its compressors'
``decompress``), bit for bit; see docs/EXPORT.md. Integer weight-only formats only:
int-quantized, naive-quantized and pack-quantized; tensor, channel and group strategies.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from qtool.formats.compressed_tensors_layout import (
    FORMATS,
    PACK_QUANTIZED,
    QPARAM_NAMES,
    WeightArgs,
    dequantize,
    unpack_from_int32,
)


@dataclass(frozen=True)
class ConfigGroup:
    name: str
    targets: tuple[str, ...]
    weights: WeightArgs
    format: str


@dataclass(frozen=True)
class CTConfig:
    """A parsed, validated ``quantization_config`` (integer weight-only reading)."""

    groups: tuple[ConfigGroup, ...]
    ignore: tuple[str, ...]

    def group_for(self, module: str) -> ConfigGroup | None:
        """The group quantizing ``module``, None when no group targets it or it is ignored.

        Names are matched as the library does (``re:`` = ``re.match``, else equality); a class
        target (``Linear``, ``Embedding``) cannot be checked without the model and matches any
        module. A module matched by groups of different settings is an error.
        """
        if any(_match_name(module, t, classes=False) for t in self.ignore):
            return None
        hits = [g for g in self.groups if any(_match_name(module, t) for t in g.targets)]
        if len({(g.weights, g.format) for g in hits}) > 1:
            raise ValueError(f"module {module} is matched by config groups "
                             f"{', '.join(g.name for g in hits)} with different settings")
        return hits[0] if hits else None


def _match_name(name: str, target: str, classes: bool = True) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name or (classes and target[:1].isupper() and "." not in target)


def parse_quantization_config(config: Mapping[str, object]) -> CTConfig:
    """Validate a compressed-tensors ``quantization_config`` (or a whole config.json)."""
    qc = config.get("quantization_config", config)
    if not isinstance(qc, Mapping):
        raise ValueError("quantization_config must be a JSON object")
    if qc.get("quant_method") != "compressed-tensors":
        raise ValueError(f"quantization_config.quant_method is {qc.get('quant_method')!r}, "
                         "not 'compressed-tensors'")
    if qc.get("quantization_status", "compressed") != "compressed":
        raise ValueError(f"quantization_config.quantization_status is "
                         f"{qc.get('quantization_status')!r}: the weights are not compressed")
    top = qc.get("format")
    if top not in (*FORMATS, "mixed-precision", None):
        raise ValueError(f"quantization_config.format {top!r} is not supported; supported: "
                         f"{', '.join(FORMATS)}, mixed-precision")
    groups_in = qc.get("config_groups")
    if not isinstance(groups_in, Mapping) or not groups_in:
        raise ValueError("quantization_config.config_groups must be a non-empty object")
    groups = [_parse_group(str(k), v, top) for k, v in groups_in.items()]
    ignore = qc.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(t, str) for t in ignore):
        raise ValueError("quantization_config.ignore must be a list of names")
    _check_patterns(ignore, "quantization_config.ignore")
    return CTConfig(tuple(groups), tuple(ignore))


def _check_patterns(names: list[str], where: str) -> None:
    """Every ``re:`` name a valid regex, refused here rather than raised while matching."""
    for t in names:
        if t.startswith("re:"):
            try:
                re.compile(t[3:])
            except (re.error, RecursionError) as e:
                raise ValueError(f"{where}: {t!r} is not a valid regex ({e})") from None


def _parse_group(name: str, g: object, top: object) -> ConfigGroup:
    where = f"quantization_config.config_groups.{name}"
    if not isinstance(g, Mapping):
        raise ValueError(f"{where} must be an object (preset scheme names are not supported)")
    targets = g.get("targets")
    if not isinstance(targets, list) or not targets or \
            not all(isinstance(t, str) for t in targets):
        raise ValueError(f"{where}.targets must be a non-empty list of names")
    _check_patterns(targets, f"{where}.targets")
    w = g.get("weights")
    if not isinstance(w, Mapping):
        raise ValueError(f"{where}.weights is missing: only weight quantization is read")
    if w.get("type", "int") != "int":
        raise ValueError(f"{where}.weights.type {w.get('type')!r} is not supported (only int)")
    if w.get("dynamic", False) is not False:
        raise ValueError(f"{where}.weights.dynamic must be false")
    if w.get("block_structure") is not None:
        raise ValueError(f"{where}.weights.block_structure: the block strategy is not supported")
    gs = w.get("group_size")
    strategy = w.get("strategy") or ("tensor" if gs is None else "channel" if gs == -1
                                     else "group")
    try:
        args = WeightArgs(w.get("num_bits", 8), w.get("symmetric", True), strategy,
                          None if gs == -1 else gs)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    fmt = g.get("format") or (top if top in FORMATS else PACK_QUANTIZED)
    if fmt not in FORMATS:
        raise ValueError(f"{where}.format {fmt!r} is not supported; supported: "
                         f"{', '.join(FORMATS)}")
    return ConfigGroup(name, tuple(targets), args, fmt)




def _get(tensors: Mapping[str, np.ndarray], name: str, where: str) -> np.ndarray:
    if name not in tensors:
        raise ValueError(f"{where}.{name} is missing")
    return np.asarray(tensors[name])


def decompress_weight(tensors: Mapping[str, np.ndarray], args: WeightArgs, fmt: str,
                      where: str = "module") -> np.ndarray:
    """One module's weight from its compressed tensors (local names), as the library does."""
    if fmt == PACK_QUANTIZED:
        shape = _get(tensors, "weight_shape", where)
        if shape.dtype.kind not in "iu" or shape.shape != (2,) or (shape < 0).any():
            raise ValueError(f"{where}.weight_shape must hold 2 non-negative integers, got "
                             f"{shape.tolist()} ({shape.dtype})")
        rows, cols = (int(d) for d in shape)
        try:
            q = unpack_from_int32(_get(tensors, "weight_packed", where), args.num_bits,
                                  (rows, cols))
        except ValueError as e:
            raise ValueError(f"{where}.weight_packed: {e}") from None
    else:
        q = _get(tensors, "weight", where)
        if q.dtype != np.int8 or q.ndim != 2:
            raise ValueError(f"{where}.weight must be 2-D int8, got {q.dtype} of shape "
                             f"{list(q.shape)}")
        rows, cols = q.shape
    scale = _get(tensors, "weight_scale", where)
    zp = None
    if args.symmetric and "weight_zero_point" in tensors and np.any(tensors["weight_zero_point"]):
        raise ValueError(f"{where}.weight_zero_point is not 0 in a symmetric config group")
    if not args.symmetric:
        zp = _get(tensors, "weight_zero_point", where)
        if fmt == PACK_QUANTIZED and args.strategy != "tensor":
            n = scale.shape[-1] if scale.ndim == 2 else 1
            try:
                zp = unpack_from_int32(zp, args.num_bits, (rows, n), packed_dim=0)
            except ValueError as e:
                raise ValueError(f"{where}.weight_zero_point: {e}") from None
        elif zp.dtype.kind not in "iu":
            raise ValueError(f"{where}.weight_zero_point must be integers, got {zp.dtype}")
    return dequantize(q, scale, zp, args, where)


def decompress_state_dict(tensors: Mapping[str, np.ndarray],
                          config: CTConfig) -> dict[str, np.ndarray]:
    """A checkpoint's tensors with every compressed module turned into its float ``.weight``.

    Order is kept (a module's weight takes its first tensor's place); other tensors pass
    through. A module is compressed when it has ``weight_scale``.
    """
    modules = {n.rpartition(".")[0] for n in tensors if n.rpartition(".")[2] == "weight_scale"}
    out: dict[str, np.ndarray] = {}
    for name, t in tensors.items():
        module, _, local = name.rpartition(".")
        if local not in ("weight", *QPARAM_NAMES):
            out[name] = t
        elif module not in modules:
            if local != "weight":
                raise ValueError(f"{name} has no {module}.weight_scale beside it")
            out[name] = t
        elif f"{module}.weight" not in out:
            group = config.group_for(module)
            if group is None:
                raise ValueError(f"{module} holds quantized tensors but no config group "
                                 "targets it (or it is ignored)")
            mine = {k: tensors[f"{module}.{k}"] for k in ("weight", *QPARAM_NAMES)
                    if f"{module}.{k}" in tensors}
            out[f"{module}.weight"] = decompress_weight(mine, group.weights, group.format,
                                                        module)
    return out
