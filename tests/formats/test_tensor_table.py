"""The compact per-file tensor table (qtool.formats.tensor_table), checked against the plain
structures it replaces: a dict by name, a list of TensorInfo sorted by (offset, size)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from qtool.formats._common import CheckpointError, TensorInfo
from qtool.formats.safetensors import SafetensorsFile
from qtool.formats.shards import open_checkpoint
from qtool.formats.tensor_table import NameIndex, TensorChain, TensorTable


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(max_size=6), max_size=300), st.lists(st.text(max_size=6), max_size=30))
def test_name_index_is_a_dict_of_first_positions(names: list[str], probes: list[str]) -> None:
    stored: list[str] = []
    index = NameIndex(stored)
    want: dict[str, int] = {}
    for name in names:
        stored.append(name)
        got = index.add(len(stored) - 1)
        if name in want:
            assert got == want[name]
            stored.pop()  # as TensorTable does with a duplicate
        else:
            assert got == -1
            want[name] = len(stored) - 1
    for name in [*names, *probes]:
        assert index.get(name) == want.get(name, -1)


def _fail(msg: str, name: object = None) -> Exception:
    return CheckpointError(f"{name}: {msg}")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.sampled_from(["F32", "I8", "BF16"])),
                min_size=0, max_size=40), st.randoms(use_true_random=False))
def test_table_is_the_sorted_list_of_its_tensors(sizes, rnd) -> None:
    # Tensors tiling the data area, added in a shuffled (header) order.
    path = Path("/x/m.safetensors")
    infos, pos = [], 0
    for k, (count, code) in enumerate(sizes):
        nbytes = count * {"F32": 4, "I8": 1, "BF16": 2}[code]
        infos.append(TensorInfo(f"t{k}", code, (count,), 100 + pos, nbytes, path))
        pos += nbytes
    header = infos[:]
    rnd.shuffle(header)
    table = TensorTable(path)
    for t in header:
        assert table.add(t.name, t.dtype, t.shape, t.offset, t.nbytes)
    assert not header or not table.add(header[0].name, "F32", (1,), 0, 4)  # a duplicate
    table.seal(100, pos, _fail)
    # The old order: two stable sorts of the header order, by size then by offset.
    want = sorted(sorted(header, key=lambda t: t.nbytes), key=lambda t: t.offset)
    assert list(table) == want and table == want and len(table) == len(want)
    assert [table[k] for k in range(len(want))] == want
    assert table[1:3] == want[1:3]
    assert table.names() == [t.name for t in want]
    for t in want:
        assert table.find(t.name) == t and t.name in table and table.holds(t)
    assert table.find("nope") is None and "nope" not in table
    if want:
        moved = TensorInfo(want[0].name, want[0].dtype, want[0].shape, want[0].offset + 1,
                           want[0].nbytes, path)
        assert not table.holds(moved)


def test_table_seal_names_overlaps_gaps_and_trailing_bytes() -> None:
    path = Path("m")
    cases = [([("a", 0, 8), ("b", 4, 8)], "overlap tensor 'a' which ends at 8"),
             ([("a", 0, 4), ("b", 8, 4)], "leave a gap: bytes [4, 8)"),
             ([("a", 0, 4)], "4 trailing bytes after the last tensor")]
    for entries, message in cases:
        table = TensorTable(path)
        for name, begin, nbytes in entries:
            table.add(name, "I8", (nbytes,), 16 + begin, nbytes)
        with pytest.raises(CheckpointError, match=message.replace("[", r"\[").replace(")", r"\)")):
            table.seal(16, 8, _fail)


def test_reader_and_checkpoint_hand_out_equal_infos(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    tensors = {"z": rng.standard_normal((3, 4)).astype(np.float32),
               "a": np.zeros((0, 5), np.float16), "m": np.arange(7, dtype=np.int8)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, path)
    with SafetensorsFile(path) as f:
        assert set(f.keys()) == set(tensors) and len(f) == 3
        for name, arr in tensors.items():
            info = f[name]
            assert (info.shape, info.np_dtype, info.path) == (arr.shape, arr.dtype, path)
            np.testing.assert_array_equal(f.read(info), arr)
            np.testing.assert_array_equal(f.read(name), arr)
        fake = TensorInfo("z", "F32", (3, 4), f["m"].offset, 48, path)
        with pytest.raises(ValueError, match="not from this file"):
            f.read(fake)
        with pytest.raises(KeyError, match="no tensor 'q'"):
            f["q"]
    ckpt = open_checkpoint(path)
    assert ckpt.tensors() == list(SafetensorsFile(path).tensors)


def test_chain_is_the_concatenation_of_its_tables() -> None:
    tables = []
    for k, n in enumerate([2, 0, 3]):
        t = TensorTable(Path(f"s{k}"))
        for i in range(n):
            t.add(f"s{k}.{i}", "I8", (1,), 8 + i, 1)
        t.seal(8, n, _fail)
        tables.append(t)
    chain = TensorChain(tables)
    flat = [info for t in tables for info in t]
    assert len(chain) == 5 and list(chain) == flat and chain == flat
    assert [chain[k] for k in range(-5, 5)] == flat + flat
    assert chain[1:4] == flat[1:4]
    with pytest.raises(IndexError):
        chain[5]
