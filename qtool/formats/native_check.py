"""The checks of one artifact shard's files against the manifest's records: the cheap ones
(every tensor present with its dtype and shape; :meth:`Artifact.check`) and the full ones of
``qtool verify`` (also the values inside the ranges their scheme allows)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from qtool.core import packing
from qtool.core.double_quant import scales_of_codes
from qtool.core.scales import scale_to_float32
from qtool.core.shapes import rows_cols, zero_point_from_stored
from qtool.formats.manifest import ArtifactError, TensorRecord
from qtool.formats.safetensors import SafetensorsFile

ShardFiles = tuple[SafetensorsFile, SafetensorsFile, SafetensorsFile, SafetensorsFile | None]
"""A shard's main file, scale and zero-point sidecars, and row-scale file (or None)."""


def close_all(files: Sequence[SafetensorsFile | None]) -> None:
    for f in files:
        if f is not None:
            f.close()


def check_shard(records: list[TensorRecord], main: SafetensorsFile, sc: SafetensorsFile,
                 zp: SafetensorsFile, rs: SafetensorsFile | None) -> None:
    """Every record of the shard is in its files with the dtype and shape the manifest gives
    (ArtifactError otherwise)."""
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


def shard_problems(records: list[TensorRecord], main: SafetensorsFile | None,
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
