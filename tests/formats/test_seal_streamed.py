"""The manifest is written record by record (Manifest.to_json -> seal_streamed, to bound the
memory of 100,000 records): its text must be exactly what seal() makes of the whole
document, whatever the records hold (names with quotes, backslashes, newlines and non-ASCII,
nested lists, a key "tensors" elsewhere in the document, no records at all)."""

from __future__ import annotations

import io
import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qtool.formats import manifest_text
from qtool.formats._common import check_strict_utf8, reject_constant, unique_object
from qtool.formats.digest import ALGORITHMS
from qtool.formats.manifest import seal, seal_streamed
from qtool.formats.manifest_text import _serialize, canonical_digest, read_streamed, write_sealed


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


# --------------------------------------------------------------------------- pieces


def _strict(text: str, versions: tuple[int, ...]) -> tuple[dict, list] | None:
    """What the whole-document parse (Manifest.from_json's strict branch) accepts, as the
    streamed reader returns it; None where it refuses."""
    try:
        doc = json.loads(text, parse_constant=reject_constant, object_pairs_hook=unique_object)
        check_strict_utf8(text, doc)
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != "qtool" or \
            type(doc.get("format_version")) is not int or doc["format_version"] not in versions:
        return None
    algorithm = doc.get("digest")
    if algorithm not in ALGORITHMS or not isinstance(doc.get("manifest_digest"), str) or \
            canonical_digest(doc, algorithm) != doc["manifest_digest"] or \
            _serialize(doc) != text or not isinstance(doc.get("tensors"), list):
        return None
    return {k: v for k, v in doc.items() if k != "tensors"} | {"tensors": []}, doc["tensors"]


def _pieces(text: str, sizes: list[int]) -> list[str]:
    out, pos, k = [], 0, 0
    while pos < len(text):
        step = sizes[k % len(sizes)]
        out.append(text[pos:pos + step])
        pos, k = pos + step, k + 1
    return out


_HEAD = {"format": "qtool", "format_version": 2, "qtool_version": "0.0", "digest": "blake3",
         "source": {"files": [{"name": "a", "tensors": []}]}, "shards": ["a"], "index": None,
         "files": {"a": {"size": 3}}}


@settings(max_examples=300, deadline=None)
@given(count=st.integers(0, 5), sizes=st.lists(st.integers(1, 80), min_size=1, max_size=6),
       edit=st.one_of(st.none(), st.tuples(st.integers(0, 10**6), st.integers(0, 3),
                                           st.sampled_from(['"', "\\", "\n", " ", ",", "]",
                                                            "}", "{", "1", "e", "\u00e9", ""]))))
def test_pieces_of_any_size_read_exactly_as_the_whole_parse(count, sizes, edit):
    """The reader takes the text in pieces cut anywhere (a record, a key, a separator or the
    marker of the records split across pieces): it accepts only what the whole parse accepts,
    with the same head and records, and always accepts qtool's own text."""
    records = [_record(i) for i in range(count)]
    text = seal(_HEAD | {"tensors": records})
    if edit is not None:
        pos = edit[0] % len(text)
        text = text[:pos] + edit[2] + text[pos + edit[1]:]
    got = read_streamed(iter(_pieces(text, sizes)), lambda t, v: t, (2,))
    want = _strict(text, (2,))
    if edit is None:
        assert want is not None and got == want
    elif got is not None:  # an edit may still leave a valid text (e.g. "" for "")
        assert got == want


def test_a_record_longer_than_many_pieces_is_read(monkeypatch, tmp_path):
    """A record far longer than a piece (read by doubling what is taken), from a file read
    3 bytes at a time: the same as the whole parse."""
    monkeypatch.setattr(manifest_text, "PIECE", 3)
    records = [_record(0) | {"long": "x\u00e9\u4e2d" * 5000}, _record(1)]
    text = seal(_HEAD | {"tensors": records})
    (tmp_path / "m.json").write_bytes(text.encode("utf-8"))
    fd = os.open(tmp_path / "m.json", os.O_RDONLY)
    try:
        got = read_streamed(manifest_text.text_pieces(fd, 10**9), lambda t, v: t, (2,))
    finally:
        os.close(fd)
    assert got is not None and got == _strict(text, (2,)) and got[1] == records


def test_file_pieces_cut_inside_utf8_sequences_decode_as_the_whole(monkeypatch, tmp_path):
    monkeypatch.setattr(manifest_text, "PIECE", 3)
    text = "a\u00e9\u4e2d\U0001f600b" * 7  # 1- to 4-byte sequences, cut everywhere by 3
    (tmp_path / "t").write_bytes(text.encode("utf-8"))
    fd = os.open(tmp_path / "t", os.O_RDONLY)
    try:
        pieces = list(manifest_text.text_pieces(fd, 10**9))
    finally:
        os.close(fd)
    assert "".join(pieces) == text and len(pieces) > 20


def test_a_file_over_the_limit_or_not_utf8_is_left_to_the_whole_read(tmp_path):
    text = seal(_HEAD | {"tensors": [_record(0)]})
    for blob, limit in ((text.encode(), len(text.encode()) - 1),
                        (text.encode().replace(b"layers", b"lay\xffrs", 1), 10**9)):
        (tmp_path / "m.json").write_bytes(blob)
        fd = os.open(tmp_path / "m.json", os.O_RDONLY)
        try:
            assert read_streamed(manifest_text.text_pieces(fd, limit), lambda t, v: t,
                                 (2,)) is None
        finally:
            os.close(fd)
    (tmp_path / "m.json").write_bytes(text.encode())
    fd = os.open(tmp_path / "m.json", os.O_RDONLY)
    try:
        assert read_streamed(manifest_text.text_pieces(fd, len(text.encode())),
                             lambda t, v: t, (2,)) == _strict(text, (2,))
    finally:
        os.close(fd)
