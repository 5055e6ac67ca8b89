"""Tensors with one huge row (issue 15, "One-row tensors"): the artifact of a one-row tensor
is exactly what core.quant.quantize makes of it in memory, `report --original` measures it
in column chunks (bounded memory, peak RSS of a real child process checked), and the figures
of ordinary tensors are those of the earlier row-block measurement, bit for bit."""

from __future__ import annotations

import json
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from qtool.core.metrics import ErrorStats
from qtool.core.quant import dequantize, quantize
from qtool.core.schemes import QuantSpec
from qtool.pipeline import measure
from qtool.pipeline.measure import measure_artifact
from tests.conftest import run

# The peak resident memory of one qtool command run as a child of a small helper process
# (RUSAGE_CHILDREN of the helper: only that command, not whatever pytest ran before).
_PEAK = ("import resource, subprocess, sys\n"
         "p = subprocess.run([sys.executable, '-m', 'qtool', *sys.argv[1:]],"
         " stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)\n"
         "assert p.returncode == 0, p.stderr.decode()\n"
         "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")


def _peak_kb(*args: object) -> int:
    p = subprocess.run([sys.executable, "-c", _PEAK, *map(str, args)], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return int(p.stdout)


def _old_stats(w: np.ndarray, w_hat: np.ndarray) -> ErrorStats:
    """The measurement before column chunks: runs of max(1, 2^18 // cols) whole rows (float32
    values, bfloat16 widened), ErrorStats.between per run, merged in order."""
    rows = w.shape[0]
    w2, h2 = w.reshape(rows, -1), w_hat.reshape(rows, -1)
    step = max(1, (1 << 18) // max(w2.shape[1], 1))
    stats = ErrorStats()
    for i in range(0, rows, step):
        stats = stats.merge(ErrorStats.between(w2[i:i + step], h2[i:i + step]))
    return stats


def _measured(out, src, jobs: int = 2) -> dict[str, ErrorStats]:
    return {r.record.name: r.record.stats for r in measure_artifact(out, src, jobs)
            if r.record.spec is not None}


@pytest.mark.parametrize("args", [
    (),
    ("--scheme", "asymmetric", "--granularity", "group", "--group-size", "100"),
    ("--granularity", "tensor", "--bits", "4"),
    ("--scheme", "asymmetric", "--range", "percentile", "--bits", "3"),
])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_one_row_artifact_is_the_in_memory_quantization(tmp_path, args, dtype):
    # float16: the streamed run widens the one long row itself (to spare a copy) and must
    # still take the numpy path, bytes and figures as in memory.
    rng = np.random.default_rng(3)
    w = rng.standard_normal((1, 1_100_001)).astype(dtype)
    src = tmp_path / "m.safetensors"
    save_file({"w": w}, str(src))
    out = tmp_path / "q"
    run("quantize", src, out, "--quiet", *args)
    opts = dict(zip(args[::2], args[1::2], strict=True))
    spec = QuantSpec(scheme=opts.get("--scheme", "symmetric"), bits=int(opts.get("--bits", 8)),
                     granularity=opts.get("--granularity", "channel"),
                     group_size=int(opts.get("--group-size", 128)),
                     range=opts.get("--range", "minmax"),
                     # --scale-dtype auto: the manifest says which one it chose
                     scale_dtype=json.loads((out / "qtool.json").read_text())["tensors"][0][
                         "scale_dtype"])
    qt = quantize(w.view(np.uint16) if dtype is ml_dtypes.bfloat16 else w, spec)
    assert load_file(str(out / "m.safetensors"))["w"].tobytes() == qt.data.tobytes()
    # Scales stored in their scale dtype; qt.scale holds those values as float32.
    stored_scale = load_file(str(out / "m.scale.safetensors"))["w"].astype(np.float32)
    assert stored_scale.tobytes() == qt.scale.tobytes()
    zero = load_file(str(out / "m.zero_point.safetensors"))["w"]
    # Zero points as stored: one 0-d value for the symmetric schemes, else one per unit.
    assert np.array_equal(np.broadcast_to(zero.astype(np.int32), qt.zero_point.shape),
                          qt.zero_point)
    record = json.loads((out / "qtool.json").read_text())["tensors"][0]
    for key, value in qt.stats.to_dict().items():
        assert record["metrics"][key] == value, key


def test_measured_figures_of_ordinary_tensors_are_unchanged(tmp_path):
    rng = np.random.default_rng(5)
    tensors = {
        "a": rng.normal(0, 0.05, (300, 1000)).astype(np.float32),  # several rows per block
        "b": rng.normal(0, 0.05, (64, 32)).astype(ml_dtypes.bfloat16),
        "c": rng.normal(0, 0.05, (32, 64)).astype(np.float16),
        "d": rng.normal(0, 0.05, (8, 4, 3, 3)),
        "e": rng.normal(0, 0.05, (3, 1 << 18)).astype(np.float32),  # one row per block
    }
    src = tmp_path / "m.safetensors"
    save_file(tensors, str(src))
    out = tmp_path / "q"
    run("quantize", src, out, "--quiet", "--scheme", "asymmetric")
    got = _measured(out, src)
    for name, w in tensors.items():
        entry = next(t for t in json.loads((out / "qtool.json").read_text())["tensors"]
                     if t["name"] == name)
        spec = QuantSpec(scheme="asymmetric")
        q = load_file(str(out / "m.safetensors"))[name]
        s = load_file(str(out / "m.scale.safetensors"))[name]
        z = load_file(str(out / "m.zero_point.safetensors"))[name]
        wf = w.astype(np.float32) if w.dtype != np.float64 else w
        w_hat = dequantize(q, s, z, tuple(entry["shape"]), spec, wf.dtype, wf.dtype)
        assert got[name] == _old_stats(wf, w_hat), name


def test_long_rows_are_measured_in_column_chunks(tmp_path, monkeypatch):
    # Blocks of 1000 values: the 2 x 4500 rows go in column chunks of 1000, 1000, ..., 500.
    monkeypatch.setattr(measure, "STATS_BLOCK_ELEMENTS", 1000)
    assert list(measure._stat_blocks(2, 2500)) == [
        (0, 1000), (1000, 2000), (2000, 2500), (2500, 3500), (3500, 4500), (4500, 5000)]
    assert list(measure._stat_blocks(5, 300)) == [(0, 900), (900, 1500)]
    rng = np.random.default_rng(7)
    w = rng.normal(0, 1, (2, 4500)).astype(np.float32)
    wb = rng.normal(0, 1, (1, 4321)).astype(ml_dtypes.bfloat16)
    src = tmp_path / "m.safetensors"
    save_file({"w": w, "wb": wb}, str(src))
    out = tmp_path / "q"
    run("quantize", src, out, "--quiet", "--granularity", "group", "--group-size", "64")
    one, four = _measured(out, src, 1), _measured(out, src, 4)
    assert one == four  # the same blocks merged in the same order whatever the threads
    for name, x in (("w", w), ("wb", wb)):
        q = load_file(str(out / "m.safetensors"))[name]
        s = load_file(str(out / "m.scale.safetensors"))[name]
        spec = QuantSpec(granularity="group", group_size=64)
        x64 = x.astype(np.float64)
        w_hat = dequantize(q, s, np.zeros((), np.int32), x.shape, spec, np.dtype(np.float64),
                           np.dtype(np.float32)).astype(np.float64)
        err = w_hat - x64
        st = one[name]
        assert st.count == x.size
        assert st.max_abs_error == np.abs(err).max()
        assert st.signal_sq == pytest.approx(float((x64 * x64).sum()), rel=1e-12)
        assert st.error_sq == pytest.approx(float((err * err).sum()), rel=1e-12)
        assert st.cross == pytest.approx(float((x64 * err).sum()), rel=1e-9, abs=1e-12)


def test_report_original_of_one_huge_row_stays_within_two_float_copies(tmp_path):
    """The bound is 2 x the tensor in float32 + 150 MB; the fixed part is measured here as the
    same command on a tiny tensor, and the part that grows must stay under 2 x 4 bytes per
    value (it was about 25 bytes per value before the column chunks)."""
    n = 4_000_000
    rng = np.random.default_rng(11)
    for name, count in (("tiny", 1000), ("big", n)):
        save_file({"w": rng.standard_normal((1, count)).astype(np.float32)},
                  str(tmp_path / f"{name}.safetensors"))
        run("quantize", tmp_path / f"{name}.safetensors", tmp_path / f"{name}-q", "--quiet")
    base = _peak_kb("report", tmp_path / "tiny-q", "--original", tmp_path / "tiny.safetensors")
    big = _peak_kb("report", tmp_path / "big-q", "--original", tmp_path / "big.safetensors")
    grown = (big - base) * 1024
    assert grown < 2 * 4 * n, f"report --original grew by {grown / n:.1f} bytes per value"
