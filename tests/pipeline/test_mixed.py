"""Mixed precision through the CLI: --target-bits keeps to its budget, --target-sqnr reaches
its target on every tensor, rules and --skip still apply, --write-recipe reproduces the
artifact byte for byte, and `report --target-bits` shows the plan without writing."""

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
from qtool.formats.shards import open_checkpoint
from qtool.pipeline import mixed
from qtool.pipeline.plan import QuantizeOptions, Rule, make_plan
from tests.conftest import run


def heavy(rng: np.random.Generator, shape: tuple[int, int], scale: float, nu: float
          ) -> np.ndarray:
    return (rng.standard_t(nu, shape) * scale).astype(np.float32)


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """A two-layer transformer in miniature: tensors differ in size and tail weight, so the
    allocator has real choices to make."""
    rng = np.random.default_rng(7)
    t = {"embed.weight": heavy(rng, (96, 64), 0.02, 5)}
    for i in range(2):
        p = f"layers.{i}."
        t[p + "attn.q.weight"] = heavy(rng, (64, 64), 0.03, 3)
        t[p + "attn.v.weight"] = heavy(rng, (64, 64), 0.03, 8)
        t[p + "mlp.up.weight"] = heavy(rng, (128, 64), 0.02, 4)
        t[p + "mlp.down.weight"] = heavy(rng, (64, 128), 0.02, 4)
        t[p + "norm.weight"] = np.ones(64, np.float32)
    path = tmp_path / "model.safetensors"
    save_file(t, str(path))
    return path


def manifest(art: Path) -> dict:
    return json.loads((art / "qtool.json").read_text())


def spec_of(rec: dict) -> QuantSpec:
    keys = ("scheme", "bits", "granularity", "group_size", "range", "percentile")
    return QuantSpec(**{k: rec[k] for k in keys if k in rec})


def quantized(art: Path) -> dict[str, dict]:
    return {t["name"]: t for t in manifest(art)["tensors"] if not t.get("passthrough")}


def bits_per_weight(art: Path) -> float:
    """Bits per weight of the quantized tensors by the lean-artifact formula, from the
    settings the manifest records."""
    q = quantized(art)
    bits = sum(8 * stored_bytes(tuple(t["shape"]), spec_of(t)) for t in q.values())
    return bits / sum(math.prod(t["shape"]) for t in q.values())


def restored_sqnr(model: Path, art: Path) -> tuple[float, dict[str, float]]:
    """SQNR of all quantized tensors together, and of each, from `qtool dequantize`'s file
    read back with the safetensors library."""
    out = art.with_name(art.name + "-restored.safetensors")
    run("dequantize", art, out, "-q")
    sig = err = 0.0
    each = {}
    with safe_open(str(model), "numpy") as f, safe_open(str(out), "numpy") as g:
        for name in quantized(art):
            w = f.get_tensor(name).astype(np.float64)
            e = float(np.sum((w - g.get_tensor(name).astype(np.float64)) ** 2))
            s = float(np.sum(w * w))
            each[name] = 10 * math.log10(s / e)
            sig, err = sig + s, err + e
    return 10 * math.log10(sig / err), each


def files(art: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(art.iterdir())}


@pytest.mark.parametrize("target", [2.6, 3.3, 4.5, 6.25])
def test_target_bits_is_never_exceeded_and_spent(model, tmp_path, target):
    art = tmp_path / f"art{target}"
    r = run("quantize", model, art, "--scheme", "asymmetric", "--target-bits", target, "--json")
    bpw = bits_per_weight(art)
    assert bpw <= target
    summary = json.loads(r.stdout)["mixed_precision"]
    assert summary["bits_per_weight"] == pytest.approx(bpw, abs=1e-6)
    # Not wasted either: the cheapest possible step (one tensor's group size or a bit) is
    # well under half a bit per weight on this model.
    assert bpw > target - 0.5
    assert "mixed precision (--target-bits" in r.stderr


def test_more_bits_give_less_error(model, tmp_path):
    sqnr = []
    for target in (3, 4, 5):
        art = tmp_path / f"a{target}"
        run("quantize", model, art, "--scheme", "asymmetric", "--target-bits", target, "-q")
        sqnr.append(restored_sqnr(model, art)[0])
    assert sqnr[0] < sqnr[1] < sqnr[2], sqnr


def test_beats_uniform_setting_of_the_same_size(model, tmp_path):
    """At the size of uniform 4-bit group-64 (one of the plans it could pick), the plan's loss,
    the size-weighted sum of relative errors, is no larger."""
    uni = tmp_path / "uni"
    run("quantize", model, uni, "--scheme", "asymmetric", "--bits", 4, "-g", "group",
        "--group-size", 64, "-q")
    target = bits_per_weight(uni)
    mix = tmp_path / "mix"
    run("quantize", model, mix, "--scheme", "asymmetric", "--target-bits", target, "-q")
    assert bits_per_weight(mix) <= target

    def loss(art: Path) -> float:
        each = restored_sqnr(model, art)[1]
        q = quantized(art)
        return sum(math.prod(q[n]["shape"]) * 10 ** (-db / 10) for n, db in each.items())

    assert loss(mix) <= loss(uni) * (1 + 1e-9)


def test_target_sqnr_reaches_the_target_on_every_tensor(model, tmp_path):
    art = tmp_path / "art"
    run("quantize", model, art, "--scheme", "asymmetric", "--target-sqnr", 25, "-q")
    got = restored_sqnr(model, art)[1]
    assert len(got) == 9 and min(got.values()) >= 25.0, got
    # The fewest bits: every tensor at one bit less (same group) would miss the target.
    for name, t in quantized(art).items():
        spec = spec_of(t)
        if spec.bits > 2:
            with safe_open(str(model), "numpy") as f:
                w = f.get_tensor(name)
            from qtool.core.quant import quantize

            st = quantize(w, spec.with_(bits=spec.bits - 1)).stats
            assert 10 * math.log10(st.signal_sq / st.error_sq) < 25.0, name


def test_recipe_rules_fix_settings_and_skip_applies(model, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[rule]]\nmatch = "*.attn.q.*"\nbits = 8\n\n'
                      '[[rule]]\nmatch = "embed*"\nskip = true\n')
    art = tmp_path / "art"
    out = tmp_path / "plan.toml"
    run("quantize", model, art, "--scheme", "asymmetric", "--target-bits", 4,
        "--recipe", recipe, "--skip", "*.v.*", "--write-recipe", out, "-q")
    q = quantized(art)
    assert {n for n in q if ".attn.q." in n} == {"layers.0.attn.q.weight",
                                                 "layers.1.attn.q.weight"}
    assert all(q[n]["bits"] == 8 and q[n]["granularity"] == "channel" for n in q
               if ".attn.q." in n)
    kept = {t["name"]: t["passthrough"] for t in manifest(art)["tensors"] if t.get("passthrough")}
    assert kept["embed.weight"] == "recipe rule 'embed*': skip"
    assert kept["layers.0.attn.v.weight"] == "matched --skip"
    # The 8-bit tensors count against the budget: the rest gets less than 4 bits.
    assert bits_per_weight(art) <= 4
    assert max(t["bits"] for n, t in q.items() if ".attn.q." not in n) < 8
    # The written recipe reproduces the artifact, with the same --skip.
    again = tmp_path / "again"
    run("quantize", model, again, "--recipe", out, "--skip", "*.v.*", "-q")
    assert files(again) == files(art)
    doc = tomllib.loads(out.read_text())
    assert doc["rule"][-1] == {"match": "embed*", "skip": True}
    assert len(doc["rule"]) == len(q) + 1


@pytest.mark.parametrize("flags", [["--target-bits", "3.7"], ["--target-sqnr", "22"],
                                   ["--target-bits", "3.7", "--scale-dtype", "float16"],
                                   ["--bits", "4", "-g", "group", "--group-size", "32",
                                    "--range", "search"]])
def test_write_recipe_reproduces_the_artifact_byte_for_byte(model, tmp_path, flags):
    a, b, rec = tmp_path / "a", tmp_path / "b", tmp_path / "plan.toml"
    run("quantize", model, a, "--scheme", "asymmetric", *flags, "--write-recipe", rec, "-q")
    # Different command-line settings: the recipe's rules give every setting.
    run("quantize", model, b, "--recipe", rec, "--bits", "8", "-q")
    assert files(a) == files(b)
    assert run("verify", b).exit_code == 0


def test_report_dry_run_shows_the_plan_and_writes_nothing(model, tmp_path):
    before = sorted(tmp_path.iterdir())
    r = run("report", model, "--scheme", "asymmetric", "--target-bits", 4)
    assert sorted(tmp_path.iterdir()) == before
    assert "mixed-precision plan (nothing written)" in r.stdout
    plan_lines = [ln for ln in r.stdout.splitlines()
                  if ln.startswith("layers.0.mlp.up.weight") and "-bit " in ln]
    assert len(plan_lines) == 1
    # The plan is the one quantize applies.
    art = tmp_path / "art"
    run("quantize", model, art, "--scheme", "asymmetric", "--target-bits", 4, "-q")
    t = quantized(art)["layers.0.mlp.up.weight"]
    unit = f"g{t['group_size']}" if t["granularity"] == "group" else t["granularity"]
    assert f"{t['bits']}-bit {unit}" in plan_lines[0]


@pytest.mark.parametrize("args,msg", [
    (["--target-bits", "4", "--target-sqnr", "30"], "with every tensor at --target-sqnr 30"),
    (["--target-bits", "1"], "below the smallest possible size"),
    (["--target-bits", "0"], "positive"),
    (["--target-bits", "nan"], "positive"),
    (["--scheme", "gnmt", "--target-bits", "5"], "gnmt"),
    (["--scheme", "gnmt", "--range", "search"], "gnmt"),
])
def test_bad_targets_are_one_line_errors_with_no_output(model, tmp_path, args, msg):
    out = tmp_path / "out"
    r = run("quantize", model, out, *args, expect=2)
    assert msg in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert not out.exists()


def test_large_tensors_are_measured_on_a_fixed_sample(model, monkeypatch):
    monkeypatch.setattr(mixed, "SAMPLE_VALUES", 2048)
    ckpt = open_checkpoint(model)
    opts = QuantizeOptions(spec=QuantSpec("asymmetric"),
                           rules=(Rule("layers.1.*", settings=(("bits", 6),)),))
    plan = make_plan(ckpt, opts)
    a = mixed.plan_mixed(ckpt, plan, opts, mixed.Target(bits=5.0))
    b = mixed.plan_mixed(ckpt, plan, QuantizeOptions(spec=opts.spec, rules=opts.rules,
                                                     jobs=1), mixed.Target(bits=5.0))
    assert a.choices == b.choices  # reproducible whatever the thread count
    by = {c.name: c for c in a.choices}
    assert by["layers.0.mlp.up.weight"].sampled_rows == 32  # 2048 values of 64-wide rows
    assert by["embed.weight"].sampled_rows == 32
    assert by["layers.1.mlp.up.weight"].fixed is not None
    assert by["layers.1.mlp.up.weight"].spec.bits == 6
    assert a.sampled == 5  # the free tensors of layer 0 and the embedding
    assert a.bits_per_weight <= 5.0


def test_target_bits_with_a_sqnr_floor_protects_the_worst_tensor(model, tmp_path):
    """Both targets: every tensor reaches the floor, the budget still holds, and the worst
    tensor is better than with the budget alone."""
    alone, both = tmp_path / "alone", tmp_path / "both"
    run("quantize", model, alone, "--scheme", "asymmetric", "--target-bits", 4.3, "-q")
    worst_alone = min(restored_sqnr(model, alone)[1].values())
    floor = worst_alone + 1.0
    r = run("quantize", model, both, "--scheme", "asymmetric", "--target-bits", 4.3,
            "--target-sqnr", floor, "--json")
    each = restored_sqnr(model, both)[1]
    assert min(each.values()) >= floor, each
    assert bits_per_weight(both) <= 4.3
    assert json.loads(r.stdout)["mixed_precision"]["short_of_target"] == []
