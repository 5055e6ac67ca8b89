"""Start-up (issue 11, section 3): no ml_dtypes at run time, Rich only when something is
drawn, and `qtool --version` without click, numpy or Rich. Checked with `python -X importtime`
as a user runs qtool; the times themselves are measured by `make bench`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file


def _imported(args: list[str], cwd: Path) -> set[str]:
    """Top-level packages a qtool run imports (from -X importtime's report on stderr)."""
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "qtool", *args], cwd=cwd,
                       capture_output=True, text=True, check=True)
    names = set()
    for line in p.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    assert "numpy" in names or "click" in names or args == ["--version"], p.stderr[-500:]
    return names


def test_float32_quantize_imports_no_ml_dtypes_and_quiet_no_rich(tmp_path):
    rng = np.random.default_rng(0)
    save_file({"w": rng.normal(size=(16, 64)).astype(np.float32),
               "b": np.zeros(16, np.float32)}, str(tmp_path / "m.safetensors"))
    names = _imported(["quantize", "m.safetensors", "out", "-q"], tmp_path)
    assert "numpy" in names and "blake3" in names
    assert "ml_dtypes" not in names and "rich" not in names
    assert (tmp_path / "out" / "qtool.json").is_file()
    # verify and dequantize print plain lines: no Rich either, and no ml_dtypes
    for args in (["verify", "out"], ["dequantize", "out", "r.safetensors"],
                 ["report", "out", "--format", "json"]):
        names = _imported(args, tmp_path)
        assert "ml_dtypes" not in names and "rich" not in names, args


def test_bfloat16_quantize_and_restore_without_ml_dtypes(tmp_path):
    import ml_dtypes  # only to write the test checkpoint

    w = np.random.default_rng(1).normal(0, 0.1, (8, 32)).astype(ml_dtypes.bfloat16)
    save_file({"w": w}, str(tmp_path / "m.safetensors"))
    for args in (["quantize", "m.safetensors", "out", "-q"],
                 ["dequantize", "out", "r.safetensors", "-q", "--dtype", "bfloat16"]):
        assert "ml_dtypes" not in _imported(args, tmp_path)
    from safetensors.numpy import load_file

    r = load_file(str(tmp_path / "r.safetensors"))["w"]
    assert r.dtype == ml_dtypes.bfloat16
    err = np.abs(r.astype(np.float32) - w.astype(np.float32)).max()
    scale = np.abs(w.astype(np.float32)).max(axis=1) / 127
    assert 0 < err <= scale.max() * 0.5 * 1.02  # within half a step (plus bf16 rounding)


def test_version_imports_neither_click_nor_numpy_nor_rich(tmp_path):
    names = _imported(["--version"], tmp_path)
    assert not names & {"click", "numpy", "rich", "ml_dtypes", "blake3"}, names


def test_qtool_command_runs_openblas_on_one_thread_unless_told(tmp_path):
    # The `qtool` command asks OpenBLAS for one thread before numpy starts its pool (a
    # spinning thread per core otherwise); OPENBLAS_NUM_THREADS set by the user wins.
    save_file({"w": np.ones((4, 8), np.float32)}, str(tmp_path / "m.safetensors"))
    script = (
        "import sys\n"
        "sys.argv = ['qtool', 'quantize', 'm.safetensors', sys.argv[1], '-q']\n"
        "from qtool.entry import main\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "import os\n"
        "from qtool.pipeline.streams import _openblas_thread_controls\n"
        "threads = sorted({get() for get, _ in _openblas_thread_controls()})\n"
        "print(os.environ['OPENBLAS_NUM_THREADS'], threads)\n"
    )
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
    # numpy's OpenBLAS (the Linux and Windows wheels) then reports that count; a numpy
    # built on another BLAS has no OpenBLAS to ask, and only the variable is checked.
    from qtool.pipeline.streams import _openblas_thread_controls

    blas = bool(_openblas_thread_controls())  # numpy is loaded here: is it on OpenBLAS?
    out = subprocess.run([sys.executable, "-c", script, "a"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == ("1 [1]" if blas else "1 []")
    out = subprocess.run([sys.executable, "-c", script, "b"], cwd=tmp_path,
                         env={**env, "OPENBLAS_NUM_THREADS": "2"},
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == ("2 [2]" if blas else "2 []")
    assert (tmp_path / "a" / "qtool.json").is_file() and (tmp_path / "b" / "qtool.json").is_file()
