"""The CLI as a user runs it: real files in, real files out, exit codes and stderr."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import blake3
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from qtool import __version__
from tests.conftest import SAMPLE, make_tensors, run, tensor_order, write_checkpoint


def _load(path):
    with safe_open(str(path), "numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.mark.parametrize("scheme", ["symmetric", "symmetric-unsigned", "asymmetric", "gnmt"])
def test_quantize_dequantize_round_trip(tmp_path, scheme):
    tensors = make_tensors()
    if scheme == "symmetric-unsigned":
        tensors = {k: (np.asarray(np.abs(v)) if k != "buffer.ids" else v)
                   for k, v in tensors.items()}
    src = write_checkpoint(tmp_path / "model.safetensors", tensors)
    out = tmp_path / "out"
    run("quantize", src, out, "--scheme", scheme, "--quiet")
    assert sorted(p.name for p in out.iterdir()) == [
        "model.safetensors", "model.scale.safetensors", "model.zero_point.safetensors",
        "qtool.json"]
    q, meta = _load(out / "model.safetensors")
    # marked as qtool's, so that model loaders refuse it; the source's metadata kept as JSON
    assert meta == {"format": "qtool",
                    "qtool_source_metadata": '{"format": "pt", "who": "test"}'}
    assert tensor_order(out / "model.safetensors") == tensor_order(src)
    scales, _ = _load(out / "model.scale.safetensors")
    zps, _ = _load(out / "model.zero_point.safetensors")
    quantized = {"layers.0.attn.q.weight", "layers.0.mlp.up.weight", "layers.0.mlp.down.weight",
                 "layers.0.conv.weight", "zeros.weight", "head.weight64"}
    assert set(scales) == set(zps) == quantized
    signed = scheme in ("symmetric", "gnmt")
    for name in quantized:
        assert q[name].dtype == (np.int8 if signed else np.uint8), name
        assert q[name].shape == tensors[name].shape
        # --scale-dtype auto: the source's own float16/bfloat16, float32 for F32 and F64
        want = {np.dtype(np.float16): np.float16, np.dtype(ml_dtypes.bfloat16):
                ml_dtypes.bfloat16}.get(tensors[name].dtype, np.float32)
        assert scales[name].dtype == want, name
        assert scales[name].shape == (tensors[name].shape[0], 1)
        # zero points in the narrowest type: U8 per row, or one 0-d value when always 0
        assert zps[name].dtype == np.uint8
        if scheme != "asymmetric":
            assert zps[name].shape == () and zps[name] == 0
        else:
            assert zps[name].shape == scales[name].shape
    for name in set(tensors) - quantized:  # passthrough: bit for bit
        assert q[name].dtype == tensors[name].dtype
        assert q[name].tobytes() == tensors[name].tobytes()

    restored = tmp_path / "restored.safetensors"
    run("dequantize", out, restored, "--quiet")
    back, meta = _load(restored)
    assert meta == {"format": "pt", "who": "test"}
    assert tensor_order(restored) == tensor_order(src)
    for name, w in tensors.items():
        assert back[name].dtype == w.dtype and back[name].shape == w.shape, name
        if name in quantized:
            s = scales[name].astype(np.float32).astype(np.float64)
            err = np.abs(back[name].astype(np.float64) - w.astype(np.float64))
            # scale/2 from rounding, plus the rounding of the restored value to its dtype
            ulp = np.spacing(np.abs(w).astype(w.dtype)).astype(np.float64)
            assert np.all(err.reshape(w.shape[0], -1) <= s / 2 + ulp.reshape(w.shape[0], -1)
                          + 1e-12), name
        else:
            assert back[name].tobytes() == w.tobytes(), name


def test_dequantize_matches_manual_formula(ckpt, tmp_path):
    out = tmp_path / "o"
    run("quantize", ckpt, out, "--scheme", "asymmetric", "--granularity", "tensor", "-q")
    q = load_file(str(out / "model.safetensors"))
    s = load_file(str(out / "model.scale.safetensors"))
    z = load_file(str(out / "model.zero_point.safetensors"))
    run("dequantize", out, tmp_path / "r.safetensors", "-q")
    back = load_file(str(tmp_path / "r.safetensors"))
    name = "layers.0.attn.q.weight"
    assert s[name].shape == () and z[name].shape == ()
    expected = s[name] * (q[name].astype(np.float32) - z[name].astype(np.float32))
    np.testing.assert_array_equal(back[name], expected)


@pytest.mark.parametrize("dtype,np_dtype", [("float32", np.float32), ("float16", np.float16),
                                            ("bfloat16", ml_dtypes.bfloat16)])
def test_dequantize_dtype_option(ckpt, tmp_path, dtype, np_dtype):
    out = tmp_path / "o"
    run("quantize", ckpt, out, "-q")
    run("dequantize", out, tmp_path / "r.safetensors", "--dtype", dtype, "-q")
    back, _ = _load(tmp_path / "r.safetensors")
    assert back["layers.0.attn.q.weight"].dtype == np_dtype
    assert back["layers.0.norm.weight"].dtype == np_dtype  # float passthrough converted too
    assert back["buffer.ids"].dtype == np.int64  # integers keep theirs


def test_skip_and_only(ckpt, tmp_path):
    out = tmp_path / "o"
    run("quantize", ckpt, out, "--skip", "*.mlp.*", "--skip", "zeros.*", "-q")
    m = json.loads((out / "qtool.json").read_text())
    by = {t["name"]: t for t in m["tensors"]}
    assert by["layers.0.mlp.up.weight"]["passthrough"] == "matched --skip"
    assert by["zeros.weight"]["passthrough"] == "matched --skip"
    assert by["layers.0.attn.q.weight"]["scheme"] == "symmetric"
    out2 = tmp_path / "o2"
    run("quantize", ckpt, out2, "--only", "*.conv.*", "-q")
    m = json.loads((out2 / "qtool.json").read_text())
    quantized = [t["name"] for t in m["tensors"] if "passthrough" not in t]
    assert quantized == ["layers.0.conv.weight"]


def test_manifest_contents(ckpt, tmp_path):
    out = tmp_path / "o"
    run("quantize", ckpt, out, "--scheme", "gnmt", "--source-digest", "-q")
    m = json.loads((out / "qtool.json").read_text())
    assert m["format_version"] == 2 and m["qtool_version"] == __version__
    assert m["digest"] == "blake3"
    raw = ckpt.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    src = m["source"]["files"][0]
    assert src["name"] == "model.safetensors" and src["size"] == len(raw)
    assert src["header_blake3"] == blake3.blake3(raw[: 8 + n]).hexdigest()
    assert src["blake3"] == blake3.blake3(raw).hexdigest()
    for name, info in m["files"].items():
        data = (out / name).read_bytes()
        assert info == {"size": len(data), "blake3": blake3.blake3(data).hexdigest()}
    by = {t["name"]: t for t in m["tensors"]}
    t = by["layers.0.mlp.up.weight"]
    assert (t["dtype"], t["shape"], t["scheme"], t["bits"], t["granularity"],
            t["quantized_dtype"]) == ("BF16", [64, 32], "gnmt", 8, "channel", "I8")
    assert by["buffer.ids"]["passthrough"] == "I64 is not a float dtype"
    assert by["layers.0.scalar"]["passthrough"] == "scalar"
    assert [t["name"] for t in m["tensors"]] == tensor_order(ckpt)


def test_summary_json_on_stdout(ckpt, tmp_path):
    r = run("quantize", ckpt, tmp_path / "o", "--json", "--quiet")
    s = json.loads(r.stdout)
    assert s["tensors"] == {"quantized": 6, "passthrough": 4}
    before = ckpt.stat().st_size
    after = sum(p.stat().st_size for p in (tmp_path / "o").iterdir() if p.name != "qtool.json")
    assert s["bytes"] == {"before": before, "after": after}
    assert s["compression_ratio"] == pytest.approx(before / after, rel=1e-3)
    assert r.stderr == ""


def test_summary_on_stderr_not_stdout(ckpt, tmp_path):
    r = run("quantize", ckpt, tmp_path / "o")
    assert r.stdout == ""
    assert "tensors quantized" in r.stderr and "6" in r.stderr


def test_force_replaces_only_an_artifact(ckpt, tmp_path):
    out = tmp_path / "o"
    run("quantize", ckpt, out, "-q")
    r = run("quantize", ckpt, out, "-q", expect=2)
    assert "not empty" in r.stderr and "--force" in r.stderr
    run("quantize", ckpt, out, "--scheme", "gnmt", "--force", "-q")
    assert json.loads((out / "qtool.json").read_text())["tensors"][0]["name"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "precious.txt").write_text("keep")
    r = run("quantize", ckpt, other, "--force", "-q", expect=2)
    assert "not a qtool artifact" in r.stderr
    assert (other / "precious.txt").read_text() == "keep"


def test_empty_output_directory_is_fine(ckpt, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    run("quantize", ckpt, out, "-q")
    assert (out / "qtool.json").is_file()


def _assert_bad(result, *fragments):
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("qtool: error: ")
    assert "Traceback" not in result.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_bad_inputs_exit_2_with_one_line(tmp_path, ckpt):
    out = tmp_path / "out"
    _assert_bad(run("quantize", tmp_path / "missing.safetensors", out, expect=2),
                "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a safetensors file at all")
    _assert_bad(run("quantize", junk, out, expect=2), "junk.safetensors")
    _assert_bad(run("quantize", ckpt, out, "--scheme", "nope", expect=2), "nope")
    _assert_bad(run("quantize", ckpt, out, "--scheme", "symmetric-unsigned", expect=2),
                "head.weight64", "negative", "asymmetric")
    assert not out.exists()
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    _assert_bad(run("quantize", ckpt, full, expect=2), "not empty")
    _assert_bad(run("dequantize", tmp_path / "nothing", tmp_path / "r.safetensors", expect=2),
                "nothing")
    assert list(tmp_path.glob(".*qtool-tmp*")) == []


def test_symmetric_unsigned_with_skip_for_negative_tensors(tmp_path):
    tensors = {"pos.weight": np.abs(np.random.default_rng(0).normal(size=(4, 4))).astype(
        np.float32), "neg.weight": np.full((4, 4), -1.0, np.float32)}
    src = write_checkpoint(tmp_path / "m.safetensors", tensors)
    run("quantize", src, tmp_path / "o", "--scheme", "symmetric-unsigned", "--skip", "neg.*",
        "-q")
    q = load_file(str(tmp_path / "o" / "m.safetensors"))
    assert q["pos.weight"].dtype == np.uint8 and q["neg.weight"].dtype == np.float32


def test_input_is_never_modified(ckpt, tmp_path):
    before = (ckpt.read_bytes(), os.stat(ckpt).st_mtime_ns)
    run("quantize", ckpt, tmp_path / "o", "-q")
    run("dequantize", tmp_path / "o", tmp_path / "r.safetensors", "-q")
    run("quantize", ckpt, ckpt.parent, "-q", expect=2)
    assert (ckpt.read_bytes(), os.stat(ckpt).st_mtime_ns) == before


def test_sample_weights_quantize(tmp_path):
    out = tmp_path / "o"
    run("quantize", SAMPLE, out, "--scheme", "gnmt", "-q")
    m = json.loads((out / "qtool.json").read_text())
    kinds = {t["name"]: t.get("passthrough") for t in m["tensors"]}
    assert kinds["model.rotary_emb.position_ids"] == "I64 is not a float dtype"
    assert kinds["model.norm.weight"] == "1-D tensor (bias or norm)"
    assert kinds["model.layers.1.mlp.gate_proj.weight"] is None


def test_version_help_and_python_m():
    r = run("--version")
    assert __version__ in r.stdout
    r = run("quantize", "--help")
    for opt in ("--scheme", "--granularity", "--skip", "--only", "--force", "--json", "--quiet"):
        assert opt in r.stdout
    p = subprocess.run([sys.executable, "-m", "qtool", "--version"], capture_output=True,
                       text=True, check=False)
    assert p.returncode == 0 and __version__ in p.stdout


def test_bf16_input_round_trip_keeps_dtype(tmp_path):
    w = np.random.default_rng(2).normal(0, 1, (16, 16)).astype(ml_dtypes.bfloat16)
    src = tmp_path / "b.safetensors"
    save_file({"w": w}, str(src))
    run("quantize", src, tmp_path / "o", "-q")
    run("dequantize", tmp_path / "o", tmp_path / "r.safetensors", "-q")
    back, _ = _load(tmp_path / "r.safetensors")
    assert back["w"].dtype == ml_dtypes.bfloat16
    rel = np.abs(back["w"].astype(np.float32) - w.astype(np.float32)).max() / np.abs(
        w.astype(np.float32)).max()
    assert rel < 1 / 127


def test_dequantize_never_replaces_a_file_unasked(ckpt, tmp_path):
    out = tmp_path / "o"
    run("quantize", ckpt, out, "-q")
    before = ckpt.read_bytes()
    r = run("dequantize", out, ckpt, expect=2)
    assert "exists" in r.stderr and "--force" in r.stderr
    assert ckpt.read_bytes() == before
    target = tmp_path / "r.safetensors"
    target.write_bytes(b"old")
    run("dequantize", out, target, "--force", "-q")
    assert set(load_file(str(target))) == set(make_tensors())


def test_gnmt_refuses_another_granularity(ckpt, tmp_path):
    r = run("quantize", ckpt, tmp_path / "o", "--scheme", "gnmt", "--granularity", "tensor",
            expect=2)
    _assert_bad(r, "gnmt is always per row")
    assert not (tmp_path / "o").exists()


def test_failed_run_leaves_no_parent_directories(tmp_path):
    src = write_checkpoint(tmp_path / "m.safetensors",
                           {"neg.weight": np.full((2, 2), -1.0, np.float32)})
    r = run("quantize", src, tmp_path / "p1" / "p2" / "out", "--scheme", "symmetric-unsigned",
            expect=2)
    _assert_bad(r, "neg.weight")
    assert not (tmp_path / "p1").exists()
    run("quantize", src, tmp_path / "p1" / "p2" / "out", "-q")
    assert (tmp_path / "p1" / "p2" / "out" / "qtool.json").is_file()


def test_dash_is_not_a_path(ckpt, tmp_path):
    _assert_bad(run("quantize", ckpt, "-", expect=2), "'-'")
    _assert_bad(run("quantize", "-", tmp_path / "o", expect=2), "'-'")
    assert not (tmp_path / "o").exists()


def test_report_on_a_file_inside_an_artifact_points_to_the_directory(ckpt, tmp_path):
    out = tmp_path / "o"
    run("quantize", ckpt, out, "-q")
    for name in ("qtool.json", "model.safetensors"):
        _assert_bad(run("report", out / name, expect=2), "part of a qtool artifact", str(out))


def test_dequantize_to_float16_refuses_overflow(tmp_path):
    w = np.random.default_rng(3).normal(0, 1e6, (8, 8)).astype(np.float32)
    src = write_checkpoint(tmp_path / "m.safetensors",
                           {"big.weight": w, "big.bias": w[0].copy()})
    run("quantize", src, tmp_path / "o", "-q")
    r = run("dequantize", tmp_path / "o", tmp_path / "r.safetensors", "--dtype", "float16",
            expect=2)
    _assert_bad(r, "float16", "--dtype")
    assert not (tmp_path / "r.safetensors").exists()
    # in range: fine, and float passthrough is converted too
    src2 = write_checkpoint(tmp_path / "m2.safetensors", {"w.weight": w / 1e3, "w.bias": w[0]
                                                          / 1e3})
    run("quantize", src2, tmp_path / "o2", "-q")
    run("dequantize", tmp_path / "o2", tmp_path / "r2.safetensors", "--dtype", "float16", "-q")
    assert np.isfinite(load_file(str(tmp_path / "r2.safetensors"))["w.weight"]).all()
