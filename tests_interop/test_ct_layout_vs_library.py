"""qtool's numpy compressed-tensors layout against compressed-tensors' own torch functions.

Bit for bit, on random data: int32 packing, the compressors' decompress, the config schema.
"""

from __future__ import annotations

import itertools

import ml_dtypes
import numpy as np
import pytest
import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.compressors.pack_quantized.helpers import (
    pack_to_int32,
    unpack_from_int32,
)
from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme
from transformers import CompressedTensorsConfig

from qtool.core.quant import dequantize, quantize
from qtool.core.schemes import QuantSpec
from qtool.formats import compressed_tensors_layout as L
from qtool.formats import compressed_tensors_read as R

SHAPES = [(1, 1), (3, 31), (9, 32), (2, 33), (17, 100), (40, 7)]


def to_torch(a: np.ndarray) -> torch.Tensor:
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a).copy())


def bits_of(t: torch.Tensor) -> np.ndarray:
    """float32 bit patterns (float16/bfloat16 widen exactly)."""
    return t.to(torch.float32).numpy().view(np.uint32)


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_to_int32_equals_library(bits):
    rng = np.random.default_rng(bits)
    for shape, dim in itertools.product(SHAPES, (0, 1)):
        v = rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), shape).astype(np.int8)
        ref = pack_to_int32(torch.from_numpy(v), bits, packed_dim=dim).numpy()
        mine = L.pack_to_int32(v, bits, dim)
        assert mine.dtype == ref.dtype and mine.shape == ref.shape, (shape, dim)
        np.testing.assert_array_equal(mine, ref, err_msg=f"{shape} dim {dim}")
        np.testing.assert_array_equal(L.unpack_from_int32(ref, bits, shape, dim), v)
        if bits == 4 and dim == 0 and ref.shape[0] == 1:
            continue  # the library's own bug, see test_library_4bit_dim0_single_word_bug
        back = unpack_from_int32(torch.from_numpy(mine), bits, torch.Size(shape), dim)
        np.testing.assert_array_equal(back.numpy(), v)


def test_library_4bit_dim0_single_word_bug():
    """compressed-tensors 0.20.1 cannot unpack 4-bit values packed along dim 0 into one row of
    words (<= 8 rows): its nibble fast path views a transposed tensor that .contiguous() leaves
    as it is. So a 4-bit asymmetric pack-quantized module with <= 8 output rows fails to load
    (its zero points are packed along dim 0). qtool's reader has no such limit."""
    v = np.zeros((8, 3), np.int8)
    packed = pack_to_int32(torch.from_numpy(v), 4, packed_dim=0)
    assert packed.shape == (1, 3)
    with pytest.raises(RuntimeError, match="stride"):
        unpack_from_int32(packed, 4, torch.Size((8, 3)), packed_dim=0)
    np.testing.assert_array_equal(L.unpack_from_int32(packed.numpy(), 4, (8, 3), 0), v)


def scheme_of(args: L.WeightArgs, fmt: str) -> QuantizationScheme:
    return QuantizationScheme(targets=["Linear"], weights=args.to_dict(), format=fmt)


def library_decompress(tensors: dict[str, np.ndarray], args: L.WeightArgs,
                       fmt: str) -> torch.Tensor:
    compressor = BaseCompressor.get_value_from_registry(fmt)
    state = {k: to_torch(v) for k, v in tensors.items()}
    return compressor.decompress(state, scheme_of(args, fmt))["weight"]


def _export_cases():
    for scheme, bits, gran in itertools.product(
            ["symmetric", "asymmetric", "symmetric-unsigned", "gnmt"], [2, 3, 4, 5, 6, 7, 8],
            ["tensor", "channel", "group"]):
        if scheme != "gnmt" or (bits == 8 and gran == "channel"):
            yield scheme, bits, gran


@pytest.mark.parametrize("scheme, bits, gran", list(_export_cases()))
def test_library_decompress_of_export_equals_qtool_dequantize(scheme, bits, gran):
    rng = np.random.default_rng(bits * 7 + len(scheme))
    w = rng.standard_normal((24, 96)).astype(np.float32)  # > 8 rows: see the 4-bit bug above
    if scheme == "symmetric-unsigned":
        w = np.abs(w)
    spec = QuantSpec(scheme, bits=bits, granularity=gran, group_size=32)
    qt = quantize(w, spec)
    expected = dequantize(qt.data, qt.scale, qt.zero_point, qt.shape, spec, np.float32)
    args, t = L.qtool_to_ct(qt.data, qt.scale, qt.zero_point, scheme=scheme, bits=bits,
                            granularity=spec.granularity, shape=w.shape, group_size=32)
    for fmt in ([L.INT_QUANTIZED, L.NAIVE_QUANTIZED] if bits == 8 else []) + [L.PACK_QUANTIZED]:
        if fmt != L.default_format(args):
            t = _reformat(t, args, fmt)
        got = library_decompress(t, args, fmt)
        assert got.dtype == torch.float32 and tuple(got.shape) == w.shape
        np.testing.assert_array_equal(bits_of(got), expected.view(np.uint32), err_msg=fmt)
        np.testing.assert_array_equal(R.decompress_weight(t, args, fmt).view(np.uint32),
                                      expected.view(np.uint32))


def _reformat(t: dict[str, np.ndarray], args: L.WeightArgs, fmt: str) -> dict[str, np.ndarray]:
    """8-bit int-quantized tensors in another format's layout."""
    if fmt != L.PACK_QUANTIZED:
        return t
    out = {"weight_packed": L.pack_to_int32(t["weight"], 8),
           "weight_shape": np.array(t["weight"].shape, np.int64),
           "weight_scale": t["weight_scale"]}
    if "weight_zero_point" in t:
        zp = t["weight_zero_point"]
        out["weight_zero_point"] = zp if args.strategy == "tensor" else \
            L.pack_to_int32(zp, 8, packed_dim=0)
    return out


def _native_cases():
    for fmt, bits, sym, strategy, sdtype in itertools.product(
            [L.INT_QUANTIZED, L.PACK_QUANTIZED], [2, 4, 5, 8], [True, False],
            ["tensor", "channel", "group"], [np.float32, np.float16, ml_dtypes.bfloat16]):
        if fmt == L.PACK_QUANTIZED or bits == 8:
            yield fmt, bits, sym, strategy, sdtype


@pytest.mark.parametrize("fmt, bits, sym, strategy, sdtype", list(_native_cases()))
def test_reading_library_compressed_weights_equals_library_decompress(fmt, bits, sym,
                                                                       strategy, sdtype):
    """Checkpoints written by compressed-tensors' own compressors (compress with its scales
    and zero points), in every scale dtype, read back bit for bit as the library does."""
    rng = np.random.default_rng(bits + 10 * sym)
    rows, cols, g = 16, 64, 16
    args = L.WeightArgs(bits, sym, strategy, g if strategy == "group" else None)
    pshape = {"tensor": (1,), "channel": (rows, 1), "group": (rows, cols // g)}[strategy]
    w = torch.from_numpy(rng.standard_normal((rows, cols)).astype(np.float32))
    scale = rng.uniform(0.01, 0.5, pshape).astype(sdtype)
    state = {"weight": w.to(to_torch(scale).dtype), "weight_scale": to_torch(scale)}
    if not sym:
        half = 1 << (bits - 1)
        state["weight_zero_point"] = torch.from_numpy(
            rng.integers(-half, half, pshape).astype(np.int8))
    compressor = BaseCompressor.get_value_from_registry(fmt)
    scheme = scheme_of(args, fmt)
    compressed = compressor.compress(state, scheme)
    ref = compressor.decompress(compressed, scheme)["weight"]
    tensors = {k: (v.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
                   if v.dtype == torch.bfloat16 else v.numpy()) for k, v in compressed.items()}
    mine = R.decompress_weight(tensors, args, fmt, "m")
    assert ref.dtype == to_torch(scale).dtype
    np.testing.assert_array_equal(mine.view(np.uint32), bits_of(ref))


def test_config_is_accepted_by_the_library_and_transformers():
    qc = L.build_quantization_config(
        [([L.exact_target("model.layers.0.mlp.up_proj")], L.WeightArgs(8, False, "channel")),
         ([L.exact_target("lm_head")], L.WeightArgs(4, True, "group", 32))])
    parsed = QuantizationConfig.model_validate(qc)
    assert parsed.quantization_status == "compressed"
    g1 = parsed.config_groups["group_1"]
    assert g1.format == "pack-quantized" and g1.weights.group_size == 32
    assert g1.weights.strategy == "group" and g1.weights.symmetric
    assert parsed.config_groups["group_0"].weights.zp_dtype == torch.int8
    assert CompressedTensorsConfig.from_dict({"quantization_config": qc}).is_quantization_compressed
    # what the library writes itself parses to the same settings in qtool's reader
    ours = R.parse_quantization_config(parsed.model_dump())
    assert [g.weights for g in ours.groups] == [L.WeightArgs(8, False, "channel"),
                                                L.WeightArgs(4, True, "group", 32)]
