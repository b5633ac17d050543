"""BOOTP/DHCP packet codec (RFC 951, RFC 2131 §2, RFC 2132, RFC 3396, PXE 2.1).

Pure code: bytes in, :class:`DhcpPacket` out, and back.  :func:`decode` raises
only :class:`sidusd.errors.RemoteProtocolError`; any other exception escaping
it is a bug.

Options are kept as an ordered tuple of ``(code, value)`` pairs with one entry
per code: several instances of the same code are concatenated on decode as
RFC 3396 §4 says, and values longer than 255 bytes are split again on encode.
Option overload (option 52, RFC 2132 §9.3) is decoded (options continue in
``file`` then ``sname``); :func:`encode` never produces it.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field, replace

from sidusd.errors import RemoteProtocolError

# -- RFC 2131 §2 fixed header ------------------------------------------------
BOOTREQUEST = 1
BOOTREPLY = 2
HTYPE_ETHERNET = 1
MAGIC_COOKIE = b"\x63\x82\x53\x63"          # RFC 2131 §3, RFC 2132 §2
_HEADER = struct.Struct("!BBBBIHH4s4s4s4s16s64s128s")
HEADER_LEN = _HEADER.size                   # 236
OPTIONS_OFFSET = HEADER_LEN + len(MAGIC_COOKIE)   # 240
BOOTP_MIN_LEN = 300                         # RFC 951: 64-byte vend field, 300 bytes total
FLAG_BROADCAST = 0x8000                     # RFC 2131 §2, figure 2
MAX_HLEN = 16                               # size of chaddr

# -- RFC 2132 §9.6 message types --------------------------------------------
DHCPDISCOVER, DHCPOFFER, DHCPREQUEST, DHCPDECLINE = 1, 2, 3, 4
DHCPACK, DHCPNAK, DHCPRELEASE, DHCPINFORM = 5, 6, 7, 8
MESSAGE_TYPE_NAMES = {1: "discover", 2: "offer", 3: "request", 4: "decline",
                      5: "ack", 6: "nak", 7: "release", 8: "inform"}

# -- option codes (RFC 2132 unless noted) -----------------------------------
OPT_PAD = 0
OPT_SUBNET_MASK = 1
OPT_ROUTER = 3
OPT_DNS_SERVERS = 6
OPT_HOSTNAME = 12
OPT_DOMAIN_NAME = 15
OPT_VENDOR_SPECIFIC = 43        # PXE 2.1 §2.2.5: encapsulated PXE sub-options
OPT_REQUESTED_IP = 50
OPT_LEASE_TIME = 51
OPT_OVERLOAD = 52
OPT_MESSAGE_TYPE = 53
OPT_SERVER_ID = 54
OPT_PARAMETER_LIST = 55
OPT_MESSAGE = 56
OPT_MAX_MESSAGE_SIZE = 57
OPT_RENEWAL_TIME = 58
OPT_REBINDING_TIME = 59
OPT_VENDOR_CLASS = 60
OPT_CLIENT_ID = 61
OPT_TFTP_SERVER = 66
OPT_BOOTFILE = 67
OPT_USER_CLASS = 77             # RFC 3004; iPXE sends the bare string "iPXE"
OPT_CLIENT_ARCH = 93            # RFC 4578 §2.1
OPT_CLIENT_NDI = 94             # RFC 4578 §2.2
OPT_CLIENT_UUID = 97            # RFC 4578 §2.3
OPT_IPXE_ENCAP = 175            # iPXE: encapsulated feature options
OPT_END = 255

# PXE 2.1 §2.2.5 vendor sub-options (inside option 43)
PXE_DISCOVERY_CONTROL = 6
PXE_DISCOVERY_USE_BOOTFILE = 0x08   # bit 3: boot file in this packet, no discovery / menu
PXE_DISCOVERY_NO_BROADCAST = 0x01
PXE_DISCOVERY_NO_MULTICAST = 0x02

# Length rules for the options sidus reads or writes (RFC 2132 §3-§9, RFC 4578).
# value: (minimum, maximum or None, multiple).  Options not listed accept any
# length, including 0 (site-specific and vendor options, RFC 4039 rapid commit...).
_LENGTH_RULES: dict[int, tuple[int, int | None, int]] = {
    OPT_SUBNET_MASK: (4, 4, 1), OPT_ROUTER: (4, None, 4), OPT_DNS_SERVERS: (4, None, 4),
    OPT_HOSTNAME: (1, None, 1), OPT_DOMAIN_NAME: (1, None, 1),
    OPT_REQUESTED_IP: (4, 4, 1), OPT_LEASE_TIME: (4, 4, 1), OPT_OVERLOAD: (1, 1, 1),
    OPT_MESSAGE_TYPE: (1, 1, 1), OPT_SERVER_ID: (4, 4, 1), OPT_PARAMETER_LIST: (1, None, 1),
    OPT_MAX_MESSAGE_SIZE: (2, 2, 1), OPT_RENEWAL_TIME: (4, 4, 1), OPT_REBINDING_TIME: (4, 4, 1),
    OPT_VENDOR_CLASS: (1, None, 1), OPT_CLIENT_ID: (2, None, 1), OPT_TFTP_SERVER: (1, None, 1),
    OPT_BOOTFILE: (1, None, 1), OPT_USER_CLASS: (1, None, 1),
    OPT_CLIENT_ARCH: (2, None, 2), OPT_CLIENT_NDI: (3, 3, 1),
    # RFC 4578 §2.3 says 17 bytes (type 0 + UUID).  Quirk: PXE ROMs in the wild send
    # option 97 with length 0 and still expect to boot (pixiecore handles it the same way).
    OPT_CLIENT_UUID: (0, 17, 1),
}

Options = tuple[tuple[int, bytes], ...]


@dataclass(frozen=True)
class DhcpPacket:
    """One BOOTP/DHCP message (RFC 2131 §2, figure 1).

    Addresses are :class:`ipaddress.IPv4Address`; ``chaddr`` holds the full 16
    bytes of the field and :attr:`mac` the ``hlen`` first ones.  ``sname`` and
    ``file`` are the raw fields without their trailing NULs.  ``options`` is an
    ordered tuple of ``(code, value)`` pairs, one per code (RFC 3396 §4).
    """

    op: int
    xid: int
    chaddr: bytes
    htype: int = HTYPE_ETHERNET
    hlen: int = 6
    hops: int = 0
    secs: int = 0
    flags: int = 0
    ciaddr: ipaddress.IPv4Address = ipaddress.IPv4Address(0)
    yiaddr: ipaddress.IPv4Address = ipaddress.IPv4Address(0)
    siaddr: ipaddress.IPv4Address = ipaddress.IPv4Address(0)
    giaddr: ipaddress.IPv4Address = ipaddress.IPv4Address(0)
    sname: bytes = b""
    file: bytes = b""
    options: Options = field(default=())

    def __post_init__(self) -> None:
        # chaddr is a 16-byte field; keep it whole so decode(encode(p)) == p.
        if len(self.chaddr) < MAX_HLEN:
            object.__setattr__(self, "chaddr", bytes(self.chaddr).ljust(MAX_HLEN, b"\0"))

    def option(self, code: int) -> bytes | None:
        """The value of option ``code``, or None when absent."""
        for c, v in self.options:
            if c == code:
                return v
        return None

    def has(self, code: int) -> bool:
        return self.option(code) is not None

    @property
    def message_type(self) -> int | None:
        """Option 53 (RFC 2132 §9.6), or None for a plain BOOTP packet."""
        v = self.option(OPT_MESSAGE_TYPE)
        return v[0] if v else None

    @property
    def mac(self) -> str:
        """Client hardware address, lower-case, colon separated (``chaddr[:hlen]``)."""
        return ":".join(f"{b:02x}" for b in self.chaddr[:self.hlen])

    def with_options(self, *pairs: tuple[int, bytes]) -> DhcpPacket:
        """A copy with ``pairs`` set (replacing same codes, appended in order)."""
        new = dict(pairs)
        kept = tuple((c, v) for c, v in self.options if c not in new)
        return replace(self, options=kept + tuple(pairs))


# -- decode -------------------------------------------------------------------

def _bad(reason: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"dhcp: {reason}")


def _parse_area(buf: bytes, where: str, need_end: bool, out: list[tuple[int, bytes]]) -> bool:
    """Parse one option area into ``out``; True if it ended with END (RFC 2132 §2)."""
    i, n = 0, len(buf)
    while i < n:
        code = buf[i]
        if code == OPT_END:
            return True
        if code == OPT_PAD:
            i += 1
            continue
        if i + 1 >= n:
            raise _bad(f"option {code} in {where}: length byte missing")
        length = buf[i + 1]
        if i + 2 + length > n:
            raise _bad(f"option {code} in {where}: length {length} overruns the area")
        out.append((code, buf[i + 2:i + 2 + length]))
        i += 2 + length
    if need_end:
        raise _bad(f"{where}: no end option (255), packet truncated?")
    return False


def _check_lengths(options: Options) -> None:
    for code, value in options:
        rule = _LENGTH_RULES.get(code)
        if rule is None:
            continue
        lo, hi, mult = rule
        n = len(value)
        if n < lo or (hi is not None and n > hi) or n % mult:
            raise _bad(f"option {code}: illegal length {n}")
        if code == OPT_CLIENT_UUID and n not in (0, 17):
            raise _bad(f"option 97: length {n}, expected 17 (RFC 4578 §2.3)")
        if code == OPT_CLIENT_UUID and n == 17 and value[0] != 0:
            raise _bad("option 97: UUID type must be 0 (RFC 4578 §2.3)")
        if code == OPT_OVERLOAD and value[0] not in (1, 2, 3):
            raise _bad(f"option 52: value {value[0]}, expected 1, 2 or 3 (RFC 2132 §9.3)")


def decode(data: bytes) -> DhcpPacket:
    """Decode one BOOTP/DHCP datagram (RFC 2131 §2, RFC 2132 §2, §9.3; RFC 3396).

    Raises :class:`RemoteProtocolError` for a truncated header, a bad magic
    cookie, an hlen over 16, an option overrunning its area, a missing end
    option, or an illegal length for an option sidus interprets.
    """
    data = bytes(data)
    if len(data) < OPTIONS_OFFSET:
        raise _bad(f"truncated: {len(data)} bytes, header needs {OPTIONS_OFFSET}")
    (op, htype, hlen, hops, xid, secs, flags, ciaddr, yiaddr, siaddr, giaddr,
     chaddr, sname, file) = _HEADER.unpack_from(data, 0)
    if op not in (BOOTREQUEST, BOOTREPLY):
        raise _bad(f"op {op} is neither BOOTREQUEST nor BOOTREPLY")
    if hlen > MAX_HLEN:
        raise _bad(f"hlen {hlen} > {MAX_HLEN}")
    if data[HEADER_LEN:OPTIONS_OFFSET] != MAGIC_COOKIE:
        raise _bad("bad magic cookie")
    raw: list[tuple[int, bytes]] = []
    _parse_area(data[OPTIONS_OFFSET:], "options", True, raw)
    overload = 0
    for code, value in raw:
        if code == OPT_OVERLOAD:
            if len(value) != 1 or value[0] not in (1, 2, 3):
                raise _bad("option 52: illegal value (RFC 2132 §9.3)")
            overload = value[0]
    # RFC 2131 §4.1: options continue in 'file' first, then in 'sname'.
    if overload & 1:
        _parse_area(file, "file", False, raw)
        file = b""
    if overload & 2:
        _parse_area(sname, "sname", False, raw)
        sname = b""
    merged: dict[int, bytes] = {}
    for code, value in raw:
        if code == OPT_OVERLOAD:
            continue
        merged[code] = merged.get(code, b"") + value      # RFC 3396 §4: concatenate
    options = tuple(merged.items())
    _check_lengths(options)
    return DhcpPacket(op=op, htype=htype, hlen=hlen, hops=hops, xid=xid, secs=secs,
                      flags=flags, ciaddr=ipaddress.IPv4Address(ciaddr),
                      yiaddr=ipaddress.IPv4Address(yiaddr), siaddr=ipaddress.IPv4Address(siaddr),
                      giaddr=ipaddress.IPv4Address(giaddr), chaddr=chaddr,
                      sname=sname.split(b"\0", 1)[0], file=file.split(b"\0", 1)[0],
                      options=options)


# -- encode -------------------------------------------------------------------

def encode_options(options: Options) -> bytes:
    """Option TLVs followed by END; values over 255 bytes are split (RFC 3396 §5)."""
    out = bytearray()
    for code, value in options:
        if code in (OPT_PAD, OPT_END) or not 0 < code < 255:
            raise ValueError(f"option code {code} cannot carry a value")
        value = bytes(value)
        if not value:
            out += bytes((code, 0))
        for i in range(0, len(value), 255):
            chunk = value[i:i + 255]
            out += bytes((code, len(chunk))) + chunk
    out.append(OPT_END)
    return bytes(out)


def encode(pkt: DhcpPacket) -> bytes:
    """Encode ``pkt`` (RFC 2131 §2); padded with PAD to the 300-byte BOOTP minimum.

    Raises ValueError for a packet sidus itself built wrong (field too long).
    """
    if len(pkt.sname) > 63 or len(pkt.file) > 127:
        raise ValueError("sname/file too long for the fixed BOOTP fields (need a NUL)")
    if len(pkt.chaddr) > 16 or pkt.hlen > MAX_HLEN:
        raise ValueError("chaddr longer than 16 bytes")
    head = _HEADER.pack(pkt.op, pkt.htype, pkt.hlen, pkt.hops, pkt.xid, pkt.secs, pkt.flags,
                        pkt.ciaddr.packed, pkt.yiaddr.packed, pkt.siaddr.packed,
                        pkt.giaddr.packed, pkt.chaddr.ljust(16, b"\0"),
                        pkt.sname.ljust(64, b"\0"), pkt.file.ljust(128, b"\0"))
    body = head + MAGIC_COOKIE + encode_options(pkt.options)
    return body.ljust(BOOTP_MIN_LEN, b"\0")


# -- helpers ------------------------------------------------------------------

def decode_suboptions(value: bytes) -> tuple[tuple[int, bytes], ...]:
    """Encapsulated sub-options (option 43 / 175): TLVs, PAD skipped, END stops.

    Raises RemoteProtocolError on an overrun (RFC 2132 §8.4).
    """
    out: list[tuple[int, bytes]] = []
    _parse_area(value, "encapsulated options", False, out)
    return tuple(out)


def encode_suboptions(pairs: tuple[tuple[int, bytes], ...] | list[tuple[int, bytes]]) -> bytes:
    """Encapsulated sub-options followed by END (RFC 2132 §8.4, PXE 2.1 §2.2.5)."""
    out = bytearray()
    for code, value in pairs:
        if not 0 < code < 255 or len(value) > 255:
            raise ValueError(f"sub-option {code}: bad code or value longer than 255")
        out += bytes((code, len(value))) + bytes(value)
    out.append(OPT_END)
    return bytes(out)


def pxe_vendor_options(discovery_control: int = PXE_DISCOVERY_USE_BOOTFILE) -> bytes:
    """Option 43 for a PXE reply: sub-option 6 (discovery control) then END.

    PXE 2.1 §2.2.5 table 2-1: bit 3 set means "the boot file name is in this
    packet: download it, no boot server discovery, no menu".
    """
    return encode_suboptions([(PXE_DISCOVERY_CONTROL, bytes((discovery_control,)))])


def client_arches(pkt: DhcpPacket) -> tuple[int, ...]:
    """The architecture types of option 93 (RFC 4578 §2.1), in client order."""
    v = pkt.option(OPT_CLIENT_ARCH)
    if not v:
        return ()
    return tuple(struct.unpack(f"!{len(v) // 2}H", v))


def ip_list(value: bytes) -> tuple[ipaddress.IPv4Address, ...]:
    """Addresses of an option made of 4-byte IPv4 addresses (RFC 2132 §3.5)."""
    return tuple(ipaddress.IPv4Address(value[i:i + 4]) for i in range(0, len(value) - 3, 4))
