"""The compressed-tensors sink with every sidecar form the native source may hand out: float32,
float16 and bfloat16 (uint16 bit patterns) scales; zero points of the parameter shape, 0-d
(symmetric schemes) or bit-packed along rows (asymmetric below 8 bits)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from qtool.core import packing
from qtool.core.quant import quantize
from qtool.core.schemes import QuantSpec
from qtool.formats import compressed_tensors_layout as L
from qtool.formats._common import TensorInfo
from qtool.formats.compressed_tensors_sink import CompressedTensorsSink
from qtool.formats.registry import SINKS, OutTensor, PlannedTensor


def raw_tensors(path: Path) -> dict[str, tuple[str, list[int], bytes]]:
    """name -> (dtype code, shape, bytes), read by hand (numpy has no bfloat16)."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    head = json.loads(data[8:8 + n])
    head.pop("__metadata__", None)
    return {k: (v["dtype"], v["shape"], data[8 + n + v["data_offsets"][0]:
                                            8 + n + v["data_offsets"][1]])
            for k, v in head.items()}


def write_one(tmp: Path, name: str, spec: QuantSpec, data: np.ndarray, scale: np.ndarray,
              zp: np.ndarray, shape: tuple[int, int]) -> tuple[dict, CompressedTensorsSink]:
    sink = SINKS["compressed-tensors"](tmp)
    assert isinstance(sink, CompressedTensorsSink)
    info = TensorInfo(name, "F32", shape, 0, 4 * shape[0] * shape[1], tmp / "src")
    sink.open(Path("model.safetensors"), None, [PlannedTensor(info, spec)])
    sink.write(OutTensor(info, spec, iter([(data, None)]), scale, zp))
    sink.finish([], {}, None)
    return raw_tensors(tmp / "model.safetensors"), sink


W = np.random.default_rng(3).normal(0, 0.1, (24, 64)).astype(np.float32)


@pytest.mark.parametrize("scale_dtype", ["float32", "float16", "bfloat16"])
def test_symmetric_with_a_0d_zero_point_and_narrow_scales(tmp_path, scale_dtype):
    spec = QuantSpec("symmetric", 4, "group", group_size=16, scale_dtype=scale_dtype)
    qt = quantize(W, QuantSpec("symmetric", 4, "group", group_size=16))
    f32 = qt.scale.astype(np.float32)
    if scale_dtype == "float16":
        scale = f32.astype(np.float16)
        want = scale.tobytes()
    elif scale_dtype == "bfloat16":
        scale = (f32.view(np.uint32) >> 16).astype(np.uint16)  # bit patterns, truncated
        want = scale.tobytes()
    else:
        scale, want = f32, f32.tobytes()
    got, sink = write_one(tmp_path, "m.proj.weight", spec, qt.data, scale,
                          np.zeros((), np.int32), W.shape)
    code, shape, b = got["m.proj.weight_scale"]
    assert code == {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[scale_dtype]
    assert shape == [24, 4] and b == want
    assert "m.proj.weight_zero_point" not in got
    code, shape, b = got["m.proj.weight_packed"]
    assert code == "I32" and shape == [24, 8]
    q = L.unpack_from_int32(np.frombuffer(b, np.int32).reshape(24, 8), 4, (24, 64))
    np.testing.assert_array_equal(q, packing.unpack(qt.data, 4, 64, True))
    qc = sink.quantization_config()
    (g,) = qc["config_groups"].values()
    assert g["targets"] == [r"re:m\.proj$"] and g["format"] == "pack-quantized"


def test_asymmetric_with_zero_points_packed_along_rows(tmp_path):
    spec = QuantSpec("asymmetric", 4, "group", group_size=16)
    qt = quantize(W, spec)
    zp = qt.zero_point.astype(np.uint8)                       # (24, 4) values 0..15
    lean = packing.pack(zp, 4)                                # (24, 2) bytes: format 2
    assert lean.shape == (24, 2)
    got, _ = write_one(tmp_path, "m.proj.weight", spec, qt.data, qt.scale, lean, W.shape)
    code, shape, b = got["m.proj.weight_zero_point"]
    assert code == "I32" and shape == [3, 4]                  # ceil(24 * 4 / 32) words
    ct_zp = L.unpack_from_int32(np.frombuffer(b, np.int32).reshape(3, 4), 4, (24, 4), 0)
    np.testing.assert_array_equal(ct_zp.astype(np.int16), zp.astype(np.int16) - 8)
    # the same bytes as from the zero points of the parameter shape (format 1)
    (tmp_path / "f1").mkdir()
    again, _ = write_one(tmp_path / "f1", "m.proj.weight", spec, qt.data, qt.scale,
                         qt.zero_point, W.shape)
    assert again == got


def test_an_embedding_below_8_bits_is_int8(tmp_path):
    spec = QuantSpec("asymmetric", 4, "channel")
    qt = quantize(W, spec)
    got, sink = write_one(tmp_path, "model.embed_tokens.weight", spec, qt.data, qt.scale,
                          qt.zero_point, W.shape)
    assert sorted(got) == ["model.embed_tokens.weight", "model.embed_tokens.weight_scale",
                           "model.embed_tokens.weight_zero_point"]
    code, shape, b = got["model.embed_tokens.weight"]
    assert code == "I8" and shape == [24, 64]
    q = np.frombuffer(b, np.int8).reshape(24, 64).astype(np.int16)
    np.testing.assert_array_equal(q + 8, packing.unpack(qt.data, 4, 64, False))
    code, shape, b = got["model.embed_tokens.weight_zero_point"]
    assert code == "I8" and shape == [24, 1]
    np.testing.assert_array_equal(np.frombuffer(b, np.int8).astype(np.int16) + 8,
                                  qt.zero_point.reshape(-1))
    (g,) = sink.quantization_config()["config_groups"].values()
    assert g["format"] == "int-quantized" and g["weights"]["num_bits"] == 4


def test_a_scale_of_another_dtype_than_the_spec_is_refused(tmp_path):
    from qtool.formats._common import CheckpointError

    spec = QuantSpec("symmetric", 8, "channel", scale_dtype="float16")
    qt = quantize(W, QuantSpec("symmetric", 8, "channel"))
    with pytest.raises(CheckpointError, match="scale is float32 .* expected float16"):
        write_one(tmp_path, "m.weight", spec, qt.data, qt.scale, qt.zero_point, W.shape)
