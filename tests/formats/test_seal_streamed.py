"""The manifest is written record by record (Manifest.to_json -> seal_streamed, to bound the
memory of 100,000 records): its text must be exactly what seal() makes of the whole
document, whatever the records hold (names with quotes, backslashes, newlines and non-ASCII,
nested lists, a key "tensors" elsewhere in the document, no records at all)."""

from __future__ import annotations

import json

import pytest

from qtool.formats.manifest import seal, seal_streamed


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
    doc = json.loads(whole)
    assert doc["tensors"] == records and list(doc)[-2:] == ["tensors", "manifest_digest"]
