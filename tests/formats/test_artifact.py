"""qtool.formats.native: the documented format, its loader in docs/FORMAT.md, the cheap checks."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from qtool.formats.manifest import ArtifactError, seal
from qtool.formats.native import Artifact
from tests.conftest import ROOT, make_tensors, run, write_checkpoint


def _doc_loader_source() -> str:
    text = (ROOT / "docs" / "FORMAT.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    (src,) = [b for b in blocks if "def load_qtool" in b]
    return src


@pytest.mark.parametrize("args", [["--scheme", "gnmt"], ["--scheme", "asymmetric"],
                                  ["--granularity", "tensor"],
                                  ["--granularity", "group", "--group-size", "5"]])
def test_format_md_loader_runs_and_matches_dequantize(tmp_path, args):
    tensors = {k: v for k, v in make_tensors().items() if k != "head.weight64"}
    src = write_checkpoint(tmp_path / "m.safetensors", tensors)
    out = tmp_path / "o"
    run("quantize", src, out, *args, "-q")
    run("dequantize", out, tmp_path / "r.safetensors", "--dtype", "float32", "-q")
    expected = load_file(str(tmp_path / "r.safetensors"))
    # Run the documented loader in a fresh interpreter, exactly as a user would paste it.
    script = _doc_loader_source() + (
        "\nimport sys, pickle\n"
        "res = load_qtool(sys.argv[1], 'm')\n"
        "sys.stdout.buffer.write(pickle.dumps({k: np.asarray(v) for k, v in res.items()}))\n"
    )
    p = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True,
                       check=True)
    import pickle

    got = pickle.loads(p.stdout)
    assert set(got) == set(expected)
    for name, w in expected.items():
        np.testing.assert_array_equal(np.asarray(got[name], dtype=w.dtype), w, err_msg=name)


def _artifact(tmp_path):
    src = write_checkpoint(tmp_path / "m.safetensors")
    out = tmp_path / "o"
    run("quantize", src, out, "-q")
    return out


def test_open_reads_manifest(tmp_path):
    art = Artifact.open(_artifact(tmp_path))
    names = [t.name for t in art.manifest.tensors]
    assert len(names) == 10
    q = [t for t in art.manifest.tensors if t.quantized]
    assert {t.spec.scheme for t in q} == {"symmetric"}


def test_unknown_format_version_names_supported_one(tmp_path):
    out = _artifact(tmp_path)
    m = json.loads((out / "qtool.json").read_text())
    m["format_version"] = 99
    (out / "qtool.json").write_text(seal(m))
    with pytest.raises(ArtifactError, match="unknown format_version 99.*reads format_version 1"):
        Artifact.open(out)
    r = run("dequantize", out, tmp_path / "r.safetensors", expect=2)
    assert "format_version 99" in r.stderr


def test_corrupt_manifest_is_exit_2(tmp_path):
    out = _artifact(tmp_path)
    (out / "qtool.json").write_text("{not json")
    r = run("dequantize", out, tmp_path / "r.safetensors", expect=2)
    assert "qtool.json" in r.stderr and "JSON" in r.stderr
    assert not (tmp_path / "r.safetensors").exists()


def test_sidecar_shape_mismatch_is_caught(tmp_path):
    out = _artifact(tmp_path)
    scales = load_file(str(out / "m.scale.safetensors"))
    scales["layers.0.attn.q.weight"] = np.ones((3, 1), np.float32)
    save_file(scales, str(out / "m.scale.safetensors"))
    m = json.loads((out / "qtool.json").read_text())
    m["files"]["m.scale.safetensors"]["size"] = (out / "m.scale.safetensors").stat().st_size
    (out / "qtool.json").write_text(seal(m))
    with pytest.raises(ArtifactError, match=r"layers.0.attn.q.weight.*\[3, 1\].*\[32, 1\]"):
        Artifact.open(out)


def test_missing_file_is_caught(tmp_path):
    out = _artifact(tmp_path)
    (out / "m.zero_point.safetensors").unlink()
    r = run("dequantize", out, tmp_path / "r.safetensors", expect=2)
    assert "m.zero_point.safetensors" in r.stderr


def test_manifest_file_names_cannot_escape(tmp_path):
    out = _artifact(tmp_path)
    m = json.loads((out / "qtool.json").read_text())
    m["files"]["../evil"] = {"size": 1}
    (out / "qtool.json").write_text(seal(m))
    with pytest.raises(ArtifactError, match="not a plain name"):
        Artifact.open(out)


def test_the_manifest_is_read_in_pieces_never_whole(tmp_path):
    """Issue 15: Artifact.load reads qtool.json a piece at a time. Beyond the records it
    returns, it holds well under half the file's size at any time (reading the file whole
    held its bytes and its text: over the file's size on top of the records)."""
    import tracemalloc

    from qtool.formats.manifest import MANIFEST, Manifest, TensorRecord

    recs = [TensorRecord(f"model.layers.{i}.mlp.experts.w", "m.safetensors", "F32", (0, 8),
                         passthrough="empty tensor") for i in range(40_000)]
    with open(tmp_path / MANIFEST, "w") as f:
        Manifest(source={}, tensors=recs, shards=["m.safetensors"]).write(f)
    size = (tmp_path / MANIFEST).stat().st_size
    tracemalloc.start()
    try:
        art = Artifact.load(tmp_path)
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert art.manifest.tensors == recs
    assert size > 8_000_000 and peak - held < 0.5 * size, (size, held, peak)


@pytest.mark.parametrize("blob_edit, message", [
    (lambda b: b.replace(b'"format": "qtool"', b'"format": "qt\xffol"', 1),
     "cannot read (invalid start byte at byte 16)"),
    (lambda b: b + b" " * 20, "different bytes than qtool writes"),
])
def test_a_manifest_the_piecewise_read_refuses_is_named_by_the_whole_read(tmp_path, blob_edit,
                                                                           message):
    """Not UTF-8, or not exactly qtool's text: the read in pieces gives up and the whole
    read says what is wrong, in one line, as before."""
    out = _artifact(tmp_path)
    path = out / "qtool.json"
    blob = blob_edit(path.read_bytes())
    path.write_bytes(blob)
    for args in (["verify", out], ["report", out]):
        r = run(*args, expect=2)
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and message in lines[0] and str(path) in lines[0], r.stderr
    assert path.read_bytes() == blob
