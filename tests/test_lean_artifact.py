"""format_version 2 (issue 11, section 1), as a user runs qtool: compact sidecars and the
bits-per-weight targets, --scale-dtype, artifacts that do not pose as a model, and
format_version 1 artifacts (tests/fixtures/v1) read exactly as before."""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from tests.conftest import ROOT, run

V1 = ROOT / "tests" / "fixtures" / "v1"


def _tensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str] | None]:
    with safe_open(str(path), "numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _stored_bytes(out: Path, stem: str, name: str) -> int:
    """What the tensor really occupies, read back from the three files."""
    return sum(_tensors(out / f"{stem}{k}.safetensors")[0][name].nbytes
               for k in ("", ".scale", ".zero_point"))


# --------------------------------------------------------------------------- bits per weight

# (setting, source dtype, shape, qtool arguments, expected bytes as a formula, target)
def _sym8_g32(r: int, c: int) -> int:
    return r * c + r * (c // 32) * 2 + 1  # int8 values, float16 scale per group, one zero


def _asym4_g(g: int):
    def f(r: int, c: int) -> int:
        return r * c // 2 + r * (c // g) * 2 + r * math.ceil(c // g * 4 / 8)  # 4-bit zeros
    return f


TARGETS = [
    ("symmetric group-32 8-bit, float16 scales", np.float32, (256, 1024),
     ["--scheme", "symmetric", "-b", "8", "-g", "group", "--group-size", "32",
      "--scale-dtype", "float16"], _sym8_g32, 8.51),
    ("symmetric group-32 8-bit, float16 scales (F16 source, auto)", np.float16, (256, 1024),
     ["--scheme", "symmetric", "-b", "8", "-g", "group", "--group-size", "32"], _sym8_g32, 8.51),
    ("asymmetric group-32 4-bit, float16 scales", np.float32, (256, 1024),
     ["--scheme", "asymmetric", "-b", "4", "-g", "group", "--group-size", "32",
      "--scale-dtype", "float16"], _asym4_g(32), 4.63),
    ("asymmetric group-128 4-bit, float16 scales", np.float32, (256, 1024),
     ["--scheme", "asymmetric", "-b", "4", "-g", "group", "--group-size", "128",
      "--scale-dtype", "float16"], _asym4_g(128), 4.17),
    ("per channel 8-bit on a 1024x4096 tensor (symmetric)", np.float32, (1024, 4096),
     ["--scheme", "symmetric"], lambda r, c: r * c + r * 4 + 1, 8.07),
    ("per channel 8-bit on a 1024x4096 tensor (asymmetric)", np.float32, (1024, 4096),
     ["--scheme", "asymmetric"], lambda r, c: r * c + r * 4 + r, 8.07),
]


@pytest.mark.parametrize("setting, dtype, shape, args, formula, target", TARGETS,
                         ids=[t[0] for t in TARGETS])
def test_bits_per_weight_targets(tmp_path, setting, dtype, shape, args, formula, target):
    w = np.random.default_rng(0).normal(0, 0.02, shape).astype(dtype)
    src = tmp_path / "m.safetensors"
    save_file({"w": w}, str(src))
    out = tmp_path / "art"
    summary = json.loads(run("quantize", src, out, "-q", "--json", *args).stdout)
    stored = _stored_bytes(out, "m", "w")
    assert stored == formula(*shape)
    bpw = 8 * stored / w.size
    assert bpw <= target, (setting, bpw)
    # quantize's summary, the manifest and the report all give the same figure
    assert summary["bits_per_weight"] == pytest.approx(bpw, rel=1e-12)
    assert summary["bits_per_weight_by_tensor"] == {"w": pytest.approx(bpw, rel=1e-12)}
    m = json.loads((out / "qtool.json").read_text())
    assert m["tensors"][0]["bytes"]["stored"] == stored
    doc = json.loads(run("report", out, "--format", "json").stdout)
    assert doc["tensors"][0]["results"]["artifact"]["bits_per_weight"] == pytest.approx(bpw)
    assert doc["groups"][0]["totals"]["bits_per_weight"] == pytest.approx(bpw)
    # and the artifact restores within half a (stored) scale
    run("dequantize", out, tmp_path / "r.safetensors", "-q")
    back = _tensors(tmp_path / "r.safetensors")[0]["w"]
    assert back.dtype == w.dtype
    err = np.abs(back.astype(np.float64) - w.astype(np.float64)).max()
    assert err <= float(np.abs(w).max()) / (7 if "4-bit" in setting else 127)


def test_report_dry_run_and_table_show_bits_per_weight(tmp_path):
    w = np.random.default_rng(1).normal(0, 0.02, (64, 256)).astype(np.float16)
    src = tmp_path / "m.safetensors"
    save_file({"w": w, "b": np.zeros(64, np.float16)}, str(src))
    args = ["-b", "4", "-g", "group", "--group-size", "32"]
    doc = json.loads(run("report", src, "-s", "symmetric", "-s", "asymmetric", *args,
                         "--format", "json").stdout)
    by = {t["name"]: t["results"] for t in doc["tensors"]}
    res = by["w"]
    # F16 source, --scale-dtype auto: float16 scales (2 bytes per group of 32)
    assert res["symmetric"]["bits_per_weight"] == pytest.approx(4 + 16 / 32 + 8 / w.size)
    assert res["asymmetric"]["bits_per_weight"] == pytest.approx(4 + 16 / 32 + 4 / 32)
    assert by["b"]["symmetric"]["bits_per_weight"] == 16.0  # kept in F16
    tot = doc["groups"][1]["totals"]
    assert tot["bits_per_weight"] == pytest.approx(4.625)
    assert tot["bits_per_weight_all"] == pytest.approx(
        8 * (w.size * 4.625 / 8 + 64 * 2) / (w.size + 64))
    # --scale-dtype float32 is what the dry run measures when asked
    doc32 = json.loads(run("report", src, *args, "--scale-dtype", "float32",
                           "--format", "json").stdout)
    by32 = {t["name"]: t["results"] for t in doc32["tensors"]}
    assert by32["w"]["symmetric"]["bits_per_weight"] == pytest.approx(
        4 + 32 / 32 + 8 / w.size)
    table = run("report", src, "-s", "asymmetric", *args).stdout
    assert "bits per weight, quantized" in table and "4.625" in table
    md = run("report", src, "-s", "asymmetric", *args, "--format", "markdown").stdout
    assert "asymmetric bits/weight" in md and "| 4.625 |" in md
    out = tmp_path / "art"
    text = run("quantize", src, out, "--scheme", "asymmetric", *args).stderr
    assert "bits per weight, quantized" in text and "4.625" in text


# --------------------------------------------------------------------------- scale dtype


def test_scale_dtype_auto_follows_the_source_and_can_be_overridden(tmp_path):
    rng = np.random.default_rng(2)
    tensors = {"f32": rng.normal(size=(4, 8)).astype(np.float32),
               "f16": rng.normal(size=(4, 8)).astype(np.float16),
               "bf16": rng.normal(size=(4, 8)).astype(ml_dtypes.bfloat16),
               "f64": rng.normal(size=(4, 8))}
    src = tmp_path / "m.safetensors"
    save_file(tensors, str(src))
    for choice, want in (("auto", {"f32": "F32", "f16": "F16", "bf16": "BF16", "f64": "F32"}),
                         ("bfloat16", dict.fromkeys(tensors, "BF16")),
                         ("float32", dict.fromkeys(tensors, "F32"))):
        out = tmp_path / choice
        run("quantize", src, out, "-q", "--scale-dtype", choice)
        h = json.loads((out / "m.scale.safetensors").read_bytes()[8:][
            :int.from_bytes((out / "m.scale.safetensors").read_bytes()[:8], "little")])
        assert {k: h[k]["dtype"] for k in tensors} == want, choice
        m = {t["name"]: t for t in json.loads((out / "qtool.json").read_text())["tensors"]}
        assert {k: m[k]["scale_dtype"] for k in tensors} == {
            k: {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[v]
            for k, v in want.items()}
        assert run("verify", out).exit_code == 0


def test_recipe_sets_scale_dtype_per_rule(tmp_path):
    w = np.random.default_rng(3).normal(size=(4, 8)).astype(np.float32)
    src = tmp_path / "m.safetensors"
    save_file({"a.weight": w, "b.weight": w}, str(src))
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[rule]]\nmatch = "a.*"\nscale_dtype = "bfloat16"\n')
    out = tmp_path / "art"
    run("quantize", src, out, "-q", "--recipe", recipe, "--scale-dtype", "float16")
    m = {t["name"]: t["scale_dtype"] for t in json.loads((out / "qtool.json").read_text())[
        "tensors"]}
    assert m == {"a.weight": "bfloat16", "b.weight": "float16"}
    recipe.write_text('[[rule]]\nmatch = "a.*"\nscale_dtype = "float8"\n')
    r = run("quantize", src, tmp_path / "bad", "--recipe", recipe, expect=2)
    assert "rule 1: scale_dtype = 'float8' is not one of auto, float32, float16, bfloat16" \
        in r.stderr


def test_scale_overflowing_float16_is_an_error_naming_the_tensor(tmp_path):
    w = np.random.default_rng(4).normal(size=(4, 8)).astype(np.float32)
    w[2, 3] = 1e7  # 1e7 / 127 > 65504, the largest float16
    src = tmp_path / "m.safetensors"
    save_file({"big.weight": w}, str(src))
    out = tmp_path / "art"
    r = run("quantize", src, out, "--scale-dtype", "float16", expect=2)
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "tensor 'big.weight' has values too large for a float16 scale" in r.stderr
    assert not out.exists()
    run("quantize", src, out, "-q")  # float32 scales hold it


def test_scale_underflowing_float16_is_raised_to_its_smallest_normal(tmp_path):
    w = np.full((2, 4), 1e-7, np.float16)  # absmax / 127 is far below 2^-14
    src = tmp_path / "m.safetensors"
    save_file({"tiny.weight": w}, str(src))
    out = tmp_path / "art"
    run("quantize", src, out, "-q")
    s = _tensors(out / "m.scale.safetensors")[0]["tiny.weight"]
    assert s.dtype == np.float16 and np.all(s == np.float16(2.0 ** -14))
    run("dequantize", out, tmp_path / "r.safetensors", "-q")
    back = _tensors(tmp_path / "r.safetensors")[0]["tiny.weight"]
    assert np.all(np.abs(back.astype(np.float64) - 1e-7) <= 2.0 ** -15)


# --------------------------------------------------------------------------- not a model


@pytest.mark.parametrize("metadata", [{"format": "pt"}, None,
                                      {"format": "pt", "note": 'quotes " and \\ and ünïcode'}])
def test_artifact_files_are_marked_and_dequantize_restores_the_metadata(tmp_path, metadata):
    w = np.random.default_rng(5).normal(size=(4, 8)).astype(np.float32)
    src = tmp_path / "m.safetensors"
    save_file({"w": w, "b": w[0]}, str(src), metadata=metadata)
    out = tmp_path / "art"
    run("quantize", src, out, "-q")
    _, main_meta = _tensors(out / "m.safetensors")
    # a model loader (transformers checks "format" in pt/tf/flax/mlx) refuses this file
    assert main_meta == {"format": "qtool", "qtool_source_metadata": json.dumps(metadata)}
    for side in ("m.scale.safetensors", "m.zero_point.safetensors"):
        assert _tensors(out / side)[1] == {"format": "qtool"}
    run("dequantize", out, tmp_path / "r.safetensors", "-q")
    assert _tensors(tmp_path / "r.safetensors")[1] == metadata


# --------------------------------------------------------------------------- format_version 1


def _copy_v1(tmp_path: Path, name: str) -> Path:
    art = tmp_path / name
    shutil.copytree(V1 / name, art)
    return art


@pytest.mark.parametrize("name", ["sym8", "asym4"])
def test_v1_artifacts_dequantize_verify_and_report_as_before(tmp_path, monkeypatch, name):
    art = _copy_v1(tmp_path, f"art_{name}")
    assert json.loads((art / "qtool.json").read_text())["format_version"] == 1
    out = tmp_path / "r.safetensors"
    run("dequantize", art, out, "-q", "--verify")
    assert out.read_bytes() == (V1 / f"restored_{name}.safetensors").read_bytes()
    r = run("verify", art)
    assert (r.stdout + r.stderr).startswith(
        f"{art}: ok: 3 files match their size and sha256; 4 tensors (3 quantized)")
    # report: the output of qtool before format_version 2 (tests/fixtures/v1/report_*): every
    # key and value it had is still there (reports may add keys, as bits per weight)
    monkeypatch.chdir(tmp_path)
    old = json.loads((V1 / f"report_{name}.json").read_text())
    new = json.loads(run("report", f"art_{name}", "--format", "json").stdout)
    _assert_contains(new, old, "report")
    for t in new["tensors"]:
        r0 = t["results"]["artifact"]
        assert r0["bits_per_weight"] == pytest.approx(8 * r0["quantized_bytes"] / t["parameters"])
    totals = new["groups"][0]["totals"]
    q_bytes = sum(t["results"]["artifact"]["quantized_bytes"] for t in new["tensors"]
                  if t["results"]["artifact"]["quantized"])
    q_weights = sum(t["parameters"] for t in new["tensors"]
                    if t["results"]["artifact"]["quantized"])
    assert totals["bits_per_weight"] == pytest.approx(8 * q_bytes / q_weights)
    assert totals["bits_per_weight_all"] == pytest.approx(
        8 * totals["bytes_after"] / sum(t["parameters"] for t in new["tensors"]))
    rows = list(csv.DictReader(io.StringIO(
        run("report", f"art_{name}", "--format", "csv").stdout)))
    old_rows = list(csv.DictReader(io.StringIO((V1 / f"report_{name}.csv").read_text())))
    assert [{k: r[k] for k in r0} for r, r0 in zip(rows, old_rows, strict=True)] == old_rows
    assert "bits_per_weight" in rows[0]


def _assert_contains(new: object, old: object, where: str) -> None:
    """``new`` holds everything ``old`` does (dicts may have more keys), value for value."""
    if isinstance(old, dict):
        assert isinstance(new, dict), where
        for k, v in old.items():
            assert k in new, f"{where}.{k} is missing"
            _assert_contains(new[k], v, f"{where}.{k}")
    elif isinstance(old, list):
        assert isinstance(new, list) and len(new) == len(old), where
        for i, (a, b) in enumerate(zip(new, old, strict=True)):
            _assert_contains(a, b, f"{where}[{i}]")
    else:
        assert new == old, (where, new, old)


@pytest.mark.parametrize("name", ["sym8", "asym4"])
def test_v1_artifacts_measure_against_their_original(name):
    # --original dequantizes through the shard reader: the v1 sidecars give the manifest's
    # figures again
    doc = json.loads(run("report", V1 / f"art_{name}", "--original", V1 / "src.safetensors",
                         "--format", "json").stdout)
    old = json.loads((V1 / f"report_{name}.json").read_text())
    for t, t0 in zip(doc["tensors"], old["tensors"], strict=True):
        r, r0 = t["results"]["artifact"], t0["results"]["artifact"]
        assert r["quantized"] == r0["quantized"]
        if not r0["quantized"]:
            continue
        assert r["sqnr_db"] == pytest.approx(r0["sqnr_db"], rel=1e-6)  # float32 sums then
        assert r["max_abs_error"] == r0["max_abs_error"]


def test_v1_bits_per_weight_counts_the_v1_sidecars(tmp_path, monkeypatch):
    # qtool 0.1 stored F32 scales and I32 zero points: 8 bytes per group of 16 at 4 bits
    monkeypatch.chdir(V1)
    doc = json.loads(run("report", "art_asym4", "--format", "json").stdout)
    r = next(t for t in doc["tensors"] if t["name"] == "layers.0.q.weight")
    assert r["results"]["artifact"]["bits_per_weight"] == pytest.approx(4 + 64 / 16)
