"""TFTP packet codec and option negotiation (pure: no I/O, no clock).

Wire format (RFC 1350 section 5, RFC 2347 section "Packet Formats")::

    RRQ/WRQ  | 01/02 | filename | 0 | mode | 0 | opt1 | 0 | value1 | 0 | ...
    DATA     | 03    | block (2) | data (0..blksize)
    ACK      | 04    | block (2)
    ERROR    | 05    | code (2) | message | 0
    OACK     | 06    | opt1 | 0 | value1 | 0 | ...

Decoding rules (exact, the unit tests check every truncated prefix):

* every string (filename, mode, option names and values, error message) must
  be NUL-terminated; an unterminated string is a :class:`RemoteProtocolError`;
* filename and mode must not be empty; an option name without its value is an
  error; NUL bytes *after* the last complete option pair are tolerated as
  padding (some PXE ROMs pad their requests);
* an ERROR message ends at its first NUL; bytes after it are ignored;
* an ACK carries exactly a block number; trailing bytes after it are ignored
  (as tftp-hpa and dnsmasq do), a shorter ACK is an error;
* an OACK needs at least one option (RFC 2347: it acknowledges options);
* strings are decoded as UTF-8 (names are netascii in RFC 1350, a subset);
  invalid UTF-8 is an error.

``decode`` raises only :class:`sidusd.errors.RemoteProtocolError`.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..errors import RemoteProtocolError

OP_RRQ, OP_WRQ, OP_DATA, OP_ACK, OP_ERROR, OP_OACK = 1, 2, 3, 4, 5, 6

# RFC 1350 section 5 error codes, plus RFC 2347 code 8.
ERR_UNDEFINED = 0
ERR_NOT_FOUND = 1
ERR_ACCESS = 2
ERR_DISK_FULL = 3
ERR_ILLEGAL = 4
ERR_UNKNOWN_TID = 5
ERR_EXISTS = 6
ERR_NO_USER = 7
ERR_OPTIONS = 8

BLKSIZE_MIN, BLKSIZE_MAX = 8, 65464          # RFC 2348
TIMEOUT_MIN, TIMEOUT_MAX = 1, 255            # RFC 2349
WINDOWSIZE_MIN, WINDOWSIZE_MAX = 1, 65535    # RFC 7440
DEFAULT_BLKSIZE = 512                        # RFC 1350
MODES = ("octet", "netascii")                # "mail" is obsolete (RFC 1350 section 1)

_HDR = struct.Struct("!HH")


@dataclass(frozen=True)
class RRQ:
    """Read request (RFC 1350 section 5, options RFC 2347).

    ``options`` keeps the wire order and spelling; :attr:`option_map` gives
    the first value of each lower-cased name.
    """

    filename: str
    mode: str = "octet"
    options: tuple[tuple[str, str], ...] = ()

    @property
    def option_map(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for k, v in self.options:
            out.setdefault(k.lower(), v)
        return out


@dataclass(frozen=True)
class WRQ(RRQ):
    """Write request (RFC 1350 section 5).  Decoded so that it can be refused."""


@dataclass(frozen=True)
class DATA:
    """Data block (RFC 1350 section 5); ``block`` is the 16-bit wire number."""

    block: int
    data: bytes = b""


@dataclass(frozen=True)
class ACK:
    """Acknowledgment (RFC 1350 section 5); block 0 acknowledges an OACK (RFC 2347)."""

    block: int


@dataclass(frozen=True)
class ERROR:
    """Error packet (RFC 1350 section 5; code 8 = option refused, RFC 2347)."""

    code: int
    message: str = ""


@dataclass(frozen=True)
class OACK:
    """Option acknowledgment (RFC 2347): the options the server accepted."""

    options: tuple[tuple[str, str], ...] = field(default=())


Packet = RRQ | WRQ | DATA | ACK | ERROR | OACK


def _strings(body: bytes, what: str) -> list[bytes]:
    """Split a run of NUL-terminated strings; the last one must be terminated."""
    if not body:
        return []
    if body[-1] != 0:
        raise RemoteProtocolError(f"{what}: unterminated string")
    return body[:-1].split(b"\x00")


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RemoteProtocolError(f"{what}: not UTF-8") from None


def _pairs(items: list[bytes], what: str) -> tuple[tuple[str, str], ...]:
    """Option name/value pairs (RFC 2347).  An empty name starts NUL padding:
    everything after it must be empty too."""
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(items):
        name = items[i]
        if not name:
            if any(items[i:]):
                raise RemoteProtocolError(f"{what}: empty option name")
            break
        if i + 1 >= len(items):
            raise RemoteProtocolError(f"{what}: option {name[:32]!r} without a value")
        pairs.append((_text(name, what), _text(items[i + 1], what)))
        i += 2
    return tuple(pairs)


def decode(data: bytes) -> Packet:
    """Decode one TFTP datagram (RFC 1350 section 5, RFC 2347).

    Raises :class:`RemoteProtocolError` for anything that is not a valid packet.
    """
    if len(data) < 2:
        raise RemoteProtocolError("datagram shorter than an opcode")
    op = (data[0] << 8) | data[1]
    if op in (OP_RRQ, OP_WRQ):
        what = "RRQ" if op == OP_RRQ else "WRQ"
        items = _strings(data[2:], what)
        if len(items) < 2:
            raise RemoteProtocolError(f"{what}: missing filename or mode")
        name, mode = items[0], items[1]
        if not name:
            raise RemoteProtocolError(f"{what}: empty filename")
        if not mode:
            raise RemoteProtocolError(f"{what}: empty mode")
        cls = RRQ if op == OP_RRQ else WRQ
        return cls(_text(name, what), _text(mode, what), _pairs(items[2:], what))
    if op == OP_DATA:
        if len(data) < 4:
            raise RemoteProtocolError("DATA shorter than 4 bytes")
        return DATA((data[2] << 8) | data[3], bytes(data[4:]))
    if op == OP_ACK:
        if len(data) < 4:
            raise RemoteProtocolError("ACK shorter than 4 bytes")
        return ACK((data[2] << 8) | data[3])
    if op == OP_ERROR:
        end = data.find(b"\x00", 4)
        if end < 0:
            raise RemoteProtocolError("ERROR: unterminated message")
        return ERROR((data[2] << 8) | data[3], _text(data[4:end], "ERROR"))
    if op == OP_OACK:
        items = _strings(data[2:], "OACK")
        pairs = _pairs(items, "OACK")
        if not pairs:
            raise RemoteProtocolError("OACK without options")
        return OACK(pairs)
    raise RemoteProtocolError(f"unknown opcode {op}")


def _cstr(s: str) -> bytes:
    b = s.encode("utf-8")
    if b"\x00" in b:
        raise ValueError("NUL inside a TFTP string")
    return b + b"\x00"


def encode(pkt: Packet) -> bytes:
    """Encode a packet to its wire form (RFC 1350 section 5, RFC 2347).

    Raises ValueError for a packet that cannot be represented (a bug of ours).
    """
    if isinstance(pkt, (RRQ, WRQ)):
        op = OP_WRQ if isinstance(pkt, WRQ) else OP_RRQ
        if not pkt.filename or not pkt.mode:
            raise ValueError("empty filename or mode")
        return (op.to_bytes(2, "big") + _cstr(pkt.filename) + _cstr(pkt.mode)
                + b"".join(_cstr(k) + _cstr(v) for k, v in pkt.options))
    if isinstance(pkt, DATA):
        return _HDR.pack(OP_DATA, pkt.block) + pkt.data
    if isinstance(pkt, ACK):
        return _HDR.pack(OP_ACK, pkt.block)
    if isinstance(pkt, ERROR):
        return _HDR.pack(OP_ERROR, pkt.code) + _cstr(pkt.message)
    if isinstance(pkt, OACK):
        if not pkt.options:
            raise ValueError("OACK without options")
        return OP_OACK.to_bytes(2, "big") + b"".join(_cstr(k) + _cstr(v) for k, v in pkt.options)
    raise TypeError(f"not a TFTP packet: {pkt!r}")


def error_packet(code: int, message: str) -> bytes:
    """The wire form of ERROR(code, message) (RFC 1350 section 5)."""
    return _HDR.pack(OP_ERROR, code) + _cstr(message)


def data_header(block: int) -> bytes:
    """The 4-byte DATA header for absolute block number ``block`` (wraps to 0 after 65535)."""
    return _HDR.pack(OP_DATA, block & 0xFFFF)


# -- option negotiation ------------------------------------------------------

@dataclass(frozen=True)
class Limits:
    """What the server allows for one request.

    ``max_blksize`` is already the minimum of the config and of the interface
    MTU minus 32 (IPv4 20 + UDP 8 + TFTP 4); ``size`` is the transfer size
    (after netascii conversion) reported for ``tsize``.
    """

    max_blksize: int = BLKSIZE_MAX
    max_windowsize: int = 64
    size: int | None = None


@dataclass(frozen=True)
class Negotiated:
    """The outcome of option negotiation: parameters plus the OACK to send."""

    blksize: int = DEFAULT_BLKSIZE
    windowsize: int = 1
    timeout_s: float | None = None
    oack: tuple[tuple[str, str], ...] = ()


def _int(value: str) -> int | None:
    v = value.strip()
    # isascii: str.isdigit() is also true for '²' or '٣', which int() refuses
    if not (v.isascii() and v.isdigit()) or len(v) > 10:
        return None
    return int(v)


def negotiate(options: Mapping[str, str], limits: Limits) -> Negotiated:
    """Negotiate RRQ options (RFC 2347 with RFC 2348 blksize, RFC 2349 timeout
    and tsize, RFC 7440 windowsize).

    ``options`` maps lower-cased names to values (``RRQ.option_map``).
    Unknown options and invalid values are ignored (not acknowledged), as
    RFC 2347 allows; a ``blksize`` above the limits is clamped down.
    """
    blksize, windowsize, timeout = DEFAULT_BLKSIZE, 1, None
    oack: list[tuple[str, str]] = []
    cap = max(BLKSIZE_MIN, min(BLKSIZE_MAX, limits.max_blksize))
    if "blksize" in options:
        v = _int(options["blksize"])
        if v is not None and v >= BLKSIZE_MIN:        # RFC 2348: 8..65464
            blksize = min(v, cap)
            oack.append(("blksize", str(blksize)))
    if "tsize" in options and limits.size is not None:
        v = _int(options["tsize"])
        if v is not None:                              # RFC 2349: RRQ sends 0
            oack.append(("tsize", str(limits.size)))
    if "timeout" in options:
        v = _int(options["timeout"])
        if v is not None and TIMEOUT_MIN <= v <= TIMEOUT_MAX:
            timeout = float(v)
            oack.append(("timeout", str(v)))
    if "windowsize" in options:
        v = _int(options["windowsize"])
        if v is not None and WINDOWSIZE_MIN <= v <= WINDOWSIZE_MAX:
            windowsize = max(1, min(v, limits.max_windowsize))
            oack.append(("windowsize", str(windowsize)))
    return Negotiated(blksize, windowsize, timeout, tuple(oack))


def netascii(data: bytes) -> bytes:
    """Convert local text to netascii (RFC 1350 section 1, RFC 764): LF -> CR LF, CR -> CR NUL."""
    return data.replace(b"\r", b"\r\x00").replace(b"\n", b"\r\n")
