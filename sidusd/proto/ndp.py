"""IPv6 Neighbor Discovery messages sidus reads and writes (RFC 4861 §4.1, §4.2): pure bytes.

Only what the opt-in "no router here" answer needs (``dhcp.ipv6_no_router``,
:mod:`sidusd.boot.ra_policy`, :mod:`sidusd.net.ra`): reading a Router
Solicitation or a Router Advertisement as a raw ICMPv6 socket delivers it (the
ICMPv6 header on, the IPv6 header off), and writing a Router Advertisement that
says nothing but "I am not a default router" (router lifetime 0, no prefix, no
M/O flag).  The kernel fills in the ICMPv6 checksum of a raw ICMPv6 socket
(RFC 3542 §3.1), so :func:`encode_no_router_ra` leaves it 0.

Malformed input raises :class:`NdpError` (the edge counts and drops it).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

ROUTER_SOLICITATION = 133
ROUTER_ADVERTISEMENT = 134
OPT_SOURCE_LL = 1                 # RFC 4861 §4.6.1
OPT_PREFIX_INFO = 3               # §4.6.2
RA_HEADER_LEN = 16                # type, code, checksum, cur hop limit, flags, lifetime, reachable, retrans
RS_HEADER_LEN = 8                 # type, code, checksum, reserved
NDP_HOP_LIMIT = 255               # §6.1.1 / §6.1.2: anything else did not come from this link


class NdpError(ValueError):
    """A Neighbor Discovery message that is not well formed (RFC 4861 §6.1)."""


@dataclass(frozen=True)
class NdpMessage:
    """One RS or RA as read: ``kind`` (133 | 134), the options' types, and for an RA its
    ``router_lifetime_s`` and ``managed``/``other`` flags (0 / False for an RS)."""

    kind: int
    option_types: tuple[int, ...]
    router_lifetime_s: int = 0
    managed: bool = False
    other: bool = False

    @property
    def has_prefix(self) -> bool:
        return OPT_PREFIX_INFO in self.option_types


def _options(data: bytes) -> tuple[int, ...]:
    """The option types of an option area (RFC 4861 §4.6: length in units of 8 octets, never 0)."""
    types = []
    i = 0
    while i < len(data):
        if len(data) - i < 2:
            raise NdpError("truncated option header")
        otype, olen = data[i], data[i + 1]
        if olen == 0:
            raise NdpError("option of length 0")
        if i + olen * 8 > len(data):
            raise NdpError("option runs past the message")
        types.append(otype)
        i += olen * 8
    return tuple(types)


def decode(data: bytes) -> NdpMessage:
    """An RS or RA from the ICMPv6 message ``data``; NdpError if it is neither or malformed."""
    if len(data) < 4:
        raise NdpError("shorter than an ICMPv6 header")
    kind, code = data[0], data[1]
    if code != 0:
        raise NdpError(f"ICMPv6 type {kind} with code {code}")
    if kind == ROUTER_SOLICITATION:
        if len(data) < RS_HEADER_LEN:
            raise NdpError("router solicitation shorter than 8 octets")
        return NdpMessage(kind, _options(data[RS_HEADER_LEN:]))
    if kind == ROUTER_ADVERTISEMENT:
        if len(data) < RA_HEADER_LEN:
            raise NdpError("router advertisement shorter than 16 octets")
        flags, lifetime = data[5], struct.unpack_from("!H", data, 6)[0]
        return NdpMessage(kind, _options(data[RA_HEADER_LEN:]), router_lifetime_s=lifetime,
                          managed=bool(flags & 0x80), other=bool(flags & 0x40))
    raise NdpError(f"ICMPv6 type {kind} is neither RS nor RA")


def encode_no_router_ra(source_mac: bytes | None = None) -> bytes:
    """A Router Advertisement saying "no default router, nothing to configure" (RFC 4861 §4.2).

    Current hop limit 0 and reachable/retrans timers 0 ("unspecified": the
    receiver keeps its own), M and O flags clear (no DHCPv6), router lifetime 0
    ("not a default router", §6.3.4), no prefix information.  With
    ``source_mac`` (6 octets) it carries the source link-layer address option.
    """
    msg = struct.pack("!BBHBBHII", ROUTER_ADVERTISEMENT, 0, 0, 0, 0, 0, 0, 0)
    if source_mac is not None:
        if len(source_mac) != 6:
            raise ValueError("source_mac must be 6 octets")
        msg += bytes((OPT_SOURCE_LL, 1)) + source_mac
    return msg
