"""The manifest is written record by record (Manifest.to_json -> seal_streamed, to bound the
memory of 100,000 records): its text must be exactly what seal() makes of the whole
document, whatever the records hold (names with quotes, backslashes, newlines and non-ASCII,
nested lists, a key "tensors" elsewhere in the document, no records at all)."""

from __future__ import annotations

import io
import json

import pytest

from qtool.formats.manifest import seal, seal_streamed
from qtool.formats.manifest_text import read_streamed, write_sealed


def _record(i: int) -> dict:
    return {"name": f"layers.{i}.w\u00e9\"x\\n\n", "shape": [i, 3],
            "metrics": {"b": 1.5e-5, "a": None, "c": -0.0} if i % 2 else {},
            "z": [], "q": {"k": [1, {"y": "tensors"}]}}


@pytest.mark.parametrize("count", [0, 1, 2, 7])
@pytest.mark.parametrize("algorithm", ["blake3", "sha256"])
def test_streamed_seal_is_the_whole_documents_seal(count, algorithm):
    head = {"format": "qtool", "format_version": 2, "qtool_version": "0.0", "digest": algorithm,
            "source": {"files": [{"name": "a", "tensors": []}], "metadata": {"tensors": "[]"}},
            "shards": ["a"], "index": None, "files": {"a": {"size": 3}}}
    records = [_record(i) for i in range(count)]
    whole = seal(head | {"tensors": records})
    assert seal_streamed(head, iter(records)) == whole
    out = io.StringIO()
    write_sealed(out, head, lambda: iter(records))  # what quantize writes, piece by piece
    assert out.getvalue() == whole
    doc = json.loads(whole)
    assert doc["tensors"] == records and list(doc)[-2:] == ["tensors", "manifest_digest"]
    # ... and reads back record by record: the same head and records as the whole parse.
    got = read_streamed(whole, lambda t, v: (v, t), (2,))
    assert got is not None
    assert got[0] == {k: v for k, v in doc.items() if k != "tensors"} | {"tensors": []}
    assert got[1] == [(2, r) for r in records]


@pytest.mark.parametrize("edit", [
    ('"shape": [\n', '"shape":[\n'),  # same meaning, other bytes
    ('"b": 1.5e-05', '"b": 1.5E-05'),
    ('"format_version": 2', '"format_version": 3'),  # not a version asked for
    ('"index": null', '"index": null, "index": null'),
    ('"z": []', '"z": [], "z": []'),  # a duplicate key inside a record
])
def test_anything_but_qtools_exact_text_is_left_to_the_whole_parse(edit):
    head = {"format": "qtool", "format_version": 2, "qtool_version": "0.0", "digest": "blake3",
            "source": {}, "shards": ["a"], "index": None, "files": {}}
    whole = seal(head | {"tensors": [_record(i) for i in range(3)]})
    assert edit[0] in whole
    assert read_streamed(whole.replace(edit[0], edit[1], 1), lambda t, v: t, (2,)) is None


def test_a_record_changed_after_sealing_is_left_to_the_whole_parse():
    head = {"format": "qtool", "format_version": 2, "qtool_version": "0.0", "digest": "blake3",
            "source": {}, "shards": ["a"], "index": None, "files": {}}
    whole = seal(head | {"tensors": [_record(i) for i in range(3)]})
    assert read_streamed(whole, lambda t, v: t, (2,)) is not None
    changed = whole.replace('"layers.1.', '"layers.9.', 1)  # same layout, digest no longer fits
    assert changed != whole and read_streamed(changed, lambda t, v: t, (2,)) is None
