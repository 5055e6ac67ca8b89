"""`report --format json` writes its rows one at a time (to bound the memory of 100,000
tensors): the text must be exactly json.dumps(document, indent=2), which a round trip through
the json module shows (it keeps key order, and floats print as they were written)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from tests.conftest import make_tensors, run, write_checkpoint


@pytest.mark.parametrize("args", [
    ("--scheme", "symmetric", "--scheme", "asymmetric"),  # two groups, a "best" per row
    ("--fail-under-sqnr", "80"),  # offenders after the rows
])
def test_json_text_is_the_documents_indent_2_dump(tmp_path, args):
    src = write_checkpoint(tmp_path / "m.safetensors", make_tensors())
    res = run("report", src, "--format", "json", *args, expect=None)
    assert res.exit_code in (0, 1)
    doc = json.loads(res.stdout)
    assert len(doc["tensors"]) == doc["tensors_shown"] == 10
    assert res.stdout == json.dumps(doc, indent=2) + "\n"


def test_json_text_of_an_artifact_and_of_no_rows(tmp_path):
    src = tmp_path / "m.safetensors"
    save_file({"w\"\\\u00e9\n": np.ones((3, 4), np.float32)}, str(src))
    run("quantize", src, tmp_path / "q", "--quiet")
    res = run("report", tmp_path / "q", "--format", "json")
    doc = json.loads(res.stdout)
    assert [t["name"] for t in doc["tensors"]] == ["w\"\\\u00e9\n"]
    assert res.stdout == json.dumps(doc, indent=2) + "\n"
    empty = tmp_path / "e.safetensors"
    save_file({}, str(empty))
    res = run("report", empty, "--format", "json")
    doc = json.loads(res.stdout)
    assert doc["tensors"] == [] and res.stdout == json.dumps(doc, indent=2) + "\n"
