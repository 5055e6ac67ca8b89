"""`quantize --scale-bits 8` (issue 13, section 3): group scales stored as U8 codes times one
F32 scale per row, end to end, as a user runs it. Files are read back with the safetensors
library and every expected value is recomputed here from docs/FORMAT.md (format_version 3)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import blake3
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from qtool.core.double_quant import quantize_dq
from qtool.core.schemes import QuantSpec
from qtool.formats import manifest as manifest_mod
from qtool.formats.manifest import seal
from tests.conftest import run, write_checkpoint
from tests.pipeline.test_export import model_folder, weights_of

ARGS = ["--scheme", "asymmetric", "--bits", "4", "-g", "group", "--group-size", "16"]


def load(path: Path) -> dict[str, np.ndarray]:
    with safe_open(str(path), "numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def unpack4(buf: np.ndarray, cols: int) -> np.ndarray:
    """docs/FORMAT.md, Packing, at 4 bits: the low nibble of each byte first."""
    lo, hi = buf & 0x0F, buf >> 4
    return np.stack([lo, hi], axis=-1).reshape(buf.shape[0], -1)[:, :cols].astype(np.int64)


@pytest.fixture
def weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    rows = np.exp(rng.normal(0, 1.0, (24, 1)))  # row magnitudes differ: small codes occur
    return {"a.weight": (rng.standard_t(3, (24, 64)) * 0.02 * rows).astype(np.float32),
            "b.weight": (rng.standard_t(4, (8, 40)) * 0.1).astype(np.float32),  # short group
            "norm.weight": np.ones(64, np.float32)}


def test_files_values_and_bits_per_weight(tmp_path, weights):
    src = write_checkpoint(tmp_path / "model.safetensors", weights)
    art = tmp_path / "art"
    run("quantize", src, art, *ARGS, "--scale-bits", "8", "-q")
    assert sorted(p.name for p in art.iterdir()) == [
        "model.row_scale.safetensors", "model.safetensors", "model.scale.safetensors",
        "model.zero_point.safetensors", "qtool.json"]
    m = json.loads((art / "qtool.json").read_text())
    assert m["format_version"] == 3
    recs = {t["name"]: t for t in m["tensors"]}
    main, codes = load(art / "model.safetensors"), load(art / "model.scale.safetensors")
    zps, row = load(art / "model.zero_point.safetensors"), load(art / "model.row_scale.safetensors")
    assert sorted(codes) == sorted(row) == ["a.weight", "b.weight"]
    restored_path = tmp_path / "r.safetensors"
    run("dequantize", art, restored_path, "-q")
    restored = load(restored_path)
    for name in ("a.weight", "b.weight"):
        w = weights[name]
        rows, cols = w.shape
        groups = -(-cols // 16)
        rec = recs[name]
        assert rec["scale_bits"] == 8 and rec["scale_dtype"] == "float32"
        c, d = codes[name], row[name]
        assert c.dtype == np.uint8 and c.shape == (rows, groups) and c.min() >= 1
        assert d.dtype == np.float32 and d.shape == (rows,)
        assert c.max() == 255  # each row's largest group uses the top code
        # the stored scale: code x row scale, multiplied in float32
        s = (c.astype(np.float32) * d[:, None]).astype(np.float32)
        z = unpack4(zps[name], groups)
        q = unpack4(main[name], cols)
        # bytes: 4-bit q, one byte per code, 4 per row, 4-bit zero points
        stored = rows * -(-cols * 4 // 8) + rows * groups + 4 * rows + rows * -(-groups * 4 // 8)
        assert rec["bytes"]["stored"] == stored
        # the restored file is (q - z) * s in float32, every value
        sc = np.repeat(s, 16, axis=1)[:, :cols]
        zc = np.repeat(z, 16, axis=1)[:, :cols].astype(np.float32)
        w_hat = (q.astype(np.float32) - zc) * sc
        np.testing.assert_array_equal(restored[name], w_hat)
        # min-max ranges: every value within stored scale / 2 (plus float32 rounding)
        tol = sc.astype(np.float64) / 2 * (1 + 4e-7) + np.spacing(np.abs(w))
        assert np.all(np.abs(w.astype(np.float64) - w_hat) <= tol)
        # and exactly what the core's double quantization gives
        q_core, dq = quantize_dq(w, QuantSpec("asymmetric", 4, "group", 16, scale_bits=8))
        np.testing.assert_array_equal(q, q_core)
        np.testing.assert_array_equal(c, dq.codes)
    # the summary's bits per weight counts the codes and row scales
    r = run("report", art, "--format", "json")
    per = {t["name"]: t["results"]["artifact"] for t in json.loads(r.stdout)["tensors"]}
    for name in ("a.weight", "b.weight"):
        stored = recs[name]["bytes"]["stored"]
        assert per[name]["quantized_bytes"] == stored
        assert per[name]["bits_per_weight"] == pytest.approx(8 * stored / weights[name].size)
    run("verify", art, "-q")


def test_fewer_bits_than_float16_scales_at_the_same_group_size(tmp_path, weights):
    src = write_checkpoint(tmp_path / "model.safetensors", weights)
    run("quantize", src, tmp_path / "dq", *ARGS, "--scale-bits", "8", "-q")
    run("quantize", src, tmp_path / "f16", *ARGS, "--scale-dtype", "float16", "-q")
    a = json.loads((tmp_path / "dq" / "qtool.json").read_text())["tensors"][0]
    b = json.loads((tmp_path / "f16" / "qtool.json").read_text())["tensors"][0]
    # 24 x 4 groups: float16 scales 2 bytes each (192), codes 1 byte each + 4 per row (192)
    assert b["bytes"]["stored"] - a["bytes"]["stored"] == 24 * 4 * 2 - (24 * 4 + 24 * 4)
    # without --scale-bits nothing changes: format_version 2, no row-scale file
    m = json.loads((tmp_path / "f16" / "qtool.json").read_text())
    assert m["format_version"] == 2 and "scale_bits" not in b
    assert not (tmp_path / "f16" / "model.row_scale.safetensors").exists()


def test_recipe_scale_bits_per_rule(tmp_path, weights):
    src = write_checkpoint(tmp_path / "model.safetensors", weights)
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[rule]]\nmatch = "a.*"\nscale_bits = 8\n')
    art = tmp_path / "art"
    run("quantize", src, art, *ARGS, "--recipe", recipe, "-q")
    recs = {t["name"]: t for t in json.loads((art / "qtool.json").read_text())["tensors"]}
    assert recs["a.weight"]["scale_bits"] == 8 and "scale_bits" not in recs["b.weight"]
    assert list(load(art / "model.row_scale.safetensors")) == ["a.weight"]
    assert load(art / "model.scale.safetensors")["b.weight"].dtype == np.float32
    run("verify", art, "-q")
    # scale_bits = 0 turns it off for a rule (here: a per-channel tensor)
    recipe.write_text('[[rule]]\nmatch = "b.*"\ngranularity = "channel"\nscale_bits = 0\n')
    run("quantize", src, tmp_path / "art2", *ARGS, "--scale-bits", "8", "--recipe", recipe,
        "-q")
    recs = {t["name"]: t for t in json.loads((tmp_path / "art2" / "qtool.json").read_text())
            ["tensors"]}
    assert recs["a.weight"]["scale_bits"] == 8 and "scale_bits" not in recs["b.weight"]
    # --write-recipe keeps scale_bits; the recipe alone writes the same artifact
    written = tmp_path / "w.toml"
    run("quantize", src, tmp_path / "art3", *ARGS, "--scale-bits", "8", "--write-recipe",
        written, "-q")
    assert written.read_text().count("scale_bits = 8") == 2
    run("quantize", src, tmp_path / "art4", "--recipe", written, "-q")
    for f in ("model.safetensors", "model.scale.safetensors", "model.row_scale.safetensors",
              "model.zero_point.safetensors"):
        assert (tmp_path / "art3" / f).read_bytes() == (tmp_path / "art4" / f).read_bytes()
    recipe.write_text('[[rule]]\nmatch = "a.*"\nscale_bits = 4\n')
    r = run("quantize", src, tmp_path / "bad", *ARGS, "--recipe", recipe, expect=2)
    assert "rule 1: scale_bits must be 8 or 0" in r.stderr and len(r.stderr.splitlines()) == 1
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("extra, message", [
    (["-g", "channel"], "needs granularity group"),
    (["--scale-dtype", "float16"], "scale_dtype must be float32"),
    # Mixed precision takes --scale-bits 8 (tests/pipeline/test_mixed_codes.py), not with
    # another scale dtype for the rows.
    (["--target-bits", "4.5", "--scale-dtype", "float16"],
     "--scale-dtype must be float32 or auto, not float16"),
    (["--scale-bits", "4"], "'4' is not '8'"),
])
def test_refusals(tmp_path, weights, extra, message):
    src = write_checkpoint(tmp_path / "model.safetensors", weights)
    args = [*ARGS, "--scale-bits", "8", *extra]
    r = run("quantize", src, tmp_path / "out", *args, expect=2)
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()
    r = run("quantize", src, tmp_path / "out", "--scheme", "gnmt", "--scale-bits", "8",
            expect=2)
    assert "needs granularity group and a scheme other than gnmt" in r.stderr


def _reseal(art: Path, doc: dict, *files: str) -> None:
    for n in files:
        data = (art / n).read_bytes()
        doc["files"][n] = {"size": len(data), "blake3": blake3.blake3(data).hexdigest()}
    (art / "qtool.json").write_text(seal(doc))


def test_older_readers_and_bad_files_are_refused(tmp_path, weights, monkeypatch):
    src = write_checkpoint(tmp_path / "model.safetensors", weights)
    art = tmp_path / "art"
    run("quantize", src, art, *ARGS, "--scale-bits", "8", "-q")
    # a qtool that reads format_version 1 and 2 only refuses the artifact by its version
    monkeypatch.setattr(manifest_mod, "READABLE_VERSIONS", (1, 2))
    r = run("dequantize", art, tmp_path / "x.safetensors", expect=2)
    assert "unknown format_version 3" in r.stderr
    monkeypatch.undo()
    # scale_bits in a format_version 2 manifest is refused, not ignored
    doc = json.loads((art / "qtool.json").read_text())
    doc.pop("manifest_digest")
    doc["format_version"] = 2
    (art / "qtool.json").write_text(seal(doc))
    r = run("dequantize", art, tmp_path / "x.safetensors", expect=2)
    assert "scale_bits is not part of format_version 2" in r.stderr
    # a zero row scale and a zero code, even with the digests updated, fail verify
    doc["format_version"] = 3
    rs = load(art / "model.row_scale.safetensors")
    rs["a.weight"][3] = 0.0
    save_file(rs, str(art / "model.row_scale.safetensors"), metadata={"format": "qtool"})
    codes = load(art / "model.scale.safetensors")
    codes["b.weight"][0, 0] = 0
    save_file(codes, str(art / "model.scale.safetensors"), metadata={"format": "qtool"})
    _reseal(art, doc, "model.row_scale.safetensors", "model.scale.safetensors")
    r = run("verify", art, expect=2)
    assert "tensor 'a.weight': 1 of 24 row scales are not finite and > 0" in r.stderr
    assert "tensor 'b.weight': 1 of 24 scales are not finite and > 0" in r.stderr
    # a missing row-scale file is named
    (art / "model.row_scale.safetensors").unlink()
    r = run("dequantize", art, tmp_path / "x.safetensors", expect=2)
    assert "missing file model.row_scale.safetensors" in r.stderr


def test_export_expands_the_scales_exactly_and_sharded_index(tmp_path):
    src = model_folder(tmp_path / "m", shards=2)
    art = tmp_path / "art"
    run("quantize", src, art, "--scheme", "asymmetric", "--bits", "4", "-g", "group",
        "--group-size", "16", "--scale-bits", "8", "-q")
    index = json.loads((art / "model.safetensors.index.json").read_text())
    coded = sorted(index["row_scale_map"])
    assert coded and coded == sorted(index["scale_map"])
    assert set(index["row_scale_map"].values()) == {
        "model-00001-of-00002.row_scale.safetensors", "model-00002-of-00002.row_scale.safetensors"}
    run("verify", art, "-q")
    run("export", art, tmp_path / "ct", "--to", "compressed-tensors", "-q")
    # the scales as float32 in the export: code x row scale, so the restored values agree
    run("dequantize", art, tmp_path / "a", "-q")
    run("dequantize", tmp_path / "ct", tmp_path / "b", "-q")
    a, b = weights_of(tmp_path / "a"), weights_of(tmp_path / "b")
    assert sorted(a) == sorted(b) and len(a) > len(coded)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_format_md_loader_reads_scale_codes(tmp_path, weights):
    """The numpy loader printed in docs/FORMAT.md, in a fresh interpreter, on an artifact
    mixing scale codes (4-bit and 8-bit) and float scales, gives what `qtool dequantize` gives."""
    import pickle
    import re
    import subprocess
    import sys

    from tests.conftest import ROOT

    text = (ROOT / "docs" / "FORMAT.md").read_text()
    (src,) = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "def load_qtool" in b]
    ckpt = write_checkpoint(tmp_path / "m.safetensors", weights)
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[rule]]\nmatch = "b.*"\nscale_bits = 0\nscale_dtype = "float16"\n')
    cases = []
    for i, args in enumerate([[*ARGS, "--scale-bits", "8", "--recipe", recipe],
                              ["--scheme", "symmetric", "-g", "group", "--group-size", "8",
                               "--scale-bits", "8"]]):
        art = tmp_path / f"a{i}"
        run("quantize", ckpt, art, *args, "-q")
        run("dequantize", art, tmp_path / f"r{i}.safetensors", "-q")
        cases.append((str(art), load(tmp_path / f"r{i}.safetensors")))
    script = src + (
        "\nimport sys, pickle\n"
        "res = [load_qtool(a, 'm') for a in sys.argv[1:]]\n"
        "sys.stdout.buffer.write(pickle.dumps([{k: np.asarray(v) for k, v in r.items()} "
        "for r in res]))\n")
    p = subprocess.run([sys.executable, "-c", script, *(c[0] for c in cases)],
                       capture_output=True, check=True)
    for (art, expected), got in zip(cases, pickle.loads(p.stdout), strict=True):
        assert set(got) == set(expected)
        for name, w in expected.items():
            np.testing.assert_array_equal(np.asarray(got[name], w.dtype), w,
                                          err_msg=f"{art} {name}")


def _md_rows(text: str) -> dict[str, list[str]]:
    """The per-tensor rows of a markdown report: name -> cells after the name."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0].strip("`")] = cells[1:]
    return rows


def test_report_says_codes_as_the_plan_does(tmp_path, weights):
    """The granularity of a tensor with 8-bit scale codes is `group 16 codes` in every report
    table (the one-line summary, the rows, markdown), as the mixed-precision plan writes
    `4-bit g16 codes`; a tensor without codes stays `group 16`."""
    src = write_checkpoint(tmp_path / "model.safetensors", weights)
    run("quantize", src, tmp_path / "art", *ARGS, "--scale-bits", "8", "-q")
    run("quantize", src, tmp_path / "plain", *ARGS, "-q")
    table = run("report", tmp_path / "art").stdout
    assert "every quantized tensor: asymmetric, 4 bits, group 16 codes\n" in table
    assert "every quantized tensor: asymmetric, 4 bits, group 16\n" in \
        run("report", tmp_path / "plain").stdout
    dry = run("report", src, *ARGS, "--scale-bits", "8").stdout
    assert "every quantized tensor: asymmetric, 4 bits, group 16 codes\n" in dry
    md = _md_rows(run("report", tmp_path / "art", "--format", "markdown").stdout)
    assert {n: c[3] for n, c in md.items()} == {"a.weight": "group 16 codes",
                                                "b.weight": "group 16 codes",
                                                "norm.weight": ""}
    md = _md_rows(run("report", tmp_path / "plain", "--format", "markdown").stdout)
    assert md["a.weight"][3] == "group 16"
    # A mixed plan and the artifact it writes: each tensor's setting the same in both.
    plan_out = run("report", src, "--target-bits", "5", "--scale-bits", "8").stdout
    plan = {}
    for line in plan_out.split("mixed-precision plan (nothing written)\n")[1].splitlines()[2:]:
        if line.startswith("total:"):
            break
        cells = re.split(r"\s{2,}", line)  # columns are 2+ spaces apart, words 1
        plan[cells[0]] = cells[2].split()  # ['3-bit', 'g16', 'codes'] or ['4-bit', 'channel']
    run("quantize", src, tmp_path / "mixed", "--target-bits", "5", "--scale-bits", "8", "-q")
    md = _md_rows(run("report", tmp_path / "mixed", "--format", "markdown").stdout)
    assert any("codes" in s for s in plan.values()), plan
    for name, setting in plan.items():
        bits, unit, *codes = setting
        gran = f"group {unit[1:]}" if unit.startswith("g") else unit
        assert [md[name][2], md[name][3]] == [bits.split("-")[0], " ".join([gran, *codes])]
