"""Hardening round 2, part b (issue 15): crashes and tracebacks, memory, and CLI polish.

Each hostile case runs qtool as a user would and checks the whole contract: the exit code,
one ``qtool: error:`` line naming the file (and tensor) and what is wrong, no traceback,
nothing partial left (no output, no hidden temporary directory), the input unchanged.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from qtool.core import schemes
from qtool.core.blocks import kernels_available
from qtool.formats._common import CheckpointError
from qtool.formats.manifest import seal
from qtool.formats.safetensors import SafetensorsFile
from qtool.options import MAX_GROUP_SIZE
from qtool.pipeline.plan import QuantizeOptions
from qtool.pipeline.run import quantize_checkpoint
from tests.conftest import ROOT, make_tensors, raw_file, run, write_checkpoint
from tests.test_security import assert_one_line_error, leftovers, snapshot

# --------------------------------------------------------------------------- helpers


def _f32_file(path: Path, name: str, metadata: str | None = None) -> Path:
    """A one-tensor F32 file whose header is written by hand, so that ``name`` may hold any
    JSON escape (the safetensors library cannot write a lone surrogate)."""
    data = np.arange(8, dtype=np.float32).tobytes()
    head = f'{{"{name}":{{"dtype":"F32","shape":[2,4],"data_offsets":[0,32]}}'
    if metadata is not None:
        head += f',"__metadata__":{{"k":"{metadata}"}}'
    path.write_bytes(raw_file(head + "}", data))
    return path


def _quantized(tmp_path: Path, *args: str) -> Path:
    src = write_checkpoint(tmp_path / "m.safetensors")
    out = tmp_path / "art"
    run("quantize", src, out, "-q", *args)
    return out


def _edit_manifest(art: Path, text_fn) -> None:
    p = art / "qtool.json"
    p.write_text(text_fn(p.read_text()))


def _nothing_left(parent: Path, *outs: Path) -> None:
    assert leftovers(parent) == []
    for o in outs:
        assert not o.exists(), o


def _refused_untouched(tmp_path: Path, command: str, art: Path, *fragments: str) -> None:
    """``command`` on the artifact ``art`` exits 2 with one line holding ``fragments``,
    changes nothing under ``tmp_path`` and leaves no output or temporary behind."""
    before = snapshot(tmp_path)
    out = tmp_path / "r.safetensors"
    args = [command, art] + ([out] if command == "dequantize" else [])
    assert_one_line_error(run(*args, expect=2), *fragments)
    assert snapshot(tmp_path) == before
    _nothing_left(tmp_path, out)


# --------------------------------------------------------------------------- lone surrogates


@pytest.mark.parametrize("command", ["quantize", "report"])
def test_lone_surrogate_in_a_tensor_name_is_refused(tmp_path, command):
    src = _f32_file(tmp_path / "s.safetensors", "a\\ud800b")
    before = snapshot(tmp_path)
    args = [command, src] + ([tmp_path / "out"] if command == "quantize" else
                             ["--format", "csv"])
    line = assert_one_line_error(run(*args, expect=2), str(src), "lone surrogate",
                                 "not valid UTF-8")
    assert "\\ud800" in line
    assert snapshot(tmp_path) == before
    _nothing_left(tmp_path, tmp_path / "out")


def test_lone_surrogate_in_metadata_is_refused(tmp_path):
    src = _f32_file(tmp_path / "s.safetensors", "w", metadata="x\\udfff")
    assert_one_line_error(run("quantize", src, tmp_path / "o", expect=2), str(src),
                          "lone surrogate")
    _nothing_left(tmp_path, tmp_path / "o")


def test_a_surrogate_pair_is_valid_and_round_trips(tmp_path):
    # "\ud83d\ude00" is one character (U+1F600), valid UTF-8 once decoded: not refused.
    src = _f32_file(tmp_path / "s.safetensors", "emoji\\ud83d\\ude00")
    out = tmp_path / "o"
    run("quantize", src, out, "-q")
    run("dequantize", out, tmp_path / "r.safetensors", "-q")
    assert list(load_file(str(tmp_path / "r.safetensors"))) == ["emoji\U0001F600"]


@pytest.mark.parametrize("command", ["dequantize", "verify", "report"])
def test_lone_surrogate_in_a_manifest_is_refused(tmp_path, command):
    art = _quantized(tmp_path)
    _edit_manifest(art, lambda t: t.replace('"name": "zeros.weight"',
                                            '"name": "zeros\\udc80weight"'))
    _refused_untouched(tmp_path, command, art, "qtool.json", "lone surrogate")


def test_lone_surrogate_in_a_sharded_index_is_refused(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    save_file({"a": np.ones((2, 2), np.float32)}, str(d / "s1.safetensors"))
    (d / "model.safetensors.index.json").write_text(
        '{"metadata": {}, "weight_map": {"a\\ud801": "s1.safetensors"}}')
    assert_one_line_error(run("quantize", d, tmp_path / "o", expect=2),
                          "model.safetensors.index.json", "lone surrogate")
    _nothing_left(tmp_path, tmp_path / "o")


# --------------------------------------------------------------------------- Rich markup


def _with_source_metadata(art: Path, value: str) -> None:
    """The artifact's main file with ``qtool_source_metadata`` set to ``value``, its size and
    digest resealed into the manifest (anyone can)."""
    import blake3
    from safetensors import safe_open

    f = art / "m.safetensors"
    with safe_open(str(f), "numpy") as h:
        meta = h.metadata()
    meta["qtool_source_metadata"] = value
    save_file(load_file(str(f)), str(f), metadata=meta)
    doc = json.loads((art / "qtool.json").read_text())
    data = f.read_bytes()
    doc["files"][f.name] = {"size": len(data), "blake3": blake3.blake3(data).hexdigest()}
    (art / "qtool.json").write_text(seal(doc))


@pytest.mark.parametrize("value", [
    '{"format": "x\\ud800"}',  # a lone surrogate: it would be written back as UTF-8
    "[" * 100_000 + "]" * 100_000,  # nested too deeply for the parser
    '{"format": "pt", "format": "np"}',  # a duplicate key: which one would be restored?
    '{"format": NaN}',
], ids=["lone_surrogate", "deep_nesting", "duplicate_key", "nan"])
@pytest.mark.parametrize("command", ["dequantize", "report"])
def test_hostile_source_metadata_in_an_artifact_is_refused(tmp_path, value, command):
    """The source's metadata kept in the artifact's main file (format_version 2) is JSON as
    strict as a header's: refused in one line naming the file, not a traceback (a lone
    surrogate failed the restored file's header encoding, deep nesting a RecursionError),
    and a duplicate key is not resolved silently."""
    art = _quantized(tmp_path)
    _with_source_metadata(art, value)
    before = snapshot(art)
    args = (["dequantize", art, tmp_path / "r.safetensors"] if command == "dequantize" else
            ["report", art, "--original", tmp_path / "m.safetensors"])
    assert_one_line_error(run(*args, expect=2), str(art / "m.safetensors"),
                          "qtool_source_metadata in __metadata__ is not a JSON object of strings")
    assert snapshot(art) == before
    _nothing_left(tmp_path, tmp_path / "r.safetensors")


def test_source_metadata_with_a_surrogate_pair_is_restored(tmp_path):
    art = _quantized(tmp_path)
    _with_source_metadata(art, '{"who": "\\ud83d\\ude00"}')
    run("dequantize", art, tmp_path / "r.safetensors", "-q")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "r.safetensors"), "numpy") as h:
        assert h.metadata() == {"who": "\U0001F600"}


@pytest.mark.parametrize("command", ["dequantize", "verify", "report"])
def test_duplicate_keys_in_a_version_1_manifest_are_refused(tmp_path, command):
    """A format_version 1 manifest has no guard (no manifest digest, any whitespace): a key
    given twice in a record (the second "bits" wins in Python's json, the first in other
    readers) is refused, as in a safetensors header."""
    import shutil

    art = tmp_path / "art"
    shutil.copytree(ROOT / "tests" / "fixtures" / "v1" / "art_asym4", art)
    run("verify", art, "-q")  # as written by qtool 0.1
    _edit_manifest(art, lambda t: t.replace('"bits": 4,', '"bits": 8, "bits": 4,', 1))
    _refused_untouched(tmp_path, command, art, "qtool.json", "duplicate key 'bits'")


def test_duplicate_keys_in_an_artifact_index_are_refused(tmp_path):
    src = tmp_path / "m"
    src.mkdir()
    for i in (1, 2):
        save_file({f"w{i}": np.ones((2, 16), np.float32)}, str(src / f"s{i}.safetensors"))
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"w1": "s1.safetensors", "w2": "s2.safetensors"}}))
    art = tmp_path / "art"
    run("quantize", src, art, "-q")
    index = art / "model.safetensors.index.json"
    text = index.read_text().replace('"w1": "s1.safetensors"',
                                     '"w1": "s2.safetensors", "w1": "s1.safetensors"', 1)
    assert text != index.read_text()
    index.write_text(text)
    import blake3
    doc = json.loads((art / "qtool.json").read_text())
    digest = blake3.blake3(text.encode()).hexdigest()
    doc["files"][index.name] = {"size": len(text.encode()), "blake3": digest}
    (art / "qtool.json").write_text(seal(doc))
    assert_one_line_error(run("dequantize", art, tmp_path / "r", expect=2), str(index),
                          "duplicate key 'w1'")
    _nothing_left(tmp_path, tmp_path / "r")


def test_markup_in_output_paths_is_printed_as_it_is(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # short paths: the summary's title is not wrapped
    write_checkpoint(tmp_path / "m.safetensors")
    out = tmp_path / "o[bold red]k"
    r = run("quantize", "m.safetensors", "o[bold red]k")
    assert "qtool quantize → o[bold red]k" in r.stderr
    # "[/" closes a tag that was never opened: Rich would raise MarkupError after the
    # artifact is written.
    weird = tmp_path / "x[/y]"
    weird.mkdir(parents=True)
    r = run("dequantize", out, "x[/y]/r[/i].safetensors")
    assert "r[/i].safetensors" in r.stderr and "Traceback" not in r.stderr
    assert (weird / "r[/i].safetensors").is_file()


def test_markup_in_tensor_names_is_shown_literally_in_the_report_table(tmp_path):
    src = tmp_path / "m.safetensors"
    save_file({"[bold]w[/bold]": np.ones((4, 8), np.float32) * np.arange(8)}, str(src))
    r = run("report", src, "--format", "table")
    assert "[bold]w[/bold]" in r.stdout


# --------------------------------------------------------------------------- bounds


def test_cli_bound_on_group_size_matches_the_core():
    assert MAX_GROUP_SIZE == schemes.MAX_GROUP_SIZE


@pytest.mark.parametrize("command", ["quantize", "report"])
@pytest.mark.parametrize("size", [str(2**63 - 1), str(2**64), str(MAX_GROUP_SIZE + 1)])
def test_huge_group_size_is_a_usage_error(tmp_path, command, size):
    src = write_checkpoint(tmp_path / "m.safetensors")
    args = [command, src] + ([tmp_path / "o"] if command == "quantize" else [])
    assert_one_line_error(run(*args, "--granularity", "group", "--group-size", size,
                              expect=2), "--group-size", f"1<=x<={MAX_GROUP_SIZE}")
    _nothing_left(tmp_path, tmp_path / "o")


def test_largest_group_size_quantizes_like_per_channel(tmp_path):
    src = write_checkpoint(tmp_path / "m.safetensors")
    run("quantize", src, tmp_path / "g", "--granularity", "group", "--group-size",
        str(MAX_GROUP_SIZE), "-q")
    run("quantize", src, tmp_path / "c", "-q")
    g = load_file(str(tmp_path / "g" / "m.safetensors"))
    c = load_file(str(tmp_path / "c" / "m.safetensors"))
    for name in c:
        np.testing.assert_array_equal(g[name], c[name], err_msg=name)
    run("verify", tmp_path / "g", "-q")
    run("dequantize", tmp_path / "g", tmp_path / "r.safetensors", "-q")


@pytest.mark.parametrize("key,value,fragment", [
    ("group_size", 2**63 - 1, "group_size"),
    ("group_size", 1e300, "group_size"),
    ("bits", True, "bits"),
    ("shape", [2**62, 4], "too large"),
    ("shape", [1] * 70, "too large"),
])
@pytest.mark.parametrize("command", ["dequantize", "verify", "report"])
def test_hostile_sizes_in_a_manifest_are_refused(tmp_path, key, value, fragment, command):
    art = _quantized(tmp_path, "--granularity", "group", "--group-size", "16")
    doc = json.loads((art / "qtool.json").read_text())
    # a passthrough tensor for the shapes (no spec check stands in the way), else a grouped one
    name = "layers.0.norm.weight" if key == "shape" else "layers.0.attn.q.weight"
    rec = next(t for t in doc["tensors"] if t["name"] == name)
    assert key in rec
    rec[key] = value
    (art / "qtool.json").write_text(seal(doc))  # resealed: the values themselves are refused
    _refused_untouched(tmp_path, command, art, "qtool.json", fragment)


def test_a_huge_target_bits_is_the_best_plan_not_a_crash(tmp_path):
    """--target-bits 1e308 overflowed the allocator's budget (OverflowError, a traceback):
    any target above what the largest candidate stores gives the same plan and artifact."""
    src = write_checkpoint(tmp_path / "m.safetensors")
    plans = [run("report", src, "--target-bits", b, "-q").stdout for b in ("1e308", "64", "20")]
    assert "mixed-precision plan" in plans[0] and plans[0] == plans[1] == plans[2]
    for b in ("1e308", "20"):
        run("quantize", src, tmp_path / f"o{b}", "--target-bits", b, "-q")
    for f in ("m.safetensors", "m.scale.safetensors", "m.zero_point.safetensors"):
        assert (tmp_path / "o1e308" / f).read_bytes() == (tmp_path / "o20" / f).read_bytes()


def test_recipe_group_size_beyond_the_bound_is_refused(tmp_path):
    src = write_checkpoint(tmp_path / "m.safetensors")
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[[rule]]\nmatch = "*"\ngranularity = "group"\ngroup_size = {2**63 - 1}\n')
    line = assert_one_line_error(run("quantize", src, tmp_path / "o", "--recipe", recipe,
                                     expect=2), str(recipe), "rule 1", "group_size",
                                 str(MAX_GROUP_SIZE))
    assert line == (f"qtool: error: {recipe} rule 1: group_size must be an integer from 1 to "
                    f"{MAX_GROUP_SIZE}, got {2**63 - 1}")


@pytest.mark.skipif(not kernels_available(), reason="the C kernel is not built here")
def test_kernel_treats_any_group_longer_than_the_row_as_the_row():
    from qtool.core import _kernels

    x = np.random.default_rng(0).normal(size=(3, 10)).astype(np.float32)
    for g in (10, 11, 2**62, 2**63 - 1):
        mn = np.empty((3, 1), np.float32)
        mx = np.empty((3, 1), np.float32)
        assert _kernels.minmax(x, 0, 3, 10, g, mn, mx)
        np.testing.assert_array_equal(mn[:, 0], x.min(axis=1))
        np.testing.assert_array_equal(mx[:, 0], x.max(axis=1))
    with pytest.raises(OverflowError):
        _kernels.minmax(x, 0, 3, 10, 2**63, mn, mx)
    with pytest.raises(ValueError, match="bad block shape"):
        _kernels.minmax(x, 0, 3, 10, 0, mn, mx)


# --------------------------------------------------------------------------- deep recipes


@pytest.mark.parametrize("body", [
    "bits = " + "[" * 100_000 + "]" * 100_000,
    "bits = " + "{a = " * 100_000 + "1" + "}" * 100_000,
])
def test_recipe_nested_100000_levels_deep_is_a_one_line_error(tmp_path, body):
    src = write_checkpoint(tmp_path / "m.safetensors")
    recipe = tmp_path / "deep.toml"
    recipe.write_text('[[rule]]\nmatch = "*"\n' + body + "\n")
    for args in (["quantize", src, tmp_path / "o"], ["report", src]):
        assert_one_line_error(run(*args, "--recipe", recipe, expect=2), str(recipe),
                              "nested too deeply")
    _nothing_left(tmp_path, tmp_path / "o")


_DEEP = "[" * 100_000 + "]" * 100_000


def _deep_header(tmp_path: Path) -> tuple[list, str]:
    src = tmp_path / "deep.safetensors"
    src.write_bytes(raw_file('{"__metadata__": {"x": ' + _DEEP + '}, '
                             '"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
                             b"\0" * 4))
    return ["report", src], f"{src}: header is not valid JSON: 'nested too deeply'"


def _deep_index(tmp_path: Path) -> tuple[list, str]:
    d = tmp_path / "ckpt"
    d.mkdir()
    save_file({"w": np.ones((2, 2), np.float32)}, str(d / "a.safetensors"))
    idx = d / "model.safetensors.index.json"
    idx.write_text('{"metadata": {"x": ' + _DEEP + '}, "weight_map": {"w": "a.safetensors"}}')
    return ["quantize", idx, tmp_path / "o"], f"{idx}: index is not valid JSON: 'nested too deeply'"


def _deep_manifest(tmp_path: Path) -> tuple[list, str]:
    art = _quantized(tmp_path)
    _edit_manifest(art, lambda t: t.replace('"format_version"', '"x": ' + _DEEP +
                                            ', "format_version"', 1))
    return ["verify", art], f"{art / 'qtool.json'}: not valid JSON (nested too deeply)"


def _deep_energy_model(tmp_path: Path) -> tuple[list, str]:
    model = tmp_path / "energy.json"
    model.write_text('{"x": ' + _DEEP + "}")
    return (["report", write_checkpoint(tmp_path / "m.safetensors"), "--energy-model", model],
            f"{model}: energy model is not valid JSON (nested too deeply)")


@pytest.mark.parametrize("make", [_deep_header, _deep_index, _deep_manifest,
                                  _deep_energy_model],
                         ids=["header", "index", "manifest", "energy_model"])
def test_json_nested_100000_levels_deep_is_a_one_line_error(tmp_path, make):
    """Every JSON qtool reads, not only recipes: the RecursionError is one line naming the
    file (the energy model's said 'maximum recursion depth exceeded while decoding a JSON
    array from a unicode stri', cut mid-word)."""
    args, message = make(tmp_path)
    before = snapshot(tmp_path)
    line = assert_one_line_error(run(*args, expect=2), message)
    assert line.endswith(message) and "recursion" not in line
    assert snapshot(tmp_path) == before
    _nothing_left(tmp_path, tmp_path / "o")


# --------------------------------------------------------------------------- truncation


_TRUNCATE_WHILE_VIEWED = """
import os, sys
import numpy as np
from qtool.formats.safetensors import SafetensorsFile
f = SafetensorsFile(sys.argv[1])
v = f.view("w")
os.truncate(sys.argv[1], 100)   # another process cuts the file while the run is held
print(float(v.astype(np.float64).sum()))   # with a memory map: SIGBUS here
try:
    f.view("w")
except Exception as e:
    print(type(e).__name__, e)
"""


def test_a_file_truncated_while_read_is_never_a_sigbus(tmp_path):
    src = tmp_path / "m.safetensors"
    w = np.arange(1 << 16, dtype=np.float32).reshape(256, 256)
    save_file({"w": w}, str(src))
    p = subprocess.run([sys.executable, "-c", _TRUNCATE_WHILE_VIEWED, str(src)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, (p.returncode, p.stderr)  # -7 would be SIGBUS
    total, err = p.stdout.splitlines()
    assert float(total) == float(w.astype(np.float64).sum())
    assert err.startswith("CheckpointError") and "truncated while open?" in err


def test_quantize_of_a_file_truncated_mid_run_fails_cleanly(tmp_path):
    src = tmp_path / "m.safetensors"
    rng = np.random.default_rng(0)
    save_file({f"t{i}": rng.normal(size=(64, 64)).astype(np.float32) for i in range(4)},
              str(src))
    out = tmp_path / "o"
    run_ = quantize_checkpoint(src, out, QuantizeOptions(spec=schemes.QuantSpec()))
    it = iter(run_)
    next(it)  # the first tensor is done; now the file shrinks under the run
    half = src.stat().st_size // 2
    os.truncate(src, half)
    # the size the file has now, not where the failed read began
    with pytest.raises(CheckpointError, match=re.escape(str(src)) + f": tensor 't.': the file "
                       f"now ends at byte {half}, short of the data at bytes .*truncated while "
                       "open"):
        list(it)
    _nothing_left(tmp_path, out)


# --------------------------------------------------------------------------- Ctrl-C

_INTERRUPT_AT_IMPORT = """
import sys
class Stop:
    def find_spec(self, name, path=None, target=None):
        if name == "click":
            raise KeyboardInterrupt
sys.meta_path.insert(0, Stop())
sys.argv = ["qtool", "verify", "nothing"]
from qtool.entry import main
main()
"""


def test_ctrl_c_during_start_up_imports_is_one_line(tmp_path):
    p = subprocess.run([sys.executable, "-c", _INTERRUPT_AT_IMPORT], capture_output=True,
                       text=True, timeout=60, cwd=tmp_path)
    assert p.returncode == 130
    assert p.stderr == "qtool: error: interrupted; no output was written\n"


def test_ctrl_c_mid_run_is_one_line_without_an_empty_line_before(tmp_path, monkeypatch):
    import qtool.pipeline.run as prun

    def interrupted(*a, **k):
        raise KeyboardInterrupt
        yield  # pragma: no cover

    monkeypatch.setattr(prun, "quantized_chunks", interrupted)
    src = write_checkpoint(tmp_path / "m.safetensors")
    before = snapshot(tmp_path)
    r = run("quantize", src, tmp_path / "o", expect=130)
    assert r.stderr == "qtool: error: interrupted; no output was written\n"
    assert snapshot(tmp_path) == before
    _nothing_left(tmp_path, tmp_path / "o")


@pytest.mark.parametrize("command", ["quantize", "dequantize"])
def test_ctrl_c_right_after_the_commit_says_the_output_exists(tmp_path, monkeypatch, command):
    from qtool.pipeline import staging

    art = _quantized(tmp_path) if command == "dequantize" else None
    method = "commit_dir" if command == "quantize" else "commit_file"
    real = getattr(staging._Staging, method)

    def commit_then_interrupt(self, *a):
        real(self, *a)
        raise KeyboardInterrupt

    monkeypatch.setattr(staging._Staging, method, commit_then_interrupt)
    if command == "quantize":
        out = tmp_path / "o"
        r = run("quantize", write_checkpoint(tmp_path / "m.safetensors"), out, expect=130)
    else:
        out = tmp_path / "r.safetensors"
        r = run("dequantize", art, out, expect=130)
    assert r.stderr == (f"qtool: error: interrupted; the output {out} had already been "
                        "written and is complete\n")
    assert leftovers(tmp_path) == []
    if command == "quantize":
        run("verify", out, "-q")
    else:
        assert set(load_file(str(out))) == set(make_tensors())
    # the next run in the same process starts afresh
    monkeypatch.undo()
    r = run("quantize", tmp_path / "missing.safetensors", tmp_path / "x", expect=2)
    assert "already been written" not in r.stderr


# --------------------------------------------------------------------------- memory


_PEAK = """
import os, resource, subprocess, sys
subprocess.run([sys.executable, "-m", "qtool", *sys.argv[1:]], check=False,
               stdout=subprocess.DEVNULL)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
"""


def _peak_rss(*args: object) -> int:
    """Peak resident bytes of `python -m qtool ARGS` in a fresh child (of a small parent,
    so that the fork's copy of the parent's memory does not count)."""
    p = subprocess.run([sys.executable, "-c", _PEAK, *map(str, args)], capture_output=True,
                       text=True, timeout=300, check=True)
    return int(p.stdout.strip())


def _one_row_checkpoint(path: Path, values: int, dtype=np.float32) -> Path:
    w = np.random.default_rng(0).normal(size=(1, values)).astype(dtype)
    save_file({"row.weight": w}, str(path))
    return path


_MB = 1 << 20


@pytest.mark.parametrize("args, dtype", [([], np.float32), (["--range", "percentile"], np.float32),
                                         ([], np.float16)], ids=["minmax", "percentile", "f16"])
def test_one_row_tensor_quantize_stays_in_the_memory_bound(tmp_path, args, dtype):
    values = 10**7
    src = _one_row_checkpoint(tmp_path / "m.safetensors", values, dtype)
    bound = 2 * values * 4 + 150 * _MB
    peak = _peak_rss("quantize", src, tmp_path / "o", "-q", *args)
    assert peak < bound, (peak / _MB, bound / _MB)
    assert (tmp_path / "o" / "qtool.json").is_file()


# --------------------------------------------------------------------------- CLI polish


def test_no_arguments_prints_the_usage_on_several_lines():
    r = run(expect=2)
    lines = r.stderr.splitlines()
    assert lines[0].startswith("Usage: ") and "[OPTIONS] COMMAND" in lines[0]
    assert "Commands:" in lines and len(lines) > 8
    assert not r.stderr.startswith("qtool: error:") and r.stdout == ""


@pytest.mark.parametrize("how", ["existing", "slash"])
def test_dequantize_into_a_directory_writes_the_file_under_its_name(tmp_path, how):
    art = _quantized(tmp_path)
    d = tmp_path / "restored"
    if how == "existing":
        d.mkdir()
        target = str(d)
    else:
        target = str(d) + "/"
    r = run("dequantize", art, target)
    out = d / "m.safetensors"
    assert f"into {out}" in r.stderr
    assert list(d.iterdir()) == [out]
    run("dequantize", art, tmp_path / "flat.safetensors", "-q")
    a, b = load_file(str(out)), load_file(str(tmp_path / "flat.safetensors"))
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    # and like any existing file, it is not replaced unasked
    assert_one_line_error(run("dequantize", art, target, expect=2), f"{out}: file exists")


@pytest.mark.parametrize("args,warning", [
    (["--group-size", "64"], "--group-size has no effect without --granularity group"),
    (["--percentile", "99.9"], "--percentile has no effect without --range percentile"),
])
@pytest.mark.parametrize("command", ["quantize", "report"])
def test_options_without_effect_are_warned_about(tmp_path, args, warning, command):
    src = write_checkpoint(tmp_path / "m.safetensors")
    extra = [tmp_path / "o"] if command == "quantize" else ["--format", "json"]
    r = run(command, src, *extra, *args)
    assert any(line.startswith(f"qtool: warning: {warning}") for line in r.stderr.splitlines())
    # given where they do act, no warning
    on = ["--granularity", "group"] if "--group-size" in args else ["--range", "percentile"]
    extra = [tmp_path / "o2"] if command == "quantize" else ["--format", "json"]
    r = run(command, src, *extra, *args, *on)
    assert "no effect" not in r.stderr


def test_group_size_with_a_recipe_that_uses_groups_is_not_warned_about(tmp_path):
    src = write_checkpoint(tmp_path / "m.safetensors")
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[rule]]\nmatch = "*mlp*"\ngranularity = "group"\n')
    r = run("quantize", src, tmp_path / "o", "--group-size", "8", "--recipe", recipe)
    assert "no effect" not in r.stderr


def test_requantizing_an_integer_checkpoint_is_warned_about(tmp_path):
    art = _quantized(tmp_path)
    ints = tmp_path / "ints.safetensors"
    save_file({k: v for k, v in load_file(str(art / "m.safetensors")).items()
               if v.dtype.kind in "iu"}, str(ints))
    r = run("quantize", ints, tmp_path / "again")
    assert any(line.startswith("qtool: warning: ") and "integer dtype (already quantized?)"
               in line for line in r.stderr.splitlines()), r.stderr


@pytest.mark.parametrize("command", ["quantize", "dequantize", "verify"])
def test_format_json_is_the_same_as_json(tmp_path, command):
    art = _quantized(tmp_path)
    outs = []
    for i, flag in enumerate((["--format", "json"], ["--json"])):
        if command == "quantize":
            args = [tmp_path / "m.safetensors", tmp_path / f"q{i}"]
        elif command == "dequantize":
            args = [art, tmp_path / f"r{i}.safetensors"]
        else:
            args = [art]
        doc = json.loads(run(command, *args, *flag, "-q").stdout)
        doc.pop("seconds", None)
        if command != "verify":
            assert Path(doc.pop("output")) == args[1]
        outs.append(doc)
    assert outs[0] == outs[1]
    if command == "verify":
        assert outs[0] == {"path": str(art), "ok": True, "files": 3, "tensors": 10,
                           "quantized": 6, "problems": []}


def test_verify_format_json_lists_the_problems(tmp_path):
    art = _quantized(tmp_path)
    with open(art / "m.safetensors", "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    r = run("verify", art, "--format", "json", expect=2)
    doc = json.loads(r.stdout)
    assert doc["ok"] is False and len(doc["problems"]) >= 1
    assert any("m.safetensors" in p and "blake3" in p.lower() for p in doc["problems"]), doc


def _sqnr(w: np.ndarray, w_hat: np.ndarray) -> float:
    w = w.astype(np.float64)
    e = w_hat.astype(np.float64) - w
    return 10 * math.log10(float((w * w).sum()) / float((e * e).sum()))


def test_total_sqnr_gate_and_exclude(tmp_path):
    rng = np.random.default_rng(3)
    tensors = {
        "big.weight": rng.normal(0, 1, (64, 64)).astype(np.float32),
        # a tiny tensor kept at 2 bits: it fails a per-tensor gate the big one passes
        "token_type_embeddings.weight": np.array([[1.0, 0.3, 0.1, 0.01]], np.float32),
    }
    src = tmp_path / "m.safetensors"
    save_file(tensors, str(src))
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[rule]]\nmatch = "token_type_*"\nbits = 2\n')
    art = tmp_path / "o"
    run("quantize", src, art, "--scheme", "asymmetric", "--recipe", recipe, "-q")
    run("dequantize", art, tmp_path / "r.safetensors", "--dtype", "float32", "-q")
    back = load_file(str(tmp_path / "r.safetensors"))
    each = {k: _sqnr(tensors[k], back[k]) for k in tensors}
    w = np.concatenate([tensors[k].ravel() for k in tensors])
    w_hat = np.concatenate([back[k].ravel() for k in tensors])
    total = _sqnr(w, w_hat)
    tiny = "token_type_embeddings.weight"
    assert each[tiny] < each["big.weight"]
    gate = (each[tiny] + each["big.weight"]) / 2
    r = run("report", art, "--fail-under-sqnr", gate, "--format", "json", expect=1)
    assert f"tensor '{tiny}'" in r.stderr
    run("report", art, "--fail-under-sqnr", gate, "--exclude", "token_type_*", "--format",
        "json", expect=0)
    # the total: passes just below it, fails just above, and --exclude leaves the tiny out
    run("report", art, "--fail-under-total-sqnr", total - 0.01, "--format", "json")
    r = run("report", art, "--fail-under-total-sqnr", total + 0.01, "--format", "json",
            expect=1)
    (line,) = r.stderr.splitlines()
    assert line.startswith("qtool: fail: total: SQNR ") and "--fail-under-total-sqnr" in line
    checks = json.loads(r.stdout)["checks"]
    (offender,) = checks["offenders"]
    assert offender["name"] == "" and offender["metric"] == "total_sqnr_db"
    assert offender["value"] == pytest.approx(total, abs=1e-3)
    assert offender["limit"] == pytest.approx(total + 0.01)
    assert checks["fail_under_total_sqnr"] == pytest.approx(total + 0.01)
    assert checks["exclude"] == [] and checks["passed"] is False
    excl = _sqnr(tensors["big.weight"], back["big.weight"])
    run("report", art, "--fail-under-total-sqnr", excl - 0.01, "--exclude", "token*",
        "--format", "json")
    r = run("report", art, "--fail-under-total-sqnr", excl + 0.01, "--exclude", "token*",
            "--format", "json", expect=1)
    (offender,) = json.loads(r.stdout)["checks"]["offenders"]
    assert offender["value"] == pytest.approx(excl, abs=1e-3)
    assert json.loads(r.stdout)["checks"]["exclude"] == ["token*"]
    assert_one_line_error(run("report", art, "--fail-under-total-sqnr", "nan", expect=2),
                          "--fail-under-total-sqnr", "finite")


def _doc_loader() -> str:
    text = (ROOT / "docs" / "FORMAT.md").read_text()
    (src,) = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "def load_qtool" in b]
    return src


@pytest.mark.parametrize("args", [[], ["--scheme", "asymmetric", "--granularity", "group",
                                       "--group-size", "5"], ["--bits", "4"]])
def test_format_md_loader_returns_float32_bit_for_bit_like_dequantize(tmp_path, args):
    tensors = make_tensors()
    src = write_checkpoint(tmp_path / "m.safetensors", tensors)
    art = tmp_path / "o"
    run("quantize", src, art, *args, "-q")
    run("dequantize", art, tmp_path / "r.safetensors", "--dtype", "float32", "-q")
    expected = load_file(str(tmp_path / "r.safetensors"))
    manifest = json.loads((art / "qtool.json").read_text())
    quantized = {t["name"] for t in manifest["tensors"] if "passthrough" not in t}
    script = _doc_loader() + (
        "\nimport sys, pickle\n"
        "sys.stdout.buffer.write(pickle.dumps({k: np.asarray(v) for k, v in "
        "load_qtool(sys.argv[1], 'm').items()}))\n")
    p = subprocess.run([sys.executable, "-c", script, str(art)], capture_output=True,
                       check=True)
    import pickle

    got = pickle.loads(p.stdout)
    assert set(got) == set(tensors)
    for name in quantized:  # no cast here: the dtype must already be float32
        assert got[name].dtype == np.float32, (name, got[name].dtype)
        assert got[name].tobytes() == expected[name].tobytes(), name
    for name in set(tensors) - quantized:
        assert got[name].dtype == tensors[name].dtype
        np.testing.assert_array_equal(got[name], tensors[name])


def test_raw_file_helper_is_what_the_reader_reads(tmp_path):
    # The hand-written header helper above is a real safetensors file (a control).
    src = _f32_file(tmp_path / "ok.safetensors", "plain")
    with SafetensorsFile(src) as f:
        np.testing.assert_array_equal(f.read("plain").ravel(), np.arange(8, dtype=np.float32))
    assert struct.unpack("<Q", src.read_bytes()[:8])[0] % 8 == 0


# --------------------------------------------------------------------------- many tensors


def _empty_tensors_file(path: Path, n: int) -> Path:
    head = ",".join(f'"t.{i}":{{"dtype":"F32","shape":[0,4],"data_offsets":[0,0]}}'
                    for i in range(n))
    path.write_bytes(raw_file("{" + head + "}"))
    return path


@pytest.mark.parametrize("command", ["quantize", "report"])
def test_more_tensors_than_the_limit_are_refused_before_parsing(tmp_path, monkeypatch,
                                                                command):
    from qtool.formats import _common

    assert _common.TENSOR_COUNT_LIMIT == 100_000  # the documented limit
    monkeypatch.setattr(_common, "TENSOR_COUNT_LIMIT", 50)  # the same check, scaled down
    ok = _empty_tensors_file(tmp_path / "ok.safetensors", 50)
    bad = _empty_tensors_file(tmp_path / "bad.safetensors", 51)
    before = snapshot(tmp_path)
    args = [tmp_path / "o"] if command == "quantize" else []
    assert_one_line_error(run(command, bad, *args, expect=2), str(bad),
                          "header declares 51 tensors, more than the limit of 50")
    _nothing_left(tmp_path, tmp_path / "o")
    assert snapshot(tmp_path) == before
    run(command, ok, *args, "-q")
    # the key written with an escape is the same key, but not the bytes counted before the
    # parse: the entries are counted again as they are read
    sneaky = tmp_path / "sneaky.safetensors"
    sneaky.write_bytes(raw_file("{" + ",".join(
        f'"t.{i}":{{"dtype":"F32","shape":[0,4],"data\\u005foffsets":[0,0]}}'
        for i in range(51)) + "}"))
    assert b"data_offsets" not in sneaky.read_bytes()
    shutil.rmtree(tmp_path / "o", ignore_errors=True)
    assert_one_line_error(run(command, sneaky, *args, expect=2), str(sneaky),
                          "header declares more tensors than the limit of 50")
    _nothing_left(tmp_path, tmp_path / "o")
