"""Hostile and broken input, end to end through the CLI (issue 6).

Every case builds its file here, runs qtool as a user would, and checks the whole contract:
exit 2, exactly one ``qtool: error: ...`` line on stderr that names the file (and the tensor
where there is one) and says what is wrong, no traceback, nothing written (no output, no
leftover temporary directory), and every input file's bytes and mtime unchanged.
The reader-level corpus (more byte-level variants) is in tests/formats/test_io.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import blake3
import ml_dtypes
import numpy as np
import pytest
from click.testing import Result
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from qtool.cli import cli
from qtool.formats._common import MAX_DIMS
from qtool.formats.manifest import FORMAT_VERSION, seal
from qtool.formats.native import verify
from tests.conftest import make_tensors, raw_file, run, write_checkpoint

# --------------------------------------------------------------------------------------------
# helpers


def ent(dtype: object, shape: object, offsets: object) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


W = "layer.w"  # the tensor name most cases use; messages must name it


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Bytes and mtime of every regular file under root (symlinks not followed)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(root))] = (p.read_bytes(), p.stat().st_mtime_ns)
    return out


def leftovers(parent: Path) -> list[str]:
    """Temporary files or directories qtool would have left beside its output."""
    return sorted(p.name for p in parent.iterdir() if ".qtool-" in p.name or p.name.endswith(
        ".tmp"))


def assert_one_line_error(result: Result, *fragments: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        result.exc_info
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("qtool: error: "), line
    assert "Traceback" not in result.stderr and result.stdout == ""
    for f in fragments:
        assert f in line, f"{f!r} not in {line!r}"
    return line


# --------------------------------------------------------------------------------------------
# the corpus of broken and hostile single files: (id, file bytes, fragment, tensor or None)

_F32_2x2 = np.arange(4, dtype=np.float32).tobytes()

CORPUS: list[tuple[str, bytes, str, str | None]] = [
    # the 8-byte length prefix and the header
    ("empty_file", b"", "file is 0 bytes, too short for the 8-byte header length", None),
    ("seven_bytes", b"\x10\x00\x00\x00\x00\x00\x00", "file is 7 bytes, too short", None),
    # The length read from the file is not echoed (issue 15: never echo bytes of a file
    # that failed validation).
    ("header_beyond_file", raw_file({}, length=4096), "header length (first 8 bytes) runs "
     "beyond the end of the file (16 bytes)", None),
    ("header_over_cap", raw_file({}, length=100_000_001),
     "header length (first 8 bytes) exceeds the 16777216-byte limit", None),
    ("header_u64_max", raw_file({}, length=2**64 - 1), "exceeds the 16777216-byte limit", None),
    ("header_not_utf8", raw_file(b'{"\xc3\x28": 1}'), "header is not valid UTF-8 (byte 10)", None),
    ("header_not_json", raw_file(b'{"layer.w": {"dtype": "F32",'), "header is not valid JSON",
     None),
    ("header_json_list", raw_file([1, 2]), "header JSON is a list, not an object", None),
    ("header_json_number", raw_file("42"), "header JSON is a number, not an object", None),
    ("header_deep_nesting", raw_file("[" * 100_000 + "]" * 100_000), "header is not valid JSON",
     None),
    ("metadata_not_object", raw_file({"__metadata__": "x"}),
     "__metadata__ is a string, not an object", None),
    ("metadata_value_not_string", raw_file({"__metadata__": {"k": 1}}),
     "__metadata__['k'] is a number, not a string", None),
    # one tensor entry
    ("unknown_dtype", raw_file({W: ent("F31", [2, 2], [0, 16])}, _F32_2x2),
     "unknown dtype 'F31'", W),
    ("dtype_not_string", raw_file({W: ent(["F32"], [2, 2], [0, 16])}, _F32_2x2),
     "unknown dtype ['F32']", W),
    ("entry_not_object", raw_file({W: [0, 16]}, _F32_2x2), "entry is a list, not an object", W),
    ("missing_dtype", raw_file({W: {"shape": [2, 2], "data_offsets": [0, 16]}}, _F32_2x2),
     "missing dtype", W),
    ("missing_shape", raw_file({W: {"dtype": "F32", "data_offsets": [0, 16]}}, _F32_2x2),
     "missing shape", W),
    ("shape_negative", raw_file({W: ent("F32", [-2, -2], [0, 16])}, _F32_2x2),
     "shape [-2, -2] is not a list of non-negative integers", W),
    ("shape_strings", raw_file({W: ent("F32", ["2", "2"], [0, 16])}, _F32_2x2),
     "is not a list of non-negative integers", W),
    ("shape_float", raw_file({W: ent("F32", [2.0, 2], [0, 16])}, _F32_2x2),
     "is not a list of non-negative integers", W),
    ("shape_not_list", raw_file({W: ent("F32", 4, [0, 16])}, _F32_2x2),
     "shape 4 is not a list", W),
    ("missing_offsets", raw_file({W: {"dtype": "F32", "shape": [2, 2]}}, _F32_2x2),
     "missing data_offsets", W),
    ("offsets_not_pair", raw_file({W: ent("F32", [2, 2], [0, 8, 16])}, _F32_2x2),
     "data_offsets [0, 8, 16] is not a pair of non-negative integers", W),
    ("offsets_negative", raw_file({W: ent("F32", [2, 2], [-16, 0])}, _F32_2x2),
     "is not a pair of non-negative integers", W),
    ("offsets_reversed", raw_file({W: ent("F32", [0, 2], [16, 0])}, _F32_2x2),
     "data_offsets [16, 0] end before they begin", W),
    ("offsets_outside_data", raw_file({W: ent("F32", [2, 4], [0, 32])}, _F32_2x2),
     "data_offsets [0, 32] extend beyond the data area (16 bytes)", W),
    ("offsets_far_outside", raw_file({W: ent("F32", [2, 2], [2**63, 2**63 + 16])}, _F32_2x2),
     "extend beyond the data area", W),
    ("bytes_differ_from_shape", raw_file({W: ent("F32", [2, 3], [0, 16])}, _F32_2x2),
     "data_offsets [0, 16] hold 16 bytes but shape [2, 3] of F32 needs 24", W),
    ("bytes_differ_dtype", raw_file({W: ent("F64", [2, 2], [0, 16])}, _F32_2x2),
     "hold 16 bytes but shape [2, 2] of F64 needs 32", W),
    # A header claiming ~10^36 elements must be refused before anything is allocated.
    ("shape_astronomical", raw_file({W: ent("F32", [2**40, 2**40, 2**40], [0, 16])}, _F32_2x2),
     "needs more than 18446744073709551616", W),
    # empty, so no bytes, but not representable: numpy cannot even make an empty array of it
    ("empty_but_huge", raw_file({W: ent("F32", [0, 3, 2**62], [0, 0])}),
     "shape [0, 3, 4611686018427387904] of F32 is too large to represent", W),
    ("too_many_dims", raw_file({W: ent("F32", [1] * (MAX_DIMS + 1), [0, 4])}, _F32_2x2[:4]),
     f"shape has {MAX_DIMS + 1} dimensions, more than {MAX_DIMS}", W),
    # several entries
    ("overlapping", raw_file({"a": ent("F32", [2], [0, 8]), W: ent("F32", [2], [4, 12])},
                             _F32_2x2), "data_offsets [4, 12] overlap tensor 'a' which ends at 8",
     W),
    ("same_bytes_twice", raw_file({"a": ent("F32", [4], [0, 16]), W: ent("I32", [4], [0, 16])},
                                  _F32_2x2), "overlap tensor 'a'", W),
    ("gap", raw_file({"a": ent("F32", [1], [0, 4]), W: ent("F32", [2], [8, 16])}, _F32_2x2),
     "data_offsets [8, 16] leave a gap: bytes [4, 8) of the data area belong to no tensor", W),
    ("trailing_bytes", raw_file({W: ent("F32", [2, 2], [0, 16])}, _F32_2x2 + b"junk"),
     "4 trailing bytes after the last tensor", None),
    ("duplicate_name", raw_file(
        '{"layer.w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},'
        ' "layer.w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}', _F32_2x2),
     "duplicate tensor name", W),
    ("duplicate_key_in_entry", raw_file(
        '{"layer.w": {"dtype": "F32", "shape": [2, 2], "shape": [4], "data_offsets": [0, 16]}}',
        _F32_2x2), "entry has duplicate key 'shape'", W),
    # a name that would forge a second line in a log is shown escaped, on one line
    ("newline_in_name", raw_file({"evil\nqtool: ok": ent("F99", [1], [0, 4])}, _F32_2x2[:4]),
     "tensor 'evil\\nqtool: ok': unknown dtype 'F99'", None),
]  # fmt: skip


@pytest.mark.parametrize("command", ["quantize", "report"])
@pytest.mark.parametrize(("blob", "fragment", "tensor"), [c[1:] for c in CORPUS],
                         ids=[c[0] for c in CORPUS])
def test_broken_file_is_rejected(tmp_path, command, blob, fragment, tensor):
    src_dir = tmp_path / "in"
    src_dir.mkdir()
    src = src_dir / "model.safetensors"
    src.write_bytes(blob)
    before = snapshot(src_dir)
    out = tmp_path / "out"
    args = (src, out) if command == "quantize" else (src,)  # report: a dry run, writes nothing
    line = assert_one_line_error(run(command, *args, expect=2), fragment)
    assert line.startswith(f"qtool: error: {src}: ")
    if tensor is not None:
        assert f"tensor {tensor!r}" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no output, no leftovers
    assert snapshot(src_dir) == before


def test_corpus_files_are_also_rejected_by_the_reference_library(tmp_path):
    """Guards the corpus itself: every case is broken for the safetensors library too, so
    qtool is not merely being fussy about files the ecosystem accepts."""
    for case_id, blob, _, _ in CORPUS:
        p = tmp_path / f"{case_id}.safetensors"
        p.write_bytes(blob)
        try:
            with safe_open(str(p), "numpy") as f:
                for k in f.keys():
                    f.get_tensor(k)
        except Exception:  # noqa: BLE001 - any failure of the library counts
            continue
        pytest.fail(f"{case_id}: the safetensors library accepts it")


def test_dequantize_rejects_broken_file_inside_artifact(tmp_path, ckpt):
    """An artifact whose manifest is intact but whose data file is a hostile safetensors file
    (manifest sizes patched to match, as an attacker would)."""
    art = tmp_path / "art"
    run("quantize", ckpt, art, "-q")
    for case_id, blob, fragment, _ in CORPUS[::4]:
        target = art / "model.scale.safetensors"
        target.write_bytes(blob)
        m = json.loads((art / "qtool.json").read_text())
        m["files"]["model.scale.safetensors"]["size"] = len(blob)
        (art / "qtool.json").write_text(seal(m))
        before = snapshot(art)
        restored = tmp_path / "r.safetensors"
        line = assert_one_line_error(run("dequantize", art, restored, expect=2), fragment)
        assert f"{target}: " in line, case_id
        assert not restored.exists() and leftovers(tmp_path) == []
        assert snapshot(art) == before


# --------------------------------------------------------------------------------------------
# values: NaN / inf, empty tensors, scalars


def _nan_checkpoint(path: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    bad = rng.normal(0, 1, (200, 1000)).astype(np.float32)
    bad[0, 0] = np.nan
    bad[150, 999] = np.inf  # a different row block than the NaN (blocks are ~65 rows here)
    bad[199, 5] = -np.inf
    half = rng.normal(0, 1, (8, 8)).astype(np.float16)
    half[3, 3] = np.nan
    tensors = {
        "good.weight": rng.normal(0, 1, (16, 16)).astype(np.float32),
        "bad.weight": bad,
        "half.weight": half,
        "nan.bias": np.array([np.nan, 1.0], np.float32),  # 1-D: copied, never inspected
    }
    save_file(tensors, str(path))
    return tensors


def test_nan_policy_error_names_tensor_and_count(tmp_path):
    src = tmp_path / "m.safetensors"
    _nan_checkpoint(src)
    before = snapshot(tmp_path)
    out = tmp_path / "out"
    assert_one_line_error(run("quantize", src, out, expect=2),
                          f"{src}: tensor 'bad.weight' has 3 NaN/inf values",
                          "--nan-policy skip")
    assert not out.exists() and leftovers(tmp_path) == []
    # skipping the first offender reveals the next one, with its own count
    assert_one_line_error(run("quantize", src, out, "--skip", "bad.*", expect=2),
                          "tensor 'half.weight' has 1 NaN/inf value ")
    assert snapshot(tmp_path) == before


def test_nan_policy_skip_keeps_tensor_in_float_and_says_so(tmp_path):
    src = tmp_path / "m.safetensors"
    tensors = _nan_checkpoint(src)
    before = snapshot(tmp_path)
    out = tmp_path / "out"
    r = run("quantize", src, out, "--nan-policy", "skip")
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("qtool: warning:")]
    assert warnings == [
        "qtool: warning: tensor 'bad.weight' has NaN/inf values; kept in float "
        "(--nan-policy skip)",
        "qtool: warning: tensor 'half.weight' has NaN/inf values; kept in float "
        "(--nan-policy skip)",
    ]
    m = json.loads((out / "qtool.json").read_text())
    by = {t["name"]: t for t in m["tensors"]}
    assert by["bad.weight"]["passthrough"] == "NaN/inf values (--nan-policy skip)"
    assert by["half.weight"]["passthrough"] == "NaN/inf values (--nan-policy skip)"
    assert by["good.weight"]["scheme"] == "symmetric"
    stored = load_file(str(out / "m.safetensors"))
    assert stored["bad.weight"].tobytes() == tensors["bad.weight"].tobytes()
    assert stored["half.weight"].dtype == np.float16
    assert stored["good.weight"].dtype == np.int8
    run("dequantize", out, tmp_path / "r.safetensors", "-q")
    back = load_file(str(tmp_path / "r.safetensors"))
    for name in ("bad.weight", "half.weight", "nan.bias"):
        assert back[name].tobytes() == tensors[name].tobytes(), name
    # --quiet silences the notice like any other diagnostic
    r = run("quantize", src, tmp_path / "out2", "--nan-policy", "skip", "-q")
    assert r.stderr == ""
    assert snapshot(tmp_path)["m.safetensors"] == before["m.safetensors"]


def test_empty_tensors_and_scalars_pass_through(tmp_path):
    tensors = {
        "empty.weight": np.zeros((0, 16), np.float32),
        "empty.cols": np.zeros((16, 0), ml_dtypes.bfloat16),
        "empty.1d": np.zeros((0,), np.float16),
        "empty.wide": np.zeros((0, 2**40), np.float32),  # representable: numpy and qtool agree
        "many.dims": np.full([1] * MAX_DIMS, 3.0, np.float32),
        "scalar.f32": np.array(-2.5, np.float32),
        "scalar.i64": np.array(7, np.int64),
        "real.weight": np.random.default_rng(1).normal(0, 1, (4, 8)).astype(np.float32),
    }
    src = write_checkpoint(tmp_path / "m.safetensors", tensors)
    out = tmp_path / "out"
    run("quantize", src, out, "--scheme", "gnmt", "-q")
    m = json.loads((out / "qtool.json").read_text())
    reasons = {t["name"]: t.get("passthrough") for t in m["tensors"]}
    assert reasons == {"empty.weight": "empty tensor", "empty.cols": "empty tensor",
                       "empty.1d": "1-D tensor (bias or norm)", "empty.wide": "empty tensor",
                       "many.dims": None, "scalar.f32": "scalar",
                       "scalar.i64": "I64 is not a float dtype", "real.weight": None}
    run("verify", out)
    run("dequantize", out, tmp_path / "r.safetensors", "-q")
    back = load_file(str(tmp_path / "r.safetensors"))
    for name, w in tensors.items():
        assert back[name].dtype == w.dtype and back[name].shape == w.shape, name
        if reasons[name] is not None:
            assert back[name].tobytes() == w.tobytes(), name
    assert back["many.dims"].item() == 3.0  # a single value per row is exact in gnmt


def _strict_json(text: str) -> dict:
    def refuse(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_values_beyond_float32_scales_are_refused_not_written_as_inf(tmp_path):
    """F64 weights above ~4e40 need a scale above float32's maximum: it would be stored as inf
    and restore as inf/NaN (found by tests/test_fuzz.py, whose `verify` call flagged the inf
    scales). quantize refuses the tensor by name; --skip keeps it; report's dry run says so."""
    big = np.array([[1e200, -3e250], [2e300, 1.0]])
    tensors = {"huge.weight": big, "ok.weight": np.eye(2, dtype=np.float32)}
    src = write_checkpoint(tmp_path / "m.safetensors", tensors)
    out = tmp_path / "out"
    # A real process: numpy's overflow warnings must not reach stderr either.
    p = subprocess.run([sys.executable, "-m", "qtool", "quantize", str(src), str(out),
                        "--scheme", "gnmt"], capture_output=True, text=True, check=False)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr == (f"qtool: error: {src}: tensor 'huge.weight' has values too large for a "
                        "float32 scale (absmax 2e+300); --skip it to keep it in float\n")
    assert not out.exists() and leftovers(tmp_path) == []
    run("quantize", src, out, "--scheme", "gnmt", "--skip", "huge.*", "-q")
    run("verify", out)
    rep = run("report", src, "--scheme", "gnmt", "--format", "json")
    assert "gnmt: has values too large for a float32 scale" in rep.stdout
    assert "Warning" not in rep.stderr
    m = _strict_json((out / "qtool.json").read_text())
    assert {t["name"]: t.get("passthrough") for t in m["tensors"]} == {
        "huge.weight": "matched --skip", "ok.weight": None}


def test_manifest_never_holds_non_json_numbers():
    """Sums of squares that overflowed are left out of the manifest rather than written as
    the non-standard `Infinity`, which strict JSON readers (and qtool's) refuse."""
    from qtool.core.metrics import ErrorStats
    from qtool.core.schemes import QuantSpec
    from qtool.formats.manifest import TensorRecord

    rec = TensorRecord("w", "m.safetensors", "F64", (2, 2), QuantSpec(),
                       stats=ErrorStats(4, float("inf"), 1.0, 0.0, 0.5))
    assert "metrics" not in rec.to_json()
    rec.stats = ErrorStats(4, 2.0, 1.0, 0.0, 0.5)
    assert rec.to_json()["metrics"]["signal_sq"] == 2.0


# --------------------------------------------------------------------------------------------
# sharded checkpoints: the index must not reach outside its directory


def _sharded(tmp_path: Path) -> Path:
    d = tmp_path / "ckpt"
    d.mkdir()
    rng = np.random.default_rng(0)
    save_file({"a.weight": rng.normal(size=(4, 4)).astype(np.float32)},
              str(d / "model-00001-of-00002.safetensors"))
    save_file({"b.weight": rng.normal(size=(4, 4)).astype(np.float32),
               "b.bias": np.zeros(4, np.float32)}, str(d / "model-00002-of-00002.safetensors"))
    index = {"metadata": {"total_size": 144},
             "weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                            "b.weight": "model-00002-of-00002.safetensors",
                            "b.bias": "model-00002-of-00002.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return d


def _edit_index(d: Path, fn: Callable[[dict], None]) -> None:
    p = d / "model.safetensors.index.json"
    idx = json.loads(p.read_text())
    fn(idx)
    p.write_text(json.dumps(idx))


def _outside(tmp_path: Path) -> Path:
    p = tmp_path / "secret.safetensors"
    save_file({"b.bias": np.zeros(4, np.float32)}, str(p))
    return p


def _case_dotdot(tmp_path: Path, d: Path) -> str:
    _outside(tmp_path)
    _edit_index(d, lambda i: i["weight_map"].update({"b.bias": "../secret.safetensors"}))
    return "tensor 'b.bias': shard '../secret.safetensors' contains '..'"


def _case_absolute(tmp_path: Path, d: Path) -> str:
    secret = _outside(tmp_path)
    _edit_index(d, lambda i: i["weight_map"].update({"b.bias": str(secret)}))
    return "tensor 'b.bias': shard '/"  # the path itself is shortened in the message


def _case_symlink_file(tmp_path: Path, d: Path) -> str:
    (d / "link.safetensors").symlink_to(_outside(tmp_path))
    _edit_index(d, lambda i: i["weight_map"].update({"b.bias": "link.safetensors"}))
    return "tensor 'b.bias': shard 'link.safetensors' resolves outside"


def _case_symlink_dir(tmp_path: Path, d: Path) -> str:
    _outside(tmp_path)
    (d / "sub").symlink_to(tmp_path, target_is_directory=True)
    _edit_index(d, lambda i: i["weight_map"].update({"b.bias": "sub/secret.safetensors"}))
    return "shard 'sub/secret.safetensors' resolves outside"


def _case_missing_shard(tmp_path: Path, d: Path) -> str:
    (d / "model-00002-of-00002.safetensors").unlink()
    return "tensor 'b.weight': shard 'model-00002-of-00002.safetensors' is missing"


def _case_shard_lacks_tensor(tmp_path: Path, d: Path) -> str:
    _edit_index(d, lambda i: i["weight_map"].update({"ghost.weight":
                                                     "model-00001-of-00002.safetensors"}))
    return ("tensor 'ghost.weight': index places it in model-00001-of-00002.safetensors, "
            "which does not contain it")


def _case_tensor_in_other_shard(tmp_path: Path, d: Path) -> str:
    _edit_index(d, lambda i: i["weight_map"].update({"a.weight":
                                                     "model-00002-of-00002.safetensors"}))
    return "tensor 'a.weight': index places it in model-00002-of-00002.safetensors"


def _case_unlisted_tensor(tmp_path: Path, d: Path) -> str:
    _edit_index(d, lambda i: i["weight_map"].pop("b.bias"))
    return "tensor 'b.bias' is not listed in index model.safetensors.index.json"


def _case_broken_shard(tmp_path: Path, d: Path) -> str:
    (d / "model-00002-of-00002.safetensors").write_bytes(raw_file({"b.weight": ent(
        "F32", [4, 4], [0, 64])}, b"\0" * 60))
    return "model-00002-of-00002.safetensors: tensor 'b.weight': data_offsets [0, 64] extend"


def _case_index_not_json(tmp_path: Path, d: Path) -> str:
    (d / "model.safetensors.index.json").write_text('{"weight_map": {')
    return "model.safetensors.index.json: index is not valid JSON"


SHARD_CASES = {f.__name__[6:]: f for f in (
    _case_dotdot, _case_absolute, _case_symlink_file, _case_symlink_dir, _case_missing_shard,
    _case_shard_lacks_tensor, _case_tensor_in_other_shard, _case_unlisted_tensor,
    _case_broken_shard, _case_index_not_json)}


@pytest.mark.parametrize("case", SHARD_CASES)
def test_quantize_rejects_hostile_index(tmp_path, case):
    d = _sharded(tmp_path)
    fragment = SHARD_CASES[case](tmp_path, d)
    before = snapshot(tmp_path)
    for arg in (d / "model.safetensors.index.json", d):
        out = tmp_path / "out"
        assert_one_line_error(run("quantize", arg, out, expect=2), fragment)
        assert not out.exists() and leftovers(tmp_path) == []
        assert_one_line_error(run("report", arg, expect=2), fragment)
    assert snapshot(tmp_path) == before


def test_sharded_quantize_and_verify_work(tmp_path):
    """The valid sharded layout the cases above break: it quantizes, verifies, restores."""
    d = _sharded(tmp_path)
    before = snapshot(d)
    out = tmp_path / "out"
    run("quantize", d, out, "-q")
    run("verify", out)
    run("dequantize", out, tmp_path / "restored", "--verify", "-q")
    run("report", out, "--verify", "--format", "json")
    assert sorted(p.name for p in (tmp_path / "restored").iterdir()) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json"]
    assert snapshot(d) == before


# --------------------------------------------------------------------------------------------
# output paths: never the input, never a directory holding it


def test_quantize_refuses_to_write_over_its_input(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    src = write_checkpoint(d / "model.safetensors")
    before = snapshot(tmp_path)
    for out in (src, d, tmp_path, tmp_path / "in" / "." / ".."):
        for extra in ((), ("--force",)):
            assert_one_line_error(run("quantize", src, out, *extra, expect=2),
                                  "output would overwrite the input")
    sharded = _sharded(tmp_path)
    before = snapshot(tmp_path)
    for out in (sharded, sharded / "model-00001-of-00002.safetensors",
                sharded / "model.safetensors.index.json"):
        assert_one_line_error(run("quantize", sharded, out, "--force", expect=2),
                              "output would overwrite the input")
    assert snapshot(tmp_path) == before
    assert leftovers(tmp_path) == [] and leftovers(d) == []


def test_dequantize_refuses_to_write_into_or_over_its_artifact(tmp_path, ckpt):
    art = tmp_path / "art"
    run("quantize", ckpt, art, "-q")
    before = snapshot(tmp_path)
    for out in (art, art / "model.safetensors", art / "qtool.json", art / "new.safetensors"):
        assert_one_line_error(run("dequantize", art, out, expect=2),
                              "output would be written inside the artifact")
    # a directory receives <name>.safetensors, like cp: here that is the original, which
    # is never replaced unasked
    assert_one_line_error(run("dequantize", art, tmp_path, expect=2),
                          f"{tmp_path / 'model.safetensors'}: file exists")
    # sharded: the output is a directory, so one that holds the artifact is the input too
    sharded_art = tmp_path / "sharded_art"
    run("quantize", _sharded(tmp_path), sharded_art, "-q")
    before = snapshot(tmp_path)
    assert_one_line_error(run("dequantize", sharded_art, tmp_path, expect=2),
                          "output would overwrite the input")
    assert snapshot(tmp_path) == before and leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------------
# artifacts: cheap checks always, hashes with --verify, `qtool verify` names every problem


@pytest.fixture
def art(tmp_path, ckpt) -> Path:
    out = tmp_path / "art"
    run("quantize", ckpt, out, "--scheme", "asymmetric", "--granularity", "group",
        "--group-size", "16", "-q")
    return out


def _manifest(art: Path) -> dict:
    return json.loads((art / "qtool.json").read_text())


def _write_manifest(art: Path, m: dict) -> None:
    (art / "qtool.json").write_text(seal(m))


def _patch_tensor(path: Path, name: str, fn: Callable[[np.ndarray], np.ndarray]) -> None:
    """Rewrite one tensor's bytes in place (same dtype and shape), as an attacker would."""
    with safe_open(str(path), "numpy") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    tensors[name] = fn(tensors[name].copy())
    save_file(tensors, str(path), metadata=meta)


def _reseal(art: Path, *names: str) -> None:
    """Record the tampered files' real size and digest and reseal the manifest, as an attacker
    would, so that only deeper checks can tell."""
    m = _manifest(art)
    for n in names:
        data = (art / n).read_bytes()
        m["files"][n] = {"size": len(data), "blake3": blake3.blake3(data).hexdigest()}
    _write_manifest(art, m)


def test_manifest_records_size_and_blake3_of_every_file(art):
    m = _manifest(art)
    on_disk = sorted(p.name for p in art.iterdir() if p.name != "qtool.json")
    assert sorted(m["files"]) == on_disk and m["digest"] == "blake3"
    for name, info in m["files"].items():
        data = (art / name).read_bytes()
        assert info == {"size": len(data), "blake3": blake3.blake3(data).hexdigest()}
    assert verify(art) == []
    r = run("verify", art)
    assert r.stdout == ""
    assert r.stderr.startswith(f"{art}: ok: 3 files match their size and blake3; 10 tensors "
                               "(6 quantized)")
    assert run("verify", art, "-q").stderr == ""


def test_dequantize_refuses_size_mismatch(art, tmp_path):
    with open(art / "model.safetensors", "ab") as f:
        f.write(b"\0")
    size = (art / "model.safetensors").stat().st_size
    for args in (("dequantize", art, tmp_path / "r.safetensors"),
                 ("dequantize", art, tmp_path / "r.safetensors", "--verify"), ("report", art)):
        assert_one_line_error(
            run(*args, expect=2),
            f"{art / 'model.safetensors'}: size {size} differs from the manifest's {size - 1}")
    assert not (tmp_path / "r.safetensors").exists() and leftovers(tmp_path) == []


def test_dequantize_verify_catches_same_size_tampering(art, tmp_path):
    _patch_tensor(art / "model.scale.safetensors", "zeros.weight", lambda s: s * 2)
    # the cheap checks cannot see it: sizes and shapes are unchanged
    run("dequantize", art, tmp_path / "r.safetensors", "-q")
    want = _manifest(art)["files"]["model.scale.safetensors"]["blake3"]
    # The digest of the tampered bytes is not echoed, only the recorded one.
    message = f"{art / 'model.scale.safetensors'}: blake3 differs from the manifest's {want}"
    assert_one_line_error(run("dequantize", art, tmp_path / "r2.safetensors", "--verify",
                              expect=2), message)
    assert not (tmp_path / "r2.safetensors").exists()
    # report reads only the manifest's metrics: the cheap checks pass, --verify does not
    run("report", art, "--format", "json")
    assert_one_line_error(run("report", art, "--verify", expect=2), message)


def test_report_verify_is_for_artifacts(ckpt):
    assert_one_line_error(run("report", ckpt, "--verify", expect=2),
                          f"--verify applies to an artifact; {ckpt} is not one")


def test_unknown_format_version_names_the_supported_one(art, tmp_path):
    m = _manifest(art)
    m["format_version"] = 7
    _write_manifest(art, m)
    for args in (("dequantize", art, tmp_path / "r.safetensors"), ("verify", art),
                 ("report", art)):
        assert_one_line_error(run(*args, expect=2),
                              f"{art / 'qtool.json'}: unknown format_version 7; this qtool",
                              f"reads format_version 1, {FORMAT_VERSION}")


# Each case tampers with a valid artifact and returns the problems `verify` must report, in
# order (fragments of each line).
VERIFY_CASES: dict[str, Callable[[Path], list[str]]] = {}


def _verify_case(fn: Callable[[Path], list[str]]) -> Callable[[Path], list[str]]:
    VERIFY_CASES[fn.__name__[3:]] = fn
    return fn


@_verify_case
def _v_missing_file(art: Path) -> list[str]:
    (art / "model.zero_point.safetensors").unlink()
    p = art / "model.zero_point.safetensors"
    return [f"{p}: missing (the manifest lists it)", f"{p}: cannot open"]


@_verify_case
def _v_flipped_byte(art: Path) -> list[str]:
    p = art / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[-1] ^= 0x01  # the last byte belongs to the last tensor's data
    p.write_bytes(data)
    return [f"{p}: blake3 differs from the manifest's"]


@_verify_case
def _v_wrong_scale_shape(art: Path) -> list[str]:
    p = art / "model.scale.safetensors"
    tensors = load_file(str(p))
    tensors["layers.0.attn.q.weight"] = np.ones((32, 2), np.float32)
    save_file(tensors, str(p))
    _reseal(art, p.name)
    return [f"{p}: tensor 'layers.0.attn.q.weight' is F32 [32, 2], expected F32 [32, 3]"]


@_verify_case
def _v_missing_zero_point_tensor(art: Path) -> list[str]:
    p = art / "model.zero_point.safetensors"
    tensors = load_file(str(p))
    del tensors["layers.0.conv.weight"]
    save_file(tensors, str(p))
    _reseal(art, p.name)
    return [f"{p}: tensor 'layers.0.conv.weight' (zero point) is missing"]


@_verify_case
def _v_bad_scales(art: Path) -> list[str]:
    p = art / "model.scale.safetensors"

    def poison(s: np.ndarray) -> np.ndarray:
        s.reshape(-1)[:3] = [0.0, -1.0, np.nan]
        return s

    _patch_tensor(p, "layers.0.mlp.up.weight", poison)
    _reseal(art, p.name)
    return [f"{p}: tensor 'layers.0.mlp.up.weight': 3 of 128 scales are not finite and > 0"]


@_verify_case
def _v_zero_point_out_of_range(art: Path) -> list[str]:
    # Every U8 is a valid 8-bit asymmetric zero point (format_version 2); a symmetric scheme's
    # single zero point must be 0. Same source and settings, symmetric.
    run("quantize", art.parent / "model.safetensors", art, "--scheme", "symmetric",
        "--granularity", "group", "--group-size", "16", "-q", "--force")
    p = art / "model.zero_point.safetensors"

    def poison(z: np.ndarray) -> np.ndarray:
        z[()] = 3
        return z

    _patch_tensor(p, "head.weight64", poison)
    _reseal(art, p.name)
    return [f"{p}: tensor 'head.weight64': 1 of 1 zero points outside [0, 0] "
            "(symmetric, 8-bit)"]


@_verify_case
def _v_extra_tensor(art: Path) -> list[str]:
    p = art / "model.scale.safetensors"
    tensors = load_file(str(p))
    tensors["smuggled"] = np.ones(3, np.float32)
    save_file(tensors, str(p))
    _reseal(art, p.name)
    return [f"{p}: 1 tensor(s) the manifest does not list there, first 'smuggled'"]


@_verify_case
def _v_unlisted_file(art: Path) -> list[str]:
    m = _manifest(art)
    del m["files"]["model.zero_point.safetensors"]
    _write_manifest(art, m)
    return [f"{art / 'model.zero_point.safetensors'}: not listed in the manifest's files"]


@pytest.mark.parametrize("case", VERIFY_CASES)
def test_verify_names_each_problem(art, case):
    expected = VERIFY_CASES[case](art)
    r = run("verify", art, expect=2)
    lines = r.stderr.splitlines()
    assert r.stdout == "" and "Traceback" not in r.stderr
    assert all(ln.startswith("qtool: error: ") for ln in lines), lines
    assert len(lines) == len(expected) + 1, lines
    for line, want in zip(lines, expected, strict=False):
        assert want in line, (want, line)
    n = len(expected)
    assert lines[-1] == (f"qtool: error: {art}: {n} problem{'s' if n > 1 else ''}; the "
                         "artifact does not verify")
    assert verify(art) == [ln[len("qtool: error: "):] for ln in lines[:-1]]


def test_verify_reports_several_problems_at_once(art):
    # (the zero-point case rewrites the artifact first, so it comes first)
    expected = _v_zero_point_out_of_range(art) + _v_bad_scales(art)
    data = bytearray((art / "model.safetensors").read_bytes())
    data[-1] ^= 0x01
    (art / "model.safetensors").write_bytes(data)
    problems = verify(art)
    assert len(problems) == 3
    assert "model.safetensors: blake3" in problems[0]  # files first, then tensors
    assert {expected[0], expected[1]} == {p for p in problems[1:]}


def _gnmt_artifact(tmp_path: Path, *args: str) -> Path:
    src = write_checkpoint(tmp_path / "g.safetensors", make_tensors(5))
    out = tmp_path / ("g" + "".join(args).replace("-", ""))
    run("quantize", src, out, *args, "-q")
    return out


def test_verify_q_outside_the_scheme_range(tmp_path):
    out = _gnmt_artifact(tmp_path, "--scheme", "gnmt")
    p = out / "g.safetensors"

    def poison(q: np.ndarray) -> np.ndarray:
        q.reshape(-1)[[0, 7, 9]] = -128  # int8 can hold it; gnmt's range is [-127, 127]
        return q

    _patch_tensor(p, "layers.0.attn.q.weight", poison)
    _reseal(out, p.name)
    assert verify(out) == [f"{p}: tensor 'layers.0.attn.q.weight': 3 of 1536 values outside "
                           "[-127, 127] (gnmt, 8-bit)"]
    # dequantize does not run the value checks (only verify does): it restores what is there
    run("dequantize", out, tmp_path / "r.safetensors", "--verify", "-q")


def test_verify_packed_padding_bits(tmp_path):
    out = _gnmt_artifact(tmp_path, "--bits", "3")
    assert verify(out) == []
    p = out / "g.safetensors"
    # [32, 48] at 3 bits: 144 bits = 18 bytes per row, no padding; the conv weight (8, 36)
    # packs 108 bits into 14 bytes, so the top 4 bits of each row's last byte are padding.
    m = {t["name"]: t for t in _manifest(out)["tensors"]}
    assert m["layers.0.conv.weight"]["stored_shape"] == [8, 14]

    def poison(q: np.ndarray) -> np.ndarray:
        q[2, 13] |= 0x80
        return q

    _patch_tensor(p, "layers.0.conv.weight", poison)
    _reseal(out, p.name)
    assert verify(out) == [f"{p}: tensor 'layers.0.conv.weight': packed rows have non-zero "
                           "padding bits"]


def test_hostile_manifest_names_are_refused_before_any_file_is_opened(art, tmp_path):
    m = _manifest(art)
    m["files"]["../../etc/passwd"] = {"size": 1, "blake3": "0" * 64}
    _write_manifest(art, m)
    for args in (("dequantize", art, tmp_path / "r.safetensors"), ("verify", art),
                 ("report", art)):
        assert_one_line_error(run(*args, expect=2), f"{art / 'qtool.json'}: file name "
                              "'../../etc/passwd' is not a plain name")


def _q(m: dict) -> dict:
    """The manifest record of a quantized tensor."""
    return next(t for t in m["tensors"] if t["name"] == "layers.0.attn.q.weight")


HOSTILE_MANIFESTS: list[tuple[str, Callable[[dict], None], str]] = [
    ("no_fields", lambda m: m.clear() or m.update({"format": "qtool", "format_version": 1}),
     "required field 'qtool_version' is missing"),
    ("not_an_object", lambda m: m.clear() or m.update({"format": ["qtool"]}),
     "not a qtool manifest"),
    ("duplicate_tensor", lambda m: m["tensors"].append(_q(m)),
     "tensor 'layers.0.attn.q.weight' is listed twice"),
    ("tensor_in_unknown_file", lambda m: _q(m).update({"file": "other.safetensors"}),
     "is in 'other.safetensors', which is not one of the shards"),
    ("two_shards_no_index", lambda m: m["shards"].append("model2.safetensors"),
     "2 shards but no index"),
    ("shape_infinite", lambda m: _q(m).update({"shape": [float("inf"), 3]}),
     "not valid JSON (Infinity is not a JSON value)"),  # json.dumps writes the literal
    ("name_not_string", lambda m: _q(m).update({"name": 5}),
     "name, file and dtype must be strings"),
    ("quantized_int_dtype", lambda m: _q(m).update({"dtype": "I64"}),
     "a quantized tensor must be a float dtype, not I64"),
    ("unknown_dtype", lambda m: _q(m).update({"dtype": "F128"}), "unknown dtype"),
    ("bits_out_of_range", lambda m: _q(m).update({"bits": 64}),
     "bits must be an integer from 2 to 8"),
    ("shard_path_escape", lambda m: m.update({"shards": ["../model.safetensors"]}) or [
        t.update({"file": "../model.safetensors"}) for t in m["tensors"]],
     "file name '../model.safetensors' is not a plain name"),
    ("version_string", lambda m: m.update({"format_version": "1" * 500}),
     "unknown format_version '11111"),
]  # fmt: skip


@pytest.mark.parametrize(("mutate", "fragment"), [c[1:] for c in HOSTILE_MANIFESTS],
                         ids=[c[0] for c in HOSTILE_MANIFESTS])
def test_hostile_manifest_is_one_line_error(art, tmp_path, mutate, fragment):
    m = _manifest(art)
    mutate(m)
    _write_manifest(art, m)
    for args in (("dequantize", art, tmp_path / "r.safetensors"), ("verify", art),
                 ("report", art)):
        line = assert_one_line_error(run(*args, expect=2), fragment)
        assert len(line) < 600
    assert not (tmp_path / "r.safetensors").exists() and leftovers(tmp_path) == []


def test_hostile_sharded_index_in_artifact(tmp_path):
    art = tmp_path / "art"
    run("quantize", _sharded(tmp_path), art, "-q")
    idx = art / "model.safetensors.index.json"
    doc = json.loads(idx.read_text())
    doc["weight_map"]["a.weight"] = "../../elsewhere.safetensors"
    idx.write_text(json.dumps(doc))
    _reseal(art, idx.name)
    out = tmp_path / "restored"
    assert_one_line_error(run("dequantize", art, out, expect=2),
                          f"{idx}: weight_map places tensor 'a.weight' in "
                          "'../../elsewhere.safetensors', the manifest in "
                          "'model-00001-of-00002.safetensors'")
    idx.write_text("[" * 50_000)
    _reseal(art, idx.name)
    assert_one_line_error(run("dequantize", art, out, expect=2), f"{idx}: not a valid JSON")
    assert not out.exists() and leftovers(tmp_path) == []


def test_commands_exist_as_documented():
    assert {"quantize", "dequantize", "verify"} <= set(cli.commands)
    assert "--verify" in [o for p in cli.commands["dequantize"].params for o in p.opts]

