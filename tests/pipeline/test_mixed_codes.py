"""Mixed precision with scale codes (`--target-bits` / `--target-sqnr` with `--scale-bits 8`,
issue 13): the budget holds on the bytes actually written, the group tensors store 8-bit codes
(format_version 3 only when some tensor does), the written recipe reproduces the artifact byte
for byte, recipe rules keep their meaning, and `report` dry-runs it. Run as a user runs it;
files read back with the safetensors library."""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from qtool.core.schemes import QuantSpec
from qtool.core.shapes import stored_bytes
from qtool.pipeline import mixed
from tests.conftest import run
from tests.pipeline import test_mixed
from tests.pipeline.test_mixed import files, manifest, quantized, restored_sqnr

model = test_mixed.model  # the fixture: a two-layer transformer in miniature

CODES = ["--scale-bits", "8"]


def written_bits(art: Path) -> tuple[int, int]:
    """(bits, weights) of the quantized tensors, from the files on disk: every array stored
    under a quantized tensor's name (integers, scale codes or scales, zero points, row scales)
    in any of the artifact's safetensors files."""
    q = quantized(art)
    nbytes = 0
    for path in sorted(art.glob("*.safetensors")):
        with safe_open(str(path), "numpy") as f:
            nbytes += sum(f.get_tensor(k).nbytes for k in f.keys() if k in q)
    return 8 * nbytes, sum(math.prod(t["shape"]) for t in q.values())


def check_codes(art: Path) -> int:
    """Every group tensor has codes, no other one; format_version 3 and the row-scale file
    exactly when some tensor has them. Returns how many have them."""
    q = quantized(art)
    for name, t in q.items():
        assert (t.get("scale_bits") == 8) == (t["granularity"] == "group"), (name, t)
        if t["granularity"] == "group":
            assert t["scale_dtype"] == "float32"
    coded = sum(1 for t in q.values() if t.get("scale_bits") == 8)
    assert manifest(art)["format_version"] == (3 if coded else 2)
    assert bool(list(art.glob("*.row_scale.safetensors"))) == bool(coded)
    return coded


@pytest.mark.parametrize("scheme,target", [("asymmetric", 2.6), ("asymmetric", 3.3),
                                           ("asymmetric", 4.5), ("asymmetric", 6.25),
                                           ("symmetric", 4.1)])
def test_budget_holds_on_the_written_bytes(model, tmp_path, scheme, target):
    art = tmp_path / "art"
    r = run("quantize", model, art, "--scheme", scheme, "--target-bits", target, *CODES,
            "--json")
    bits, n = written_bits(art)
    assert bits / n <= target
    assert bits / n > target - 0.5  # and spent: the steps are small on this model
    summary = json.loads(r.stdout)["mixed_precision"]
    assert summary["bits_per_weight"] == pytest.approx(bits / n, abs=1e-6)
    assert summary["scale_bits"] == 8
    assert "--scale-bits 8" in r.stderr
    if target >= 3.3:
        assert check_codes(art) > 0  # group settings are chosen at these budgets
    else:
        check_codes(art)
    assert run("verify", art).exit_code == 0


def test_no_codes_chosen_means_format_version_2(model, tmp_path):
    """At the smallest possible size every tensor is 2-bit per channel: no codes anywhere, so
    the artifact is format_version 2 (readable by a qtool that knows only 1 and 2)."""
    probe = tmp_path / "probe"
    run("quantize", model, probe, "--scheme", "asymmetric", "--bits", "2", "-q")
    bits, n = written_bits(probe)
    art = tmp_path / "art"
    run("quantize", model, art, "--scheme", "asymmetric", "--target-bits",
        f"{math.ceil(bits / n * 1e6) / 1e6:.6f}", *CODES, "-q")
    assert check_codes(art) == 0
    assert all(t["bits"] == 2 and t["granularity"] == "channel"
               for t in quantized(art).values())


@pytest.mark.parametrize("target", [3.3, 4.5])
def test_codes_lose_less_than_float_scales_at_the_same_budget(model, tmp_path, target):
    """The point of it: at the same budget (measured on the files), the size-weighted error of
    the restored tensors is smaller with codes than with float32 group scales."""
    loss = {}
    for label, extra in (("float", []), ("codes", CODES)):
        art = tmp_path / label
        run("quantize", model, art, "--scheme", "asymmetric", "--target-bits", target, *extra,
            "-q")
        bits, n = written_bits(art)
        assert bits / n <= target
        each = restored_sqnr(model, art)[1]
        q = quantized(art)
        loss[label] = sum(math.prod(q[k]["shape"]) * 10 ** (-db / 10) for k, db in each.items())
    assert loss["codes"] < loss["float"], loss


@pytest.mark.parametrize("flags", [["--target-bits", "3.7"], ["--target-sqnr", "22"],
                                   ["--target-bits", "5", "--target-sqnr", "18"]])
def test_written_recipe_reproduces_the_artifact_byte_for_byte(model, tmp_path, flags):
    a, b, rec = tmp_path / "a", tmp_path / "b", tmp_path / "plan.toml"
    run("quantize", model, a, "--scheme", "asymmetric", *flags, *CODES, "--write-recipe", rec,
        "-q")
    coded = check_codes(a)
    assert coded > 0
    rules = tomllib.loads(rec.read_text())["rule"]
    assert sum(1 for r in rules if r.get("scale_bits") == 8) == coded
    # Other command-line settings, no --scale-bits: the rules give every setting.
    run("quantize", model, b, "--recipe", rec, "--bits", "8", "-q")
    assert files(a) == files(b)
    assert run("verify", b).exit_code == 0
    if "--target-sqnr" in flags:
        floor = float(flags[flags.index("--target-sqnr") + 1])
        assert min(restored_sqnr(model, a)[1].values()) >= floor


def test_recipe_rules_with_codes(model, tmp_path):
    """A rule's group setting gets codes as it would without a target; scale_bits = 0 turns
    them off; the fixed tensors count against the budget."""
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[rule]]\nmatch = "*.attn.q.*"\nbits = 6\ngranularity = "group"\n'
                      'group_size = 16\n\n[[rule]]\nmatch = "layers.0.mlp.up.*"\nbits = 4\n'
                      'granularity = "group"\ngroup_size = 32\nscale_bits = 0\n')
    art, rec = tmp_path / "art", tmp_path / "plan.toml"
    run("quantize", model, art, "--scheme", "asymmetric", "--target-bits", 4.5, *CODES,
        "--recipe", recipe, "--write-recipe", rec, "-q")
    q = quantized(art)
    for name in ("layers.0.attn.q.weight", "layers.1.attn.q.weight"):
        assert (q[name]["bits"], q[name]["group_size"], q[name]["scale_bits"]) == (6, 16, 8)
    up = q["layers.0.mlp.up.weight"]
    assert (up["bits"], up["group_size"], "scale_bits" in up) == (4, 32, False)
    bits, n = written_bits(art)
    assert bits / n <= 4.5
    again = tmp_path / "again"
    run("quantize", model, again, "--recipe", rec, "-q")
    assert files(again) == files(art)
    # A rule that asks for float16 scales on a group setting contradicts the codes.
    recipe.write_text('[[rule]]\nmatch = "*.attn.q.*"\ngranularity = "group"\n'
                      'scale_dtype = "float16"\n')
    out = tmp_path / "out"
    r = run("quantize", model, out, "--scheme", "asymmetric", "--target-bits", 4.5, *CODES,
            "--recipe", recipe, expect=2)
    assert "scale_dtype must be float32" in r.stderr and "attn.q" in r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr and not out.exists()


def test_float16_checkpoint_channel_scales_stay_float16(tmp_path):
    """F16 tensors: per-channel candidates keep the auto scale dtype (float16); coded group
    candidates have their float32 row scales; the recipe reproduces both."""
    rng = np.random.default_rng(3)
    t = {f"l{i}.weight": (rng.standard_t(4, (48, 96)) * 0.02).astype(np.float16)
         for i in range(4)}
    src = tmp_path / "m.safetensors"
    save_file(t, str(src))
    art, b, rec = tmp_path / "a", tmp_path / "b", tmp_path / "r.toml"
    run("quantize", src, art, "--scheme", "asymmetric", "--target-bits", 4.6, *CODES,
        "--write-recipe", rec, "-q")
    q = quantized(art)
    assert check_codes(art) > 0
    for name, rec_t in q.items():
        want = "float32" if rec_t["granularity"] == "group" else "float16"
        assert rec_t["scale_dtype"] == want, name
    bits, n = written_bits(art)
    assert bits / n <= 4.6
    run("quantize", src, b, "--recipe", rec, "-q")
    assert files(art) == files(b)


def test_candidate_costs_are_the_stored_sizes():
    """Group candidates carry codes, per-channel ones do not; a coded candidate costs what is
    written: packed integers, one byte per group, four per row, packed zero points."""
    base = QuantSpec("asymmetric", 8, "channel", scale_dtype="float16")
    cands = mixed.candidate_specs(base, 128, 8)
    assert len(cands) == 7 * 4  # bits 2-8 x (g16, g32, g64, channel): g128+ not below 128
    for s in cands:
        if s.granularity == "group":
            assert (s.scale_bits, s.scale_dtype) == (8, "float32")
        else:
            assert (s.scale_bits, s.scale_dtype) == (None, "float16")
    s = next(c for c in cands if (c.bits, c.granularity, c.group_size) == (4, "group", 32))
    # 64 rows x 128 values at 4 bits; 4 groups a row: 4 codes, 4 zero points in 2 bytes
    assert stored_bytes((64, 128), s) == 64 * 64 + 64 * 4 + 64 * 4 + 64 * 2
    assert mixed.candidate_specs(base, 128) == [c.with_(scale_bits=None, scale_dtype="float16")
                                                for c in cands]


def test_report_dry_run_with_scale_bits(model, tmp_path):
    before = sorted(tmp_path.iterdir())
    r = run("report", model, "--scheme", "asymmetric", "--target-bits", 4.5, *CODES)
    assert sorted(tmp_path.iterdir()) == before
    plan = {ln.split()[0]: ln for ln in r.stdout.splitlines() if "-bit " in ln}
    assert "--target-bits 4.5 --scale-bits 8" in r.stderr
    art = tmp_path / "art"
    run("quantize", model, art, "--scheme", "asymmetric", "--target-bits", 4.5, *CODES, "-q")
    for name, t in quantized(art).items():
        unit = f"g{t['group_size']} codes" if t["granularity"] == "group" else "channel"
        assert f"{t['bits']}-bit {unit} " in plan[name], plan[name]
    # Without a target: the dry run's bits per weight are the artifact's, codes included.
    args = ["--scheme", "asymmetric", "-b", "4", "-g", "group", "--group-size", "32", *CODES]
    doc = json.loads(run("report", model, *args, "--format", "json").stdout)
    group = doc["groups"][0]
    assert group["spec"]["scale_bits"] == 8
    uni = tmp_path / "uni"
    run("quantize", model, uni, *args, "-q")
    bits, n = written_bits(uni)
    assert group["totals"]["bits_per_weight"] == pytest.approx(bits / n, rel=1e-12)


@pytest.mark.parametrize("cmd,msg", [
    (["quantize", "{model}", "{out}", "--target-bits", "4.5", "--scale-bits", "8",
      "--scale-dtype", "bfloat16"], "--scale-dtype must be float32 or auto, not bfloat16"),
    (["quantize", "{model}", "{out}", "--scheme", "gnmt", "--target-bits", "5",
      "--scale-bits", "8"], "scheme gnmt is 8-bit per row only"),
    (["report", "{model}", "--scale-bits", "8"], "needs granularity group"),
    (["report", "{art}", "--scale-bits", "8"], "--scale-bits applies to a dry run"),
])
def test_refusals_are_one_line(model, tmp_path, cmd, msg):
    art = tmp_path / "art"
    run("quantize", model, art, "-q")
    out = tmp_path / "out"
    args = [a.format(model=model, out=out, art=art) for a in cmd]
    r = run(*args, expect=2)
    assert msg in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert not out.exists()
