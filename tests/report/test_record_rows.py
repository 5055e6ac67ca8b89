"""An artifact report's rows are made from its records when read (RecordRows), not held one
Row per tensor (issue 15, very many tensors): they must read, sort and slice exactly as a
list of Rows did, and the report must hold no per-tensor state beyond the records."""

from __future__ import annotations

import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qtool.core.metrics import ErrorStats
from qtool.core.schemes import QuantSpec
from qtool.formats.manifest import TensorRecord
from qtool.report.model import SORT_KEYS, RecordRows, Row, _with_real_bytes, artifact_report


def _records(draw_specs: list[tuple[int, float | None, int]]) -> list[TensorRecord]:
    recs = []
    for i, (rows, err, size) in enumerate(draw_specs):
        shape = (rows, 4)
        if err is None:
            recs.append(TensorRecord(f"t{i % 5}.{i}", "m.safetensors", "F32", shape,
                                     passthrough="kept", original_bytes=16 * rows,
                                     stored_bytes=16 * rows))
            continue
        n = rows * 4
        stats = ErrorStats(count=n, signal_sq=float(n), error_sq=err * n,
                           max_abs_error=err, cross=float(n)) if n else None
        recs.append(TensorRecord(f"t{i % 5}.{i}", "m.safetensors", "F32", shape, QuantSpec(),
                                 stats=stats, original_bytes=16 * rows,
                                 stored_bytes=size))
    return recs


@settings(max_examples=60, deadline=None)
@given(specs=st.lists(st.tuples(st.integers(1, 4), st.one_of(st.none(), st.sampled_from(
           [0.0, 0.01, 0.5, 0.01])), st.integers(0, 40)), max_size=12),
       top=st.one_of(st.none(), st.integers(0, 14)))
def test_rows_read_sort_and_slice_as_a_list_of_rows(specs, top):
    # byte counts as the report computes them (it replaces records that say otherwise)
    recs = [_with_real_bytes(r) for r in _records(specs)]
    rows = RecordRows(recs)
    listed = [Row(r.name, r.dtype, tuple(r.shape), [r]) for r in recs]
    assert len(rows) == len(listed) and list(rows) == listed
    assert [rows[i] for i in range(len(recs))] == listed
    assert list(rows[2:5]) == listed[2:5]
    rep = artifact_report("art", recs)
    for sort in (None, *SORT_KEYS):
        got = list(rep.sorted_rows(sort, top))
        # the old way: a list of Rows, sorted stably in place
        want = list(listed)
        key = {"name": lambda r: r.name,
               "sqnr": lambda r: (0, r.results[0].stats.sqnr_db) if r.results[0].stats
               else (1, 0.0),
               "error": lambda r: (0, -r.results[0].stats.max_abs_error)
               if r.results[0].stats else (1, 0.0),
               "size": lambda r: -r.original_bytes}.get(sort)
        if key is not None:
            want.sort(key=key)
        assert got == (want[:top] if top is not None else want), sort
    # totals over the rows made on the fly: the plain sums
    t = rep.totals[0]
    assert t.tensors == len(recs)
    assert t.bytes_before == sum(r.original_bytes for r in recs)
    assert t.bytes_after == sum(r.stored_bytes for r in recs)
    assert t.quantized_weights == sum(4 * r.shape[0] for r in recs if r.spec is not None)
    assert t.quantized_bytes == sum(r.stored_bytes for r in recs if r.spec is not None)
    assert t.quantized == sum(1 for r in recs if r.stats is not None)


def test_the_report_holds_no_row_per_tensor():
    n = 50_000
    recs = [TensorRecord(f"layers.{i}.w", "m.safetensors", "F32", (0, 8),
                         passthrough="empty tensor") for i in range(n)]
    tracemalloc.start()
    try:
        rep = artifact_report("art", recs)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(rep.rows) == n and rep.rows[n - 1].name == f"layers.{n - 1}.w"
    # a list of the records (8 bytes each) and a little more; a Row each was ~150 bytes
    assert held < 20 * n, held


@pytest.mark.parametrize("sort", SORT_KEYS)
def test_sorting_rows_gives_rows_that_still_read_as_records(sort):
    recs = [_with_real_bytes(r) for r in _records([(2, 0.5, 10), (1, None, 0), (3, 0.01, 30)])]
    rows = artifact_report("art", recs).sorted_rows(sort, 2)
    assert isinstance(rows, RecordRows) and len(rows) == 2
    assert all(r.results == [rec] for r, rec in zip(rows, rows.records, strict=True))
