"""Headers are parsed entry by entry (stream_pairs, to bound the memory of 200,000 tensors):
for any text it must give exactly the pairs of the whole parse (_parse_json), or None where
the whole parse fails or the text needs it (not an object, a surrogate escape), so that the
reader meets the same documents and the same errors either way."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qtool.formats._common import _Obj, _parse_json, stream_pairs

values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text()
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8)


@given(st.lists(st.tuples(st.text(), values), max_size=6), st.sampled_from(["", " ", "\n\t "]))
def test_pairs_are_the_whole_parses(pairs, ws):
    text = ws + "{" + ws + ("," + ws).join(
        f"{json.dumps(k, ensure_ascii=False)}{ws}:{ws}{json.dumps(v, ensure_ascii=False)}"
        for k, v in pairs) + ws + "}" + ws
    got = stream_pairs(text)
    assert got is not None
    assert list(got) == list(_parse_json(text))  # duplicates kept, in order


@pytest.mark.parametrize("text", [
    "", "[]", "1", '"a"', "{", "}", '{"a"}', '{"a":}', '{"a":1,}', '{"a":1 "b":2}',
    '{"a":1}x', '{"a":1}{}', '{a:1}', '{"a":NaN}', '{"a":Infinity}', '{"a":[1,]}',
    '{"a":"\\ud800"}', '{"\\udc00":1}', '{"a":"\x01"}', "{\"a\":1}\x00",
])
def test_what_the_whole_parse_must_judge_is_left_to_it(text):
    assert stream_pairs(text) is None
    try:
        doc = _parse_json(text)
    except ValueError:
        return
    assert not isinstance(doc, _Obj)  # valid, but not an object


def test_an_empty_object_has_no_pairs():
    assert list(stream_pairs(" {} ")) == []


def test_an_escaped_character_outside_the_bmp_takes_the_whole_parse():
    # json writes U+10000 as a surrogate pair of escapes: valid, but the surrogate check
    # needs the whole document, so stream_pairs leaves it to the whole parse.
    text = json.dumps({"\U00010000": 1})
    assert stream_pairs(text) is None and list(_parse_json(text)) == [("\U00010000", 1)]
