"""The documented per-checkpoint limits (docs/SECURITY.md, "Very many tensors"): tensors,
header bytes and metadata, for one file, a sharded checkpoint as a whole, and its index.
Each check runs as a user runs qtool, with the limit scaled down by monkeypatching the
constant the code reads, so the files stay small; the real values are checked against the
documentation."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from qtool.formats import _common
from tests.conftest import ROOT, raw_file, run
from tests.test_security import assert_one_line_error, leftovers, snapshot


def _entries(names: list[str]) -> str:
    return ",".join(f'"{n}":{{"dtype":"F32","shape":[0,4],"data_offsets":[0,0]}}'
                    for n in names)


def _file(path: Path, names: list[str], metadata: dict | None = None) -> Path:
    head = _entries(names)
    if metadata is not None:
        head = f'"__metadata__":{json.dumps(metadata)},' + head
    path.write_bytes(raw_file("{" + head + "}"))
    return path


def _sharded(root: Path, counts: list[int], metadata: dict | None = None) -> Path:
    """A checkpoint of ``counts[k]`` empty tensors in shard k, and its index."""
    root.mkdir()
    weight_map = {}
    for k, n in enumerate(counts):
        shard = f"model-{k + 1:05d}-of-{len(counts):05d}.safetensors"
        names = [f"layers.{k}.t{i}" for i in range(n)]
        _file(root / shard, names)
        weight_map.update(dict.fromkeys(names, shard))
    index = root / "model.safetensors.index.json"
    doc = {"metadata": metadata or {"total_size": 0}, "weight_map": weight_map}
    index.write_text(json.dumps(doc, indent=2))
    return index


def _refused(tmp_path: Path, command: str, src: Path, *fragments: str) -> None:
    """``command`` on ``src`` exits 2 with one line holding ``fragments``, leaves nothing
    behind and does not touch its input."""
    before = snapshot(tmp_path)
    args = [tmp_path / "out"] if command == "quantize" else []
    assert_one_line_error(run(command, src, *args, expect=2), *fragments)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    assert snapshot(tmp_path) == before


def _accepted(tmp_path: Path, command: str, src: Path) -> None:
    args = [tmp_path / "ok-out"] if command == "quantize" else []
    run(command, src, *args, "-q")


def test_the_documented_limits_are_the_ones_enforced():
    text = (ROOT / "docs" / "SECURITY.md").read_text()
    count = f"{_common.TENSOR_COUNT_LIMIT:,}".replace(",", " ")
    assert f"at most {count} tensors" in text
    assert f"{_common.HEADER_SIZE_LIMIT // 2**20} MiB of headers" in text
    assert _common.METADATA_SIZE_LIMIT == 2**20 and "1 MiB of metadata" in text
    assert _common.INDEX_SIZE_LIMIT == _common.HEADER_SIZE_LIMIT
    from qtool.formats.manifest import MANIFEST_SIZE_LIMIT

    assert f"{MANIFEST_SIZE_LIMIT // 2**20} MiB" in text




@pytest.mark.parametrize("command", ["quantize", "report"])
def test_a_sharded_checkpoint_counts_its_tensors_as_a_whole(tmp_path, monkeypatch, command):
    monkeypatch.setattr(_common, "TENSOR_COUNT_LIMIT", 50)
    ok = _sharded(tmp_path / "ok", [25, 25])
    bad = _sharded(tmp_path / "bad", [30, 21])  # each shard within the limit, not the sum
    _refused(tmp_path, command, bad, str(bad),
             "weight_map lists 51 tensors, more than qtool's limit of 50 per checkpoint")
    _accepted(tmp_path, command, ok)


def test_an_index_of_very_many_entries_is_refused_before_it_is_parsed(tmp_path, monkeypatch):
    monkeypatch.setattr(_common, "TENSOR_COUNT_LIMIT", 50)
    ckpt = _sharded(tmp_path / "c", [10])
    doc = json.loads(ckpt.read_text())
    doc["weight_map"].update({f"ghost.{i}": "model-00001-of-00001.safetensors"
                              for i in range(2 * 50 + 1001)})
    ckpt.write_text(json.dumps(doc))
    # Refused on the count of colons, before the JSON is parsed (the per-entry error that a
    # parse would give is "not in ...": the shard does not hold the ghosts).
    _refused(tmp_path, "quantize", ckpt, str(ckpt),
             "index lists more tensors than qtool's limit of 50 per checkpoint")


@pytest.mark.parametrize("command", ["quantize", "report"])
def test_the_headers_of_a_checkpoint_are_bounded_as_a_whole(tmp_path, monkeypatch, command):
    ok = _sharded(tmp_path / "ok", [20, 20])
    bad = _sharded(tmp_path / "bad", [20, 21])
    sizes = [len(_file(tmp_path / "probe.safetensors",
                       [f"layers.{k}.t{i}" for i in range(n)]).read_bytes()) - 8
             for k, n in ((0, 20), (1, 20))]
    (tmp_path / "probe.safetensors").unlink()
    monkeypatch.setattr(_common, "HEADER_SIZE_LIMIT", sum(sizes))  # ok fits exactly
    _refused(tmp_path, command, bad, str(bad), f"more than {sum(sizes)} bytes in all",
             "reached at model-00002-of-00002.safetensors")
    _accepted(tmp_path, command, ok)


def test_one_header_over_the_limit_is_refused_unread(tmp_path, monkeypatch):
    src = _file(tmp_path / "m.safetensors", [f"t{i}" for i in range(40)])
    monkeypatch.setattr(_common, "HEADER_SIZE_LIMIT", len(src.read_bytes()) - 9)
    _refused(tmp_path, "quantize", src, str(src),
             f"exceeds the {len(src.read_bytes()) - 9}-byte limit")
    monkeypatch.setattr(_common, "HEADER_SIZE_LIMIT", len(src.read_bytes()) - 8)
    _accepted(tmp_path, "quantize", src)


@pytest.mark.parametrize("command", ["quantize", "report"])
def test_metadata_of_a_file_is_bounded(tmp_path, monkeypatch, command):
    monkeypatch.setattr(_common, "METADATA_SIZE_LIMIT", 100)
    ok = _file(tmp_path / "ok.safetensors", ["w"], {"format": "pt", "x": "y" * 91})
    bad = _file(tmp_path / "bad.safetensors", ["w"], {"format": "pt", "x": "y" * 92})
    _refused(tmp_path, command, bad, str(bad),
             "__metadata__ holds more than 100 characters, qtool's limit")
    _accepted(tmp_path, command, ok)


def test_metadata_of_an_index_is_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(_common, "METADATA_SIZE_LIMIT", 100)
    ok = _sharded(tmp_path / "ok", [3], {"total_size": 0, "note": "n" * 70})
    bad = _sharded(tmp_path / "bad", [3], {"total_size": 0, "note": "n" * 80})
    assert len(json.dumps(json.loads(ok.read_text())["metadata"])) <= 100
    _refused(tmp_path, "quantize", bad, str(bad),
             "index metadata holds more than 100 characters, qtool's limit")
    _accepted(tmp_path, "quantize", ok)


def test_a_header_that_takes_the_whole_parse_is_bounded_before_it(tmp_path, monkeypatch):
    """Keys written with escapes pass the raw count of "data_offsets", and a name with an
    escaped surrogate pair sends the header to the whole-document parse, which builds every
    entry at once: the header's colons bound it before it starts."""
    monkeypatch.setattr(_common, "TENSOR_COUNT_LIMIT", 50)
    n = (8 * 50 + 1000) // 4 + 1
    entry = '"t{}{}":{{"dtype":"F32","shape":[0],"data\\u005foffsets":[0,0]}}'
    head = ",".join(entry.format(i, "\\ud83d\\ude00" if i == 0 else "") for i in range(n))
    src = tmp_path / "sneaky.safetensors"
    src.write_bytes(raw_file("{" + head + "}"))
    assert len(re.findall(rb":", src.read_bytes())) == 4 * n > 8 * 50 + 1000
    assert b"data_offsets" not in src.read_bytes()
    _refused(tmp_path, "quantize", src, str(src),
             "header has too many entries to parse (the limit is 50 tensors)")
    # Below the colon bound, the same header is refused entry by entry by the whole parse.
    few = tmp_path / "few.safetensors"
    few.write_bytes(raw_file("{" + ",".join(entry.format(i, "\\ud83d\\ude00" if i == 0
                                                         else "") for i in range(51)) + "}"))
    _refused(tmp_path, "quantize", few, str(few),
             "header declares more tensors than the limit of 50")


@pytest.mark.parametrize("command", ["verify", "report", "dequantize"])
def test_a_manifest_listing_more_tensors_than_the_limit_is_refused(tmp_path, monkeypatch,
                                                                  command):
    src = _file(tmp_path / "m.safetensors", [f"t{i}" for i in range(6)])
    art = tmp_path / "art"
    run("quantize", src, art, "-q")
    monkeypatch.setattr(_common, "TENSOR_COUNT_LIMIT", 5)
    args = [tmp_path / "restored.safetensors"] if command == "dequantize" else []
    before = snapshot(tmp_path)
    assert_one_line_error(run(command, art, *args, expect=2), str(art / "qtool.json"),
                          "lists more tensors than the limit of 5")
    assert snapshot(tmp_path) == before and leftovers(tmp_path) == []
    monkeypatch.setattr(_common, "TENSOR_COUNT_LIMIT", 6)
    run(command, art, *args, "-q")


def test_a_manifest_not_as_qtool_writes_it_is_bounded_too(tmp_path, monkeypatch):
    """A manifest that is not qtool's exact text takes the whole parse (which then says what
    is wrong with it): the count is checked there too, before the records are built."""
    src = _file(tmp_path / "m.safetensors", [f"t{i}" for i in range(6)])
    art = tmp_path / "art"
    run("quantize", src, art, "-q")
    doc = json.loads((art / "qtool.json").read_text())
    (art / "qtool.json").write_text(json.dumps(doc, indent=1))  # same content, other bytes
    monkeypatch.setattr(_common, "TENSOR_COUNT_LIMIT", 5)
    assert_one_line_error(run("verify", art, expect=2), "lists more tensors than the limit of 5")
    monkeypatch.setattr(_common, "TENSOR_COUNT_LIMIT", 6)
    # within the limit, the whole parse finds what is wrong: the bytes were changed
    assert_one_line_error(run("verify", art, expect=2), "different bytes than qtool writes")


def test_a_real_header_over_the_cap_is_called_too_large_not_foreign(tmp_path, monkeypatch):
    """A header beyond the cap that fits its file and opens a JSON object is a checkpoint too
    large for qtool, not "not a safetensors file?"; the length itself is never echoed."""
    names = [f"t{i}" for i in range(40)]
    src = _file(tmp_path / "m.safetensors", names)
    n = len(src.read_bytes()) - 8
    monkeypatch.setattr(_common, "HEADER_SIZE_LIMIT", n - 1)
    line = assert_one_line_error(run("report", src, expect=2), str(src),
                                 f"exceeds the {n - 1}-byte limit; qtool's limit per checkpoint")
    assert str(n) not in line.replace(str(src), "").replace(str(n - 1), "")
    foreign = tmp_path / "x.bin"
    foreign.write_bytes(n.to_bytes(8, "little") + b"\x00" * n)
    line = assert_one_line_error(run("report", foreign, expect=2), str(foreign),
                                 f"exceeds the {n - 1}-byte limit; not a safetensors file?")
