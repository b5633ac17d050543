"""sidusd.proto.http: the Range header (RFC 9110 section 14.1.2), request names and request lines."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidusd.proto.http import ByteRange, RangeNotSatisfiable, parse_range, request_line_ok, request_name


@pytest.mark.parametrize("value,size,want", [
    (None, 10, None),
    ("bytes=0-0", 10, (0, 1)),
    ("bytes=2-5", 10, (2, 6)),
    ("bytes=2-", 10, (2, 10)),
    ("bytes=8-100", 10, (8, 10)),             # last-pos past the end: clipped
    ("bytes=-3", 10, (7, 10)),
    ("bytes=-30", 10, (0, 10)),               # suffix longer than the file: all of it
    (" bytes=1-2 ", 10, (1, 3)),
    ("bytes=5-2", 10, None),                  # invalid: ignored
    ("bytes=0-1,4-5", 10, None),              # several ranges: ignored, whole file sent
    ("items=0-1", 10, None), ("bytes=", 10, None), ("bytes=-", 10, None), ("bytes=a-b", 10, None),
    ("bytes=0x1-2", 10, None), ("bytes=1-2" + " " * 200, 10, None),
])
def test_parse_range_table(value, size, want):
    got = parse_range(value, size)
    assert (None if got is None else (got.start, got.stop)) == want


@pytest.mark.parametrize("value,size", [("bytes=10-", 10), ("bytes=10-20", 10), ("bytes=-0", 10),
                                        ("bytes=0-", 0), ("bytes=-5", 0)])
def test_unsatisfiable(value, size):
    with pytest.raises(RangeNotSatisfiable):
        parse_range(value, size)


def test_content_range():
    assert ByteRange(0, 100, 1000).content_range == "bytes 0-99/1000"


@given(st.integers(0, 1 << 40), st.integers(0, 1 << 41), st.one_of(st.none(), st.integers(0, 1 << 41)))
def test_ranges_stay_inside_the_file(size, first, last):
    value = f"bytes={first}-" + ("" if last is None else str(last))
    try:
        r = parse_range(value, size)
    except RangeNotSatisfiable:
        assert first >= size
        return
    if r is not None:
        assert 0 <= r.start < r.stop <= size and r.start == first


@given(st.text(max_size=60))
def test_any_header_value_is_a_range_none_or_refusal(value):
    try:
        r = parse_range(value, 1000)
    except RangeNotSatisfiable:
        return
    assert r is None or 0 <= r.start < r.stop <= 1000


@pytest.mark.parametrize("raw,name", [
    ("/demo/vmlinuz", "/demo/vmlinuz"), ("/a%20b?x=1#f", "/a b"), ("/%2e%2e/x", "/../x"),
    ("/a%00", "/a\x00"), ("/%ff", None), ("/caf%C3%A9", "/café"),
])
def test_request_name(raw, name):
    assert request_name(raw) == name


@pytest.mark.parametrize("line,ok", [
    (b"GET /boot/x.ipxe HTTP/1.1\r", True),
    (b"GET /boot/x.ipxe HTTP/1.0", True),
    (b"HEAD /a?b=c HTTP/1.1\r", True),
    (b"GET /boot/x.ipxe\r", False),              # HTTP/0.9: no version
    (b"GET /boot/x.ipxe", False),
    (b"GET\r", False),
    (b"GET  /x HTTP/1.1\r", False),
    (b"GET /x HTTP/1.1 extra\r", False),
    (b"\x00\x01\x02 junk", False),
    (b"", False),
])
def test_request_line_shape(line, ok):
    assert request_line_ok(line) is ok
