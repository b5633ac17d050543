"""DHCP decisions (pure): who is answered, with which boot file and which address.

The edge (:mod:`sidusd.net.dhcp_server`) decodes a datagram, builds a
:class:`BootRequest` with :meth:`BootRequest.from_packet`, calls :func:`decide`
and does what comes back:

* :class:`Reply` — journal ``reply.lease`` durably if set, then send
  ``reply.packet`` to ``reply.dest``;
* :class:`LeaseChange` — journal and apply the lease, send nothing (RELEASE, DECLINE);
* :class:`Drop` — send nothing, count ``dhcp.drop.<code>``.

proxyDHCP (PXE 2.1 §2.2.5, §2.2.6): only PXE clients (option 60 ``PXEClient``,
or ``HTTPClient`` for UEFI HTTP boot) are answered, never with an address:
an OFFER to a DISCOVER on port 67, an ACK to a REQUEST/INFORM on port 4011.
Full DHCP (RFC 2131 §4.3): addresses from the pool for every served client,
plus the PXE boot fields for PXE clients so no other DHCP server is needed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sidusd.boot import loaders
from sidusd.boot.dhcp_full import decide_full
from sidusd.boot.dhcp_reply import (
    BROADCAST,
    ZERO,
    Decision,
    Drop,
    LeaseChange,
    Reply,
    build_reply,
    ip_option,
    reply_dest,
)
from sidusd.boot.dhcp_request import ARCHES, VIA_DHCP, VIA_PXE, Arch, BootRequest, IPv4Address, arch_of
from sidusd.boot.leases import DECLINE_HOLD_S, NO_RESERVATIONS, OFFER_HOLD_S, Lease, LeaseDB, Reservations
from sidusd.proto import dhcp

__all__ = [
    "ARCHES", "BROADCAST", "DECLINE_HOLD_S", "NO_RESERVATIONS", "OFFER_HOLD_S", "VIA_DHCP", "VIA_PXE", "ZERO",
    "Arch", "BootRequest", "Decision", "Drop", "IPv4Address", "Lease", "LeaseChange", "LeaseDB", "Lookup",
    "Reply", "Reservations", "arch_of", "boot_file_for", "build_reply", "decide",
]

Lookup = Callable[[str], Any]


def boot_file_for(req: BootRequest, config: Any, target: Any = None) -> tuple[str | None, str]:
    """The boot file of a PXE or UEFI HTTP Boot client, or (None, why).

    The loader (:func:`sidusd.boot.loaders.choose`: the profile of ``target``,
    then the architecture, then ``boot.ipxe_chain``, else ``boot.boot_files``)
    gives the first file.  A client that is already iPXE and whose loader is
    ipxe gets ``http://<server>:<http.port>/boot/<mac>.ipxe`` (so iPXE is never
    chainloaded in a loop); an iPXE client of another loader gets that loader's
    file, through iPXE's PXE base code.  UEFI HTTP boot clients get
    ``boot.loader.http`` (iPXE: a PXE loader cannot work after an HTTP boot) as
    ``http://<server>:<http.port>/<file>``.
    """
    http = config.http
    base = f"http://{req.server_ip}:{http.port}"
    if req.arch is None:
        return None, f"unsupported client architecture {req.arch_code} (option 93)"
    family = req.arch.family
    http_boot = req.http_boot
    choice = loaders.choose(family, config, profile=getattr(target, "profile", None), http=http_boot)
    if choice.loader is None:
        return None, f"UEFI HTTP boot client ({req.arch.name}) and {choice.source} is null"
    legacy_chain = config.boot.ipxe_chain and choice.source.startswith("boot.boot_files")
    if req.ipxe and not http_boot and (choice.loader == loaders.IPXE or legacy_chain):
        if not http.enabled:
            return None, f"{choice.source}: ipxe needs http.enabled for the iPXE script"
        return f"{base}/boot/{req.mac.replace(':', '-')}.ipxe", ""
    name, key, why = loaders.first_file(choice.loader, family, config)
    if not name:
        if choice.loader == loaders.PXELINUX:
            return None, f"no boot_files.{family} configured for {req.arch.name} (arch {req.arch_code})"
        return None, f"{choice.source}: {why}"
    if http_boot:
        if not http.enabled:
            return None, "UEFI HTTP boot client but http.enabled is false"
        return f"{base}/{name}", ""
    return name, ""


def _valid_ethernet(pkt: dhcp.DhcpPacket) -> bool:
    if pkt.htype != dhcp.HTYPE_ETHERNET or pkt.hlen != 6:
        return False
    first = pkt.chaddr[0]
    return not first & 1 and pkt.chaddr[:6] != bytes(6)


def decide(req: BootRequest, config: Any, lookup: Lookup, *, leases: LeaseDB | None = None,
           reservations: Reservations = NO_RESERVATIONS, now: float = 0.0) -> Decision:
    """Decide the answer to ``req`` under ``config`` (a :class:`sidusd.config.Config`).

    ``lookup(mac)`` returns what the inventory says about the machine (a
    BootTarget, or any truthy value in tests), or None/False when it must not be
    served.  Full mode needs ``leases`` (read here, changed only by the edge
    applying the returned lease), ``reservations`` and ``now``.
    """
    p, t = req.packet, req.msg_type
    mode = config.dhcp.mode
    if p.op != dhcp.BOOTREQUEST:
        return Drop("not_request", "BOOTREPLY received on a server port")
    if t is None:
        return Drop("bootp", "plain BOOTP (no option 53) is not served")
    if not _valid_ethernet(p):
        return Drop("bad_chaddr", f"htype {p.htype} hlen {p.hlen}: only Ethernet MACs are served")
    if mode == "off":
        return Drop("disabled", "dhcp.mode is off")
    if t in (dhcp.DHCPOFFER, dhcp.DHCPACK, dhcp.DHCPNAK):
        return Drop("not_request", "server message type received")
    if mode == "proxy" and not req.pxe:
        return Drop("not_pxe", "option 60 does not start with PXEClient/HTTPClient")
    if req.via == VIA_PXE and t not in (dhcp.DHCPREQUEST, dhcp.DHCPINFORM):
        return Drop("wrong_port", f"{dhcp.MESSAGE_TYPE_NAMES.get(t)} on the PXE port")
    target = lookup(req.mac)
    if not target:
        return Drop("unknown_host", "not in the inventory and dhcp.unknown_hosts is ignore")
    boot: str | None = None
    if req.pxe:
        boot, why = boot_file_for(req, config, target)
        if boot is None:
            return Drop("no_boot_file", why)
    if mode == "proxy" or req.via == VIA_PXE:
        return _proxy(req, t, config, boot)
    if leases is None:
        return Drop("no_pool", "full mode without a lease database")
    return decide_full(req, t, config, target, boot, leases, reservations, now)


def _proxy(req: BootRequest, t: int, config: Any, boot: str | None) -> Decision:
    """proxyDHCP (PXE 2.1 §2.2.5): boot information only, yiaddr 0, no lease options."""
    if req.via == VIA_DHCP:
        if t == dhcp.DHCPDISCOVER:
            pkt = build_reply(req, dhcp.DHCPOFFER, boot=boot)
            return Reply("offer", pkt, reply_dest(req, dhcp.DHCPOFFER, config), boot)
        if t == dhcp.DHCPREQUEST:
            sid = req.packet.option(dhcp.OPT_SERVER_ID)
            if sid != req.server_ip.packed:
                # The client is taking its address from the site DHCP server: not ours,
                # but worth noting (iPXE skips the 4011 request when the proxy OFFER
                # already carries the boot file, so this is the only time we see it).
                seen = ip_option(req.packet, dhcp.OPT_REQUESTED_IP) or req.packet.ciaddr
                return Drop("other_server", "REQUEST on the DHCP port for another server",
                            seen_ip=seen if seen != ZERO else None)
            # Quirk: some PXE ROMs send the ProxyDHCP REQUEST to port 67 (broadcast,
            # server id = us) instead of unicasting it to 4011; answer it the same way.
            pkt = build_reply(req, dhcp.DHCPACK, boot=boot)
            return Reply("ack", pkt, reply_dest(req, dhcp.DHCPACK, config), boot)
        return Drop("ignored", f"{dhcp.MESSAGE_TYPE_NAMES.get(t)} is for the site DHCP server")
    pkt = build_reply(req, dhcp.DHCPACK, boot=boot)
    return Reply("ack", pkt, reply_dest(req, dhcp.DHCPACK, config), boot)
