"""Hostile compressed-tensors folders: scales that are zero, negative or not finite (issue 15).

qtool's own artifacts refuse such scales as they are read (formats/native_source.py); a
compressed-tensors folder read by ``dequantize`` or ``report --against`` did not, and restored
zeros, sign-flipped or NaN weights with exit 0. Each case writes a real folder on disk (config
and safetensors files, as the library lays them out), runs the CLI as a user would and checks
the whole contract: exit 2, one ``qtool: error:`` line naming the file, the tensor and what is
wrong, nothing written, the folder unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from safetensors.numpy import load_file, save_file

from qtool.formats import compressed_tensors_layout as L
from tests.conftest import run
from tests.test_security import assert_one_line_error, leftovers, snapshot

RNG = np.random.default_rng(15)
ROWS, COLS, GROUP = 4, 32, 16
DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64}


def _scale_shape(strategy: str) -> tuple[int, ...]:
    return {"tensor": (1,), "channel": (ROWS, 1), "group": (ROWS, COLS // GROUP)}[strategy]


def ct_folder(root: Path, *, strategy: str = "group", fmt: str = "pack-quantized",
              symmetric: bool = True, code: str = "F32", shards: int = 1,
              bad: dict[str, tuple[tuple[int, ...], float]] | None = None) -> Path:
    """A compressed-tensors folder of two 4-bit modules ``a`` and ``b`` written as the library
    lays them out; ``bad`` sets one scale value of a module (module -> (index, value))."""
    root.mkdir(parents=True)
    tensors: dict[str, np.ndarray] = {}
    for m in ("a", "b"):
        q = RNG.integers(-8, 8, (ROWS, COLS)).astype(np.int8)
        s = RNG.uniform(0.001, 0.02, _scale_shape(strategy)).astype(DTYPES[code])
        if bad and m in bad:
            index, value = bad[m]
            s[index] = value
        if fmt == L.PACK_QUANTIZED:
            tensors[f"{m}.weight_packed"] = L.pack_to_int32(q, 4)
            tensors[f"{m}.weight_shape"] = np.array([ROWS, COLS], np.int64)
        else:
            tensors[f"{m}.weight"] = q
        tensors[f"{m}.weight_scale"] = s
        if not symmetric:
            zp = RNG.integers(-8, 8, s.shape).astype(np.int8)
            if fmt == L.PACK_QUANTIZED and strategy != "tensor":
                zp = L.pack_to_int32(zp, 4, packed_dim=0)
            tensors[f"{m}.weight_zero_point"] = zp
    tensors["norm.weight"] = np.ones(COLS, np.float32)
    args = L.WeightArgs(4, symmetric, strategy, GROUP if strategy == "group" else None)
    qc = {"quant_method": "compressed-tensors", "format": fmt,
          "quantization_status": "compressed", "ignore": [],
          "config_groups": {"group_0": {"targets": ["re:a$", "re:b$"],
                                        "weights": args.to_dict(), "format": fmt}}}
    (root / "config.json").write_text(json.dumps({"model_type": "llama",
                                                  "quantization_config": qc}))
    if shards == 1:
        save_file(tensors, str(root / "model.safetensors"), metadata={"format": "pt"})
        return root
    names = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    parts: dict[str, dict[str, np.ndarray]] = {}
    for n, t in tensors.items():
        parts.setdefault(names.get(n.split(".")[0], names["b"]), {})[n] = t
    for fname, part in parts.items():
        save_file(part, str(root / fname), metadata={"format": "pt"})
    weight_map = {n: fname for fname, part in parts.items() for n in part}
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    return root


def original(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"a.weight": RNG.normal(0, 0.05, (ROWS, COLS)).astype(np.float32),
               "b.weight": RNG.normal(0, 0.05, (ROWS, COLS)).astype(np.float32),
               "norm.weight": np.ones(COLS, np.float32)}, str(path))
    return path


def _refused(tmp_path: Path, folder: Path, args: tuple, *fragments: str) -> str:
    before = snapshot(folder)
    line = assert_one_line_error(run(*args, expect=None), *fragments)
    assert snapshot(folder) == before
    assert not (tmp_path / "out").exists() and not (tmp_path / "r.safetensors").exists()
    assert leftovers(tmp_path) == []
    return line


# (id, folder settings, module, index, value, what the message says is wrong)
_CASES = [
    ("zero-f32-group", {}, "a", (1, 0), 0.0, "1 of 8 scales are not finite and > 0 (1 zero)"),
    ("negative-zero", {}, "b", (0, 1), -0.0, "1 of 8 scales are not finite and > 0 (1 zero)"),
    ("negative-f32", {}, "a", (3, 1), -0.004, "(1 negative)"),
    ("nan-f32", {}, "b", (2, 0), np.nan, "(1 NaN)"),
    ("inf-f32", {}, "a", (0, 0), np.inf, "(1 infinite)"),
    ("minus-inf-f32", {}, "a", (0, 0), -np.inf, "1 of 8 scales are not finite and > 0 "
     "(1 infinite)"),
    ("zero-f16", {"code": "F16"}, "a", (2, 1), 0.0, "(1 zero)"),
    ("inf-f16", {"code": "F16"}, "b", (1, 1), np.inf, "(1 infinite)"),
    ("negative-bf16", {"code": "BF16"}, "a", (0, 1), -0.5, "(1 negative)"),
    ("nan-bf16", {"code": "BF16"}, "b", (3, 0), np.nan, "(1 NaN)"),
    ("zero-f64", {"code": "F64"}, "b", (0, 0), 0.0, "(1 zero)"),
    ("zero-tensor-strategy", {"strategy": "tensor"}, "a", (0,), 0.0,
     "1 of 1 scales are not finite and > 0 (1 zero)"),
    ("negative-channel-strategy", {"strategy": "channel"}, "b", (2, 0), -1.0,
     "1 of 4 scales are not finite and > 0 (1 negative)"),
    ("nan-int-quantized", {"fmt": "int-quantized"}, "a", (1, 1), np.nan, "(1 NaN)"),
    ("zero-naive-quantized-channel", {"fmt": "naive-quantized", "strategy": "channel"}, "b",
     (3, 0), 0.0, "(1 zero)"),
    ("negative-asymmetric", {"symmetric": False}, "a", (2, 1), -0.01, "(1 negative)"),
    ("inf-asymmetric-tensor", {"symmetric": False, "strategy": "tensor"}, "b", (0,), np.inf,
     "(1 infinite)"),
]


@pytest.mark.parametrize("settings, module, index, value, what",
                         [c[1:] for c in _CASES], ids=[c[0] for c in _CASES])
def test_dequantize_refuses_bad_scales(tmp_path, settings, module, index, value, what):
    folder = ct_folder(tmp_path / "ct", bad={module: (index, value)}, **settings)
    line = _refused(tmp_path, folder, ("dequantize", folder, tmp_path / "r.safetensors"), what)
    assert line.startswith(f"qtool: error: {folder / 'model.safetensors'}: tensor "
                           f"'{module}.weight_scale': ")


@pytest.mark.parametrize("value, what", [(0.0, "(1 zero)"), (-2.0, "(1 negative)"),
                                         (np.nan, "(1 NaN)")])
def test_report_against_refuses_bad_scales(tmp_path, value, what):
    """Without the check a zero scale measured as a plain (bad) error and a negative one as a
    sign-flipped weight: a number in a report, not a broken folder."""
    folder = ct_folder(tmp_path / "ct", bad={"b": ((1, 1), value)})
    orig = original(tmp_path / "orig" / "model.safetensors")
    for fmt in ("table", "json"):
        _refused(tmp_path, folder, ("report", folder, "--against", orig, "--format", fmt),
                 f"{folder / 'model.safetensors'}: tensor 'b.weight_scale': 1 of 8 scales",
                 what)


def test_sharded_folder_with_bad_scales_in_its_last_shard_writes_nothing(tmp_path):
    """The first shard is fine and would be restored first: the scales are all checked
    before anything is written, so no shard directory appears, not even a temporary one."""
    folder = ct_folder(tmp_path / "ct", shards=2, bad={"b": ((0, 0), -1.0)})
    line = _refused(tmp_path, folder, ("dequantize", folder, tmp_path / "out"),
                    "tensor 'b.weight_scale': 1 of 8 scales are not finite and > 0 "
                    "(1 negative)")
    assert f"{folder / 'model-00002-of-00002.safetensors'}: " in line


def test_several_bad_scales_are_counted_by_kind(tmp_path):
    folder = ct_folder(tmp_path / "ct")
    t = load_file(folder / "model.safetensors")
    t["a.weight_scale"][:] = np.array([[0, -1], [np.nan, np.inf], [-np.inf, 0.5], [0, 1]],
                                      np.float32)
    save_file(t, str(folder / "model.safetensors"), metadata={"format": "pt"})
    _refused(tmp_path, folder, ("dequantize", folder, tmp_path / "r.safetensors"),
             "tensor 'a.weight_scale': 6 of 8 scales are not finite and > 0 "
             "(2 zero, 1 negative, 1 NaN, 2 infinite)")


def test_replacing_an_existing_output_with_force_keeps_it_when_scales_are_bad(tmp_path):
    folder = ct_folder(tmp_path / "ct", bad={"a": ((0, 0), 0.0)})
    target = tmp_path / "keep.safetensors"
    target.write_bytes(b"the user's file")
    assert_one_line_error(run("dequantize", folder, target, "--force", expect=None),
                          "tensor 'a.weight_scale'", "(1 zero)")
    assert target.read_bytes() == b"the user's file" and leftovers(tmp_path) == []


@pytest.mark.parametrize("code", list(DTYPES))
def test_good_folders_restore_exactly_the_librarys_values(tmp_path, code):
    """The control: positive scales (a subnormal float32 one too) still restore, and each
    weight is (q) * scale in the scale's dtype, computed here independently."""
    folder = ct_folder(tmp_path / "ct", fmt="int-quantized", code=code)
    t = load_file(folder / "model.safetensors")
    if code == "F32":
        t["a.weight_scale"][0, 0] = np.float32(1e-40)  # subnormal: > 0 and finite
        save_file(t, str(folder / "model.safetensors"), metadata={"format": "pt"})
    run("dequantize", folder, tmp_path / "r.safetensors", "-q")
    got = load_file(tmp_path / "r.safetensors")
    for m in ("a", "b"):
        q = t[f"{m}.weight"].astype(np.float64).reshape(ROWS, COLS // GROUP, GROUP)
        s = t[f"{m}.weight_scale"].astype(np.float64)[:, :, None]
        want = (q * s).reshape(ROWS, COLS).astype(DTYPES[code])
        assert got[f"{m}.weight"].dtype == want.dtype
        np.testing.assert_array_equal(got[f"{m}.weight"], want)


_floats = hnp.arrays(np.float32, st.integers(1, 12),
                     elements=st.floats(width=32, allow_nan=True, allow_infinity=True))


@given(_floats)
def test_scale_problem_is_none_exactly_when_every_scale_is_finite_and_positive(s):
    problem = L.scale_problem(s)
    ok = all(np.isfinite(v) and v > 0 for v in s.tolist())
    assert (problem is None) == ok
    if not ok:
        bad = sum(1 for v in s.tolist() if not (np.isfinite(v) and v > 0))
        assert problem.startswith(f"{bad} of {s.size} scales are not finite and > 0 (")


def test_the_layout_reader_refuses_them_too():
    """formats/compressed_tensors_read.py, for callers without a folder: the module named."""
    from qtool.formats.compressed_tensors_read import decompress_weight

    args = L.WeightArgs(8, True, "channel")
    q = np.ones((2, 3), np.int8)
    with pytest.raises(ValueError, match=r"^m\.weight_scale: 1 of 2 scales are not finite and "
                                         r"> 0 \(1 negative\)$"):
        decompress_weight({"weight": q, "weight_scale": np.array([[1.0], [-1.0]], np.float32)},
                          args, "int-quantized", "m")


@pytest.mark.parametrize("how", ["slash", "existing"])
def test_ct_dequantize_speaks_json_and_restores_into_a_directory_like_an_artifact(tmp_path,
                                                                                 how):
    """CLI polish (issue 15) holds for compressed-tensors folders too: `--format json` (and
    `--json`) print the same document as for an artifact, and OUT as a directory (existing,
    or DIR/) receives the file under its own name, as cp would."""
    folder = ct_folder(tmp_path / "ct", fmt="int-quantized")
    d = tmp_path / "restored"
    if how == "existing":
        d.mkdir()
    target = str(d) + ("/" if how == "slash" else "")
    r = run("dequantize", folder, target, "--format", "json", "-q")
    out = d / "model.safetensors"
    assert list(d.iterdir()) == [out] and r.stderr == ""
    doc = json.loads(r.stdout)
    restored = load_file(out)
    assert doc.pop("seconds") >= 0
    assert doc == {"output": str(out), "tensors": 3, "dtype": "original",
                   "bytes": sum(v.nbytes for v in restored.values())}
    r = run("dequantize", folder, tmp_path / "f.safetensors", "--json", "-q")
    assert json.loads(r.stdout)["output"] == str(tmp_path / "f.safetensors")
    assert_one_line_error(run("dequantize", folder, target, expect=2), f"{out}: file exists")


def _set(name: str, value: np.ndarray | None):
    def change(t: dict[str, np.ndarray]) -> None:
        if value is None:
            del t[name]
        else:
            t[name] = value
    return change


@pytest.mark.parametrize("fmt, change, fragment", [
    ("pack-quantized", _set("a.weight_shape", np.array([2**40, 2**40], np.int64)),
     "tensor 'a.weight_packed': [1099511627776, 1099511627776] values of 4 bits "
     "(weight_shape) pack to int32 of shape [1099511627776, 137438953472], got [4, 4]"),
    ("pack-quantized", _set("a.weight_shape", np.array([ROWS, 2 * COLS], np.int64)),
     f"tensor 'a.weight_packed': [{ROWS}, {2 * COLS}] values of 4 bits (weight_shape) pack "
     f"to int32 of shape [{ROWS}, 8], got [{ROWS}, 4]"),
    ("pack-quantized", _set("a.weight_shape", np.array([ROWS, COLS], np.float64)),
     "tensor 'a.weight_shape' is F64, not integers"),
    ("pack-quantized", _set("a.weight_shape", np.array([ROWS, COLS, 1], np.int64)),
     "module a: weight shape [4, 32, 1] is not 2-D"),
    ("pack-quantized", _set("a.weight_packed", None),
     "module a has no weight_packed/weight_shape (format pack-quantized)"),
    ("int-quantized", _set("b.weight", None), "module b has no weight (format int-quantized)"),
], ids=["terabytes", "twice_the_columns", "float_shape", "three_dims", "no_packed",
        "no_weight"])
def test_weight_shape_must_be_what_the_folder_holds(tmp_path, fmt, change, fragment):
    """The output is sized from the declared shape before any value is unpacked: a
    weight_shape of [2**40, 2**40] over 16 packed words crashed the writer's reservation with
    a traceback (OverflowError); a smaller lie would have reserved that much disk."""
    folder = ct_folder(tmp_path / "ct", fmt=fmt)
    t = load_file(folder / "model.safetensors")
    change(t)
    save_file(t, str(folder / "model.safetensors"), metadata={"format": "pt"})
    _refused(tmp_path, folder, ("dequantize", folder, tmp_path / "r.safetensors"), fragment)
    orig = original(tmp_path / "orig" / "model.safetensors")
    _refused(tmp_path, folder, ("report", folder, "--against", orig), fragment)


def test_restored_values_are_never_a_silent_inf(tmp_path):
    """As for artifacts: a --dtype narrower than the values is refused with the advice that
    helps, and values the library's own arithmetic overflows (float16 scales near 65504 times
    q = 7) are refused with none: `dequantize` wrote inf into the output before."""
    folder = ct_folder(tmp_path / "ct", fmt="int-quantized")
    t = load_file(folder / "model.safetensors")
    t["a.weight_scale"] = (t["a.weight_scale"] * np.float32(1e9)).astype(np.float32)
    save_file(t, str(folder / "model.safetensors"), metadata={"format": "pt"})
    _refused(tmp_path, folder, ("dequantize", folder, tmp_path / "r.safetensors", "--dtype",
                                "float16"),
             f"{folder / 'model.safetensors'}: tensor 'a.weight' has values beyond the range "
             "of float16; restore it with --dtype float32")
    run("dequantize", folder, tmp_path / "r.safetensors", "--dtype", "float32", "-q")
    got = load_file(tmp_path / "r.safetensors")["a.weight"]
    q = t["a.weight"].astype(np.float64).reshape(ROWS, COLS // GROUP, GROUP)
    want = (q * t["a.weight_scale"].astype(np.float64)[:, :, None]).reshape(ROWS, COLS)
    np.testing.assert_array_equal(got, want.astype(np.float32))
    assert np.abs(got).max() > 65504  # the case is real: float16 cannot hold it

    folder = ct_folder(tmp_path / "ct16", fmt="int-quantized", code="F16")
    t = load_file(folder / "model.safetensors")
    t["b.weight"][0, 0] = 7
    t["b.weight_scale"][0, 0] = np.float16(60000)
    save_file(t, str(folder / "model.safetensors"), metadata={"format": "pt"})
    for extra in ([], ["--dtype", "float32"]):
        (tmp_path / "r.safetensors").unlink(missing_ok=True)
        _refused(tmp_path, folder, ("dequantize", folder, tmp_path / "r.safetensors", *extra),
                 f"{folder / 'model.safetensors'}: tensor 'b.weight' dequantizes to NaN or "
                 "infinite values (its float16 scales times its integers overflow); no "
                 "--dtype can hold them")


@pytest.mark.parametrize("key, value, fragment", [
    ("targets", ["re:(a|b"], "quantization_config.config_groups.group_0.targets: 're:(a|b' is "
     "not a valid regex (missing ), unterminated subpattern at position 0)"),
    ("ignore", ["re:[z"], "quantization_config.ignore: 're:[z' is not a valid regex "
     "(unterminated character set at position 0)"),
], ids=["targets", "ignore"])
def test_a_bad_regex_in_the_config_is_one_line(tmp_path, key, value, fragment):
    """A `re:` target that is not a regex raised re.error with a traceback while matching."""
    folder = ct_folder(tmp_path / "ct")
    cfg = json.loads((folder / "config.json").read_text())
    qc = cfg["quantization_config"]
    (qc["config_groups"]["group_0"] if key == "targets" else qc)[key] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    line = _refused(tmp_path, folder, ("dequantize", folder, tmp_path / "r.safetensors"),
                    fragment)
    assert line == f"qtool: error: {folder / 'config.json'}: {fragment}"
    orig = original(tmp_path / "orig" / "model.safetensors")
    _refused(tmp_path, folder, ("report", folder, "--against", orig), fragment)


def test_a_config_nested_too_deeply_is_one_line(tmp_path):
    """config.json nested 100,000 deep: a RecursionError traceback before, for a
    compressed-tensors folder given to dequantize and for export's --model-dir."""
    deep = '{"x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    folder = ct_folder(tmp_path / "ct")
    (folder / "config.json").write_text(deep)
    # no longer recognisable as a compressed-tensors folder: read as a (missing) artifact
    _refused(tmp_path, folder, ("dequantize", folder, tmp_path / "r.safetensors"),
             f"{folder}: not a qtool artifact (no qtool.json)")
    model = tmp_path / "model"
    model.mkdir()
    save_file({"w.weight": RNG.normal(0, 0.05, (8, 32)).astype(np.float32)},
              str(model / "model.safetensors"))
    run("quantize", model / "model.safetensors", tmp_path / "art", "-q")
    (model / "config.json").write_text(deep)
    _refused(tmp_path, model, ("export", tmp_path / "art", tmp_path / "out", "--to",
                               "compressed-tensors", "--model-dir", model),
             f"{model / 'config.json'}: not valid JSON (nested too deeply)")
