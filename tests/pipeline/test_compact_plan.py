"""Per-tensor state held compactly for checkpoints of very many tensors (issue 15): the plan's
items, a shard's slice of them, the header digest hashed piece by piece. Each is checked
against the plain form it replaces (lists of tuples, hashlib over the file's bytes)."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from qtool.core.schemes import QuantSpec
from qtool.formats import digest as _digest
from qtool.formats import safetensors as st_mod
from qtool.formats.safetensors import SafetensorsFile
from qtool.formats.shards import open_checkpoint
from qtool.pipeline.plan import PlanItems, QuantizeOptions, decide, make_plan
from qtool.pipeline.run import _Planned, _shard_spans, _Span


def _checkpoint(tmp_path: Path) -> Path:
    rng = np.random.default_rng(1)
    tensors = {
        "a.weight": rng.standard_normal((4, 8)).astype(np.float32),
        "a.bias": rng.standard_normal(4).astype(np.float32),
        "b.weight": rng.standard_normal((2, 16)).astype(np.float16),
        "c.idx": np.arange(3, dtype=np.int64),
        "d.empty": np.zeros((0, 8), np.float32),
        "e.weight": rng.standard_normal((8, 8)).astype(np.float32),
        "f.weight": rng.standard_normal((3, 8)).astype(np.float32),
    }
    path = tmp_path / "m.safetensors"
    save_file(tensors, path)
    return path


def _sharded(tmp_path: Path, shards: int) -> Path:
    rng = np.random.default_rng(2)
    names = [f"l{i}.weight" for i in range(7)] + ["l0.bias", "l1.bias"]
    weight_map = {}
    for s in range(shards):
        part = {n: (rng.standard_normal((3, 8)) if n.endswith("weight")
                    else rng.standard_normal(3)).astype(np.float32) for n in names[s::shards]}
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, tmp_path / fname)
        weight_map.update(dict.fromkeys(part, fname))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def test_plan_items_are_the_decisions_of_each_tensor(tmp_path: Path) -> None:
    ckpt = open_checkpoint(_checkpoint(tmp_path))
    opts = QuantizeOptions(spec=QuantSpec(scheme="asymmetric", bits=4), skip=("e.*",))
    plan = make_plan(ckpt, opts)
    # What the plan was before: a list of (info, *decide(info)) in checkpoint order.
    expected = [(info, *decide(info, opts)) for info in ckpt.tensors()]
    assert isinstance(plan.items, PlanItems)
    assert list(plan.items) == expected
    assert plan.items == expected and expected == plan.items
    assert len(plan.items) == 7
    assert [plan.items[k] for k in range(7)] == expected
    assert plan.items[-1] == expected[-1]
    assert plan.items[1:4] == expected[1:4]
    assert plan.items != expected[:-1]
    reasons = {info.name: reason for info, _, reason in plan.items}
    assert reasons["e.weight"] == "matched --skip"
    assert reasons["d.empty"] == "empty tensor"
    assert reasons["c.idx"] == "I64 is not a float dtype"
    # One decision stored per distinct (spec, reason): the two quantized F32 weights share
    # one (the F16 weight's differs by its scale_dtype).
    assert len(plan.items._decisions) == len({(s, r) for _, s, r in expected}) == 6
    assert plan.total_bytes == sum(info.nbytes for info in ckpt.tensors())
    with pytest.raises(IndexError):
        plan.items[7]


@pytest.mark.parametrize("shards", [1, 2, 3])
def test_shard_spans_give_each_shards_items_in_order(tmp_path: Path, shards: int) -> None:
    ckpt = open_checkpoint(_sharded(tmp_path, shards))
    plan = make_plan(ckpt, QuantizeOptions())
    spans = _shard_spans(plan.items)
    assert list(spans) == ckpt.shards
    for shard in ckpt.shards:
        view = _Span(plan.items, *spans[shard])
        want = [it for it in plan.items if it[0].path == shard]
        assert list(view) == want and list(view) == want  # re-iterable
        assert len(view) == len(want) > 0
        planned = _Planned(view)
        assert [(p.info, p.spec) for p in planned] == [(i, s) for i, s, _ in want]
        assert len(planned) == len(want)
        assert (planned[0].info, planned[-1].info) == (want[0][0], want[-1][0])
        with pytest.raises(IndexError):
            planned[len(want)]


def test_shard_spans_refuse_items_out_of_shard_order(tmp_path: Path) -> None:
    ckpt = open_checkpoint(_sharded(tmp_path, 2))
    items = list(make_plan(ckpt, QuantizeOptions()).items)
    with pytest.raises(AssertionError):
        _shard_spans([items[-1], *items[:-1]])  # the last shard's item first, then the rest
    assert _shard_spans([]) == {}


@settings(max_examples=25, deadline=None)
@given(st.integers(min_value=0, max_value=3000), st.sampled_from([7, 64, 1 << 20]))
def test_header_digest_is_the_digest_of_the_header_bytes(tmp_path_factory, pad: int,
                                                         piece: int) -> None:
    # Headers shorter and longer than a piece, and of several pieces.
    path = tmp_path_factory.mktemp("h") / "m.safetensors"
    save_file({"x" * (1 + pad): np.ones((2, 2), np.float32), "y": np.zeros(3, np.int8)}, path)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    old = st_mod._HEADER_PIECE
    st_mod._HEADER_PIECE = piece
    try:
        with SafetensorsFile(path) as f:
            assert f.header_digest("sha256") == hashlib.sha256(raw[: 8 + n]).hexdigest()
            assert f.header_digest("blake3") == _digest.of_bytes(raw[: 8 + n], "blake3")
    finally:
        st_mod._HEADER_PIECE = old
    f.close()
    with pytest.raises(ValueError, match="closed"):
        f.header_digest("sha256")


def test_report_original_parses_the_original_once(tmp_path: Path, monkeypatch) -> None:
    import gc
    import os

    from qtool.pipeline.measure import measure_artifact
    from qtool.pipeline.run import quantize_checkpoint

    src = _checkpoint(tmp_path)
    art = tmp_path / "art"
    for _ in quantize_checkpoint(src, art, QuantizeOptions()):
        pass
    parsed: list[Path] = []
    real = SafetensorsFile._parse

    def counting(self: SafetensorsFile) -> None:
        parsed.append(self.path)
        real(self)

    monkeypatch.setattr(SafetensorsFile, "_parse", counting)
    run = measure_artifact(art, src)
    results = {r.record.name: r.record for r in run}
    assert parsed.count(src) == 1  # checked once, then measured from the same open file
    assert set(results) == {"a.weight", "a.bias", "b.weight", "c.idx", "d.empty", "e.weight",
                            "f.weight"}
    assert results["a.weight"].stats is not None and results["a.weight"].stats.signal_sq > 0
    # A run never iterated closes the original it holds when it goes.
    gc.collect()
    before = len(os.listdir("/proc/self/fd"))
    run = measure_artifact(art, src)
    assert len(os.listdir("/proc/self/fd")) == before + 1
    del run
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) == before


def test_index_is_written_as_json_dumps_wrote_it(tmp_path: Path) -> None:
    import json as _json

    from qtool.formats.manifest import TensorRecord, row_scale_name, sidecar_names
    from qtool.formats.native_sink import _write_index

    spec = QuantSpec(scheme="symmetric", bits=4, granularity="group", group_size=16)
    coded = QuantSpec(scheme="symmetric", bits=4, granularity="group", group_size=16,
                      scale_bits=8)
    records = [TensorRecord("a.weight", "m-1.safetensors", "F32", (4, 16), spec),
               TensorRecord("a.bias", "m-1.safetensors", "F32", (4,), passthrough="1-D"),
               TensorRecord("b\u00e9\"w", "m-2.safetensors", "F32", (4, 16), coded)]
    meta = {"total_size": 12, "nested": {"x": [1, 2, {"y": "z\u00e9"}]}}
    for recs, metadata in [(records, meta), (records[:2], None), ([], {})]:
        # What the sink wrote before: the whole document, then json.dumps of it.
        doc = {"metadata": metadata or {},
               "weight_map": {r.name: r.file for r in recs},
               "scale_map": {r.name: sidecar_names(r.file)[0] for r in recs if r.quantized},
               "zero_point_map": {r.name: sidecar_names(r.file)[1] for r in recs
                                  if r.quantized}}
        rs_map = {r.name: row_scale_name(r.file) for r in recs
                  if r.spec is not None and r.spec.scale_bits is not None}
        if rs_map:
            doc["row_scale_map"] = rs_map
        want = (_json.dumps(doc, indent=2) + "\n").encode()
        path = tmp_path / "index.json"
        entry = _write_index(path, recs, metadata)
        assert path.read_bytes() == want
        assert entry == {"size": len(want), "blake3": _digest.of_bytes(want, "blake3")}
