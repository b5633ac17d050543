"""HTTP pieces that need no I/O: the ``Range`` header and the request path (RFC 9110).

The HTTP/1.1 message syntax itself is parsed by aiohttp in
:mod:`sidusd.net.http_server`; what is decided here is which bytes a
request asks for and which boot file name a request target means.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from ..errors import SidusError

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_REQUEST_LINE = re.compile(rb"^[!-~]+ [!-~]+ HTTP/\d\.\d\r?$")


class RangeNotSatisfiable(SidusError):
    """No byte of the requested range exists (RFC 9110 section 15.5.17).

    A :class:`~sidusd.errors.SidusError`, not a ``RemoteProtocolError``: the
    header is well formed, it names bytes this representation does not have
    (the answer is 416, not 400).
    """


@dataclass(frozen=True)
class ByteRange:
    """Bytes ``start`` up to (not including) ``stop`` of a representation of ``size`` bytes."""

    start: int
    stop: int
    size: int

    @property
    def content_range(self) -> str:
        """The ``Content-Range`` value (RFC 9110 section 14.4)."""
        return f"bytes {self.start}-{self.stop - 1}/{self.size}"


def parse_range(value: str | None, size: int) -> ByteRange | None:
    """The single byte range of a ``Range`` header (RFC 9110 section 14.1.2), or None for "all".

    None when there is no header, it is malformed, or it asks for several
    ranges (section 14.2: a server may ignore Range).  Raises
    :class:`RangeNotSatisfiable` when the range starts at or after the end.
    """
    if value is None:
        return None
    m = _RANGE.match(value.strip())
    if not m or (not m.group(1) and not m.group(2)) or len(value) > 100:
        return None
    first, last = m.group(1), m.group(2)
    if first:
        start = int(first)
        if last:
            end = int(last)
            if end < start:
                return None                 # invalid range-spec: ignored
            stop = min(end + 1, size)
        else:
            stop = size
        if start >= size:
            raise RangeNotSatisfiable(value)
        return ByteRange(start, stop, size)
    suffix = int(last)                      # bytes=-N: the last N bytes
    if suffix == 0 or size == 0:
        raise RangeNotSatisfiable(value)
    return ByteRange(max(0, size - suffix), size, size)


def request_name(raw_path: str) -> str | None:
    """The boot file name of a request target: path only, percent-decoded, strict UTF-8 (None if not)."""
    path = raw_path.split("?", 1)[0].split("#", 1)[0]
    try:
        return unquote_to_bytes(path).decode("utf-8")
    except UnicodeDecodeError:
        return None


def request_line_ok(line: bytes) -> bool:
    """Whether ``line`` (without its LF) has the shape ``method SP target SP HTTP/x.y`` (RFC 9112 section 3).

    False for an HTTP/0.9 request (``GET /x``, no version), which the HTTP
    boot edge answers with 400 at once instead of waiting for headers.
    """
    return _REQUEST_LINE.match(line) is not None
