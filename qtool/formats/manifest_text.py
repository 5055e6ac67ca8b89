"""The manifest's text: how qtool writes it (sealed with its manifest_digest, record by record)
and a reader that takes a manifest written exactly that way apart one record at a time.

Both exist for checkpoints of very many tensors: a manifest of 200,000 records parsed whole
is several hundred MB of dicts, and its re-serialisation for the guard (the pure-Python
encoder, as ``indent`` is set) as much again; record by record, each record's dict goes as
soon as it has been checked and converted.
"""

from __future__ import annotations

import json
import os
from array import array
from collections.abc import Callable, Iterator
from typing import Any, TextIO, TypeVar

from qtool.formats import digest as _digest
from qtool.formats._common import check_strict_utf8, reject_constant

T = TypeVar("T")


def _serialize(doc: dict[str, Any]) -> str:
    """The bytes qtool writes for a manifest document (readers check a version-2 manifest is
    exactly this, so that even an edit that keeps the meaning, such as 1e-05 -> 1E-05, shows)."""
    return json.dumps(doc, indent=1) + "\n"


def seal(doc: dict[str, Any]) -> str:
    """The text of a manifest document with its manifest_digest (re)computed. The digest
    catches accidents and naive edits; it is no signature (anyone can seal a document)."""
    doc = {k: v for k, v in doc.items() if k != "manifest_digest"}
    doc["manifest_digest"] = canonical_digest(doc, doc.get("digest", _digest.DEFAULT))
    return _serialize(doc)


def seal_streamed(head: dict[str, Any], tensors: Iterator[dict[str, Any]]) -> str:
    """``seal(head | {"tensors": list(tensors)})``, the same text, built one record at a time:
    each record's dict goes as soon as its two JSON forms are written, so that 100,000 records
    are never all held as dicts at once (they were the largest per-tensor cost)."""
    canon, text = [], []
    for t in tensors:
        canon.append(json.dumps(t, sort_keys=True, separators=(",", ":"), ensure_ascii=False))
        # indent=1 inside the top-level list: every line of the record two spaces deeper
        # (JSON strings never hold a raw newline, so only line breaks are replaced).
        text.append(json.dumps(t, indent=1).replace("\n", "\n  "))
    mark = json.dumps(os.urandom(16).hex())  # a placeholder no other value can equal
    doc = {k: v for k, v in head.items() if k != "manifest_digest"} | {"tensors": mark[1:-1]}
    algorithm = doc.get("digest", _digest.DEFAULT)
    body = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    body = body.replace(mark, "[" + ",".join(canon) + "]", 1)
    del canon
    doc["manifest_digest"] = _digest.of_bytes(body.encode("utf-8"), algorithm)
    del body
    return _serialize(doc).replace(
        mark, "[\n  " + ",\n  ".join(text) + "\n ]" if text else "[]", 1)


def write_sealed(out: TextIO, head: dict[str, Any],
                 records: Callable[[], Iterator[dict[str, Any]]]) -> None:
    """``seal_streamed(head, records())`` written to ``out`` piece by piece, holding neither
    the records' texts nor the whole text: ``records()`` is iterated twice, once for the
    canonical digest (hashed a record at a time), once for the text (whose manifest_digest,
    the last key, follows the records)."""
    mark = json.dumps(os.urandom(16).hex())  # a placeholder no other value can equal
    doc = {k: v for k, v in head.items() if k != "manifest_digest"} | {"tensors": mark[1:-1]}
    algorithm = doc.get("digest", _digest.DEFAULT)
    before, after = json.dumps(doc, sort_keys=True, separators=(",", ":"),
                               ensure_ascii=False).split(mark, 1)
    hasher = _digest.new(algorithm)
    hasher.update((before + "[").encode("utf-8"))
    for k, t in enumerate(records()):
        hasher.update((("," if k else "") + json.dumps(
            t, sort_keys=True, separators=(",", ":"), ensure_ascii=False)).encode("utf-8"))
    hasher.update(("]" + after).encode("utf-8"))
    doc["manifest_digest"] = hasher.hexdigest()
    text_before, text_after = _serialize(doc).split(mark, 1)
    out.write(text_before)
    first = True
    for t in records():
        out.write(("[\n  " if first else ",\n  ") + json.dumps(t, indent=1).replace("\n", "\n  "))
        first = False
    out.write("[]" if first else "\n ]")
    out.write(text_after)


def canonical_digest(doc: dict[str, Any], algorithm: str) -> str:
    """The digest of a manifest's canonical content: every field but ``manifest_digest``, as
    JSON with sorted keys, no whitespace, UTF-8 (docs/FORMAT.md)."""
    body = {k: v for k, v in doc.items() if k != "manifest_digest"}
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return _digest.of_bytes(canon.encode("utf-8"), algorithm)


def _is_hex(value: object, algorithm: str) -> bool:
    return (isinstance(value, str) and len(value) == _digest.HEX_LENGTH[algorithm]
            and all(c in "0123456789abcdef" for c in value))


_TENSORS = '\n "tensors": ['  # the top-level key: only top-level keys are indented by one
_NEXT = ",\n  "
_FIRST = "\n  "
_CLOSE = "\n ]"


def read_streamed(text: str, convert: Callable[[dict[str, Any], int], T],
                  versions: tuple[int, ...]) -> tuple[dict[str, Any], list[T]] | None:
    """A manifest of a format version in ``versions`` (2 or later: sealed) whose text is
    exactly what :func:`seal_streamed` writes and whose manifest_digest matches, as ``(doc
    without its records, converted records)``, reading one record at a time. None for anything else
    (including a record ``convert`` refuses): the caller then parses the whole text as
    before, which names what is wrong.

    Accepting here implies the whole-document checks pass: the head (with ``"tensors": []``)
    re-serialises to its own text, each record to its slice, the separators are the encoder's,
    so the text is ``_serialize(doc)``; the canonical digest is hashed piece by piece exactly
    as :func:`canonical_digest` hashes the whole."""
    try:
        return _read_streamed(text, convert, versions)
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError, OverflowError):
        return None
    except Exception as e:  # ArtifactError from convert (imported lazily: no cycle)
        from qtool.formats._common import CheckpointError

        if isinstance(e, CheckpointError):
            return None
        raise


def _read_streamed(text: str, convert: Callable[[dict[str, Any], int], T],
                   versions: tuple[int, ...]) -> tuple[dict[str, Any], list[T]] | None:
    i = text.find(_TENSORS)
    if i < 0:
        return None
    pos = i + len(_TENSORS)
    spans = array("q")  # start, end of each record: 16 bytes each, not two int objects
    if text.startswith("]", pos):
        tail = pos + 1
    elif text.startswith(_FIRST, pos):
        pos += len(_FIRST)
        decoder = json.JSONDecoder(parse_constant=reject_constant)
        while True:
            if not text.startswith("{", pos):
                return None
            _, end = decoder.raw_decode(text, pos)  # parsed again below, one at a time
            spans.extend((pos, end))
            if text.startswith(_NEXT, end):
                pos = end + len(_NEXT)
            elif text.startswith(_CLOSE, end):
                tail = end + len(_CLOSE)
                break
            else:
                return None
    else:
        return None
    head_text = text[:i] + _TENSORS + "]" + text[tail:]
    head = json.loads(head_text, parse_constant=reject_constant)
    check_strict_utf8(head_text, head)
    if not isinstance(head, dict) or head.get("format") != "qtool" or \
            type(head.get("format_version")) is not int or \
            head["format_version"] not in versions or \
            head.get("tensors") != [] or _serialize(head) != head_text:
        return None
    algorithm = head.get("digest")
    want = head.get("manifest_digest")
    if algorithm not in _digest.ALGORITHMS or not _is_hex(want, algorithm):
        return None
    mark = os.urandom(16).hex()
    body = {k: v for k, v in head.items() if k != "manifest_digest"} | {"tensors": mark}
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    before, after = canon.split(json.dumps(mark), 1)
    hasher = _digest.new(algorithm)
    hasher.update((before + "[").encode("utf-8"))
    decoder = json.JSONDecoder(parse_constant=reject_constant)
    records: list[T] = []
    for k in range(len(spans) // 2):
        start, end = spans[2 * k], spans[2 * k + 1]
        piece = text[start:end]
        rec = decoder.decode(piece)
        check_strict_utf8(piece, rec)
        if not isinstance(rec, dict) or \
                json.dumps(rec, indent=1).replace("\n", "\n  ") != piece:
            return None
        hasher.update((("," if k else "") + json.dumps(
            rec, sort_keys=True, separators=(",", ":"), ensure_ascii=False)).encode("utf-8"))
        records.append(convert(rec, head["format_version"]))
    hasher.update(("]" + after).encode("utf-8"))
    if hasher.hexdigest() != want:
        return None
    return head, records
