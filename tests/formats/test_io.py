"""qtool.formats: the validating safetensors reader, checkpoint resolution, the writer."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import blake3
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from qtool.formats._common import DTYPES, FLOAT_CODES, CheckpointError, aligned_buffer, dtype_code
from qtool.formats.safetensors import SafetensorsFile, TensorInfo
from qtool.formats.shards import open_checkpoint
from qtool.formats.writer import SafetensorsWriter
from tests.conftest import raw_file

# --------------------------------------------------------------------------------------------
# helpers

F8_CODES = {"F8_E4M3", "F8_E5M2"}  # safetensors' numpy API cannot materialise these
_TMP_OK = [HealthCheck.function_scoped_fixture]  # tmp_path is reused across examples: fine here


# qtool holds these as bit patterns (uint16, uint8); the tests build real values with ml_dtypes.
REAL_TYPES = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn,
              "F8_E5M2": ml_dtypes.float8_e5m2}


def sample(code: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Deterministic non-trivial values of the given dtype."""
    rng = np.random.default_rng(seed)
    dt = np.dtype(REAL_TYPES.get(code, DTYPES[code]))
    if code == "BOOL":
        return rng.integers(0, 2, size=shape).astype(bool)
    if code in FLOAT_CODES or code in F8_CODES:
        vals = rng.standard_normal(size=shape) * 3
        return vals.astype(np.float32).astype(dt)
    info = np.iinfo(dt)
    return rng.integers(info.min, info.max, size=shape, dtype=dt, endpoint=True)


def ent(dtype: str, shape: list, offsets: list) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


def same(a: np.ndarray, b: np.ndarray) -> bool:
    """Exact equality incl. dtype (ml_dtypes' types and qtool's bit patterns count as the
    same), shape and bit patterns (NaN-safe)."""
    bits = {np.dtype(t).name: DTYPES[c].name for c, t in REAL_TYPES.items()}
    return (
        bits.get(a.dtype.name, a.dtype.name) == bits.get(b.dtype.name, b.dtype.name)
        and a.dtype.itemsize == b.dtype.itemsize
        and a.shape == b.shape
        and np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()
    )


# --------------------------------------------------------------------------------------------
# dtypes


def test_dtype_table():
    assert set(DTYPES) >= {
        "F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8",
        "U64", "U32", "U16", "U8", "BOOL", "F8_E4M3", "F8_E5M2",
    }  # fmt: skip
    # No ml_dtypes at run time: bfloat16 as uint16 bit patterns, float8 as opaque bytes
    assert DTYPES["BF16"] == np.dtype("<u2") and DTYPES["F8_E4M3"] == np.dtype("u1")
    for code, dt in DTYPES.items():
        if code in REAL_TYPES:
            assert dtype_code(REAL_TYPES[code]) == code
            assert dt.itemsize == np.dtype(REAL_TYPES[code]).itemsize
        else:
            assert dtype_code(dt) == code
    assert dtype_code(np.uint16) == "U16" and dtype_code(np.uint8) == "U8"
    assert dtype_code(np.float32) == "F32"
    assert dtype_code("float16") == "F16"
    assert FLOAT_CODES == frozenset({"F64", "F32", "F16", "BF16"})
    with pytest.raises(ValueError):
        dtype_code(np.complex64)
    with pytest.raises(ValueError):
        dtype_code(np.dtype(">f4"))


# --------------------------------------------------------------------------------------------
# reading files written by the safetensors library


def test_reader_round_trip_every_dtype(tmp_path):
    tensors = {f"t.{code.lower()}": sample(code, (3, 5), seed=i) for i, code in enumerate(DTYPES)}
    tensors["scalar"] = np.array(2.5, dtype=np.float32)
    tensors["empty"] = np.zeros((0, 4), dtype=np.float16)
    tensors["vec"] = sample("BF16", (7,))
    meta = {"format": "pt", "note": "héllo"}
    path = tmp_path / "model.safetensors"
    save_file(tensors, path, metadata=meta)

    with SafetensorsFile(path) as f:
        assert f.metadata == meta
        assert f.size == path.stat().st_size
        assert len(f) == len(tensors)
        assert set(f.keys()) == set(tensors)
        assert "scalar" in f and "nope" not in f
        # physical order = the order of data offsets in the header, parsed independently
        n = struct.unpack("<Q", path.read_bytes()[:8])[0]
        assert f.header_bytes == path.read_bytes()[: 8 + n]
        hdr = json.loads(f.header_bytes[8:])
        hdr.pop("__metadata__")
        expected_order = sorted(hdr, key=lambda k: hdr[k]["data_offsets"])
        assert [t.name for t in f.tensors] == expected_order
        for name, want in tensors.items():
            info = f[name]
            assert info.dtype == dtype_code(want.dtype)
            assert info.shape == want.shape
            assert info.numel == want.size
            assert info.nbytes == want.nbytes
            assert info.path == path
            assert info.offset == 8 + n + hdr[name]["data_offsets"][0]
            got = f.read(name)
            assert same(got, want), name
            assert got.flags.writeable and got.flags.c_contiguous
            assert same(f.read(info), want)
    assert f.closed
    with pytest.raises(ValueError, match="closed"):
        f.read("scalar")


def test_read_returns_fresh_arrays(tmp_path):
    path = tmp_path / "a.safetensors"
    save_file({"w": np.arange(6, dtype=np.int32).reshape(2, 3)}, path)
    before = path.read_bytes()
    with SafetensorsFile(path) as f:
        a = f.read("w")
        a[:] = 99
        assert same(f.read("w"), np.arange(6, dtype=np.int32).reshape(2, 3))
    assert path.read_bytes() == before  # never modifies the file


def test_read_aligned_to_file_offset(tmp_path):
    big = sample("F32", (257, 1031))  # ~1 MB
    path = tmp_path / "big.safetensors"
    # a small leading tensor pushes the big one off any page boundary
    save_file({"a_small": np.arange(3, dtype=np.uint8), "b_big": big}, path)
    with SafetensorsFile(path) as f:
        info = f["b_big"]
        assert info.offset % 4096 != 0
        for _ in range(3):
            arr = f.read(info)
            assert arr.ctypes.data % 4096 == info.offset % 4096
            assert same(arr, big)
        # read_into reuses a caller buffer and returns a typed view of it
        buf = aligned_buffer(info.nbytes + 100, info.offset)
        assert buf.ctypes.data % 4096 == info.offset % 4096
        view = f.read_into(info, buf)
        assert same(view, big)
        assert view.ctypes.data == buf.ctypes.data
        small = f.read_into("a_small", buf)
        assert same(small, np.arange(3, dtype=np.uint8))
        with pytest.raises(ValueError, match="too small"):
            f.read_into(info, np.empty(10, dtype=np.uint8))
        with pytest.raises(ValueError, match="uint8"):
            f.read_into(info, np.empty(info.nbytes, dtype=np.float32))


def test_view_into_a_reused_buffer(tmp_path):
    # quantize reads each task's rows into one buffer per worker thread: view(..., buffer)
    # must give the same values as a fresh view, from inside that buffer, at an address
    # congruent to the file offset (fast page-cache copies), however the run starts.
    path = tmp_path / "v.safetensors"
    big = np.arange(3 * 4096, dtype=np.float32).reshape(3, 4096)
    save_file({"a_small": np.arange(3, dtype=np.uint8), "b_big": big,
               "c_odd": np.arange(5, dtype=np.uint8)}, path)
    raw = np.empty(2 * 4096 * 4 + 4096, np.uint8)
    lo, hi = raw.ctypes.data, raw.ctypes.data + raw.size
    with SafetensorsFile(path) as f:
        info = f["b_big"]
        for start, stop in [(0, 4096), (4096, 3 * 4096), (1000, 1001 + 5000), (7, 9)]:
            got = f.view(info, start, stop, raw)
            assert np.array_equal(got, big.reshape(-1)[start:stop])
            assert np.array_equal(got, f.view(info, start, stop))
            assert lo <= got.ctypes.data and got.ctypes.data + got.nbytes <= hi
            if got.nbytes >= 4096:
                assert got.ctypes.data % 4096 == (info.offset + 4 * start) % 4096
            assert not got.flags.writeable
        # a buffer too small for the run: a fresh one, the values all the same
        got = f.view(info, 0, 3 * 4096, raw)
        assert np.array_equal(got, big.reshape(-1))
        assert not lo <= got.ctypes.data < hi
        assert np.array_equal(f.view("c_odd", 1, 4, raw), np.arange(1, 4, dtype=np.uint8))


def test_read_rejects_foreign_tensorinfo(tmp_path):
    path = tmp_path / "a.safetensors"
    save_file({"w": np.zeros(4, np.float32)}, path)
    fake = TensorInfo("w", "F32", (4,), 0, 16, path)
    with SafetensorsFile(path) as f, pytest.raises(ValueError, match="not from this file"):
        f.read(fake)


def test_edge_cases_valid(tmp_path):
    cases = {
        "no_tensors": raw_file({}),
        "only_metadata": raw_file({"__metadata__": {}}),
        "empty_tensors_same_offset": raw_file(
            {
                "e1": ent("F32", [0, 3], [0, 0]),
                "e2": ent("I8", [5, 0], [0, 0]),
                "x": ent("U8", [2], [0, 2]),
                "e3": ent("F16", [0], [2, 2]),
            },
            b"\x07\x09",
        ),
        "scalar_unpadded_header": raw_file({"s": ent("F64", [], [0, 8])}, struct.pack("<d", 1.5),
                                           pad=False),
    }  # fmt: skip
    for name, blob in cases.items():
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(blob)
        with SafetensorsFile(p) as f:
            if name == "empty_tensors_same_offset":
                assert [t.name for t in f.tensors] == ["e1", "e2", "x", "e3"]
                assert f.read("e1").shape == (0, 3)
                assert f.read("e2").dtype == np.int8
                assert list(f.read("x")) == [7, 9]
                assert f.read_into("e3", np.empty(0, np.uint8)).shape == (0,)
            elif name == "scalar_unpadded_header":
                s = f.read("s")
                assert s.shape == () and s.dtype == np.float64 and float(s) == 1.5
            else:
                assert len(f) == 0
                assert f.metadata == ({} if name == "only_metadata" else None)


# --------------------------------------------------------------------------------------------
# broken and hostile files

_W = "w"  # tensor name used in most cases
_MISMATCH_MSG = (
    "{p}: tensor 'layers.0.w': data_offsets [0, 12] hold 12 bytes but shape [2, 2] of F32 needs 16"
)

BROKEN: list[tuple[str, bytes, str]] = [
    ("empty_file", b"", "too short"),
    ("seven_bytes", b"\x08\x00\x00\x00\x00\x00\x00", "too short"),
    ("header_beyond_file", struct.pack("<Q", 1000) + b"{}      ", "beyond the end of the file"),
    ("header_over_cap", struct.pack("<Q", (16 << 20) + 1) + b"{}", "exceeds the 16777216-byte"),
    ("header_huge_u64", b"\xff" * 8 + b"{}", "exceeds the 16777216-byte"),
    ("header_zero_len", struct.pack("<Q", 0), "not valid JSON"),
    ("not_utf8", raw_file(b'{"\xff\xfe": 1}'), "not valid UTF-8"),
    ("not_json", raw_file(b'{"w": '), "not valid JSON"),
    ("nul_padding", raw_file(b"{}\x00\x00\x00\x00\x00\x00", pad=False), "not valid JSON"),
    ("json_list", raw_file([1, 2]), "header JSON is a list, not an object"),
    ("json_string", raw_file('"hi"'), "header JSON is a string, not an object"),
    ("json_null", raw_file("null"), "header JSON is a null, not an object"),
    ("deep_nesting", raw_file("[" * 200_000 + "]" * 200_000), "not valid JSON"),
    ("int_too_long", raw_file('{"w": {"dtype": "F32", "shape": [' + "9" * 5000 + "]}}"),
     "not valid JSON"),
    ("metadata_list", raw_file({"__metadata__": ["a"]}), "__metadata__ is a list, not an object"),
    ("metadata_null", raw_file({"__metadata__": None}), "__metadata__ is a null"),
    ("metadata_value_int", raw_file({"__metadata__": {"a": 1}}),
     "__metadata__['a'] is a number, not a string"),
    ("metadata_value_obj", raw_file({"__metadata__": {"a": {}}}), "__metadata__['a'] is a object"),
    ("metadata_dup_key", raw_file('{"__metadata__": {"a": "1", "a": "2"}}'),
     "__metadata__ has duplicate key 'a'"),
    ("metadata_twice", raw_file('{"__metadata__": {}, "__metadata__": {}}'),
     "duplicate '__metadata__'"),
    ("duplicate_tensor", raw_file(
        '{"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},'
        ' "w": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}', b"ab"),
     "tensor 'w': duplicate tensor name"),
    ("duplicate_entry_key", raw_file(
        '{"w": {"dtype": "U8", "dtype": "I8", "shape": [1], "data_offsets": [0, 1]}}', b"a"),
     "tensor 'w': entry has duplicate key 'dtype'"),
    ("entry_list", raw_file({_W: [1, 2]}), "tensor 'w': entry is a list, not an object"),
    ("entry_string", raw_file({_W: "F32"}), "tensor 'w': entry is a string, not an object"),
    ("unknown_dtype", raw_file({_W: ent("F7", [1], [0, 1])}, b"a"),
     "tensor 'w': unknown dtype 'F7'"),
    ("lowercase_dtype", raw_file({_W: ent("f32", [1], [0, 4])}, b"abcd"), "unknown dtype 'f32'"),
    ("dtype_not_str", raw_file({_W: ent(4, [1], [0, 4])}, b"abcd"), "unknown dtype 4"),
    ("missing_dtype", raw_file({_W: {"shape": [1], "data_offsets": [0, 1]}}, b"a"),
     "tensor 'w': missing dtype"),
    ("missing_shape", raw_file({_W: {"dtype": "U8", "data_offsets": [0, 1]}}, b"a"),
     "tensor 'w': missing shape"),
    ("shape_not_list", raw_file({_W: ent("U8", 1, [0, 1])}, b"a"), "shape 1 is not a list"),
    ("shape_negative", raw_file({_W: ent("U8", [-1], [0, 1])}, b"a"),
     "shape [-1] is not a list of non-negative integers"),
    ("shape_float", raw_file({_W: ent("U8", [1.0], [0, 1])}, b"a"), "shape [1.0] is not a list"),
    ("shape_bool", raw_file({_W: ent("U8", [True], [0, 1])}, b"a"), "shape [True] is not a list"),
    ("shape_null", raw_file({_W: ent("U8", None, [0, 1])}, b"a"), "shape None is not a list"),
    ("missing_offsets", raw_file({_W: {"dtype": "U8", "shape": [1]}}, b"a"),
     "tensor 'w': missing data_offsets"),
    ("offsets_three", raw_file({_W: ent("U8", [1], [0, 1, 2])}, b"a"),
     "data_offsets [0, 1, 2] is not a pair of non-negative integers"),
    ("offsets_one", raw_file({_W: ent("U8", [1], [1])}, b"a"), "data_offsets [1] is not a pair"),
    ("offsets_negative", raw_file({_W: ent("U8", [1], [-1, 0])}, b"a"),
     "data_offsets [-1, 0] is not a pair"),
    ("offsets_str", raw_file({_W: ent("U8", [1], ["0", "1"])}, b"a"),
     "data_offsets ['0', '1'] is not a pair"),
    ("offsets_object", raw_file({_W: ent("U8", [1], {"a": 1})}, b"a"), "is not a pair"),
    ("offsets_reversed", raw_file({_W: ent("U8", [0], [1, 0])}, b"a"),
     "tensor 'w': data_offsets [1, 0] end before they begin"),
    ("offsets_beyond_data", raw_file({_W: ent("F32", [2], [0, 8])}, b"abcd"),
     "tensor 'w': data_offsets [0, 8] extend beyond the data area (4 bytes)"),
    ("offsets_way_beyond", raw_file({_W: ent("U8", [1], [2**64, 2**64 + 1])}, b"a"),
     "extend beyond the data area (1 bytes)"),
    ("bytes_too_few", raw_file({_W: ent("F32", [2, 2], [0, 12])}, b"x" * 12),
     "data_offsets [0, 12] hold 12 bytes but shape [2, 2] of F32 needs 16"),
    ("bytes_too_many", raw_file({_W: ent("BF16", [3], [0, 8])}, b"x" * 8),
     "hold 8 bytes but shape [3] of BF16 needs 6"),
    ("scalar_wrong_size", raw_file({_W: ent("F32", [], [0, 2])}, b"xx"),
     "hold 2 bytes but shape [] of F32 needs 4"),
    ("empty_with_bytes", raw_file({_W: ent("F32", [0, 2], [0, 4])}, b"xxxx"),
     "hold 4 bytes but shape [0, 2] of F32 needs 0"),
    ("huge_shape", raw_file({_W: ent("F32", [2**62, 2**62, 2**62], [0, 4])}, b"xxxx"),
     "needs more than 18446744073709551616"),
    ("overlap", raw_file({"a": ent("F32", [2], [0, 8]), "b": ent("F32", [2], [4, 12])}, b"x" * 12),
     "tensor 'b': data_offsets [4, 12] overlap tensor 'a' which ends at 8"),
    ("same_range", raw_file({"a": ent("U8", [4], [0, 4]), "b": ent("I8", [4], [0, 4])}, b"x" * 4),
     "overlap tensor 'a'"),
    ("empty_inside_other", raw_file({"a": ent("U8", [4], [0, 4]), "e": ent("U8", [0], [2, 2])},
                                    b"x" * 4), "tensor 'e': data_offsets [2, 2] overlap"),
    ("gap_between", raw_file({"a": ent("F32", [1], [0, 4]), "b": ent("F32", [1], [8, 12])},
                             b"x" * 12),
     "tensor 'b': data_offsets [8, 12] leave a gap: bytes [4, 8) of the data area"),
    ("gap_at_start", raw_file({"a": ent("F32", [1], [4, 8])}, b"x" * 8),
     "leave a gap: bytes [0, 4)"),
    ("trailing_bytes", raw_file({"a": ent("F32", [1], [0, 4])}, b"x" * 7),
     "3 trailing bytes after the last tensor"),
    ("no_tensors_but_data", raw_file({}, b"xyz"), "3 trailing bytes"),
    ("newline_in_name", raw_file({"a\nb": ent("Q9", [1], [0, 1])}, b"x"),
     "tensor 'a\\nb': unknown dtype"),
]  # fmt: skip


@pytest.mark.parametrize(("blob", "fragment"), [c[1:] for c in BROKEN], ids=[c[0] for c in BROKEN])
def test_broken_files_rejected(tmp_path, blob, fragment):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(blob)
    with pytest.raises(CheckpointError) as ei:
        SafetensorsFile(p)
    msg = str(ei.value)
    assert "\n" not in msg
    assert msg.startswith(f"{p}: ")
    assert fragment in msg
    assert len(msg) < 400


def test_exact_message(tmp_path, monkeypatch):
    p = tmp_path / "model.safetensors"
    p.write_bytes(raw_file({"layers.0.w": ent("F32", [2, 2], [0, 12])}, b"x" * 12))
    with pytest.raises(CheckpointError) as ei:
        SafetensorsFile(p)
    assert str(ei.value) == _MISMATCH_MSG.format(p=p)
    # the name is used as given
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"^model\.safetensors: tensor 'layers\.0\.w'"):
        SafetensorsFile("model.safetensors")


def test_not_a_regular_file(tmp_path):
    with pytest.raises(CheckpointError, match="not a regular file"):
        SafetensorsFile(tmp_path)
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match="not a regular file"):
        SafetensorsFile(fifo)  # must not block
    with pytest.raises(CheckpointError, match="cannot open"):
        SafetensorsFile(tmp_path / "missing.safetensors")


def _valid_blob() -> bytes:
    return raw_file(
        {
            "__metadata__": {"k": "v"},
            "a": ent("F32", [2], [0, 8]),
            "b": ent("U8", [3], [8, 11]),
            "c": ent("BF16", [], [11, 13]),
        },
        bytes(range(13)),
    )


@settings(max_examples=300, deadline=None, suppress_health_check=_TMP_OK)
@given(data=st.data())
def test_fuzzed_files_never_crash(tmp_path, data):
    """Random corruptions either parse cleanly or raise CheckpointError, nothing else."""
    blob = bytearray(_valid_blob())
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "truncate", "insert"]))
        pos = data.draw(st.integers(0, max(len(blob) - 1, 0)))
        if kind == "flip" and blob:
            blob[pos] = data.draw(st.integers(0, 255))
        elif kind == "truncate":
            del blob[pos:]
        else:
            blob[pos:pos] = data.draw(st.binary(min_size=1, max_size=4))
    p = tmp_path / "fuzz.safetensors"
    p.write_bytes(bytes(blob))
    try:
        with SafetensorsFile(p) as f:
            for t in f.tensors:
                assert f.read(t).nbytes == t.nbytes
    except CheckpointError as e:
        assert "\n" not in str(e)


# --------------------------------------------------------------------------------------------
# checkpoints (single file, sharded, directories)


def _make_sharded(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    d = tmp_path / "ckpt"
    d.mkdir()
    s1 = {"embed": sample("BF16", (4, 3)), "layers.0.w": sample("F32", (3, 3), 1)}
    s2 = {"layers.1.w": sample("F32", (3, 3), 2), "norm": sample("F16", (3,), 3)}
    save_file(s1, d / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    save_file(s2, d / "model-00002-of-00002.safetensors")
    index = {
        "metadata": {"total_size": 12345, "extra": [1, {"x": None}]},
        "weight_map": {
            # shard 2 appears first in the index
            "norm": "model-00002-of-00002.safetensors",
            "layers.1.w": "model-00002-of-00002.safetensors",
            "embed": "model-00001-of-00002.safetensors",
            "layers.0.w": "model-00001-of-00002.safetensors",
        },
    }
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return d, {**s1, **s2}


def test_sharded_checkpoint(tmp_path):
    d, tensors = _make_sharded(tmp_path)
    for arg in (d / "model.safetensors.index.json", d, str(d)):
        ck = open_checkpoint(arg)
        assert ck.root == d
        assert ck.index_path == d / "model.safetensors.index.json"
        assert ck.index_metadata == {"total_size": 12345, "extra": [1, {"x": None}]}
        assert ck.shards == [
            d / "model-00002-of-00002.safetensors",
            d / "model-00001-of-00002.safetensors",
        ]
        infos = ck.tensors()
        assert {t.name for t in infos} == set(tensors)
        assert [t.path for t in infos] == [ck.shards[0]] * 2 + [ck.shards[1]] * 2
        for shard in ck.shards:  # each shard in data-offset order
            offs = [t.offset for t in infos if t.path == shard]
            assert offs == sorted(offs)
        for t in infos:
            with SafetensorsFile(t.path) as f:
                assert same(f.read(t), tensors[t.name])


def test_single_file_checkpoint(tmp_path):
    p = tmp_path / "model.safetensors"
    want = {"b": sample("F32", (2, 2)), "a": sample("I8", (5,))}
    save_file(want, p)
    for arg in (p, tmp_path):
        ck = open_checkpoint(arg)
        assert ck.index_path is None and ck.index_metadata is None
        assert ck.shards == [p] and ck.root == tmp_path
        assert {t.name for t in ck.tensors()} == {"a", "b"}


def test_directory_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no .safetensors file or index"):
        open_checkpoint(tmp_path)
    save_file({"a": np.zeros(1, np.float32)}, tmp_path / "one.safetensors")
    save_file({"a": np.zeros(1, np.float32)}, tmp_path / "two.safetensors")
    with pytest.raises(CheckpointError, match="2 .safetensors files and no"):
        open_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no such file"):
        open_checkpoint(tmp_path / "nope.safetensors")


def test_directory_prefers_index(tmp_path):
    d, _ = _make_sharded(tmp_path)
    assert open_checkpoint(d).index_path is not None


def test_symlink_inside_directory_is_fine(tmp_path):
    d, _ = _make_sharded(tmp_path)
    (d / "alias.safetensors").symlink_to(d / "model-00001-of-00002.safetensors")
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    idx["weight_map"]["embed"] = "alias.safetensors"  # same file under two names
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    ck = open_checkpoint(d / "model.safetensors.index.json")
    assert len(ck.shards) == 2
    assert len(ck.tensors()) == 4


def _index_case(tmp_path: Path, case: str) -> tuple[Path, str]:
    d, _ = _make_sharded(tmp_path)
    idx_path = d / "model.safetensors.index.json"
    idx = json.loads(idx_path.read_text())
    wm = idx["weight_map"]
    outside = tmp_path / "outside.safetensors"
    save_file({"norm": np.zeros(3, np.float16)}, outside)
    text: str | None = None
    if case == "dotdot":
        wm["norm"] = "../outside.safetensors"
        frag = "tensor 'norm': shard '../outside.safetensors' contains '..'"
    elif case == "dotdot_inner":
        (d / "sub").mkdir()
        wm["norm"] = "sub/../../outside.safetensors"
        frag = "contains '..'"
    elif case == "absolute":
        wm["norm"] = str(outside)
        frag = "is an absolute path"
    elif case == "symlink_out":
        (d / "link.safetensors").symlink_to(outside)
        wm["norm"] = "link.safetensors"
        frag = "shard 'link.safetensors' resolves outside"
    elif case == "symlink_dir_out":
        (d / "sub").symlink_to(tmp_path, target_is_directory=True)
        wm["norm"] = "sub/outside.safetensors"
        frag = "resolves outside"
    elif case == "missing":
        wm["norm"] = "model-00003-of-00002.safetensors"
        frag = "shard 'model-00003-of-00002.safetensors' is missing"
    elif case == "shard_is_dir":
        (d / "dir.safetensors").mkdir()
        wm["norm"] = "dir.safetensors"
        frag = "is not a regular file"
    elif case == "wrong_shard":
        wm["embed"] = "model-00002-of-00002.safetensors"
        frag = "tensor 'embed': index places it in model-00002-of-00002.safetensors, which does"
    elif case == "not_listed":
        del wm["embed"]
        frag = "model-00001-of-00002.safetensors: tensor 'embed' is not listed in index"
    elif case == "listed_nowhere":
        wm["ghost"] = "model-00001-of-00002.safetensors"
        frag = "tensor 'ghost': index places it in model-00001-of-00002.safetensors, which does"
    elif case == "value_not_str":
        wm["norm"] = 2
        frag = "tensor 'norm': weight_map value is a number"
    elif case == "weight_map_list":
        idx["weight_map"] = ["a"]
        frag = "weight_map is a list, not an object"
    elif case == "no_weight_map":
        del idx["weight_map"]
        frag = "index has no weight_map"
    elif case == "empty_weight_map":
        idx["weight_map"] = {}
        frag = "weight_map is empty"
    elif case == "metadata_list":
        idx["metadata"] = [1]
        frag = "index metadata is a list"
    elif case == "not_json":
        text = '{"weight_map": '
        frag = "index is not valid JSON"
    elif case == "not_object":
        text = "[]"
        frag = "index JSON is a list, not an object"
    elif case == "dup_tensor":
        text = (
            '{"weight_map": {"norm": "model-00002-of-00002.safetensors",'
            ' "norm": "model-00001-of-00002.safetensors"}}'
        )
        frag = "weight_map lists tensor 'norm' twice"
    elif case == "bad_shard_file":
        (d / "model-00002-of-00002.safetensors").write_bytes(b"\x01\x02")
        frag = "model-00002-of-00002.safetensors: file is 2 bytes, too short"
    else:
        raise AssertionError(case)
    idx_path.write_text(text if text is not None else json.dumps(idx))
    return idx_path, frag


INDEX_CASES = [
    "dotdot", "dotdot_inner", "absolute", "symlink_out", "symlink_dir_out", "missing",
    "shard_is_dir", "wrong_shard", "not_listed", "listed_nowhere", "value_not_str",
    "weight_map_list", "no_weight_map", "empty_weight_map", "metadata_list", "not_json",
    "not_object", "dup_tensor", "bad_shard_file",
]  # fmt: skip


@pytest.mark.parametrize("case", INDEX_CASES)
def test_broken_indexes_rejected(tmp_path, case):
    idx_path, frag = _index_case(tmp_path, case)
    for arg in (idx_path, idx_path.parent):
        with pytest.raises(CheckpointError) as ei:
            open_checkpoint(arg)
        msg = str(ei.value)
        assert "\n" not in msg
        assert frag in msg, msg


def test_duplicate_tensor_across_shards(tmp_path):
    d, _ = _make_sharded(tmp_path)
    save_file(
        {"layers.1.w": np.zeros((3, 3), np.float32), "norm": np.zeros(3, np.float16),
         "embed": np.zeros(1, np.float32)},
        d / "model-00002-of-00002.safetensors",
    )  # fmt: skip
    with pytest.raises(CheckpointError, match="'embed': index places it in model-00001"):
        open_checkpoint(d)


# --------------------------------------------------------------------------------------------
# writer


def _all_entries() -> dict[str, np.ndarray]:
    out = {f"w.{code}": sample(code, (4, 3), seed=i) for i, code in enumerate(DTYPES)}
    out["scalar"] = np.array(-1.25, dtype=ml_dtypes.bfloat16)
    out["empty"] = np.zeros((2, 0), dtype=np.float32)
    out["odd"] = sample("U8", (5,))  # leaves following tensors at odd offsets
    out["after_odd"] = sample("F64", (2, 2))
    return out


def test_writer_read_by_safetensors_library(tmp_path):
    tensors = _all_entries()
    meta = {"quant": "int8", "ü": "✓"}
    p = tmp_path / "out.safetensors"
    entries = [(n, dtype_code(a.dtype), a.shape) for n, a in tensors.items()]
    with SafetensorsWriter(p, entries, metadata=meta) as w:
        for n, a in tensors.items():
            w.write(n, a)
    blob = p.read_bytes()
    assert w.digest == blake3.blake3(blob).hexdigest()
    assert w.size == len(blob)

    # header layout: metadata first, then entries in order, contiguous, padded to 8
    n = struct.unpack("<Q", blob[:8])[0]
    assert n % 8 == 0 and w.header_size == 8 + n
    text = blob[8 : 8 + n].decode()
    assert text.rstrip(" ").endswith("}") and len(text) - len(text.rstrip(" ")) < 8
    hdr = json.loads(blob[8 : 8 + n])
    assert list(hdr) == ["__metadata__", *tensors]
    pos = 0
    for name in tensors:
        b, e = hdr[name]["data_offsets"]
        assert b == pos
        pos = e
    assert pos == len(blob) - 8 - n

    # the reference library reads it (its numpy API cannot build F8 arrays: skip only those)
    with safe_open(p, framework="numpy") as f:
        assert f.metadata() == meta
        assert set(f.keys()) == set(tensors)
        for name, a in tensors.items():
            if dtype_code(a.dtype) not in F8_CODES:
                assert same(f.get_tensor(name), a), name
    # load_file on an F8-free file written the same way
    no_f8 = {n: a for n, a in tensors.items() if dtype_code(a.dtype) not in F8_CODES}
    p2 = tmp_path / "no_f8.safetensors"
    with SafetensorsWriter(p2, [(n, dtype_code(a.dtype), a.shape) for n, a in no_f8.items()]) as w2:
        for n, a in no_f8.items():
            w2.write(n, a)
    loaded = load_file(p2)
    assert set(loaded) == set(no_f8)
    for name, a in no_f8.items():
        assert same(loaded[name], a), name

    # and so do we (including F8), with identical header bytes
    with SafetensorsFile(p) as f:
        assert f.header_bytes == blob[: w.header_size]
        assert f.metadata == meta
        assert [t.name for t in f.tensors] == list(tensors)
        for name, a in tensors.items():
            assert same(f.read(name), a), name


@pytest.mark.parametrize("background", [False, True])
def test_writer_large_pieces_hashed_and_written_whole(tmp_path, background):
    # The writer hashes and writes 1 MB at a time: runs of several MB (and their odd tails),
    # whole or in chunks, must come out byte for byte, with the digest of the whole file.
    rng = np.random.default_rng(5)
    a = rng.integers(0, 256, (3 << 20) + 12345, dtype=np.uint8)
    b = rng.standard_normal((1 << 18) + 7).astype(np.float32)  # 1 MB and 28 bytes
    p = tmp_path / "big.safetensors"
    with SafetensorsWriter(p, [("a", "U8", a.shape), ("b", "F32", b.shape)],
                           background=background) as w:
        w.write_chunk("a", a[: 1 << 20])
        w.write_chunk("a", a[1 << 20 :])
        w.write("b", b)
    blob = p.read_bytes()
    assert w.digest == blake3.blake3(blob).hexdigest()
    with SafetensorsFile(p) as f:
        assert same(f.read("a"), a) and same(f.read("b"), b)


def test_writer_accepts_bytes_views_and_noncontiguous(tmp_path):
    base = sample("F32", (6, 8))
    strided = base[::2, 1::3]  # non-contiguous
    transposed = base.T
    be = base.astype(">f4")  # big-endian: converted to little-endian
    raw = sample("I16", (10,))
    p = tmp_path / "o.safetensors"
    entries = [
        ("strided", "F32", strided.shape),
        ("transposed", "F32", transposed.shape),
        ("bigendian", "F32", base.shape),
        ("from_bytes", "I16", (10,)),
        ("from_memoryview", "I16", (2, 5)),
        ("from_uint8", "I16", (5, 2)),
        ("flat_for_2d", "F32", (8, 6)),
    ]
    with SafetensorsWriter(p, entries) as w:
        w.write("strided", strided)
        w.write("transposed", transposed)
        w.write("bigendian", be)
        w.write("from_bytes", raw.tobytes())
        w.write("from_memoryview", memoryview(raw))
        w.write("from_uint8", raw.view(np.uint8))
        w.write("flat_for_2d", transposed.reshape(-1))
    got = load_file(p)
    assert same(got["strided"], np.ascontiguousarray(strided))
    assert same(got["transposed"], np.ascontiguousarray(transposed))
    assert same(got["bigendian"], base)
    assert same(got["from_bytes"], raw)
    assert same(got["from_memoryview"], raw.reshape(2, 5))
    assert same(got["from_uint8"], raw.reshape(5, 2))
    assert same(got["flat_for_2d"], transposed.reshape(8, 6))
    assert w.digest == blake3.blake3(p.read_bytes()).hexdigest()


def test_writer_errors(tmp_path):
    p = tmp_path / "o.safetensors"
    entries = [("a", "F32", (2,)), ("b", "U8", (3,))]
    w = SafetensorsWriter(p, entries)
    with pytest.raises(ValueError, match="digest is only available after close"):
        _ = w.digest
    with pytest.raises(ValueError, match="out of order; expected 'a'"):
        w.write("b", b"abc")
    with pytest.raises(ValueError, match="got 12 bytes, expected 8"):
        w.write("a", np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="does not match F32"):
        w.write("a", np.zeros(2, np.float64)[:1])
    w.write("a", np.zeros(2, np.float32))
    assert not p.exists()  # nothing appears before a successful close
    with pytest.raises(ValueError, match="1 tensor\\(s\\) not written, first 'b'"):
        w.close()
    assert not p.exists()
    assert list(tmp_path.iterdir()) == []  # temporary file cleaned up

    # an exception inside the with-block discards the output
    with pytest.raises(RuntimeError), SafetensorsWriter(p, entries) as w2:
        w2.write("a", np.zeros(2, np.float32))
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []

    with pytest.raises(ValueError, match="duplicate tensor name"):
        SafetensorsWriter(p, [("a", "F32", (1,)), ("a", "F32", (1,))])
    with pytest.raises(ValueError, match="unknown dtype"):
        SafetensorsWriter(p, [("a", "F7", (1,))])
    with pytest.raises(ValueError, match="negative"):
        SafetensorsWriter(p, [("a", "F32", (-1,))])
    with pytest.raises(ValueError, match="metadata"):
        SafetensorsWriter(p, [], metadata={"a": 1})  # type: ignore[dict-item]
    assert list(tmp_path.iterdir()) == []

    with SafetensorsWriter(p, [("a", "U8", (1,))]) as w3:
        w3.write("a", b"x")
        with pytest.raises(ValueError, match="already written"):
            w3.write("a", b"x")
    assert p.read_bytes().endswith(b"x")


def test_writer_empty_file(tmp_path):
    p = tmp_path / "empty.safetensors"
    with SafetensorsWriter(p, []) as w:
        pass
    assert load_file(p) == {}
    assert w.digest == blake3.blake3(p.read_bytes()).hexdigest()
    with SafetensorsFile(p) as f:
        assert len(f) == 0 and f.metadata is None


@settings(max_examples=40, deadline=None, suppress_health_check=_TMP_OK)
@given(
    specs=st.lists(
        st.tuples(
            st.sampled_from(sorted(DTYPES)),
            st.lists(st.integers(0, 4), max_size=3).map(tuple),
        ),
        max_size=6,
    ),
    meta=st.none() | st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
)
def test_writer_reader_round_trip_property(tmp_path, specs, meta):
    tensors = {f"t{i}": sample(code, shape, seed=i) for i, (code, shape) in enumerate(specs)}
    p = tmp_path / "prop.safetensors"
    with SafetensorsWriter(p, [(n, dtype_code(a.dtype), a.shape) for n, a in tensors.items()],
                           metadata=meta) as w:  # fmt: skip
        for n, a in tensors.items():
            w.write(n, a)
    assert w.digest == blake3.blake3(p.read_bytes()).hexdigest()
    with SafetensorsFile(p) as f:
        assert f.metadata == meta
        assert [t.name for t in f.tensors] == list(tensors)
        for n, a in tensors.items():
            assert same(f.read(n), a)
    with safe_open(p, framework="numpy") as f:
        assert set(f.keys()) == set(tensors)
        assert (f.metadata() or None) == (meta or None)


@pytest.mark.parametrize("background", [False, True])
def test_writer_header_of_many_entries_is_json_dumps_of_the_dict(tmp_path, background):
    # The header goes out in pieces of 1 MB and is hashed read back from the file: it must be
    # byte for byte json.dumps of the header dict (padded), and the digest the whole file's.
    count = 20_000
    entries = [(f"model.layers.{i}.ü.{'x' * (i % 97)}", ("F32", "BF16", "U8")[i % 3],
                (i % 5, 3)) for i in range(count)]
    meta = {"format": "pt"}
    doc: dict = {"__metadata__": meta}
    pos = 0
    for name, code, shape in entries:
        size = shape[0] * shape[1] * DTYPES[code].itemsize
        doc[name] = {"dtype": code, "shape": list(shape), "data_offsets": [pos, pos + size]}
        pos += size
    body = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
    body += b" " * (-len(body) % 8)
    assert len(body) > 2 << 20  # several pieces
    p = tmp_path / "many.safetensors"
    with SafetensorsWriter(p, iter(entries), meta, background=background) as w:
        assert w.pending[:2] == [entries[0][0], entries[1][0]] and len(w.pending) == count
        for name, code, shape in entries:
            w.write(name, np.zeros(shape, DTYPES[code]))
    blob = p.read_bytes()
    assert blob[:8] == struct.pack("<Q", len(body)) and blob[8 : 8 + len(body)] == body
    assert len(blob) == 8 + len(body) + pos and w.size == len(blob)
    assert w.header_size == 8 + len(body)
    assert w.digest == blake3.blake3(blob).hexdigest()
    with safe_open(p, framework="numpy") as f:
        assert list(f.keys()) == sorted(n for n, _, _ in entries)


def test_writer_refuses_a_duplicate_far_apart_and_leaves_nothing(tmp_path):
    p = tmp_path / "dup.safetensors"
    entries = [(f"t{i}", "F32", (2,)) for i in range(5000)] + [("t17", "F32", (2,))]
    with pytest.raises(ValueError, match="duplicate tensor name 't17'"):
        SafetensorsWriter(p, entries)

    def failing():  # an error from the caller's entries mid-way
        yield ("a", "F32", (1,))
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        SafetensorsWriter(p, failing())
    assert list(tmp_path.iterdir()) == []


def test_writer_checks_each_entrys_size_and_order(tmp_path):
    p = tmp_path / "o.safetensors"
    with SafetensorsWriter(p, [("a", "F16", (2, 3)), ("b", "I64", (0,)), ("c", "U8", ())],
                           background=True) as w:
        with pytest.raises(ValueError, match="'a': got 4 bytes, expected 12 \\(F16\\)"):
            w.write("a", b"abcd")
        with pytest.raises(ValueError, match="does not match F16"):
            w.write("a", np.zeros((2, 3), np.float32))
        w.write_chunk("a", np.zeros(2, np.float16))
        with pytest.raises(ValueError, match="chunks add up to more than its 12 bytes"):
            w.write_chunk("a", np.zeros(5, np.float16))
        with pytest.raises(ValueError, match="'b' written out of order; expected 'a'"):
            w.write("b", b"")
        w.write_chunk("a", np.zeros(4, np.float16))
        w.write("b", b"")
        with pytest.raises(ValueError, match="got 2 bytes, expected 1 \\(U8\\)"):
            w.write("c", b"xy")
        w.write("c", b"z")
    assert p.read_bytes()[-13:] == bytes(12) + b"z"
