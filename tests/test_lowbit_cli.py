"""Bit widths 2..8, bit packing, group-wise scales and range setting, through the CLI on real
files. Every check reads the files qtool wrote with the safetensors library (or by hand) and
recomputes the expected values here with numpy from the formulas in README.md and
docs/FORMAT.md; packed integers are unpacked by a reader written from docs/FORMAT.md's
*Packing* section alone, not with qtool.core.packing."""

from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from tests.conftest import ROOT, SAMPLE, header, run, write_checkpoint

SCHEMES = ("symmetric", "symmetric-unsigned", "asymmetric")


# --------------------------------------------------------------------------- helpers


def read_packed(buf: np.ndarray, bits: int, cols: int, signed: bool) -> np.ndarray:
    """docs/FORMAT.md, *Packing*: a row's bytes read as one little-endian integer N hold
    value j at (N >> j*b) & (2^b - 1); padding bits are 0; signed codes are two's complement.
    """
    rows, nbytes = buf.shape
    assert nbytes == -(-cols * bits // 8)
    mask = (1 << bits) - 1
    out = np.empty((rows, cols), np.int64)
    for r in range(rows):
        n = int.from_bytes(buf[r].tobytes(), "little")
        assert n >> (cols * bits) == 0, f"row {r}: padding bits are not zero"
        codes = [(n >> (j * bits)) & mask for j in range(cols)]
        if signed:
            codes = [c - (1 << bits) if c >> (bits - 1) else c for c in codes]
        out[r] = codes
    return out


def load(path: Path) -> dict[str, np.ndarray]:
    with safe_open(str(path), "numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def manifest(out: Path) -> dict[str, dict]:
    return {t["name"]: t for t in json.loads((out / "qtool.json").read_text())["tensors"]}


def q_limits(scheme: str, bits: int) -> tuple[int, int]:
    if scheme == "symmetric":
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def expected_q(w: np.ndarray, scheme: str, bits: int) -> tuple[np.ndarray, ...]:
    """README's formulas, per row (channel), minmax: (q, scale, zero_point), q as float."""
    cdt = np.float64 if w.dtype == np.float64 else np.float32
    w = w.reshape(w.shape[0], -1).astype(cdt)
    qmin, qmax = q_limits(scheme, bits)
    mn = w.min(axis=1, keepdims=True).astype(np.float64)
    mx = w.max(axis=1, keepdims=True).astype(np.float64)
    if scheme == "symmetric":
        lo, span = None, np.maximum(mx, -mn) / qmax
    elif scheme == "symmetric-unsigned":
        lo, span = None, np.maximum(mx, 0) / qmax
    else:
        lo, hi = np.minimum(mn, 0), np.maximum(mx, 0)
        span = (hi - lo) / qmax
    s = np.where(span == 0, 1.0, span).astype(np.float32)  # a zero range gets scale 1
    z = np.zeros(s.shape, np.int32) if lo is None else \
        np.clip(np.rint(-lo / s.astype(np.float64)), 0, qmax).astype(np.int32)
    q = np.clip(np.rint(w / s.astype(cdt)) + z.astype(cdt), qmin, qmax)
    return q, s, z


def low_bit_tensors(unsigned: bool) -> dict[str, np.ndarray]:
    """Row lengths that leave a partly used last byte at every odd width, a 4-D conv, a
    zero row, float64, and tensors that are passed through."""
    rng = np.random.default_rng(4)
    t = {
        "a.weight": rng.normal(0, 0.05, (5, 13)).astype(np.float32),
        "conv.weight": rng.normal(0, 0.1, (6, 3, 3, 3)).astype(np.float32),
        "b.weight": rng.standard_t(3, (16, 40)).astype(np.float32),
        "zero_row.weight": rng.normal(0, 1, (3, 9)).astype(np.float32),
        "w64.weight": rng.normal(0, 0.05, (4, 11)),
    }
    t["zero_row.weight"][1] = 0.0
    if unsigned:
        t = {k: np.abs(v) for k, v in t.items()}
    t["a.bias"] = rng.normal(0, 0.01, (5,)).astype(np.float32)
    t["ids"] = np.arange(6, dtype=np.int64).reshape(2, 3)
    return t


def _quantize(tmp_path: Path, tensors: dict[str, np.ndarray], *args: str) -> Path:
    src = write_checkpoint(tmp_path / "m.safetensors", tensors)
    out = tmp_path / "out"
    run("quantize", src, out, *args, "-q")
    return out


# --------------------------------------------------------------------------- every width


def test_reader_matches_the_documented_examples():
    # The worked examples of docs/FORMAT.md, decoded by the test's reader.
    ex = [(4, True, [0xE1, 0x07], [1, -2, 7]), (2, False, [0xE4, 0x03], [0, 1, 2, 3, 3]),
          (3, False, [0x9D, 0x01], [5, 3, 6])]
    doc = (ROOT / "docs" / "FORMAT.md").read_text()
    for bits, signed, data, values in ex:
        buf = np.array([data], np.uint8)
        assert read_packed(buf, bits, len(values), signed).tolist() == [values]
        assert " ".join(f"0x{b:02X}" for b in data) in doc


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_width_round_trips_with_q_in_range(tmp_path, scheme, bits):
    tensors = low_bit_tensors(unsigned=scheme == "symmetric-unsigned")
    out = _quantize(tmp_path, tensors, "--scheme", scheme, "--bits", str(bits))
    restored_path = tmp_path / "restored.safetensors"
    run("dequantize", out, restored_path, "-q")
    stored, scales, zps = (load(out / f"m{s}.safetensors") for s in ("", ".scale", ".zero_point"))
    restored = load(restored_path)
    m = manifest(out)
    qmin, qmax = q_limits(scheme, bits)
    quantized = [k for k in tensors if k.endswith(".weight")]
    assert sorted(scales) == sorted(quantized)
    for name in quantized:
        w = tensors[name]
        rows, cols = w.shape[0], int(np.prod(w.shape[1:]))
        t = m[name]
        assert (t["bits"], t["scheme"], t["shape"]) == (bits, scheme, list(w.shape))
        if bits < 8:
            assert t["packed"] is True and t["quantized_dtype"] == "U8"
            assert stored[name].dtype == np.uint8
            assert stored[name].shape == (rows, -(-cols * bits // 8)) == tuple(t["stored_shape"])
            q = read_packed(stored[name], bits, cols, signed=scheme == "symmetric")
        else:
            assert t["packed"] is False and stored[name].shape == w.shape
            assert stored[name].dtype == (np.int8 if scheme == "symmetric" else np.uint8)
            q = stored[name].reshape(rows, cols).astype(np.int64)
        assert q.min() >= qmin and q.max() <= qmax, name
        q_exp, s_exp, z_exp = expected_q(w, scheme, bits)
        np.testing.assert_array_equal(q, q_exp, err_msg=name)
        np.testing.assert_array_equal(scales[name], s_exp, err_msg=name)
        np.testing.assert_array_equal(zps[name], z_exp, err_msg=name)
        # minmax uses the whole grid: a nonzero row's largest |w| maps to qmax (symmetric
        # schemes); asymmetric maps the row's min to 0 (or, if min >= 0, its max to qmax).
        nonzero = np.abs(w.reshape(rows, cols)).max(axis=1) > 0
        if scheme == "asymmetric":
            ends = np.where(w.reshape(rows, cols).min(axis=1) < 0, q.min(axis=1) == 0,
                            q.max(axis=1) == qmax)
        else:
            ends = np.abs(q).max(axis=1) == qmax
        assert ends[nonzero].all(), name
        # dequantize gives exactly scale * (q - zero_point), in the input's dtype.
        cdt = np.float64 if w.dtype == np.float64 else np.float32
        w_hat = (s_exp.astype(cdt) * (q.astype(cdt) - z_exp.astype(cdt))).reshape(w.shape)
        assert restored[name].dtype == w.dtype
        np.testing.assert_array_equal(restored[name], w_hat, err_msg=name)
        # minmax clips nothing: each value is within one step (half a step when z = 0).
        err = np.abs(w - restored[name]).reshape(rows, cols)
        step = s_exp.astype(np.float64) * (1.0 if scheme == "asymmetric" else 0.5 + 1e-6)
        assert (err <= step).all(), name
    for name in ("a.bias", "ids"):
        assert stored[name].tobytes() == tensors[name].tobytes()
        assert restored[name].tobytes() == tensors[name].tobytes()


@pytest.mark.parametrize("bits", range(2, 9))
def test_packed_file_sizes_are_exact(tmp_path, bits):
    tensors = low_bit_tensors(unsigned=False)
    out = _quantize(tmp_path, tensors, "--scheme", "asymmetric", "--bits", str(bits))
    h = header(out / "m.safetensors")
    m = manifest(out)
    data_bytes = 0
    for name, w in tensors.items():
        off = h[name]["data_offsets"]
        nbytes = off[1] - off[0]
        if name.endswith(".weight"):
            rows, cols = w.shape[0], int(np.prod(w.shape[1:]))
            expected = rows * -(-cols * bits // 8)  # rows × ceil(cols·bits/8)
            assert h[name]["dtype"] == "U8"  # asymmetric: U8 packed or not
            assert h[name]["shape"] == ([rows, -(-cols * bits // 8)] if bits < 8
                                       else list(w.shape))
            # a float32 scale and a U8 zero point (its low `bits` bits, one byte) per row
            assert m[name]["bytes"] == {"original": w.nbytes, "stored": expected + rows * 5}
        else:
            expected = w.nbytes
        assert nbytes == expected, name
        data_bytes += nbytes
    # The file holds nothing but the header and these bytes.
    hlen = int.from_bytes((out / "m.safetensors").read_bytes()[:8], "little")
    assert (out / "m.safetensors").stat().st_size == 8 + hlen + data_bytes


def test_four_and_two_bit_sample_weights_are_really_smaller(tmp_path):
    sizes = {}
    for bits in (8, 4, 2):
        out = tmp_path / f"o{bits}"
        run("quantize", SAMPLE, out, "--bits", str(bits), "-q")
        h = header(out / "sample.safetensors")
        m = manifest(out)
        q = [n for n, t in m.items() if "passthrough" not in t]
        sizes[bits] = sum(h[n]["data_offsets"][1] - h[n]["data_offsets"][0] for n in q)
        # symmetric per channel: a scale per row (float32, or 2 bytes for F16/BF16 tensors
        # under --scale-dtype auto) and one 0-d zero point
        assert sum(m[n]["bytes"]["stored"] for n in q) == sizes[bits] + sum(
            (2 if m[n]["dtype"] in ("F16", "BF16") else 4) * m[n]["shape"][0] + 1 for n in q)
    # Every quantized sample tensor has an even number of columns (and a multiple of 4).
    assert sizes[4] * 2 == sizes[8] and sizes[2] * 4 == sizes[8]


def test_format_md_loader_reads_packed_artifacts(tmp_path):
    """The numpy loader printed in docs/FORMAT.md, run in a fresh interpreter on packed
    artifacts of every width and granularity, gives what `qtool dequantize` gives."""
    text = (ROOT / "docs" / "FORMAT.md").read_text()
    (src,) = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "def load_qtool" in b]
    tensors = {k: v for k, v in low_bit_tensors(False).items() if k != "w64.weight"}
    cases = []
    for i, (scheme, bits, gran) in enumerate(
            [("symmetric", 2, "channel"), ("asymmetric", 3, "group"), ("symmetric", 4, "group"),
             ("asymmetric", 5, "tensor"), ("symmetric", 6, "channel"),
             ("asymmetric", 7, "group"), ("symmetric", 8, "group")]):
        d = tmp_path / str(i)
        d.mkdir()
        out = _quantize(d, tensors, "--scheme", scheme, "--bits", str(bits), "--granularity",
                        gran, "--group-size", "4")
        run("dequantize", out, d / "r.safetensors", "-q")
        cases.append((str(out), load(d / "r.safetensors")))
    script = src + (
        "\nimport sys, pickle\n"
        "res = [load_qtool(a, 'm') for a in sys.argv[1:]]\n"
        "sys.stdout.buffer.write(pickle.dumps([{k: np.asarray(v) for k, v in r.items()} "
        "for r in res]))\n"
    )
    p = subprocess.run([sys.executable, "-c", script, *(c[0] for c in cases)],
                       capture_output=True, check=True)
    for (out, expected), got in zip(cases, pickle.loads(p.stdout), strict=True):
        assert set(got) == set(expected)
        for name, w in expected.items():
            np.testing.assert_array_equal(np.asarray(got[name], w.dtype), w,
                                          err_msg=f"{out} {name}")


# --------------------------------------------------------------------------- group-wise


def test_group_sidecars_and_shorter_last_group(tmp_path):
    rng = np.random.default_rng(7)
    w = rng.normal(0, 1, (4, 2, 5)).astype(np.float32)  # rows 4, cols 10: groups 4, 4, 2
    w[2, 1, 3:] = 40.0  # a big value in the short last group of row 2 only
    out = _quantize(tmp_path, {"w": w}, "--bits", "4", "--granularity", "group",
                    "--group-size", "4")
    scales = load(out / "m.scale.safetensors")["w"]
    assert scales.shape == (4, 3) and manifest(out)["w"]["param_shape"] == [4, 3]
    w2 = w.reshape(4, 10)
    for j, cols in enumerate([slice(0, 4), slice(4, 8), slice(8, 10)]):
        exp = (np.abs(w2[:, cols]).max(axis=1).astype(np.float64) / 7).astype(np.float32)
        np.testing.assert_array_equal(scales[:, j], exp)
    assert scales[2, 2] == np.float32(40.0 / 7) and scales[2, 1] < 1  # the outlier stays put
    q = read_packed(load(out / "m.safetensors")["w"], 4, 10, signed=True)
    s_full = np.repeat(scales, 4, axis=1)[:, :10]
    np.testing.assert_array_equal(q, np.clip(np.rint(w2 / s_full), -8, 7))


def _errors(original: Path, restored: Path) -> dict[str, np.ndarray]:
    """Per-element squared error, (rows, cols), of every quantized tensor, in float64.

    ``restored`` was written with --dtype float32, so its float tensors of two or more
    dimensions (those quantized) are float32 and the others keep their dtype (int64)."""
    a, b = load(original), load(restored)
    return {k: ((b[k].astype(np.float64) - a[k].astype(np.float64)) ** 2)
            .reshape(a[k].shape[0], -1) for k in a if b[k].ndim >= 2 and b[k].dtype == np.float32}


def _quantize_restore(tmp_path: Path, src: Path, tag: str, *args: str) -> Path:
    out = tmp_path / tag
    run("quantize", src, out, *args, "-q")
    run("dequantize", out, tmp_path / f"{tag}.safetensors", "--dtype", "float32", "-q")
    return tmp_path / f"{tag}.safetensors"


@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
def test_group_error_at_most_channel_error_at_4_bits_on_sample(tmp_path, scheme):
    base = ("--scheme", scheme, "--bits", "4")
    chan = _errors(SAMPLE, _quantize_restore(tmp_path, SAMPLE, "c", *base))
    for g in ("128", "32"):
        grp = _errors(SAMPLE, _quantize_restore(tmp_path, SAMPLE, f"g{g}", *base,
                                                "--granularity", "group", "--group-size", g))
        assert grp.keys() == chan.keys() and len(grp) == 17
        for name in chan:
            if name.endswith("lora_delta"):  # all zeros: exact either way
                assert chan[name].sum() == grp[name].sum() == 0
                continue
            assert grp[name].sum() <= chan[name].sum(), (g, name)
        total_c = sum(e.sum() for e in chan.values())
        total_g = sum(e.sum() for e in grp.values())
        # Groups of 32 are a real gain on these weights (outlier rows and values).
        assert total_g < total_c * (0.9 if g == "32" else 1.0), (g, total_g, total_c)


# --------------------------------------------------------------------------- range setting


def test_percentile_scales_are_the_percentile_of_abs_w(tmp_path):
    w = np.random.default_rng(9).standard_t(3, (8, 300)).astype(np.float32)
    out = _quantize(tmp_path, {"w": w}, "--bits", "4", "--range", "percentile",
                    "--percentile", "99")
    s = load(out / "m.scale.safetensors")["w"][:, 0]
    a = np.minimum(np.percentile(np.abs(w).astype(np.float64), 99, axis=1),
                   np.abs(w).max(axis=1))
    np.testing.assert_array_equal(s, (a / 7).astype(np.float32))
    t = manifest(out)["w"]
    assert (t["range"], t["percentile"]) == ("percentile", 99.0)


def _sqnr(w: np.ndarray, w_hat: np.ndarray) -> float:
    w, w_hat = w.astype(np.float64), w_hat.astype(np.float64)
    return 10 * np.log10((w**2).sum() / ((w_hat - w) ** 2).sum())


def test_mse_never_worse_than_minmax_on_any_range_of_sample(tmp_path):
    for args in (("--bits", "4"), ("--bits", "3", "--scheme", "asymmetric"),
                 ("--bits", "4", "--granularity", "group", "--group-size", "32")):
        tag = "-".join(a.strip("-") for a in args)
        mm = _errors(SAMPLE, _quantize_restore(tmp_path, SAMPLE, f"mm{tag}", *args))
        ms = _errors(SAMPLE, _quantize_restore(tmp_path, SAMPLE, f"ms{tag}", *args,
                                               "--range", "mse"))
        gained = 0
        for name in mm:
            g = 32 if "group" in args else mm[name].shape[1]
            # Per range: a row (channel), or a group of 32 (every sample row is a multiple).
            e_mm = mm[name].reshape(mm[name].shape[0], -1, g).sum(axis=2)
            e_ms = ms[name].reshape(e_mm.shape[0], -1, g).sum(axis=2)
            assert (e_ms <= e_mm * (1 + 1e-9)).all(), (args, name)
            gained += int((e_ms < e_mm * (1 - 1e-6)).sum())
        assert gained > 100, args  # and it really searches: most ranges improve


def test_mse_gains_a_db_over_minmax_on_student_t_through_cli(tmp_path):
    w = np.random.default_rng(3).standard_t(3, (128, 512)).astype(np.float32)
    src = write_checkpoint(tmp_path / "t.safetensors", {"w": w})
    res = {}
    for rng in ("minmax", "mse"):
        restored = load(_quantize_restore(tmp_path, src, rng, "--bits", "4", "--range", rng))
        res[rng] = _sqnr(w, restored["w"])
        recorded = manifest(tmp_path / rng)["w"]["metrics"]["sqnr_db"]
        assert recorded == pytest.approx(res[rng], abs=1e-6)
    assert res["mse"] - res["minmax"] >= 1.0, res


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("args, fragment", [
    (["--scheme", "gnmt", "--bits", "4"], "gnmt is 8-bit only"),
    (["--bits", "9"], "'--bits'"),
    (["--bits", "1"], "'--bits'"),
    (["--granularity", "group", "--group-size", "0"], "'--group-size'"),
    (["--range", "percentile", "--percentile", "20"], "percentile must be in (50, 100]"),
])
def test_bad_low_bit_options_exit_2_nothing_written(tmp_path, ckpt, args, fragment):
    out = tmp_path / "out"
    r = run("quantize", ckpt, out, *args, expect=2)
    assert r.stdout == "" and r.stderr.startswith("qtool: error: ")
    assert r.stderr.count("\n") == 1 and fragment in r.stderr, r.stderr
    assert not out.exists()
