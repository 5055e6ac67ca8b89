"""The progress bar: on stderr, only when stderr is a terminal and --quiet is not given.

qtool runs in a process of its own with its stderr on a pseudo-terminal (the `pty` module),
as under a user's shell, or on a pipe, as under a script.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

# "quantize ━━━━━━━━ 12/12 tensors 3.1 MB/s 0:00:00": tensors done/total, bytes/s, time left
BAR = re.compile(r"(\d+)/(\d+) tensors\s+(\?|[\d.]+ [kMGT]?B/s)\s+(-:--:--|\d+:\d\d:\d\d)")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _checkpoint(path: Path, n: int = 12) -> Path:
    rng = np.random.default_rng(0)
    tensors = {f"layers.{i}.weight": rng.normal(0, 0.05, (256, 512)).astype(np.float32)
               for i in range(n)}
    tensors["norm.weight"] = np.ones(512, np.float32)
    save_file(tensors, str(path))
    return path


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "TERM", "COLUMNS")}
    env["TERM"] = "xterm-256color"
    return env


def _run_on_tty(args: list[str]) -> tuple[int, str, str]:
    """Run qtool with stderr on a pseudo-terminal (120 columns) and stdout on a pipe; returns
    (exit code, what the terminal showed, stdout)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "qtool", *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=slave, env=_env())
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 60)
        if not ready:
            proc.kill()
            raise AssertionError("qtool produced nothing on its terminal for 60 s")
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal's last handle
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    out = proc.stdout.read().decode() if proc.stdout else ""
    code = proc.wait()
    return code, b"".join(chunks).decode("utf-8", "replace"), out


def _run_piped(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qtool", *args], capture_output=True,
                          text=True, env=_env())


def test_quantize_shows_the_bar_on_a_terminal_only(tmp_path):
    src = _checkpoint(tmp_path / "model.safetensors")
    code, tty, out = _run_on_tty(["quantize", str(src), str(tmp_path / "a")])
    assert code == 0, tty
    bars = BAR.findall(ANSI.sub("", tty))
    assert bars, tty
    done, total, speed, _left = bars[-1]
    assert (int(done), int(total)) == (13, 13)  # 12 weights and the norm
    assert speed.endswith("B/s") and speed != "?"  # bytes per second, not tensors
    assert "\x1b[" in tty  # a live display, redrawn in place
    assert out == ""  # stdout carries data only

    piped = _run_piped(["quantize", str(src), str(tmp_path / "b")])
    assert piped.returncode == 0
    assert not BAR.search(piped.stderr) and "\x1b[" not in piped.stderr
    assert "tensors quantized" in piped.stderr  # the summary still comes, plain


def test_quiet_silences_the_bar_even_on_a_terminal(tmp_path):
    src = _checkpoint(tmp_path / "model.safetensors", n=3)
    code, tty, _ = _run_on_tty(["quantize", str(src), str(tmp_path / "a"), "--quiet"])
    assert code == 0 and tty == ""


def test_dequantize_and_dry_run_report_show_the_bar(tmp_path):
    src = _checkpoint(tmp_path / "model.safetensors", n=4)
    art = tmp_path / "a"
    assert _run_piped(["quantize", str(src), str(art), "-q"]).returncode == 0
    code, tty, _ = _run_on_tty(["dequantize", str(art), str(tmp_path / "r.safetensors")])
    assert code == 0
    assert BAR.findall(ANSI.sub("", tty))[-1][:2] == ("5", "5")

    code, tty, out = _run_on_tty(["report", str(src), "--scheme", "symmetric",
                                  "--format", "json"])
    assert code == 0, tty
    assert BAR.findall(ANSI.sub("", tty))[-1][:2] == ("5", "5")
    assert out.lstrip().startswith("{")  # the report itself is on stdout, untouched

    piped = _run_piped(["dequantize", str(art), str(tmp_path / "r2.safetensors")])
    assert piped.returncode == 0 and not BAR.search(piped.stderr)
