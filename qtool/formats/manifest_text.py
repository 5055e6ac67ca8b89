"""The manifest's text: how qtool writes it (sealed with its manifest_digest, record by record)
and a reader that takes a manifest written exactly that way apart one record at a time.

Both exist for checkpoints of very many tensors: a manifest of 200,000 records parsed whole
is several hundred MB of dicts, and its re-serialisation for the guard (the pure-Python
encoder, as ``indent`` is set) as much again; record by record, each record's dict goes as
soon as it has been checked and converted.
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO, TypeVar

from qtool.formats import digest as _digest
from qtool.formats._common import CheckpointError, check_strict_utf8, reject_constant

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
PIECE = 1 << 18  # characters (bytes, from a file) taken at a time


def read_streamed(text: str | Iterable[str], convert: Callable[[dict[str, Any], int], T],
                  versions: tuple[int, ...]) -> tuple[dict[str, Any], list[T]] | None:
    """A manifest of a format version in ``versions`` (2 or later: sealed) whose text is
    exactly what :func:`seal_streamed` writes and whose manifest_digest matches, as ``(doc
    without its records, converted records)``, reading one record at a time. None for anything
    else (including a record ``convert`` refuses): the caller then parses the whole text as
    before, which names what is wrong.

    ``text`` is the whole text or its successive pieces (a file decoded a chunk at a time):
    only the head, the record being read and one piece are held, never the whole text, so
    200,000 records cost their converted form and not also 50 MB of text.

    Accepting here implies the whole-document checks pass: the head (with ``"tensors": []``)
    re-serialises to its own text, each record to its slice, the separators are the encoder's,
    so the text is ``_serialize(doc)``; the canonical digest is hashed piece by piece exactly
    as :func:`canonical_digest` hashes the whole."""
    pieces = (text[i:i + PIECE] for i in range(0, len(text), PIECE)) \
        if isinstance(text, str) else iter(text)
    try:
        return _read_streamed(_Text(pieces), convert, versions)
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError, OverflowError,
            CheckpointError):  # ArtifactError: from convert, or the pieces of a file
        return None


def text_pieces(fd: int, limit: int) -> Iterator[str]:
    """The UTF-8 text of the open file ``fd``, a piece at a time; CheckpointError when it is
    not UTF-8, cannot be read or is over ``limit`` bytes (read_streamed then gives None, and
    the whole read names the problem)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    total = 0
    try:
        while chunk := os.read(fd, PIECE):
            total += len(chunk)
            if total > limit:
                raise CheckpointError(f"over the {limit}-byte limit")
            yield decoder.decode(chunk)
        yield decoder.decode(b"", final=True)
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(str(e)) from None


class _Text:
    """The text being read, a piece at a time: what is left of the pieces taken, from
    ``pos`` on (what is before ``pos`` is dropped once it is a piece long)."""

    def __init__(self, pieces: Iterator[str]) -> None:
        self.pieces = pieces
        self.buf = ""
        self.pos = 0

    def _more(self, count: int) -> bool:
        """Take pieces until ``count`` characters are there from ``pos``; False when the
        text ends first."""
        if self.pos >= PIECE:
            self.buf, self.pos = self.buf[self.pos:], 0
        while len(self.buf) - self.pos < count:
            piece = next(self.pieces, None)
            if piece is None:
                return False
            self.buf += piece
        return True

    def at(self, s: str, skip: bool = True) -> bool:
        """Whether the text goes on with ``s`` (then skipped, unless ``skip`` is false)."""
        self._more(len(s))
        if self.buf.startswith(s, self.pos):
            self.pos += len(s) if skip else 0
            return True
        return False

    def until(self, s: str) -> str | None:
        """The text before the next ``s`` (then skipped), None when there is none."""
        seen = 0  # characters from pos already searched (pieces taken may move pos)
        while (i := self.buf.find(s, self.pos + seen)) < 0:
            seen = max(0, len(self.buf) - self.pos - len(s) + 1)
            if not self._more(len(self.buf) - self.pos + 1):
                return None
        before, self.pos = self.buf[self.pos:i], i + len(s)
        return before

    def value(self, decoder: json.JSONDecoder) -> tuple[Any, str]:
        """The JSON value at ``pos`` and its text. A value cut short by the end of the
        pieces taken fails to parse: then twice as much is taken and it is parsed again
        (a JSON object ends only with its closing brace, so a shorter parse cannot succeed)."""
        while True:
            try:
                value, end = decoder.raw_decode(self.buf, self.pos)
                break
            except json.JSONDecodeError:
                have = len(self.buf) - self.pos
                self._more(2 * have + 1)
                if len(self.buf) - self.pos == have:  # nothing more: the text is cut short
                    raise
        text, self.pos = self.buf[self.pos:end], end
        return value, text

    def rest(self) -> str:
        rest = [self.buf[self.pos:], *self.pieces]
        self.buf, self.pos = "", 0
        return "".join(rest)


def _canonical_parts(head: dict[str, Any]) -> tuple[str, str]:
    """The canonical text of ``head`` (records, manifest_digest left out) before and after
    where its records go."""
    mark = os.urandom(16).hex()
    body = {k: v for k, v in head.items() if k != "manifest_digest"} | {"tensors": mark}
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    before, after = canon.split(json.dumps(mark), 1)
    return before, after


def _read_streamed(text: _Text, convert: Callable[[dict[str, Any], int], T],
                   versions: tuple[int, ...]) -> tuple[dict[str, Any], list[T]] | None:
    start = text.until(_TENSORS)
    if start is None:
        return None
    # The keys before the records (qtool writes them all there) give the version and digest
    # algorithm the records are read and hashed with; the whole head is checked at the end.
    early = json.loads(start + _TENSORS + "]\n}", parse_constant=reject_constant)
    if not isinstance(early, dict) or type(early.get("format_version")) is not int or \
            early["format_version"] not in versions or \
            early.get("digest") not in _digest.ALGORITHMS:
        return None
    version, algorithm = early["format_version"], early["digest"]
    before, _ = _canonical_parts(early)
    del early
    hasher = _digest.new(algorithm)
    hasher.update((before + "[").encode("utf-8"))
    decoder = json.JSONDecoder(parse_constant=reject_constant)
    records: list[T] = []
    if not text.at("]"):
        if not text.at(_FIRST):
            return None
        while True:
            if not text.at("{", skip=False):
                return None
            rec, piece = text.value(decoder)
            check_strict_utf8(piece, rec)
            if not isinstance(rec, dict) or \
                    json.dumps(rec, indent=1).replace("\n", "\n  ") != piece:
                return None
            hasher.update((("," if records else "") + json.dumps(
                rec, sort_keys=True, separators=(",", ":"), ensure_ascii=False)).encode("utf-8"))
            records.append(convert(rec, version))
            if text.at(_CLOSE):
                break
            if not text.at(_NEXT):
                return None
    head_text = start + _TENSORS + "]" + text.rest()
    head = json.loads(head_text, parse_constant=reject_constant)
    check_strict_utf8(head_text, head)
    if not isinstance(head, dict) or head.get("format") != "qtool" or \
            head.get("format_version") != version or head.get("digest") != algorithm or \
            head.get("tensors") != [] or _serialize(head) != head_text:
        return None
    want = head.get("manifest_digest")
    head_before, after = _canonical_parts(head)
    if head_before != before or not _is_hex(want, algorithm):
        return None
    hasher.update(("]" + after).encode("utf-8"))
    if hasher.hexdigest() != want:
        return None
    return head, records
