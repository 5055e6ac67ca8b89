"""The compressed-tensors 0.20.1 checkpoint layout, in numpy (no torch).

What transformers and vLLM load for integer weight-only quantization (docs/EXPORT.md):

* ``int-quantized`` / ``naive-quantized``: ``weight`` int8 (the signed ``num_bits`` range),
  ``weight_scale`` float, ``weight_zero_point`` int8 when asymmetric.
* ``pack-quantized``: ``weight_packed`` int32 (``pack_to_int32``), ``weight_shape`` int64
  ``[rows, cols]``, ``weight_scale``; when asymmetric, ``weight_zero_point`` packed along
  dim 0 for the channel and group strategies, plain int8 ``[1]`` for tensor.
* Dequantized: ``(q.to(s.dtype) - zp.to(s.dtype)) * s``, in the scale's dtype.

Tensor names here are a module's *local* names (``weight_scale``, not ``x.weight_scale``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from qtool.core import packing

INT_QUANTIZED = "int-quantized"
NAIVE_QUANTIZED = "naive-quantized"
PACK_QUANTIZED = "pack-quantized"
FORMATS = (INT_QUANTIZED, NAIVE_QUANTIZED, PACK_QUANTIZED)
STRATEGIES = ("tensor", "channel", "group")
LAYOUT_VERSION = "0.20.1"  # the compressed-tensors release this layout was read from
QPARAM_NAMES = ("weight_scale", "weight_zero_point", "weight_packed", "weight_shape")


def _check_bits(num_bits: object, what: str = "num_bits") -> int:
    if isinstance(num_bits, bool) or not isinstance(num_bits, int | np.integer) \
            or not 1 <= num_bits <= 8:
        raise ValueError(f"{what} must be an integer from 1 to 8, got {num_bits!r}")
    return int(num_bits)


# --- int32 packing ---------------------------------------------------------------------------

def pack_to_int32(values: np.ndarray, num_bits: int, packed_dim: int = 1) -> np.ndarray:
    """Pack 2-D int8 values of the signed ``num_bits`` range into int32, as the library does.

    Each value v becomes the code ``v + 2**(num_bits-1)``; along ``packed_dim`` (1: each row,
    0: each column) the codes form one dense little-endian bit stream, value i at stream bits
    ``i*num_bits ...``, LSB first, stream bit k being bit ``k % 32`` of word ``k // 32``; codes
    straddle words when ``num_bits`` does not divide 32. ``ceil(n * num_bits / 32)`` words per
    row (column), unused high bits 0.
    """
    b = _check_bits(num_bits)
    v = np.asarray(values)
    if v.dtype != np.int8 or v.ndim != 2:
        raise ValueError(f"values to pack must be 2-D int8, got {v.dtype} of shape {v.shape}")
    if packed_dim not in (0, 1):
        raise ValueError(f"packed_dim must be 0 or 1, got {packed_dim!r}")
    lo, hi = -(1 << (b - 1)), (1 << (b - 1)) - 1
    if v.size and (int(v.min()) < lo or int(v.max()) > hi):
        raise ValueError(f"values in [{int(v.min())}, {int(v.max())}] do not fit {b} bits "
                         f"([{lo}, {hi}])")
    if packed_dim == 0:
        v = v.T
    rows, cols = v.shape
    groups = -(-cols // 32)  # 32 values fill exactly b words
    codes = np.zeros((rows, groups * 32), np.uint32)
    codes[:, :cols] = v.astype(np.int32) + (1 << (b - 1))
    codes = codes.reshape(rows * groups, 32)
    words = np.zeros((rows * groups, b), np.uint32)
    for i in range(32):
        w, off = divmod(i * b, 32)
        words[:, w] |= codes[:, i] << np.uint32(off)  # the high bits shifted out ...
        if off + b > 32:
            words[:, w + 1] |= codes[:, i] >> np.uint32(32 - off)  # ... go to the next word
    out = words.reshape(rows, groups * b)[:, : -(-cols * b // 32)].view(np.int32)
    return np.ascontiguousarray(out.T if packed_dim == 0 else out)


def unpack_from_int32(packed: np.ndarray, num_bits: int, shape: Sequence[int],
                      packed_dim: int = 1) -> np.ndarray:
    """Inverse of ``pack_to_int32``: int32 words -> int8 values of the 2-D ``shape``."""
    b = _check_bits(num_bits)
    p = np.asarray(packed)
    if p.dtype != np.int32 or p.ndim != 2:
        raise ValueError(f"packed values must be 2-D int32, got {p.dtype} of shape {p.shape}")
    if packed_dim not in (0, 1):
        raise ValueError(f"packed_dim must be 0 or 1, got {packed_dim!r}")
    shape = tuple(int(d) for d in shape)
    if len(shape) != 2:
        raise ValueError(f"the unpacked shape must be 2-D, got {list(shape)}")
    if packed_dim == 0:
        p, shape = p.T, shape[::-1]
    rows, cols = shape
    need = -(-cols * b // 32)
    if p.shape != (rows, need):
        dims = (rows, need) if packed_dim == 1 else (need, rows)
        raise ValueError(f"{list(shape if packed_dim == 1 else shape[::-1])} values of {b} bits "
                         f"pack to int32 of shape {list(dims)}, got "
                         f"{list(p.shape if packed_dim == 1 else p.shape[::-1])}")
    groups = -(-need // b)
    words = np.zeros((rows, groups * b), np.uint32)
    words[:, :need] = np.ascontiguousarray(p).view(np.uint32)
    words = words.reshape(rows * groups, b)
    codes = np.empty((rows * groups, 32), np.uint32)
    for i in range(32):
        w, off = divmod(i * b, 32)
        c = words[:, w] >> np.uint32(off)
        if off + b > 32:
            c |= words[:, w + 1] << np.uint32(32 - off)
        codes[:, i] = c & np.uint32((1 << b) - 1)
    q = (codes.reshape(rows, groups * 32)[:, :cols].astype(np.int16) - (1 << (b - 1)))
    q = q.astype(np.int8)
    return np.ascontiguousarray(q.T if packed_dim == 0 else q)


# --- settings and the quantization_config ----------------------------------------------------

@dataclass(frozen=True)
class WeightArgs:
    """The ``weights`` QuantizationArgs this module reads and writes (type int, static)."""

    num_bits: int
    symmetric: bool
    strategy: str
    group_size: int | None = None

    def __post_init__(self) -> None:
        _check_bits(self.num_bits, "weights.num_bits")
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"weights.symmetric must be true or false, got {self.symmetric!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"weights.strategy {self.strategy!r} is not supported; "
                             f"supported: {', '.join(STRATEGIES)}")
        if self.strategy == "group":
            g = self.group_size
            if isinstance(g, bool) or not isinstance(g, int) or g < 1:
                raise ValueError(f"weights.group_size must be a positive integer for strategy "
                                 f"group, got {g!r}")
        elif self.group_size not in (None, -1):
            raise ValueError(f"weights.group_size {self.group_size!r} needs strategy group, "
                             f"not {self.strategy}")

    def to_dict(self) -> dict[str, object]:
        return {"num_bits": self.num_bits, "type": "int", "symmetric": self.symmetric,
                "group_size": self.group_size if self.strategy == "group" else None,
                "strategy": self.strategy, "dynamic": False}


def default_format(args: WeightArgs) -> str:
    """What qtool writes: int8 as is at 8 bits, int32-packed below."""
    return INT_QUANTIZED if args.num_bits == 8 else PACK_QUANTIZED


def exact_target(module_name: str, optional_prefix: str | None = None) -> str:
    """A ``re:`` target matching exactly ``module_name`` (the library uses ``re.match``).

    With ``optional_prefix`` (a model's ``base_model_prefix``, e.g. ``model``, ``bert``) a
    name starting with it also matches without it: transformers drops that prefix when a
    checkpoint is loaded into the bare model class (``AutoModel`` on a ``...ForCausalLM``).
    """
    if optional_prefix and module_name.startswith(optional_prefix + "."):
        rest = module_name[len(optional_prefix) + 1:]
        return f"re:(?:{re.escape(optional_prefix)}\\.)?{re.escape(rest)}$"
    return "re:" + re.escape(module_name) + "$"


def build_quantization_config(groups: Sequence[tuple[Sequence[str], WeightArgs]],
                              ignore: Sequence[str] = (),
                              formats: Sequence[str] | None = None) -> dict[str, object]:
    """config.json's ``quantization_config``: one config group per (targets, settings).

    Each group carries its own ``format``: transformers 5 with compressed-tensors 0.20 picks a
    module's compressor from its group's format, else infers one (pack-quantized for weight-only
    int), ignoring the top-level ``format``.
    """
    if not groups:
        raise ValueError("a quantization_config needs at least one config group")
    fmts = list(formats) if formats is not None else [default_format(a) for _, a in groups]
    if len(fmts) != len(groups):
        raise ValueError(f"{len(fmts)} formats for {len(groups)} config groups")
    config_groups: dict[str, object] = {}
    for i, ((targets, args), fmt) in enumerate(zip(groups, fmts, strict=True)):
        name = f"group_{i}"
        if isinstance(targets, str) or not targets or \
                not all(isinstance(t, str) and t for t in targets):
            raise ValueError(f"config_groups.{name}.targets must be a non-empty list of names, "
                             f"got {targets!r}")
        if fmt not in FORMATS:
            raise ValueError(f"config_groups.{name}.format {fmt!r} is not one of "
                             f"{', '.join(FORMATS)}")
        config_groups[name] = {"targets": list(targets), "weights": args.to_dict(),
                               "input_activations": None, "output_activations": None,
                               "format": fmt}
    return {"config_groups": config_groups, "quant_method": "compressed-tensors",
            "format": fmts[0] if len(set(fmts)) == 1 else "mixed-precision",
            "quantization_status": "compressed", "kv_cache_scheme": None,
            "global_compression_ratio": None, "ignore": list(ignore),
            "sparsity_config": {}, "transform_config": {}, "version": LAYOUT_VERSION}


# --- decompression ---------------------------------------------------------------------------

def _scale_dtype(s: np.ndarray, where: str) -> str:
    # uint16 holds bfloat16 scales as bit patterns (readers that do without ml_dtypes)
    name = "bfloat16" if s.dtype == np.uint16 else s.dtype.name
    if name not in ("float16", "bfloat16", "float32", "float64"):
        raise ValueError(f"{where}.weight_scale must be float16, bfloat16, float32 or float64, "
                         f"got {name}")
    return name


def _as_compute(s: np.ndarray) -> np.ndarray:
    """Scales as float32 (float64 for float64), exactly."""
    if s.dtype.name == "bfloat16" or s.dtype == np.uint16:  # read by its bits
        return (np.ascontiguousarray(s).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return s.astype(np.float64 if s.dtype == np.float64 else np.float32)


def scale_problem(scale: np.ndarray) -> str | None:
    """What is wrong with a module's ``weight_scale`` values, None when every one is finite
    and > 0. A zero, negative or non-finite scale restores zeros, sign-flipped or NaN weights,
    so it is refused as the scales of qtool's own artifacts are (same wording)."""
    s = _as_compute(np.asarray(scale))
    if bool(np.all(s > 0)) and bool(np.isfinite(s.max(initial=0.0))):
        return None
    kinds = [(int(np.count_nonzero(s == 0)), "zero"),
             (int(np.count_nonzero((s < 0) & np.isfinite(s))), "negative"),
             (int(np.count_nonzero(np.isnan(s))), "NaN"),
             (int(np.count_nonzero(np.isinf(s))), "infinite")]
    bad = s.size - int(np.count_nonzero(np.isfinite(s) & (s > 0)))
    detail = ", ".join(f"{n} {k}" for n, k in kinds if n)
    return f"{bad} of {s.size} scales are not finite and > 0 ({detail})"


def _round_to(y: np.ndarray, dtype_name: str) -> np.ndarray:
    """Round float32 ``y`` to ``dtype_name`` (nearest, ties to even), returned widened exactly."""
    if dtype_name == "float16":
        return y.astype(np.float16).astype(np.float32)
    if dtype_name == "bfloat16":
        u = y.view(np.uint32)
        u = (u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) \
            & np.uint32(0xFFFF0000)
        return u.view(np.float32)
    return y


def dequantize(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None,
               args: WeightArgs, where: str = "weight") -> np.ndarray:
    """The library's ``dequantize``: ``(q - zp) * scale`` in the scale's dtype.

    ``q`` is int8 ``[rows, cols]``; ``scale`` (and ``zero_point``) ``[1]`` (tensor),
    ``[rows, 1]`` (channel) or ``[rows, cols / group_size]`` (group). Returns float32 (float64
    for float64 scales) holding exactly the library's values. ``where`` names the module.
    """
    rows, cols = q.shape
    sname = _scale_dtype(scale, where)
    if args.strategy == "tensor":
        want: tuple[int, ...] = (1,)
    elif args.strategy == "channel":
        want = (rows, 1)
    else:
        g = args.group_size
        if cols % g:
            raise ValueError(f"{where}: {cols} columns are not a multiple of group_size {g}")
        want = (rows, cols // g)
    ok = scale.size == 1 and scale.ndim <= 1 if args.strategy == "tensor" else \
        scale.shape == want
    if not ok:
        raise ValueError(f"{where}.weight_scale has shape {list(scale.shape)}, "
                         f"expected {list(want)} for strategy {args.strategy}")
    if zero_point is not None and zero_point.shape != scale.shape:
        raise ValueError(f"{where}.weight_zero_point has shape {list(zero_point.shape)}, "
                         f"the weight_scale's is {list(scale.shape)}")
    problem = scale_problem(scale)
    if problem is not None:
        raise ValueError(f"{where}.weight_scale: {problem}")
    s = _as_compute(scale)
    x = q.astype(s.dtype)
    if args.strategy == "group":
        x = x.reshape(rows, want[1], args.group_size)
        s = s[:, :, None]
    if zero_point is not None:
        z = zero_point.astype(s.dtype)
        x = x - (z[:, :, None] if args.strategy == "group" else z)
    return _round_to(x * s, sname).reshape(rows, cols)



# --- qtool <-> compressed-tensors ------------------------------------------------------------


def qtool_to_ct(data: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, *, scheme: str,
                bits: int, granularity: str, shape: Sequence[int],
                group_size: int | None = None) -> tuple[WeightArgs, dict[str, np.ndarray]]:
    """One qtool-quantized 2-D tensor as compressed-tensors tensors (local names).

    ``data`` is qtool's stored integers (I8/U8 in ``shape`` at 8 bits, U8 bit-packed rows
    below), ``scale``/``zero_point`` its sidecars. The weights the library reconstructs equal
    qtool's ``scale * (q - zero_point)`` bit for bit: ``q - zp`` is unchanged (unsigned schemes
    move both by ``2**(bits-1)``), and the scale is kept as it is.
    """
    shape = tuple(int(d) for d in shape)
    if len(shape) != 2:
        raise ValueError(f"only 2-D weights can be exported, got shape {list(shape)}")
    rows, cols = shape
    if granularity not in STRATEGIES:
        raise ValueError(f"unknown granularity {granularity!r}")
    if scheme not in ("symmetric", "gnmt", "asymmetric", "symmetric-unsigned"):
        raise ValueError(f"unknown scheme {scheme!r}")
    gs = group_size if granularity == "group" else None
    if gs is not None and cols % gs:
        raise ValueError(f"{cols} columns are not a multiple of group_size {gs}: "
                         "compressed-tensors has no shorter last group")
    signed = scheme in ("symmetric", "gnmt")
    args = WeightArgs(bits, signed, granularity, gs)
    data = np.asarray(data)
    if bits < 8:
        q = packing.unpack(data.reshape(rows, -1), bits, cols, signed)
    else:
        q = data.reshape(rows, cols)
    want = np.dtype(np.int8 if signed else np.uint8)
    if q.dtype != want:
        raise ValueError(f"scheme {scheme} stores {want} values, got {q.dtype}")
    pshape = {"tensor": (), "channel": (rows, 1)}.get(granularity, (rows, -(-cols // (gs or 1))))
    scale, zp = np.asarray(scale), np.asarray(zero_point)
    if scale.shape != pshape or zp.shape != pshape:
        raise ValueError(f"scale {list(scale.shape)} / zero point {list(zp.shape)} do not have "
                         f"the shape {list(pshape)} of granularity {granularity}")
    if scale.dtype.kind != "f" and scale.dtype.name != "bfloat16" and scale.dtype != np.uint16:
        # uint16: bfloat16 scales as bit patterns (kept as they are)
        raise ValueError(f"scale must be floats, got {scale.dtype}")
    half = 1 << (bits - 1)
    if signed:
        if np.any(zp):
            raise ValueError(f"scheme {scheme} has zero points 0, got non-zero ones")
        weight, ct_zp = q, None
    else:
        weight = (q.astype(np.int16) - half).astype(np.int8)
        if scheme == "symmetric-unsigned":
            if np.any(zp):
                raise ValueError(f"scheme {scheme} has zero points 0, got non-zero ones")
            ct_zp = np.full(pshape, -half, np.int8)
        else:
            if zp.size and (zp.min() < 0 or zp.max() > 2 * half - 1):
                raise ValueError(f"zero points in [{zp.min()}, {zp.max()}] are outside "
                                 f"[0, {2 * half - 1}]")
            ct_zp = (zp.astype(np.int16) - half).astype(np.int8)
    ct_scale = scale.reshape(1) if granularity == "tensor" else scale
    if ct_zp is not None and granularity == "tensor":
        ct_zp = ct_zp.reshape(1)
    out: dict[str, np.ndarray] = {}
    if bits == 8:
        out["weight"] = np.ascontiguousarray(weight)
    else:
        out["weight_packed"] = pack_to_int32(weight, bits)
        out["weight_shape"] = np.array([rows, cols], np.int64)
    out["weight_scale"] = np.ascontiguousarray(ct_scale)
    if ct_zp is not None:
        out["weight_zero_point"] = (pack_to_int32(ct_zp, bits, packed_dim=0)
                                    if bits < 8 and granularity != "tensor" else ct_zp)
    return args, out


def ct_to_qtool(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None,
                args: WeightArgs) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    """compressed-tensors int8 ``q`` (unpacked), scales and zero points in qtool's terms.

    Symmetric gives ``symmetric`` (int8 ``q``, zero points 0); asymmetric gives ``asymmetric``
    (``q`` and zero points moved up by ``2**(num_bits-1)`` into the unsigned range: uint8 and
    int32). ``q - zero_point`` is unchanged; a tensor strategy's ``[1]`` becomes ``[]``.
    Returns (scheme, q, scale, zero_point), q unpacked.
    """
    b = args.num_bits
    if b < 2:
        raise ValueError("qtool stores 2 to 8 bits, got weights.num_bits 1")
    half = 1 << (b - 1)
    q = np.asarray(q)
    if q.dtype != np.int8 or (q.size and (q.min() < -half or q.max() > half - 1)):
        raise ValueError(f"weight must be int8 in [{-half}, {half - 1}]")
    scale = np.asarray(scale)
    if args.strategy == "tensor":
        scale = scale.reshape(())
    if args.symmetric:
        return "symmetric", q, scale, np.zeros(scale.shape, np.int32)
    if zero_point is None:
        raise ValueError("an asymmetric weight needs weight_zero_point")
    zp = np.asarray(zero_point).astype(np.int32).reshape(scale.shape) + half
    if zp.size and (zp.min() < 0 or zp.max() > 2 * half - 1):
        raise ValueError(f"weight_zero_point outside [{-half}, {half - 1}]")
    return "asymmetric", (q.astype(np.int16) + half).astype(np.uint8), scale, zp
