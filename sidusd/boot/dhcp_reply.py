"""What a DHCP decision returns (pure): the decision types and the reply packet.

:class:`Reply`, :class:`LeaseChange` and :class:`Drop` are what
:func:`sidusd.boot.policy.decide` returns to the edge; :func:`build_reply`
builds the reply packet (RFC 2131 §4.3.1 table 3, PXE 2.1 §2.2.5) and
:func:`reply_dest` says where it goes (RFC 2131 §4.1, PXE 2.1 §2.2.6).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from sidusd.boot.dhcp_request import VIA_PXE, BootRequest
from sidusd.boot.leases import Lease
from sidusd.proto import dhcp

IPv4Address = ipaddress.IPv4Address
ZERO = IPv4Address(0)
BROADCAST = IPv4Address("255.255.255.255")


@dataclass(frozen=True)
class Reply:
    """Send ``packet`` to ``dest``; if ``lease`` is set, journal it durably first."""

    kind: str                           # "offer", "ack" or "nak"
    packet: dhcp.DhcpPacket
    dest: tuple[str, int]
    boot_file: str | None
    lease: Lease | None = None

    @property
    def durable(self) -> bool:
        """True if ``lease`` must reach the disk before the packet is sent (an ACK)."""
        return self.lease is not None and self.lease.state != "offered"


@dataclass(frozen=True)
class LeaseChange:
    """No answer, but a lease to journal and apply (``event``: release, decline)."""

    event: str
    lease: Lease


@dataclass(frozen=True)
class Drop:
    """No answer.  ``code`` is a fixed short name (counter ``dhcp.drop.<code>``).

    ``seen_ip``: in proxy mode, the address a PXE client is requesting from the
    site's DHCP server (option 50 or ciaddr of its REQUEST); the edge notes it
    so TFTP/HTTP requests from that address are tied to the machine.
    """

    code: str
    detail: str = ""
    seen_ip: IPv4Address | None = None


Decision = Reply | LeaseChange | Drop


def build_reply(req: BootRequest, msg_type: int, *, yiaddr: IPv4Address = ZERO,
                boot: str | None = None, options: tuple[tuple[int, bytes], ...] = ()) -> dhcp.DhcpPacket:
    """The reply packet (RFC 2131 §4.3.1 table 3), with the PXE fields when ``boot`` is set.

    PXE fields (PXE 2.1 §2.2.5): siaddr = this server, boot file in ``file``
    (option 67 as well when it does not fit the 128-byte field), option 60
    ``PXEClient`` (``HTTPClient`` for HTTP boot), option 43 with discovery
    control 8 (boot file is in this packet: no discovery, no menu), option 97
    echoed when the client sent it.
    """
    p = req.packet
    opts: list[tuple[int, bytes]] = [(dhcp.OPT_MESSAGE_TYPE, bytes((msg_type,))),
                                     (dhcp.OPT_SERVER_ID, req.server_ip.packed)]
    siaddr, file = ZERO, b""
    if boot is not None and msg_type != dhcp.DHCPNAK:
        siaddr = req.server_ip
        raw = boot.encode()
        if len(raw) <= 127:
            file = raw
        else:
            opts.append((dhcp.OPT_BOOTFILE, raw))
        if req.http_boot:
            # UEFI 2.x §24.7.2: the firmware takes only an offer whose option 60 is "HTTPClient"
            opts.append((dhcp.OPT_VENDOR_CLASS, b"HTTPClient"))
        else:
            opts.append((dhcp.OPT_VENDOR_CLASS, b"PXEClient"))
            opts.append((dhcp.OPT_VENDOR_SPECIFIC, dhcp.pxe_vendor_options()))
        uuid = p.option(dhcp.OPT_CLIENT_UUID)
        if uuid is not None:
            opts.append((dhcp.OPT_CLIENT_UUID, uuid))
    opts.extend(options)
    flags = p.flags
    if msg_type == dhcp.DHCPNAK and p.giaddr != ZERO:
        flags |= dhcp.FLAG_BROADCAST           # RFC 2131 §4.3.2: relay must broadcast a NAK
    ciaddr = p.ciaddr if msg_type == dhcp.DHCPACK else ZERO
    return dhcp.DhcpPacket(op=dhcp.BOOTREPLY, xid=p.xid, chaddr=p.chaddr, htype=p.htype,
                           hlen=p.hlen, hops=0, secs=0, flags=flags, ciaddr=ciaddr,
                           yiaddr=yiaddr, siaddr=siaddr, giaddr=p.giaddr, file=file,
                           options=tuple(opts))


def reply_dest(req: BootRequest, msg_type: int, config: Any) -> tuple[str, int]:
    """Where the reply goes (RFC 2131 §4.1, PXE 2.1 §2.2.6)."""
    p = req.packet
    if p.giaddr != ZERO:
        return str(p.giaddr), config.dhcp.port          # via the relay agent
    if msg_type == dhcp.DHCPNAK:
        return str(BROADCAST), config.dhcp.client_port
    if req.via == VIA_PXE and req.source and req.source[0] not in ("0.0.0.0", ""):
        return req.source                               # PXE: back to where it came from
    if p.ciaddr != ZERO:
        return str(p.ciaddr), config.dhcp.client_port
    # A client without an address cannot receive unicast before ARP knows it;
    # broadcasting is allowed for every client (RFC 2131 §4.1, last paragraphs).
    return str(BROADCAST), config.dhcp.client_port


def ip_option(pkt: dhcp.DhcpPacket, code: int) -> IPv4Address | None:
    """Option ``code`` of ``pkt`` as an address (options 50, 54), or None."""
    v = pkt.option(code)
    return IPv4Address(v) if v else None
