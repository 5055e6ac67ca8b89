"""Report v2 as a user runs it: `--chart` (bars and the layer × module heatmap) at 80 and 160
columns, the table rules (kept tensors on one line, SQNR kept at 80 columns, -b repeated,
NO_COLOR), the latency, area and lookup estimates from the CLI, and the quantize quality
line. Expected values are computed here with numpy."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import run, write_checkpoint

ESC = re.compile(r"\x1b")
RNG = np.random.default_rng(7)


def _layered(tmp_path, layers=3):
    """A small decoder: layers.N.{q,k,v,o,up,down} plus an embedding and norms. Layer 1's
    v_proj has one huge outlier, so its SQNR (per-tensor symmetric) is far the worst."""
    t = {"model.embed_tokens.weight": RNG.normal(0, 0.05, (64, 16)).astype(np.float32)}
    for i in range(layers):
        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                  "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"):
            w = RNG.normal(0, 0.05, (16, 16)).astype(np.float32)
            if i == 1 and m == "self_attn.v_proj":
                w[0, 0] = 40.0
            t[f"model.layers.{i}.{m}.weight"] = w
        t[f"model.layers.{i}.input_layernorm.weight"] = np.ones(16, np.float32)
    t["model.norm.weight"] = np.ones(16, np.float32)
    return write_checkpoint(tmp_path / "m.safetensors", t), t


def _sqnr_tensor_symmetric(w: np.ndarray, bits: int = 8) -> float:
    qmax = 2 ** (bits - 1) - 1
    s = np.float32(np.abs(w).max() / qmax)
    q = np.clip(np.rint(w / s), -qmax - 1, qmax)
    e = (q * s).astype(np.float64) - w
    return 10 * np.log10((w.astype(np.float64) ** 2).sum() / (e ** 2).sum())


@pytest.mark.parametrize("width", [80, 160])
def test_chart_heatmap_fits_and_shows_the_weak_cell(tmp_path, monkeypatch, width):
    src, t = _layered(tmp_path)
    monkeypatch.setenv("COLUMNS", str(width))
    out = run("report", src, "--chart", "-g", "tensor").stdout
    lines = out.splitlines()
    assert all(len(ln) <= width for ln in lines), max(lines, key=len)
    assert not ESC.search(out)
    head = next(i for i, ln in enumerate(lines) if ln.split()[:1] == ["layer"])
    # One row per layer, one column per module type; the cell of layer 1, v_proj holds the
    # SQNR computed here.
    header = " ".join(lines[head - 1:head + 1])
    assert "v_proj" in header and "down_" in header and "up_proj" in header
    rows = {int(ln.split()[0]): ln.split()[1:] for ln in lines[head + 1:head + 4]}
    assert sorted(rows) == [0, 1, 2] and all(len(r) == 6 for r in rows.values())
    want = _sqnr_tensor_symmetric(t["model.layers.1.self_attn.v_proj.weight"])
    col = lines[head].split()[1:].index("v_proj")  # every column ends its header on this line
    assert float(rows[1][col]) == pytest.approx(want, abs=0.051)
    assert min(float(x) for r in rows.values() for x in r) == float(rows[1][col])
    # The embedding is outside the layers: a bar below the heatmap.
    assert any(ln.startswith("model.embed_tokens.weight") and "█" in ln for ln in lines)
    assert "worst: model.layers.1.self_attn.v_proj.weight" in out


@pytest.mark.parametrize("width", [80, 160])
def test_chart_bars_are_proportional(tmp_path, monkeypatch, width):
    t = {"a.weight": RNG.normal(0, 1, (32, 32)).astype(np.float32),
         "b.weight": RNG.normal(0, 1, (32, 32)).astype(np.float32)}
    t["b.weight"][0, 0] = 300.0
    src = write_checkpoint(tmp_path / "m.safetensors", t)
    monkeypatch.setenv("COLUMNS", str(width))
    lines = run("report", src, "--chart", "-g", "tensor").stdout.splitlines()
    assert all(len(ln) <= width for ln in lines)
    bars = {ln.split()[0]: ln for ln in lines if ln.startswith(("a.weight", "b.weight"))}
    va, vb = (_sqnr_tensor_symmetric(t[n]) for n in ("a.weight", "b.weight"))

    def length(ln: str) -> float:
        eighths = " ▏▎▍▌▋▊▉"
        return sum(1 if c == "█" else eighths.index(c) / 8 if c in eighths[1:] else 0
                   for c in ln)

    assert float(bars["a.weight"].split()[-1]) == pytest.approx(va, abs=0.051)
    la, lb = length(bars["a.weight"]), length(bars["b.weight"])
    assert la > 10 * (width // 80)  # the longest bar takes most of the width
    assert lb / la == pytest.approx(vb / va, abs=1.5 / la)


def test_chart_bits_per_weight(tmp_path, monkeypatch):
    src, t = _layered(tmp_path, layers=2)
    out = tmp_path / "q"
    run("quantize", src, out, "-q", "-b", "4", "-g", "group", "--group-size", "8")
    text = run("report", out, "--chart", "bits").stdout
    # 16×16 at 4 bits, groups of 8: 128 bytes of integers + 32 float32 scales + 32 int32
    # zero points... for symmetric the zero points are stored too; bits per weight is
    # 8 × stored bytes / weights, taken from the report's JSON.
    doc = json.loads(run("report", out, "--format", "json").stdout)
    rec = next(x for x in doc["tensors"] if x["name"] == "model.layers.0.mlp.up_proj.weight")
    want = 8 * rec["results"]["artifact"]["quantized_bytes"] / 256
    assert f"{want:.2f}" in text and "bits per weight" in text


def test_chart_applies_to_the_table_only(tmp_path):
    src, _ = _layered(tmp_path, 2)
    r = run("report", src, "--chart", "--format", "json", expect=2)
    assert r.stdout == "" and "--chart" in r.stderr


def test_dry_run_of_four_schemes_keeps_sqnr_at_80_columns(tmp_path, monkeypatch):
    src, _ = _layered(tmp_path, 2)
    monkeypatch.setenv("COLUMNS", "80")
    out = run("report", src, "-s", "symmetric", "-s", "asymmetric", "-s", "gnmt",
              "-s", "symmetric-unsigned").stdout
    lines = out.splitlines()
    assert all(len(ln) <= 80 for ln in lines), max(lines, key=len)
    head = "\n".join(lines[:8])
    assert head.count("SQNR dB") == 4
    row = next(ln for ln in lines if ln.startswith("layers.1.self_attn.v_proj.weight"))
    assert len(re.findall(r"\d+\.\d\d|n/a", row)) == 4


def test_one_spec_dry_run_says_it_once(tmp_path, monkeypatch):
    src, _ = _layered(tmp_path, 2)
    monkeypatch.setenv("COLUMNS", "80")
    lines = run("report", src, "-b", "6").stdout.splitlines()
    assert "every quantized tensor: symmetric, 6 bits, channel" in lines
    i = next(i for i, ln in enumerate(lines) if ln.startswith("tensor ") and "SQNR" in ln)
    assert "SQNR dB" in lines[i] and "symmetric" not in lines[i - 1] + lines[i]


def test_bits_repeated_compares_widths(tmp_path):
    src, t = _layered(tmp_path, 2)
    doc = json.loads(run("report", src, "-b", "4", "-b", "8", "-g", "tensor",
                         "--format", "json").stdout)
    assert [g["label"] for g in doc["groups"]] == ["symmetric 4b tensor", "symmetric 8b tensor"]
    w = t["model.layers.0.mlp.up_proj.weight"]
    res = next(x for x in doc["tensors"] if x["name"] == "model.layers.0.mlp.up_proj.weight")
    assert res["results"]["symmetric 4b tensor"]["sqnr_db"] == pytest.approx(
        _sqnr_tensor_symmetric(w, 4), abs=1e-3)
    assert res["results"]["symmetric 8b tensor"]["sqnr_db"] == pytest.approx(
        _sqnr_tensor_symmetric(w, 8), abs=1e-3)
    # gnmt is 8-bit only: with several widths it takes the 8-bit one.
    doc = json.loads(run("report", src, "-s", "gnmt", "-s", "symmetric", "-b", "4", "-b", "8",
                         "--format", "json").stdout)
    assert [g["spec"]["bits"] for g in doc["groups"]] == [8, 4, 8]


def test_no_color_removes_every_escape_on_a_terminal(tmp_path, monkeypatch):
    """Rich keeps bold and dim under NO_COLOR; qtool's stdout console does not."""
    from qtool.console import _out_console
    from qtool.report.model import dry_run_report  # noqa: F401  (imported for the layer)

    src, _ = _layered(tmp_path, 2)
    monkeypatch.setenv("FORCE_COLOR", "1")  # Rich: a terminal even under pytest
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.delenv("NO_COLOR", raising=False)
    with_colour = run("report", src, "--fail-under-sqnr", "100", expect=1).stdout
    assert ESC.search(with_colour)
    monkeypatch.setenv("NO_COLOR", "1")
    plain = run("report", src, "--fail-under-sqnr", "100", expect=1).stdout
    assert not ESC.search(plain) and "SQNR" in plain
    assert not ESC.search(run("report", src, "--chart").stdout)
    assert _out_console().no_color
    # The quantize summary on stderr too (its labels are bold on a terminal).
    assert not ESC.search(run("quantize", src, tmp_path / "q1").stderr)
    monkeypatch.delenv("NO_COLOR")
    assert ESC.search(run("quantize", src, tmp_path / "q2").stderr)


def test_latency_area_and_lookup_from_the_cli(tmp_path):
    src, t = _layered(tmp_path, 2)
    out = tmp_path / "q"
    run("quantize", src, out, "-q")
    doc = json.loads(run("report", out, "--format", "json", "--tokens", "4",
                         "--bandwidth", "10").stdout)
    rows = {x["name"]: x for x in doc["tensors"]}
    emb = "model.embed_tokens.weight"
    before = after = 0.0
    macs = 0
    for name, w in t.items():
        stored = rows[name]["results"]["artifact"]["quantized_bytes"]
        if name == emb:  # a lookup table: 4 of its 64 rows are read, no MACs
            before += w.nbytes * 4 / 64
            after += stored * 4 / 64
        else:
            before += w.nbytes
            after += stored
            macs += 4 * w.size
    e = doc["groups"][0]["energy"]
    assert e["dram_bytes"]["before"] == pytest.approx(before)
    assert e["dram_bytes"]["after"] == pytest.approx(after)
    assert e["latency"]["before_s"] == pytest.approx(before / 10e9)
    assert e["latency"]["after_s"] == pytest.approx(after / 10e9)
    assert e["macs"] == macs
    assert e["memory"]["before_pj"] == pytest.approx(before * 160)
    # Float activations: fp32 MACs before and after, area unchanged.
    assert e["compute"]["after_pj"] == pytest.approx(macs * 4.6)
    assert e["area"]["before_um2"] == pytest.approx(7700 + 4184)
    assert e["area"]["after_um2"] == pytest.approx(7700 + 4184)
    i = json.loads(run("report", out, "--format", "json", "--int-activations").stdout)
    quantized = sum(w.size for n, w in t.items() if w.ndim == 2 and n != emb)
    floats = sum(w.size for n, w in t.items() if w.ndim == 1)
    assert i["groups"][0]["energy"]["area"]["after_um2"] == pytest.approx(
        (quantized * (282 + 36) + floats * (7700 + 4184)) / (quantized + floats))
    # --lookup replaces the default globs: nothing is a lookup table now.
    n = json.loads(run("report", out, "--format", "json", "--lookup", "nothing*").stdout)
    assert n["groups"][0]["energy"]["dram_bytes"]["before"] == pytest.approx(
        sum(w.nbytes for w in t.values()))
    text = run("report", out).stdout
    assert "latency" in text and "MAC area" in text and "float activations" in text


def test_bad_estimate_options_exit_2(tmp_path):
    src, _ = _layered(tmp_path, 2)
    for args in (["--tokens", "0"], ["--bandwidth", "0"], ["--bandwidth", "nan"]):
        r = run("report", src, *args, expect=2)
        assert r.stdout == "" and r.stderr.startswith("qtool: error:")


def test_quantize_prints_a_quality_line(tmp_path):
    src, t = _layered(tmp_path, 2)
    r = run("quantize", src, tmp_path / "q", "--json", "-g", "tensor")
    s = json.loads(r.stdout)
    worst = "model.layers.1.self_attn.v_proj.weight"
    assert s["quality"]["worst"]["name"] == worst
    assert s["quality"]["worst"]["sqnr_db"] == pytest.approx(
        _sqnr_tensor_symmetric(t[worst]), abs=1e-3)
    assert s["quality"]["sqnr_db"] > s["quality"]["worst"]["sqnr_db"]
    r = run("quantize", src, tmp_path / "q2", "-g", "tensor")
    assert f"worst tensor {worst}" in " ".join(r.stderr.split())
    assert "quality: SQNR" in r.stderr


def test_readme_chart_is_what_the_command_prints(tmp_path, monkeypatch):
    """README shows `qtool report demo_out --chart` of `make demo`: the same text."""
    from tests.conftest import ROOT, SAMPLE

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "80")
    run("quantize", SAMPLE, "demo_out", "--scheme", "gnmt", "-q")
    got = [ln.rstrip() for ln in run("report", "demo_out", "--chart").stdout.splitlines()]
    readme = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    start = readme.index("    $ qtool report demo_out --chart") + 1
    shown = []
    for ln in readme[start:]:
        if not ln.startswith("    "):
            break
        shown.append(ln[4:].rstrip())
    assert shown == got


@given(st.lists(st.text(st.characters(codec="ascii", exclude_characters="."), min_size=1,
                        max_size=12), min_size=1, max_size=8),
       st.integers(8, 60))
def test_fit_name_never_cuts_a_part_when_first_and_last_fit(parts, width):
    from qtool.report.fmt import ELLIPSIS, fit_name

    name = ".".join(parts)
    got = fit_name(name, width)
    assert len(got) <= max(width, 3)
    if len(name) <= width:
        assert got == name
    elif len(parts) > 2 and len(parts[0]) + len(parts[-1]) + 4 <= width:
        shown = got.split(".")
        assert ELLIPSIS in shown and shown[0] == parts[0] and shown[-1] == parts[-1]
        k = shown.index(ELLIPSIS)
        assert shown[:k] == parts[:k] and shown[k + 1:] == parts[len(parts) - len(shown) + k + 1:]


def test_chart_too_many_module_types_for_the_width_draws_bars(tmp_path, monkeypatch):
    t = {f"layers.{i}.module_number_{m}.weight": RNG.normal(0, 1, (8, 8)).astype(np.float32)
         for i in range(2) for m in range(12)}
    src = write_checkpoint(tmp_path / "m.safetensors", t)
    monkeypatch.setenv("COLUMNS", "80")
    lines = run("report", src, "--chart").stdout.splitlines()
    assert all(len(ln) <= 80 for ln in lines)
    assert not any(ln.split()[:1] == ["layer"] for ln in lines)  # no heatmap
    assert sum("█" in ln for ln in lines) == 24  # one bar per tensor
    monkeypatch.setenv("COLUMNS", "200")
    wide = run("report", src, "--chart").stdout.splitlines()
    assert any(ln.split()[:1] == ["layer"] for ln in wide) and all(len(ln) <= 200 for ln in wide)
