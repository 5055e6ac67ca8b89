"""The layering: the numeric core never loads files, the terminal or the CLI libraries."""

from __future__ import annotations

import json
import subprocess
import sys

CORE = ["qtool.schemes", "qtool.ranges", "qtool.quant", "qtool.packing", "qtool.metrics"]


def test_numeric_core_imports_no_io_or_ui_libraries():
    code = (
        "import sys, json\n"
        + "".join(f"import {m}\n" for m in CORE)
        + "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('rich', 'click', 'safetensors', 'qtool'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    loaded = json.loads(out)
    assert not [m for m in loaded if not m.startswith("qtool")], loaded
    # qtool._kernels is the optional C part of the core (numpy buffers in and out).
    assert set(loaded) <= {"qtool", "qtool._kernels", *CORE}, loaded


def test_io_layer_does_not_import_presentation():
    code = ("import sys, qtool.io, qtool.artifact, qtool.pipeline\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('rich', 'click')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_cli_import_loads_no_numpy_or_rich():
    code = ("import sys, time; t = time.perf_counter()\n"
            "from qtool.cli import cli\n"
            "print('numpy' in sys.modules, 'rich' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["False", "False"]
    p = subprocess.run([sys.executable, "-m", "qtool", "--version"], capture_output=True,
                       text=True, check=True)
    assert "qtool" in p.stdout  # the startup time itself is measured by `make bench`
