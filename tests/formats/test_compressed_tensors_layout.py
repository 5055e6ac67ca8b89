"""The compressed-tensors layout in numpy: hand-packed words, qtool mapping, config, reading.

Torch-free: the same functions are checked against the library itself in tests_interop/.
"""

from __future__ import annotations

import itertools

import ml_dtypes
import numpy as np
import pytest

from qtool.core.quant import dequantize, quantize
from qtool.core.schemes import QuantSpec
from qtool.formats import compressed_tensors_layout as L
from qtool.formats import compressed_tensors_read as R


def i32(*words: int) -> np.ndarray:
    """Unsigned 32-bit literals as the int32 values the library stores."""
    return np.array(words, np.uint32).view(np.int32)


# --- packing: words computed by hand ---------------------------------------------------------

@pytest.mark.parametrize("bits, values, words", [
    # code = value + 2**(bits-1); value i at bits i*b.. of the row's little-endian stream
    (4, [1, -2, 7, -8], i32(0x0F69)),                   # codes 9, 6, 15, 0
    (4, [7] * 8, i32(0xFFFFFFFF)),                      # 8 codes of 15 fill a word: -1
    (4, [-8] * 9, i32(0, 0)),                           # the 9th value opens a 2nd word
    (8, [-128, 127, 0, 1], i32(0x8180FF00)),            # codes 0, 255, 128, 129
    (2, [1] * 16 + [-2], i32(0xFFFFFFFF, 0)),           # 16 codes of 3, then a code 0
    # 3 bits: values 0..9 (code 4 at bit 3i+2), value 10 (code 7) straddles: bits 30-31 of
    # word 0 hold its low two bits 11, bit 0 of word 1 its high bit.
    (3, [0] * 10 + [3], i32(0x24924924 | 0xC0000000, 1)),
    (1, [0, -1, 0, 0, 0, 0, 0, 0, 0, -1], i32(0b0111111101)),  # 1 bit: code 1 for 0
    (5, [15] * 7, i32(0xFFFFFFFF, 0b111)),              # 35 bits of 1s
])
def test_pack_to_int32_hand_words(bits, values, words):
    v = np.array([values], np.int8)
    packed = L.pack_to_int32(v, bits)
    assert packed.dtype == np.int32
    np.testing.assert_array_equal(packed, words[None, :])
    np.testing.assert_array_equal(L.unpack_from_int32(packed, bits, v.shape), v)


def test_pack_along_dim0_packs_columns():
    v = np.array([[1, -8], [2, 0], [3, 7]], np.int8)  # codes column 0: 9 10 11, column 1: 0 8 15
    packed = L.pack_to_int32(v, 4, packed_dim=0)
    np.testing.assert_array_equal(packed, i32(0xBA9, 0xF80).reshape(1, 2))
    np.testing.assert_array_equal(L.unpack_from_int32(packed, 4, (3, 2), packed_dim=0), v)


def test_pack_rows_are_independent_and_padding_is_zero():
    v = np.array([[7, 7, 7], [-8, -8, -8]], np.int8)
    np.testing.assert_array_equal(L.pack_to_int32(v, 4), i32(0xFFF, 0).reshape(2, 1))
    # padding bits are ignored on unpacking, as by the library
    np.testing.assert_array_equal(L.unpack_from_int32(i32(0xFFFFFFFF).reshape(1, 1), 4, (1, 3)),
                                  [[7, 7, 7]])


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_roundtrip_random(bits):
    rng = np.random.default_rng(bits)
    for rows, cols in [(1, 0), (3, 1), (5, 31), (4, 32), (2, 33), (6, 97)]:
        v = rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), (rows, cols)).astype(np.int8)
        for dim in (0, 1):
            p = L.pack_to_int32(v, bits, dim)
            n = -(-(cols if dim else rows) * bits // 32)
            assert p.shape == ((rows, n) if dim else (n, cols))
            np.testing.assert_array_equal(L.unpack_from_int32(p, bits, v.shape, dim), v)


def test_pack_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"do not fit 4 bits \(\[-8, 7\]\)"):
        L.pack_to_int32(np.array([[8]], np.int8), 4)
    with pytest.raises(ValueError, match="2-D int8"):
        L.pack_to_int32(np.array([[1]], np.uint8), 4)
    with pytest.raises(ValueError, match="num_bits must be an integer from 1 to 8"):
        L.pack_to_int32(np.array([[1]], np.int8), 9)
    with pytest.raises(ValueError, match=r"pack to int32 of shape \[2, 1\], got \[2, 2\]"):
        L.unpack_from_int32(np.zeros((2, 2), np.int32), 4, (2, 8))


# --- qtool -> compressed-tensors ---------------------------------------------------------------

def test_symmetric_8bit_channel_is_stored_as_is():
    q = np.array([[-127, 5], [0, 127]], np.int8)
    s = np.array([[0.5], [2.0]], np.float32)
    args, t = L.qtool_to_ct(q, s, np.zeros((2, 1), np.int32), scheme="gnmt", bits=8,
                            granularity="channel", shape=(2, 2))
    assert args == L.WeightArgs(8, True, "channel")
    assert set(t) == {"weight", "weight_scale"}
    np.testing.assert_array_equal(t["weight"], q)
    assert t["weight_scale"].dtype == np.float32 and t["weight_scale"].shape == (2, 1)


def test_asymmetric_8bit_moves_q_and_zero_point_by_128():
    q = np.array([[0, 255, 128, 3]], np.uint8)
    args, t = L.qtool_to_ct(q, np.float32(0.1), np.int32(3), scheme="asymmetric", bits=8,
                            granularity="tensor", shape=(1, 4))
    assert args == L.WeightArgs(8, False, "tensor")
    np.testing.assert_array_equal(t["weight"], np.array([[-128, 127, 0, -125]], np.int8))
    assert t["weight_zero_point"].dtype == np.int8
    np.testing.assert_array_equal(t["weight_zero_point"], [-125])
    assert t["weight_scale"].shape == (1,)


def test_symmetric_unsigned_is_asymmetric_with_zero_point_minus_half():
    q = np.array([[0, 255]], np.uint8)
    args, t = L.qtool_to_ct(q, np.array([[1.0]], np.float32), np.zeros((1, 1), np.int32),
                            scheme="symmetric-unsigned", bits=8, granularity="channel",
                            shape=(1, 2))
    assert not args.symmetric
    np.testing.assert_array_equal(t["weight_zero_point"], [[-128]])


def test_asymmetric_4bit_codes_are_qtools_q_and_zero_points_pack_down_columns():
    q = np.array([[15, 0, 8, 1], [1, 2, 3, 4], [0, 0, 0, 0]], np.uint8)
    zp = np.array([[1], [2], [3]], np.int32)
    from qtool.core import packing
    args, t = L.qtool_to_ct(packing.pack(q, 4), np.ones((3, 1), np.float32), zp,
                            scheme="asymmetric", bits=4, granularity="channel", shape=(3, 4))
    assert args == L.WeightArgs(4, False, "channel")
    # weight = q - 8, so the code (weight + 8) is q itself
    np.testing.assert_array_equal(t["weight_packed"], i32(0x180F, 0x4321, 0).reshape(3, 1))
    np.testing.assert_array_equal(t["weight_shape"], np.array([3, 4], np.int64))
    np.testing.assert_array_equal(t["weight_zero_point"], i32(0x321).reshape(1, 1))


def test_export_limits_are_errors():
    z = np.zeros((2, 2), np.int32)
    with pytest.raises(ValueError, match="not a multiple of group_size 4"):
        L.qtool_to_ct(np.zeros((2, 6), np.int8), np.ones((2, 2), np.float32), z,
                      scheme="symmetric", bits=8, granularity="group", shape=(2, 6),
                      group_size=4)
    with pytest.raises(ValueError, match=r"only 2-D weights.*\[2, 2, 2\]"):
        L.qtool_to_ct(np.zeros((2, 2, 2), np.int8), np.ones((2, 1), np.float32), z[:, :1],
                      scheme="symmetric", bits=8, granularity="channel", shape=(2, 2, 2))


SCHEMES = ["symmetric", "asymmetric", "symmetric-unsigned", "gnmt"]


def _cases():
    for scheme, bits, gran in itertools.product(SCHEMES, [2, 3, 4, 5, 8],
                                                ["tensor", "channel", "group"]):
        if scheme == "gnmt" and (bits != 8 or gran != "channel"):
            continue
        yield scheme, bits, gran


@pytest.mark.parametrize("scheme, bits, gran", list(_cases()))
def test_library_layout_reconstructs_qtool_dequantize_bit_for_bit(scheme, bits, gran):
    rng = np.random.default_rng(bits)
    w = rng.standard_normal((12, 64)).astype(np.float32)
    if scheme == "symmetric-unsigned":
        w = np.abs(w)
    spec = QuantSpec(scheme, bits=bits, granularity=gran, group_size=16)
    qt = quantize(w, spec)
    expected = dequantize(qt.data, qt.scale, qt.zero_point, qt.shape, spec, np.float32)
    args, t = L.qtool_to_ct(qt.data, qt.scale, qt.zero_point, scheme=scheme, bits=bits,
                            granularity=spec.granularity, shape=w.shape,
                            group_size=spec.group_size)
    got = R.decompress_weight(t, args, L.default_format(args))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))
    # and back: qtool's own values again
    q = t["weight"] if bits == 8 else L.unpack_from_int32(t["weight_packed"], bits, w.shape)
    zp = t.get("weight_zero_point")
    if zp is not None and bits < 8 and gran != "tensor":
        zp = L.unpack_from_int32(zp, bits, (12, t["weight_scale"].shape[1]), packed_dim=0)
    sch, q2, s2, z2 = L.ct_to_qtool(q, t["weight_scale"], zp, args)
    assert sch == ("symmetric" if spec.signed else "asymmetric")
    again = (s2 * (q2.astype(np.float32) - z2.astype(np.float32))) if gran != "group" else None
    if again is not None:
        np.testing.assert_array_equal(again, expected)


# --- dequantize in the scale's dtype ---------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_half_scales_round_the_product_once_to_their_dtype(dtype):
    rng = np.random.default_rng(1)
    q = rng.integers(-128, 128, (8, 16)).astype(np.int8)
    s = rng.uniform(1e-3, 1.0, (8, 1)).astype(dtype)
    got = L.dequantize(q, s, None, L.WeightArgs(8, True, "channel"))
    exact = q.astype(np.float64) * s.astype(np.float64)  # exact: 8 x 11 bits
    np.testing.assert_array_equal(got, exact.astype(dtype).astype(np.float32))


def test_bf16_rounding_ties_to_even():
    y = np.array([1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20], np.float32)
    np.testing.assert_array_equal(L._round_to(y, "bfloat16"),
                                  np.array([1.0, 1 + 2**-6, 1 + 2**-7], np.float32))


# --- config -----------------------------------------------------------------------------------

def test_build_quantization_config():
    cfg = L.build_quantization_config(
        [([L.exact_target("model.layers.0.mlp.up_proj")], L.WeightArgs(8, True, "channel")),
         (["re:^lm_head$"], L.WeightArgs(4, False, "group", 32))], ignore=["model.norm"])
    g0, g1 = cfg["config_groups"]["group_0"], cfg["config_groups"]["group_1"]
    assert g0["targets"] == [r"re:model\.layers\.0\.mlp\.up_proj$"]
    assert g0["format"] == "int-quantized" and g1["format"] == "pack-quantized"
    assert g0["weights"] == {"num_bits": 8, "type": "int", "symmetric": True,
                             "group_size": None, "strategy": "channel", "dynamic": False}
    assert g1["weights"]["group_size"] == 32 and g1["input_activations"] is None
    assert cfg["format"] == "mixed-precision"
    assert cfg["quant_method"] == "compressed-tensors"
    assert cfg["quantization_status"] == "compressed" and cfg["ignore"] == ["model.norm"]
    parsed = R.parse_quantization_config({"quantization_config": cfg})
    assert parsed.group_for("model.layers.0.mlp.up_proj").weights.num_bits == 8
    assert parsed.group_for("model.layers.0.mlp.up_proj_x") is None  # $ anchors the end
    assert parsed.group_for("xmodel.layers.0.mlp.up_proj") is None   # re.match the start
    assert parsed.group_for("lm_head").format == "pack-quantized"


def _qc(**weights):
    w = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", **weights}
    return {"quant_method": "compressed-tensors", "format": "int-quantized",
            "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": w}}}


@pytest.mark.parametrize("change, message", [
    ({"quant_method": "gptq"}, "quant_method is 'gptq'"),
    ({"format": "nvfp4-pack-quantized"}, "format 'nvfp4-pack-quantized' is not supported"),
    ({"quantization_status": "frozen"}, "quantization_status is 'frozen'"),
    ({"config_groups": {}}, "config_groups must be a non-empty object"),
])
def test_parse_rejects_top_level_fields(change, message):
    with pytest.raises(ValueError, match=message):
        R.parse_quantization_config({**_qc(), **change})


@pytest.mark.parametrize("weights, message", [
    ({"type": "float"}, r"group_0.weights.type 'float'"),
    ({"strategy": "block", "block_structure": [128, 128]}, "block_structure"),
    ({"strategy": "token"}, "strategy 'token' is not supported"),
    ({"strategy": "group"}, "group_size must be a positive integer"),
    ({"num_bits": 16}, "weights.num_bits must be an integer from 1 to 8"),
    ({"dynamic": True}, "dynamic must be false"),
])
def test_parse_rejects_weight_args(weights, message):
    with pytest.raises(ValueError, match=message):
        R.parse_quantization_config(_qc(**weights))


def test_parse_infers_strategy_from_group_size_and_format_from_top():
    p = R.parse_quantization_config(_qc(strategy=None, group_size=-1))
    assert p.groups[0].weights.strategy == "channel" and p.groups[0].format == "int-quantized"
    p = R.parse_quantization_config({**_qc(strategy=None, group_size=64),
                                     "format": "mixed-precision"})
    assert p.groups[0].weights == L.WeightArgs(8, True, "group", 64)
    assert p.groups[0].format == "pack-quantized"  # what the library infers (weight-only int)


# --- reading a checkpoint's tensors -----------------------------------------------------------

def test_decompress_state_dict_keeps_order_and_other_tensors():
    cfg = R.parse_quantization_config(_qc())
    tensors = {
        "a.weight": np.array([[2, -3]], np.int8),
        "a.weight_scale": np.array([[0.5]], np.float32),
        "a.bias": np.array([1.0], np.float32),
        "norm.weight": np.array([1.0, 2.0], np.float32),
    }
    out = R.decompress_state_dict(tensors, cfg)
    assert list(out) == ["a.weight", "a.bias", "norm.weight"]
    np.testing.assert_array_equal(out["a.weight"], np.array([[1.0, -1.5]], np.float32))


@pytest.mark.parametrize("tensors, message", [
    ({"a.weight": np.zeros((2, 2), np.int8), "a.weight_scale": np.ones((1, 1), np.float32)},
     r"a.weight_scale has shape \[1, 1\], expected \[2, 1\]"),
    ({"a.weight_scale": np.ones((2, 1), np.float32)}, "a.weight is missing"),
    ({"a.weight": np.zeros((2, 2), np.int32), "a.weight_scale": np.ones((2, 1), np.float32)},
     "a.weight must be 2-D int8"),
    ({"a.weight": np.zeros((2, 2), np.int8), "a.weight_scale": np.ones((2, 1), np.int32)},
     "a.weight_scale must be float16, bfloat16, float32 or float64"),
    ({"a.weight_zero_point": np.zeros((2, 1), np.int8)}, "has no a.weight_scale beside it"),
])
def test_decompress_errors_name_the_tensor(tensors, message):
    with pytest.raises(ValueError, match=message):
        R.decompress_state_dict(tensors, R.parse_quantization_config(_qc()))


def test_untargeted_or_ambiguous_modules_are_errors():
    qc = _qc()
    qc["config_groups"]["group_0"]["targets"] = ["re:b$"]
    t = {"a.weight": np.zeros((1, 1), np.int8), "a.weight_scale": np.ones((1, 1), np.float32)}
    with pytest.raises(ValueError, match="a holds quantized tensors but no config group"):
        R.decompress_state_dict(t, R.parse_quantization_config(qc))
    qc["config_groups"]["group_1"] = {"targets": ["a"], "weights": {
        "num_bits": 4, "strategy": "channel"}}
    qc["config_groups"]["group_0"]["targets"] = ["re:a"]
    with pytest.raises(ValueError, match="matched by config groups group_0, group_1"):
        R.parse_quantization_config(qc).group_for("a")


def test_pack_quantized_weight_shape_must_agree():
    args = L.WeightArgs(4, True, "channel")
    t = {"weight_packed": np.zeros((2, 1), np.int32), "weight_shape": np.array([2, 9]),
         "weight_scale": np.ones((2, 1), np.float32)}
    with pytest.raises(ValueError, match=r"m.weight_packed: \[2, 9\] values of 4 bits pack to "
                                         r"int32 of shape \[2, 2\], got \[2, 1\]"):
        R.decompress_weight(t, args, L.PACK_QUANTIZED, "m")
