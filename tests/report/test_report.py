"""`qtool report` as a user runs it: artifacts and checkpoints written to disk, the report's
figures checked against values computed here with numpy (never with qtool's own functions),
its JSON against the schema documented in docs/REPORT.md, its CSV read back with the csv
module, and its exit codes."""

from __future__ import annotations

import csv
import io
import json
import math
import re

import ml_dtypes
import numpy as np
import pytest
from rich.console import Console
from safetensors.numpy import load_file, save_file

from qtool.formats.manifest import seal
from qtool.report.model import Report, ReportOptions, artifact_report
from qtool.report.tables import render_report
from tests.conftest import ROOT, SAMPLE, make_tensors, run, write_checkpoint

ANSI = re.compile(r"\x1b\[")


# --------------------------------------------------------------------------- helpers


def _no_constant(name):
    raise AssertionError(f"{name} in the JSON output")


def _json(result) -> dict:
    # parse_constant: NaN / Infinity / -Infinity are not JSON and must never be written.
    return json.loads(result.stdout, parse_constant=_no_constant)


def _quantize(tmp_path, tensors=None, *args, name="model"):
    src = write_checkpoint(tmp_path / f"{name}.safetensors", tensors)
    out = tmp_path / f"{name}-q"
    run("quantize", src, out, "--quiet", *args)
    return src, out


def _manifest(out):
    return json.loads((out / "qtool.json").read_text())


def _restore(out, stem: str, entry: dict) -> np.ndarray:
    """w_hat by the formula of docs/FORMAT.md, with numpy only (8-bit artifacts)."""
    q = load_file(str(out / f"{stem}.safetensors"))[entry["name"]]
    s = load_file(str(out / f"{stem}.scale.safetensors"))[entry["name"]]
    z = load_file(str(out / f"{stem}.zero_point.safetensors"))[entry["name"]]
    dt = np.float64 if entry["dtype"] == "F64" else np.float32
    rows = entry["shape"][0]
    qi = q.reshape(rows, -1).astype(dt)
    if s.ndim == 0:
        w_hat = s.astype(dt) * (qi - z.astype(dt))
    else:
        assert s.shape == (rows, 1)  # per channel
        w_hat = s.astype(dt) * (qi - z.astype(dt))
    return w_hat.reshape(entry["shape"])


def _metrics(w: np.ndarray, w_hat: np.ndarray) -> dict:
    w = np.asarray(w).astype(np.float64).ravel()
    w_hat = np.asarray(w_hat).astype(np.float64).ravel()
    e = w_hat - w
    sig, err = float(w @ w), float(e @ e)
    return {
        "signal": sig, "error": err,
        "mse": err / w.size,
        "sqnr_db": math.inf if err == 0 else 10 * math.log10(sig / err),
        "max_abs_error": float(np.abs(e).max()),
        "cosine": 1.0 if sig == 0 and float(w_hat @ w_hat) == 0 else
        float(w @ w_hat) / math.sqrt(sig * float(w_hat @ w_hat)),
    }


def _sqnr(x):
    return math.inf if x == "inf" else x


def _assert_metrics(got: dict, want: dict):
    assert got["mse"] == pytest.approx(want["mse"], rel=1e-4, abs=1e-15)
    if math.isinf(want["sqnr_db"]):
        assert got["sqnr_db"] == "inf" and got["exact"] is True
    else:
        assert got["sqnr_db"] == pytest.approx(want["sqnr_db"], abs=1e-3)
        assert got["exact"] is False
    assert got["max_abs_error"] == pytest.approx(want["max_abs_error"], rel=1e-5, abs=1e-12)
    assert got["cosine"] == pytest.approx(want["cosine"], abs=1e-7)


def _documented_schema() -> dict[str, set[str]]:
    """key path -> allowed types, from the table in docs/REPORT.md."""
    text = (ROOT / "docs" / "REPORT.md").read_text(encoding="utf-8")
    section = text.split("## JSON schema", 1)[1]
    schema = {}
    for line in section.splitlines():
        m = re.match(r"^\| `([^`]+)` \| ([^|]+?) \|", line)
        if m:
            schema[m.group(1)] = {t.strip() for t in m.group(2).split(" or ")}
    assert len(schema) > 80, "the schema table was not found in docs/REPORT.md"
    return schema


def _type_ok(v, types: set[str]) -> bool:
    if v is None:
        return "null" in types
    if isinstance(v, bool):
        return "boolean" in types
    if isinstance(v, int):
        return bool({"integer", "number"} & types)
    if isinstance(v, float):
        return "number" in types and math.isfinite(v)
    if isinstance(v, str):
        return "string" in types or f'"{v}"' in types
    if isinstance(v, dict):
        return "object" in types
    if isinstance(v, list):
        return "array" in types
    return False


def _children(schema, path):
    out = set()
    for p in schema:
        if path == "":
            rest = p
        elif p.startswith(path + "."):
            rest = p[len(path) + 1:]
        else:
            continue
        if "." not in rest and "[]" not in rest and rest != "*":
            out.add(rest)
    return out


def _validate(doc, schema, seen: set[str]):
    """Every key documented, of a documented type; every documented key present."""

    def walk(v, path):
        assert path in schema, f"key {path!r} is not documented in docs/REPORT.md"
        seen.add(path)
        assert _type_ok(v, schema[path]), f"{path} = {v!r:.80} is not {schema[path]}"
        if isinstance(v, dict):
            if f"{path}.*" in schema:
                for child in v.values():
                    walk(child, f"{path}.*")
            else:
                assert set(v) == _children(schema, path), path
                for k, child in v.items():
                    walk(child, f"{path}.{k}" if path else k)
        elif isinstance(v, list):
            for child in v:
                walk(child, f"{path}[]")

    assert isinstance(doc, dict)
    assert set(doc) == _children(schema, "")
    for k, v in doc.items():
        walk(v, k)


# --------------------------------------------------------------------------- artifact metrics


@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric", "gnmt"])
def test_artifact_metrics_match_numpy(tmp_path, scheme):
    tensors = make_tensors()
    src, out = _quantize(tmp_path, tensors, "--scheme", scheme)
    doc = _json(run("report", out, "--format", "json"))
    assert doc["kind"] == "artifact" and doc["metrics_from"] == "manifest"
    assert [t["name"] for t in doc["tensors"]] == [t["name"] for t in _manifest(out)["tensors"]]
    files = {k: load_file(str(out / f"model.{k}safetensors")) for k in ("", "scale.",
                                                                      "zero_point.")}
    sig = err = 0.0
    per_tensor = {}
    for t in doc["tensors"]:
        w = tensors[t["name"]]
        r = t["results"]["artifact"]
        assert t["dtype"] == {np.dtype(np.float32): "F32", np.dtype(np.float64): "F64",
                              np.dtype(np.float16): "F16", np.dtype(ml_dtypes.bfloat16): "BF16",
                              np.dtype(np.int64): "I64"}[w.dtype]
        assert t["shape"] == list(w.shape) and t["parameters"] == w.size
        assert t["original_bytes"] == w.nbytes
        if not r["quantized"]:
            assert r["passthrough"] and r["sqnr_db"] is None and r["mse"] is None
            assert r["quantized_bytes"] == w.nbytes and r["compression_ratio"] == 1.0
            continue
        assert r["scheme"] == scheme and r["bits"] == 8 and r["granularity"] == "channel"
        stored = sum(f[t["name"]].nbytes for f in files.values())
        assert r["quantized_bytes"] == stored
        assert r["compression_ratio"] == pytest.approx(w.nbytes / stored)
        entry = next(e for e in _manifest(out)["tensors"] if e["name"] == t["name"])
        want = _metrics(w, _restore(out, "model", entry))
        _assert_metrics(r, want)
        sig, err = sig + want["signal"], err + want["error"]
        per_tensor[t["name"]] = want["sqnr_db"]
    # the all-zero tensor round-trips exactly: +inf, written as "inf"
    assert doc["tensors"][[t["name"] for t in doc["tensors"]].index("zeros.weight")][
        "results"]["artifact"]["sqnr_db"] == "inf"
    tot = doc["groups"][0]["totals"]
    assert tot["tensors"] == len(tensors) and tot["quantized"] == len(per_tensor)
    assert tot["bytes_before"] == sum(w.nbytes for w in tensors.values())
    assert tot["bytes_after"] == sum(t["results"]["artifact"]["quantized_bytes"]
                                     for t in doc["tensors"])
    assert tot["compression_ratio"] == pytest.approx(tot["bytes_before"] / tot["bytes_after"])
    assert tot["bytes_saved"] == tot["bytes_before"] - tot["bytes_after"]
    assert tot["sqnr_db"] == pytest.approx(10 * math.log10(sig / err), abs=1e-3)
    worst = min(per_tensor, key=per_tensor.get)
    assert tot["worst"]["name"] == worst
    disk = doc["disk"]
    assert disk["before"] == src.stat().st_size
    assert disk["after"] == sum(p.stat().st_size for p in out.iterdir() if p.name != "qtool.json")


def test_packed_artifact_bytes_are_as_really_stored(tmp_path):
    tensors = {"w": np.random.default_rng(1).normal(size=(6, 13)).astype(np.float32)}
    _, out = _quantize(tmp_path, tensors, "--bits", "4", "--scheme", "asymmetric")
    r = _json(run("report", out, "--format", "json"))["tensors"][0]["results"]["artifact"]
    # 13 four-bit values per row -> 7 bytes per row; a float32 scale and a 4-bit zero point,
    # packed: 1 byte per row (format_version 2).
    assert r["quantized_bytes"] == 6 * 7 + 6 * 4 + 6 * 1
    on_disk = sum(load_file(str(out / f"model.{k}safetensors"))["w"].nbytes
                  for k in ("", "scale.", "zero_point."))
    assert r["quantized_bytes"] == on_disk
    assert r["bits"] == 4


def test_exact_tensor_is_infinite_in_every_format(tmp_path):
    rows = np.arange(-127, 128, dtype=np.float32)[:254].reshape(2, 127)
    rows[:, 0] = [-127, 127]  # each row's absmax is 127: gnmt's scale is exactly 1
    _, out = _quantize(tmp_path, {"exact.weight": rows}, "--scheme", "gnmt")
    doc = _json(run("report", out, "--format", "json", "--fail-under-sqnr", "1000"))
    r = doc["tensors"][0]["results"]["artifact"]
    assert r["sqnr_db"] == "inf" and r["exact"] is True and r["max_abs_error"] == 0.0
    assert r["mse"] == 0.0 and r["cosine"] == 1.0
    assert doc["groups"][0]["totals"]["sqnr_db"] == "inf"
    assert doc["checks"]["passed"] is True  # ∞ passes any SQNR threshold
    rows_csv = list(csv.DictReader(io.StringIO(run("report", out, "--format", "csv").stdout)))
    assert rows_csv[0]["sqnr_db"] == "inf" and float(rows_csv[0]["sqnr_db"]) == math.inf
    table = run("report", out).stdout
    assert "∞" in table and "nan" not in table.lower()
    assert "| ∞ |" in run("report", out, "--format", "markdown").stdout


# --------------------------------------------------------------------------- schema, CSV, MD


def test_json_follows_the_documented_schema(tmp_path):
    schema = _documented_schema()
    seen: set[str] = set()
    src, out = _quantize(tmp_path, None, "--scheme", "asymmetric")
    docs = [
        _json(run("report", out, "--format", "json")),
        _json(run("report", out, "--format", "json", "--original", src, "--sort", "sqnr",
                  "--top", "2", "--fail-under-sqnr", "45", "--max-error", "1e-4",
                  expect=1)),
        _json(run("report", src, "--format", "json", "-s", "gnmt", "-s", "asymmetric",
                  "-g", "group", "--group-size", "16", "--range", "percentile")),
    ]
    for doc in docs:
        _validate(doc, schema, seen)
        assert doc["schema_version"] == 1
    assert docs[1]["exit_code"] == 1 and docs[1]["checks"]["offenders"]
    assert docs[1]["tensors_shown"] == 2 and docs[1]["tensors_total"] == 10
    assert docs[2]["groups"][0]["spec"]["granularity"] == "channel"  # gnmt is per row
    assert docs[2]["groups"][1]["spec"] == {"scheme": "asymmetric", "bits": 8,
                                            "granularity": "group", "group_size": 16,
                                            "range": "percentile", "percentile": 99.99,
                                            "scale_bits": None}
    # Every documented key was produced by one of these reports.
    assert set(schema) - seen == set()


def test_csv_reads_back_with_the_csv_module(tmp_path):
    tensors = make_tensors()
    _, out = _quantize(tmp_path, tensors, "--scheme", "gnmt")
    doc = _json(run("report", out, "--format", "json"))
    rows = list(csv.DictReader(io.StringIO(run("report", out, "--format", "csv").stdout)))
    assert len(rows) == len(tensors)
    assert list(rows[0]) == ["name", "dtype", "shape", "parameters", "original_bytes",
                             "scheme", "bits", "granularity", "group_size", "range",
                             "passthrough", "quantized_bytes", "compression_ratio", "mse",
                             "sqnr_db", "max_abs_error", "cosine", "bits_per_weight"]
    for row, t in zip(rows, doc["tensors"], strict=True):
        r = t["results"]["artifact"]
        assert row["name"] == t["name"]
        assert float(row["bits_per_weight"]) == r["bits_per_weight"] == pytest.approx(
            8 * r["quantized_bytes"] / tensors[t["name"]].size)
        assert json.loads(row["shape"]) == list(tensors[t["name"]].shape)
        assert int(row["parameters"]) == tensors[t["name"]].size
        assert int(row["original_bytes"]) == tensors[t["name"]].nbytes
        assert int(row["quantized_bytes"]) == r["quantized_bytes"]
        if r["quantized"]:
            assert row["passthrough"] == "" and row["scheme"] == "gnmt"
            assert float(row["sqnr_db"]) == _sqnr(r["sqnr_db"])
            assert float(row["mse"]) == r["mse"]  # full precision, no rounding
            assert float(row["max_abs_error"]) == r["max_abs_error"]
        else:
            assert row["passthrough"] == r["passthrough"] and row["sqnr_db"] == ""


def test_dry_run_csv_has_one_row_per_tensor_and_prefixed_columns(ckpt):
    text = run("report", ckpt, "--format", "csv", "-s", "symmetric", "-s", "asymmetric").stdout
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == len(make_tensors())
    assert {"best", "symmetric.sqnr_db", "asymmetric.sqnr_db",
            "asymmetric.quantized_bytes"} <= set(rows[0])
    for row in rows:
        if row["symmetric.sqnr_db"]:
            s, a = float(row["symmetric.sqnr_db"]), float(row["asymmetric.sqnr_db"])
            if s != a:
                assert row["best"] == ("symmetric" if s > a else "asymmetric")


def test_markdown_pastes_as_tables(tmp_path):
    tensors = make_tensors()
    _, out = _quantize(tmp_path, tensors, "--scheme", "gnmt")
    md = run("report", out, "--format", "markdown").stdout
    lines = md.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.startswith("| tensor |"))
    assert re.fullmatch(r"\|(-{3}:?\|)+", lines[header + 1].replace("---:", "---:"))
    body = lines[header + 2: header + 2 + len(tensors)]
    assert [re.match(r"\| `([^`]+)` \|", ln).group(1) for ln in body] == list(
        t["name"] for t in _manifest(out)["tensors"])
    cells = len(lines[header].split("|"))
    assert all(len(ln.split("|")) == cells for ln in body)
    assert "| energy: total |" in md and "Horowitz" in md


# --------------------------------------------------------------------------- the table


def test_table_is_plain_and_fits_80_columns(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    long_name = "model.encoder.layers.17.self_attention.query_key_value_projection.weight"
    tensors = {
        "model.decoder.layers.0.mlp.down_proj.weight":
            np.random.default_rng(0).normal(size=(8, 16)).astype(np.float32),
        long_name: np.random.default_rng(1).normal(size=(8, 16)).astype(np.float32),
        "model.norm.weight": np.ones(8, np.float32),
    }
    _, out = _quantize(tmp_path, tensors, "--scheme", "gnmt")
    text = run("report", out).stdout
    assert not ANSI.search(text)  # stdout is not a terminal: plain text
    lines = text.splitlines()
    assert all(len(ln) <= 80 for ln in lines), max(lines, key=len)
    # The common prefix is stated once; the names are shown without it.
    assert "start with 'model.'" in text
    assert any(ln.startswith("decoder.layers.0.mlp.down_proj.weight ") for ln in lines)
    # Kept tensors are summed into one line; --all lists them, one line each.
    assert "kept: 1 tensor, 32 B (1-D tensor (bias or norm): 1); --all lists them" in text
    assert not any(ln.startswith("norm.weight") for ln in lines)
    every = run("report", out, "--all").stdout.splitlines()
    assert sum(1 for ln in every if ln.startswith("norm.weight ")) == 1
    # A name that fits is whole; one that does not loses whole middle parts, never part of
    # a word, and SQNR stays.
    assert any(ln.startswith(long_name[len("model."):] + " ") for ln in lines)
    monkeypatch.setenv("COLUMNS", "50")
    narrow = run("report", out).stdout.splitlines()
    assert all(len(ln) <= 50 for ln in narrow), max(narrow, key=len)
    assert any("SQNR" in ln for ln in narrow)
    shown = next(ln.split()[0] for ln in narrow if ln.startswith("encoder.layers.17."))
    assert "…" in shown and shown.endswith(".weight")
    parts = long_name[len("model."):].split(".")
    assert all(p in parts or p == "…" for p in shown.split("."))
    # One scheme, one bit width: said once in the subtitle instead of two columns.
    assert "every quantized tensor: gnmt, 8 bits, channel" in text
    assert not any(ln.split()[:2] == ["tensor", "shape"] and "scheme" in ln for ln in lines)
    assert "SQNR" in text and "totals" in text and "energy: total" in text
    assert "Horowitz" in text


def test_table_colours_bad_sqnr_on_a_terminal_and_respects_no_color(tmp_path, monkeypatch):
    src, out = _quantize(tmp_path, None, "--scheme", "gnmt")
    from qtool.formats.native import Artifact

    records = Artifact.open(out).manifest.tensors
    report = artifact_report(out, records, options=ReportOptions(fail_under_sqnr=200.0))

    def render(r: Report) -> str:
        buf = io.StringIO()
        Console(file=buf, force_terminal=True, color_system="standard", width=120).print(
            render_report(r, width=120))
        return buf.getvalue()

    monkeypatch.delenv("NO_COLOR", raising=False)
    coloured = render(report)
    assert "\x1b[1;31m" in coloured  # bold red: below --fail-under-sqnr
    assert "\x1b[1;31m" not in render(artifact_report(out, records))  # all above 30 dB
    monkeypatch.setenv("NO_COLOR", "1")
    assert not re.search(r"\x1b\[[0-9;]*3[0-7]m", render(report))


def test_sort_and_top(tmp_path):
    tensors = make_tensors()
    _, out = _quantize(tmp_path, tensors, "--scheme", "symmetric")
    full = _json(run("report", out, "--format", "json"))
    by = {t["name"]: t for t in full["tensors"]}

    def names(*args):
        return [t["name"] for t in _json(run("report", out, "--format", "json", *args))["tensors"]]

    assert names("--sort", "name") == sorted(by)
    q = [n for n in by if by[n]["results"]["artifact"]["quantized"]]
    kept = [n for n in by if n not in q]
    sq = names("--sort", "sqnr")
    assert sq[:len(q)] == sorted(q, key=lambda n: _sqnr(by[n]["results"]["artifact"]["sqnr_db"]))
    assert set(sq[len(q):]) == set(kept)
    err = names("--sort", "error")
    assert err[:len(q)] == sorted(q, key=lambda n: -by[n]["results"]["artifact"]["max_abs_error"])
    size = names("--sort", "size")
    assert [by[n]["original_bytes"] for n in size] == sorted(
        (t["original_bytes"] for t in full["tensors"]), reverse=True)
    top = _json(run("report", out, "--format", "json", "--sort", "sqnr", "--top", "3"))
    assert [t["name"] for t in top["tensors"]] == sq[:3]
    assert top["groups"] == full["groups"]  # totals still cover every tensor
    rows = list(csv.DictReader(io.StringIO(
        run("report", out, "--format", "csv", "--top", "2").stdout)))
    assert len(rows) == 2
    assert "showing 3 of 10 tensors" in run("report", out, "--top", "3").stdout


def test_default_path_is_the_current_directory(tmp_path, monkeypatch):
    _, out = _quantize(tmp_path, None, "--scheme", "gnmt")
    monkeypatch.chdir(out)
    doc = _json(run("report", "--format", "json"))
    assert doc["path"] == "." and doc["kind"] == "artifact"


# --------------------------------------------------------------------------- CI gating


def test_thresholds_exit_codes_and_offenders_on_stderr(tmp_path):
    tensors = make_tensors()
    _, out = _quantize(tmp_path, tensors, "--scheme", "symmetric")
    doc = _json(run("report", out, "--format", "json"))
    results = {t["name"]: t["results"]["artifact"] for t in doc["tensors"]}
    quantized = {n: r for n, r in results.items() if r["quantized"]}
    finite = sorted(_sqnr(r["sqnr_db"]) for r in quantized.values() if r["sqnr_db"] != "inf")
    # A threshold between the two worst tensors: exactly the worst one fails.
    limit = (finite[0] + finite[1]) / 2
    worst = next(n for n, r in quantized.items() if r["sqnr_db"] == finite[0])
    res = run("report", out, "--fail-under-sqnr", f"{limit}", expect=1)
    assert res.stderr.splitlines() == [
        f"qtool: fail: tensor '{worst}': SQNR {finite[0]:.2f} dB is below --fail-under-sqnr "
        f"{limit:g}"]
    assert "FAIL" in res.stdout  # the report itself is still printed
    # Every quantized tensor but the exact one fails an impossible threshold.
    res = run("report", out, "--fail-under-sqnr", "1000", expect=1)
    assert len(res.stderr.splitlines()) == len(quantized) - 1
    for name in quantized:
        assert (f"'{name}'" in res.stderr) == (results[name]["sqnr_db"] != "inf")
    # max error
    errs = sorted(r["max_abs_error"] for r in quantized.values())
    res = run("report", out, "--max-error", f"{errs[-1] * 0.999}", expect=1)
    assert len(res.stderr.splitlines()) == 1 and "max abs error" in res.stderr
    doc = _json(run("report", out, "--max-error", "0", "--format", "json", expect=1))
    assert {o["name"] for o in doc["checks"]["offenders"]} == {
        n for n, r in quantized.items() if r["max_abs_error"] > 0}
    assert all(o["metric"] == "max_abs_error" and o["limit"] == 0 for o in
               doc["checks"]["offenders"])
    # Loose thresholds pass.
    res = run("report", out, "--fail-under-sqnr", f"{finite[0] - 1}", "--max-error",
              f"{errs[-1]}", expect=0)
    assert res.stderr == ""


def test_dry_run_thresholds_name_the_scheme(ckpt):
    res = run("report", ckpt, "-s", "gnmt", "-s", "asymmetric", "--fail-under-sqnr", "1000",
              "--format", "csv", expect=1)
    assert "(gnmt): SQNR" in res.stderr and "(asymmetric): SQNR" in res.stderr


def _corrupt_manifest(out):
    (out / "qtool.json").write_text("{not json")


def _no_metrics(out):
    m = _manifest(out)
    next(t for t in m["tensors"] if "metrics" in t).pop("metrics")
    (out / "qtool.json").write_text(seal(m))


def _transposed_scale(out):
    # Same bytes, same file size, but [rows, 1] becomes [1, rows]: the shape check catches it.
    path = out / "model.scale.safetensors"
    scales = load_file(str(path))
    name = "layers.0.attn.q.weight"
    scales[name] = scales[name].reshape(1, -1)
    save_file(scales, str(path), metadata={"format": "qtool"})


def _transposed_zero_point(out):
    # The same for the U8 zero points of an asymmetric tensor.
    run("quantize", out.parent / "model.safetensors", out, "-q", "--scheme", "asymmetric",
        "--force")
    path = out / "model.zero_point.safetensors"
    zps = load_file(str(path))
    name = "layers.0.attn.q.weight"
    zps[name] = zps[name].reshape(1, -1)
    save_file(zps, str(path), metadata={"format": "qtool"})


@pytest.mark.parametrize("damage, fragment", [
    (_corrupt_manifest, "qtool.json: not valid JSON"),
    (_no_metrics, "has no metrics; pass --original"),
    (_transposed_scale, "expected F32 [32, 1]"),
    (_transposed_zero_point, "expected U8 [32, 1]"),
])
def test_bad_artifacts_exit_2(tmp_path, damage, fragment):
    _, out = _quantize(tmp_path, None, "--scheme", "symmetric")
    damage(out)
    res = run("report", out, expect=2)
    assert res.stdout == ""
    assert res.stderr.startswith("qtool: error: ") and fragment in res.stderr
    assert len(res.stderr.splitlines()) == 1 and "Traceback" not in res.stderr


def test_bad_usage_and_input_exit_2(tmp_path, ckpt):
    _, out = _quantize(tmp_path, None, "--scheme", "gnmt")
    cases = [
        (("report", tmp_path / "missing"), "no such file or directory"),
        (("report", out, "--bits", "4"), "--bits applies to a dry run"),
        (("report", out, "-s", "gnmt"), "--scheme applies to a dry run"),
        (("report", ckpt, "--original", ckpt), "--original applies to an artifact"),
        (("report", out, "--fail-under-sqnr", "nan"), "must be a finite number"),
        (("report", out, "--energy-model", tmp_path / "none.json"), "none.json: cannot read"),
        (("report", ckpt, "-s", "gnmt", "--bits", "4"), "gnmt is 8-bit only"),
        (("report", out, "--format", "yaml"), "--format"),
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    cases.append((("report", empty), "neither a qtool artifact"))
    for args, fragment in cases:
        res = run(*args, expect=2)
        assert fragment in res.stderr, (args, res.stderr)
        assert res.stdout == "" and len(res.stderr.splitlines()) == 1


@pytest.mark.parametrize("content, fragment", [
    ("{not json", "not valid JSON"),
    ("[640]", "must be a JSON object"),
    ('{"dram_read_pj": 640}', "unknown key 'dram_read_pj'"),
    ('{"int8_add_pj": -0.03}', "'int8_add_pj' must be a finite number"),
    ('{"int8_add_pj": NaN}', "not valid JSON"),
    ('{"int8_add_pj": "0.03"}', "'int8_add_pj' must be a finite number"),
])
def test_malformed_energy_model_exits_2(tmp_path, ckpt, content, fragment):
    model = tmp_path / "energy.json"
    model.write_text(content)
    res = run("report", ckpt, "--energy-model", model, expect=2)
    assert res.stderr.startswith(f"qtool: error: {model}: ") and fragment in res.stderr


# --------------------------------------------------------------------------- energy


def _expected_energy(tensors, stored, fig, int_activations=False):
    """The model of docs/ENERGY.md, by hand: pJ before/after for memory and compute (one
    token; no tensor here is a lookup table)."""
    mac = {"F32": fig["fp32_mul_pj"] + fig["fp32_add_pj"],
           "F64": fig["fp32_mul_pj"] + fig["fp32_add_pj"],
           "F16": fig["fp16_mul_pj"] + fig["fp16_add_pj"],
           "BF16": fig["fp16_mul_pj"] + fig["fp16_add_pj"]}
    int8 = fig["int8_mul_pj"] + fig["int8_add_pj"]
    per_byte = fig["dram_read_32bit_pj"] / 4
    mem_b = sum(w.nbytes for w in tensors.values()) * per_byte
    mem_a = sum(stored[n] for n in tensors) * per_byte
    comp_b = comp_a = 0.0
    codes = {np.dtype(np.float32): "F32", np.dtype(np.float64): "F64",
             np.dtype(np.float16): "F16", np.dtype(ml_dtypes.bfloat16): "BF16"}
    for n, w in tensors.items():
        code = codes.get(w.dtype)
        if code is None:
            continue
        comp_b += w.size * mac[code]
        quantized = stored[n] != w.nbytes
        comp_a += w.size * (int8 if quantized and int_activations else mac[code])
    return mem_b, mem_a, comp_b, comp_a


@pytest.mark.parametrize("model", [None, {"name": "test figures", "dram_read_32bit_pj": 100.0,
                                          "fp32_mul_pj": 2.0, "fp16_add_pj": 0.25,
                                          "int8_mul_pj": 0.5}])
@pytest.mark.parametrize("int_act", [False, True])
def test_energy_recomputed_from_the_model(tmp_path, model, int_act):
    tensors = make_tensors()
    _, out = _quantize(tmp_path, tensors, "--scheme", "gnmt")
    fig = {"dram_read_32bit_pj": 640.0, "fp32_mul_pj": 3.7, "fp32_add_pj": 0.9,
           "fp16_mul_pj": 1.1, "fp16_add_pj": 0.4, "int8_mul_pj": 0.2, "int8_add_pj": 0.03}
    args = ["--int-activations"] if int_act else []
    if model is not None:
        (tmp_path / "model.json").write_text(json.dumps(model))
        args += ["--energy-model", tmp_path / "model.json"]
        fig.update({k: v for k, v in model.items() if k != "name"})
    doc = _json(run("report", out, "--format", "json", *args))
    stored = {t["name"]: t["results"]["artifact"]["quantized_bytes"] for t in doc["tensors"]}
    mem_b, mem_a, comp_b, comp_a = _expected_energy(tensors, stored, fig, int_act)
    e = doc["groups"][0]["energy"]
    assert e["memory"]["before_pj"] == pytest.approx(mem_b)
    assert e["memory"]["after_pj"] == pytest.approx(mem_a)
    assert e["compute"]["before_pj"] == pytest.approx(comp_b)
    assert e["compute"]["after_pj"] == pytest.approx(comp_a)
    assert e["total"]["before_pj"] == pytest.approx(mem_b + comp_b)
    assert e["total"]["saving_percent"] == pytest.approx(
        100 * ((mem_b + comp_b) - (mem_a + comp_a)) / (mem_b + comp_b))
    assert e["memory"]["saving_percent"] == pytest.approx(100 * (mem_b - mem_a) / mem_b)
    assert {k: doc["energy_model"][k] for k in fig} == fig
    assert doc["workload"]["int_activations"] is int_act
    if model is not None:
        assert doc["energy_model"]["name"] == "test figures"
    assert any(f"DRAM {fig['dram_read_32bit_pj']:g} pJ" in a
               for a in doc["energy_assumptions"])
    # The figures in use, written back as a model file, give the same estimate.
    (tmp_path / "echo.json").write_text(json.dumps(doc["energy_model"]))
    again = _json(run("report", out, "--format", "json", "--energy-model",
                      tmp_path / "echo.json", *args[:1 if int_act else 0]))
    assert again["groups"][0]["energy"] == e


# --------------------------------------------------------------------------- dry run


def _symmetric(w):
    absmax = np.abs(w).max(axis=1, keepdims=True).astype(np.float64)
    s = np.where(absmax == 0, 1.0, absmax / 127).astype(np.float32)
    q = np.clip(np.rint(w / s), -128, 127)
    # int8 values, a float32 scale per row and one (0-d) zero point
    return (s * q.astype(np.float32)).astype(np.float32), w.size + 4 * w.shape[0] + 1


def _asymmetric(w):
    lo = np.minimum(w.min(axis=1, keepdims=True), 0).astype(np.float64)
    hi = np.maximum(w.max(axis=1, keepdims=True), 0).astype(np.float64)
    span = (hi - lo) / 255
    s = np.where(span == 0, 1.0, span).astype(np.float32)
    z = np.clip(np.rint(-lo / s.astype(np.float64)), 0, 255).astype(np.float32)
    q = np.clip(np.rint(w / s) + z, 0, 255)
    # uint8 values, a float32 scale and a uint8 zero point per row
    return (s * (q - z)).astype(np.float32), w.size + 5 * w.shape[0]


def test_dry_run_compares_two_schemes_and_writes_nothing(tmp_path):
    rng = np.random.default_rng(3)
    tensors = {
        "a.weight": rng.normal(0, 0.05, (16, 24)).astype(np.float32),
        "b.weight": rng.uniform(0.0, 1.0, (8, 32)).astype(np.float32) + 0.5,  # skewed
        "b.bias": rng.normal(size=8).astype(np.float32),
        "z.weight": np.zeros((4, 4), np.float32),
    }
    d = tmp_path / "ckpt"
    d.mkdir()
    src = write_checkpoint(d / "m.safetensors", tensors)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    res = run("report", src, "--scheme", "symmetric", "--scheme", "asymmetric",
              "--format", "json")
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written
    doc = _json(res)
    assert doc["kind"] == "dry-run" and doc["metrics_from"] == "dry-run"
    assert [g["label"] for g in doc["groups"]] == ["symmetric", "asymmetric"]
    sig = {"symmetric": 0.0, "asymmetric": 0.0}
    err = dict(sig)
    for t in doc["tensors"]:
        w = tensors[t["name"]]
        if w.ndim == 1:
            assert t["best"] is None
            for r in t["results"].values():
                assert r["passthrough"] == "1-D tensor (bias or norm)"
            continue
        sqnr = {}
        for label, ref in (("symmetric", _symmetric), ("asymmetric", _asymmetric)):
            w_hat, nbytes = ref(w)
            want = _metrics(w, w_hat)
            r = t["results"][label]
            assert r["scheme"] == label and r["quantized_bytes"] == nbytes
            _assert_metrics(r, want)
            sqnr[label] = want["sqnr_db"]
            sig[label] += want["signal"]
            err[label] += want["error"]
        if sqnr["symmetric"] != sqnr["asymmetric"]:
            assert t["best"] == max(sqnr, key=sqnr.get)
        else:  # both exact (the zero tensor): same bytes, the first scheme given wins
            assert t["best"] == "symmetric"
    # asymmetric wins clearly on the skewed, all-positive tensor
    b = next(t for t in doc["tensors"] if t["name"] == "b.weight")
    assert b["best"] == "asymmetric"
    for g in doc["groups"]:
        assert g["totals"]["sqnr_db"] == pytest.approx(
            10 * math.log10(sig[g["label"]] / err[g["label"]]), abs=1e-3)
    # The table marks the best per tensor.
    table = run("report", src, "-s", "symmetric", "-s", "asymmetric").stdout
    assert "★" in table and "dry run" in table


def test_dry_run_marks_what_a_scheme_cannot_do(ckpt):
    doc = _json(run("report", ckpt, "-s", "symmetric-unsigned", "-s", "gnmt",
                    "--format", "json"))
    q = next(t for t in doc["tensors"] if t["name"] == "layers.0.attn.q.weight")
    assert q["results"]["symmetric-unsigned"]["quantized"] is False
    assert "negative values" in q["results"]["symmetric-unsigned"]["passthrough"]
    assert q["results"]["gnmt"]["quantized"] is True and q["best"] == "gnmt"
    assert "n/a" in run("report", ckpt, "-s", "symmetric-unsigned", "-s", "gnmt").stdout


def test_dry_run_with_nan_exits_2_naming_the_tensor(tmp_path):
    w = np.ones((4, 4), np.float32)
    w[1, 2] = np.nan
    src = write_checkpoint(tmp_path / "m.safetensors", {"bad.weight": w})
    res = run("report", src, expect=2)
    assert "'bad.weight'" in res.stderr and "1 NaN/inf value" in res.stderr


def test_dry_run_of_the_sample_checkpoint_runs():
    doc = _json(run("report", SAMPLE, "-s", "gnmt", "-s", "asymmetric", "--format", "json"))
    assert doc["tensors_total"] == 23
    assert all(g["totals"]["quantized"] == 17 for g in doc["groups"])


# --------------------------------------------------------------------------- --original


def test_original_recomputes_against_the_file(tmp_path):
    tensors = make_tensors()
    # One metadata key: the safetensors library writes several in a random order, and the
    # header bytes (hence their digest) would differ between two saves of the same layout.
    src = write_checkpoint(tmp_path / "model.safetensors", tensors, {"format": "pt"})
    out = tmp_path / "model-q"
    run("quantize", src, out, "--quiet", "--scheme", "asymmetric")
    stored = _json(run("report", out, "--format", "json"))
    again = _json(run("report", out, "--original", src, "--format", "json"))
    assert again["metrics_from"] == "original" and again["original"] == str(src)
    for a, b in zip(stored["tensors"], again["tensors"], strict=True):
        ra, rb = a["results"]["artifact"], b["results"]["artifact"]
        if ra["quantized"]:
            assert _sqnr(rb["sqnr_db"]) == pytest.approx(_sqnr(ra["sqnr_db"]), abs=1e-3)
    # Same header and size, other values (no --source-digest, so only the header is checked):
    # the figures are measured against this file, not copied from the manifest.
    other = {k: np.asarray(v * 1.01).astype(v.dtype) if v.dtype.kind == "f" else v
             for k, v in tensors.items()}
    moved = write_checkpoint(tmp_path / "renamed.safetensors", other, {"format": "pt"})
    doc = _json(run("report", out, "--original", moved, "--format", "json"))
    manifest = {e["name"]: e for e in _manifest(out)["tensors"]}
    for t in doc["tensors"]:
        r = t["results"]["artifact"]
        if r["quantized"]:
            want = _metrics(other[t["name"]], _restore(out, "model", manifest[t["name"]]))
            _assert_metrics(r, want)


def test_original_that_is_not_the_source_exits_2(tmp_path):
    tensors = make_tensors()
    src = write_checkpoint(tmp_path / "model.safetensors", tensors, {"format": "pt"})
    out = tmp_path / "model-q"
    run("quantize", src, out, "--quiet", "--scheme", "gnmt", "--source-digest")
    # a different size
    bigger = write_checkpoint(tmp_path / "bigger.safetensors",
                              {**tensors, "extra": np.zeros(3, np.float32)}, {"format": "pt"})
    res = run("report", out, "--original", bigger, expect=2)
    assert "bigger.safetensors: size" in res.stderr and "is this the original?" in res.stderr
    # the same size, another header (a tensor renamed to a name of the same length)
    renamed = {("layers.0.attn.k.weight" if k == "layers.0.attn.q.weight" else k): v
               for k, v in tensors.items()}
    other = write_checkpoint(tmp_path / "other.safetensors", renamed, {"format": "pt"})
    assert other.stat().st_size == src.stat().st_size
    res = run("report", out, "--original", other, expect=2)
    assert "header blake3" in res.stderr
    # the same header, one value changed: only the full digest (--source-digest) tells
    data = bytearray(src.read_bytes())
    data[-1] ^= 0x01
    changed = tmp_path / "changed.safetensors"
    changed.write_bytes(bytes(data))
    res = run("report", out, "--original", changed, expect=2)
    assert "blake3 differs" in res.stderr and res.stdout == ""


# --------------------------------------------------------------------------- sharded


def test_sharded_artifact_totals_cover_every_shard(tmp_path):
    rng = np.random.default_rng(5)
    s1 = {"embed.weight": rng.normal(size=(16, 8)).astype(np.float32),
          "layers.0.w": rng.normal(size=(8, 8)).astype(np.float32)}
    s2 = {"layers.1.w": rng.normal(size=(8, 8)).astype(np.float16),
          "norm.weight": np.ones(8, np.float32)}
    d = tmp_path / "ckpt"
    d.mkdir()
    save_file(s1, str(d / "model-00001-of-00002.safetensors"))
    save_file(s2, str(d / "model-00002-of-00002.safetensors"))
    wm = {**{k: "model-00001-of-00002.safetensors" for k in s1},
          **{k: "model-00002-of-00002.safetensors" for k in s2}}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {},
                                                                "weight_map": wm}))
    out = tmp_path / "q"
    run("quantize", d, out, "--scheme", "gnmt", "--quiet")
    doc = _json(run("report", out, "--format", "json"))
    tensors = {**s1, **s2}
    tot = doc["groups"][0]["totals"]
    assert tot["tensors"] == 4 and tot["quantized"] == 3
    assert tot["bytes_before"] == sum(w.nbytes for w in tensors.values())
    manifest = {e["name"]: e for e in _manifest(out)["tensors"]}
    sig = err = 0.0
    for name, w in tensors.items():
        if w.ndim == 2:
            m = _metrics(w, _restore(out, manifest[name]["file"][:-len(".safetensors")],
                                     manifest[name]))
            sig, err = sig + m["signal"], err + m["error"]
    assert tot["sqnr_db"] == pytest.approx(10 * math.log10(sig / err), abs=1e-3)
    again = _json(run("report", out, "--original", d, "--format", "json"))
    assert again["groups"][0]["totals"]["sqnr_db"] == pytest.approx(tot["sqnr_db"], abs=1e-3)


def test_control_characters_in_names_reach_no_terminal(tmp_path):
    evil = "layers.0.\x1b[2J.weight"
    rng = np.random.default_rng(2)
    tensors = {evil: rng.normal(size=(2, 3)).astype(np.float32),
               "b.weight": rng.normal(size=(2, 3)).astype(np.float32)}
    _, out = _quantize(tmp_path, tensors, "--scheme", "gnmt")
    for fmt in ("table", "markdown"):
        text = run("report", out, "--format", fmt).stdout
        assert "\x1b" not in text and "\\x1b[2J" in text
    res = run("report", out, "--fail-under-sqnr", "1000", expect=1)
    assert "\x1b" not in res.stderr and "\\x1b[2J" in res.stderr
    assert _json(run("report", out, "--format", "json"))["tensors"][0]["name"] in tensors


def test_original_with_a_nan_scale_exits_2(tmp_path):
    src = write_checkpoint(tmp_path / "model.safetensors", None, {"format": "pt"})
    out = tmp_path / "q"
    run("quantize", src, out, "--quiet")
    path = out / "model.scale.safetensors"
    scales = load_file(str(path))
    scales["head.weight64"][3, 0] = np.nan  # same size: only the values can tell
    save_file(scales, str(path), metadata={"format": "qtool"})
    res = run("report", out, "--original", src, "--format", "json", expect=2)
    # the scales are checked as they are read: the file and tensor named, called corrupt
    assert f"{path}: tensor 'head.weight64': 1 of " in res.stderr and res.stdout == ""
    assert "scales are not finite and > 0; the artifact is corrupt" in res.stderr


def test_dry_run_takes_recipe_and_nan_policy(tmp_path):
    from tests.conftest import write_checkpoint

    rng = np.random.default_rng(4)
    bad = rng.normal(size=(8, 8)).astype(np.float32)
    bad[2, 3] = np.nan
    src = write_checkpoint(tmp_path / "m.safetensors", {
        "a.mlp.weight": rng.normal(size=(8, 64)).astype(np.float32),
        "a.attn.weight": rng.normal(size=(8, 8)).astype(np.float32),
        "bad.weight": bad,
    })
    r = run("report", src, "--format", "json", expect=2)
    assert "bad.weight" in r.stderr and "1 NaN/inf value" in r.stderr
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[rule]]\nmatch = "*.mlp.*"\nbits = 4\ngranularity = "group"\n'
                      'group_size = 16\n')
    doc = json.loads(run("report", src, "--format", "json", "--recipe", recipe,
                         "--nan-policy", "skip").stdout)
    rows = {t["name"]: t for t in doc["tensors"]}
    mlp = rows["a.mlp.weight"]["results"]["symmetric"]
    assert (mlp["bits"], mlp["granularity"], mlp["group_size"]) == (4, "group", 16)
    assert rows["a.attn.weight"]["results"]["symmetric"]["bits"] == 8
    assert "NaN" in rows["bad.weight"]["results"]["symmetric"]["passthrough"]
    # packed 4-bit: 8 rows x 32 bytes, plus 8 x 4 float32 scales and one 0-d zero point
    assert mlp["quantized_bytes"] == 8 * 32 + 8 * 4 * 4 + 1


@pytest.mark.parametrize("args", [(), ("--scheme", "asymmetric", "--bits", "4",
                                       "--granularity", "group", "--group-size", "2")])
@pytest.mark.parametrize("width", [60, 120])
def test_a_large_table_drawn_in_chunks_reads_as_the_whole_table(tmp_path, monkeypatch, args,
                                                                width):
    """Above LARGE_TABLE rows the table is built and printed a chunk at a time (bounded
    memory for 100,000 tensors); its text is the one table's, colours included."""
    from qtool.formats.native import Artifact
    from qtool.report import tables

    rng = np.random.default_rng(3)
    tensors = {f"model.layers.{i}.mlp.{'up' if i % 2 else 'down'}_proj.weight":
               (rng.standard_normal((3 + i % 4, 8)) * 10.0 ** (i % 5 - 2)).astype(np.float32)
               for i in range(23)}
    tensors["model.norm.weight"] = np.ones(8, np.float32)
    src, out = _quantize(tmp_path, tensors, *args)
    report = artifact_report(out, Artifact.open(out).manifest.tensors)

    def render(parts) -> str:
        buf = io.StringIO()
        console = Console(file=buf, force_terminal=True, color_system="standard", width=width)
        for part in parts:
            console.print(part)
        return buf.getvalue()

    for show_all in (False, True):
        whole = render([render_report(report, "sqnr", width=width, show_all=show_all)])
        monkeypatch.setattr(tables, "LARGE_TABLE", 5)
        monkeypatch.setattr(tables, "_CHUNK", 4)
        chunked = render(tables.render_report_parts(report, "sqnr", width=width,
                                                    show_all=show_all))
        monkeypatch.undo()
        assert chunked == whole
        assert sum("model" not in ln and "proj" in ln for ln in whole.splitlines()) >= 23
