"""The layering: each layer imports only those below it, the numeric core loads no file, terminal
or CLI library, and no module grows past about 400 lines."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "qtool"
LAYERS = ["core", "formats", "pipeline", "report"]  # lowest first; cli.py sits on top
MAX_LINES = 420  # "about 400"; the C kernel is exempt


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(ROOT.parent).with_suffix("").parts): p
            for p in sorted(ROOT.rglob("*.py"))}


def _qtool_imports(path: Path) -> set[str]:
    """Every qtool module a file imports, at any depth (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qtool"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("qtool"))
    return found


def _layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in LAYERS:
        return LAYERS.index(parts[1])
    if module in ("qtool", "qtool.__version__"):
        return -1  # the package itself holds only the version
    return len(LAYERS)  # cli, __main__


def test_layers_import_only_downward():
    bad = []
    for mod, path in _modules().items():
        mine = _layer(mod)
        for imp in _qtool_imports(path):
            if _layer(imp) > mine:
                bad.append(f"{mod} imports {imp}")
    assert not bad, bad


def test_the_checker_sees_an_upward_import(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from qtool.report.model import Report\n")
    assert "qtool.report.model" in _qtool_imports(probe)
    assert _layer("qtool.report.model") > _layer("qtool.formats.native")


def test_no_module_over_about_400_lines():
    sizes = {m: len(p.read_text().splitlines()) for m, p in _modules().items()}
    long = {m: n for m, n in sizes.items() if n > MAX_LINES}
    assert not long, long


def test_numeric_core_imports_numpy_alone():
    core = [m for m in _modules() if m.startswith("qtool.core.")]
    code = (
        "import sys, json\n"
        + "".join(f"import {m}\n" for m in core)
        + "print(json.dumps(sorted(m.split('.')[0] for m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    baseline = subprocess.run([sys.executable, "-c", code.split("\n")[0] + "\nimport numpy\n"
                               + code.split("\n")[-1]], capture_output=True, text=True,
                              check=True).stdout
    extra = (set(json.loads(out)) - set(json.loads(baseline)) - {"qtool"}
             - set(sys.stdlib_module_names))
    assert not extra, f"the core loads more than numpy and the standard library: {sorted(extra)}"


def test_io_and_pipeline_layers_do_not_import_presentation():
    code = ("import sys, qtool.formats.native, qtool.pipeline.run, qtool.pipeline.dequantize, "
            "qtool.pipeline.measure, qtool.report.model, qtool.report.text\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('rich', 'click')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_cli_import_loads_no_numpy_or_rich():
    code = ("import sys\n"
            "from qtool.cli import cli\n"
            "print('numpy' in sys.modules, 'rich' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["False", "False"]
    p = subprocess.run([sys.executable, "-m", "qtool", "--version"], capture_output=True,
                       text=True, check=True)
    assert "qtool" in p.stdout  # the startup time itself is measured by `make bench`
