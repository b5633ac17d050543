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

import ipaddress
import struct
from dataclasses import dataclass
from typing import Any, Callable

from sidusd.boot.leases import (DECLINE_HOLD_S, NO_RESERVATIONS, OFFER_HOLD_S, Lease, LeaseDB,
                                Reservations)
from sidusd.proto import dhcp

IPv4Address = ipaddress.IPv4Address
ZERO = IPv4Address(0)
BROADCAST = IPv4Address("255.255.255.255")
VIA_DHCP = "dhcp"           # arrived on config.dhcp.port (67)
VIA_PXE = "pxe"             # arrived on config.dhcp.pxe_port (4011)



@dataclass(frozen=True)
class Arch:
    """A client architecture (RFC 4578 §2.1 and the IANA "Processor Architecture Types").

    ``family`` names the ``config.boot.boot_files`` entry it boots; ``http``
    marks the UEFI HTTP boot types, which get a URL instead of a TFTP name.
    """

    code: int
    name: str
    family: str
    http: bool = False


ARCHES: dict[int, Arch] = {a.code: a for a in (
    Arch(0, "bios", "bios"),
    Arch(6, "efi-ia32", "uefi_ia32"),
    # Quirk: RFC 4578 lists 7 as "EFI BC" and 9 as "EFI x86-64", but the IANA
    # registry and most x64 firmware (OVMF included) send 7; both mean x64 here.
    Arch(7, "efi-x64", "uefi_x64"),
    Arch(9, "efi-x64", "uefi_x64"),
    Arch(11, "efi-arm64", "arm64"),
    Arch(15, "efi-ia32-http", "uefi_ia32", True),
    Arch(16, "efi-x64-http", "uefi_x64", True),
    Arch(19, "efi-arm64-http", "arm64", True),
)}


def arch_of(code: int) -> Arch | None:
    """The :class:`Arch` of option 93 value ``code``, or None if sidus cannot boot it."""
    return ARCHES.get(code)


@dataclass(frozen=True)
class BootRequest:
    """What sidus needs to know about one received request (RFC 2131, RFC 4578)."""

    packet: dhcp.DhcpPacket
    via: str                            # VIA_DHCP or VIA_PXE
    server_ip: IPv4Address              # address of the interface it came in on
    source: tuple[str, int] | None      # (ip, port) it came from
    mac: str
    msg_type: int | None
    arch: Arch | None                   # None: option 93 names an arch sidus cannot boot
    arch_code: int
    pxe: bool                           # option 60 starts with PXEClient or HTTPClient
    http_client: bool                   # option 60 starts with HTTPClient (UEFI HTTP boot)
    ipxe: bool                          # option 77 "iPXE" or option 175 present

    @classmethod
    def from_packet(cls, pkt: dhcp.DhcpPacket, via: str, server_ip: IPv4Address | str,
                    source: tuple[str, int] | None = None) -> "BootRequest":
        """Classify ``pkt`` (RFC 4578 §2.1 option 93, PXE 2.1 option 60, iPXE 77/175)."""
        vendor = pkt.option(dhcp.OPT_VENDOR_CLASS) or b""
        arches = dhcp.client_arches(pkt)
        # RFC 4578 §2.1: a client that sends no option 93 is treated as x86 BIOS.
        code = arches[0] if arches else 0
        user_class = pkt.option(dhcp.OPT_USER_CLASS) or b""
        return cls(packet=pkt, via=via, server_ip=IPv4Address(server_ip), source=source,
                   mac=pkt.mac, msg_type=pkt.message_type, arch=arch_of(code), arch_code=code,
                   pxe=vendor.startswith((b"PXEClient", b"HTTPClient")),
                   http_client=vendor.startswith(b"HTTPClient"),
                   # iPXE sends 77 as the bare string "iPXE" (not RFC 3004 format); the
                   # encapsulated option 175 is iPXE's own and present in every request.
                   ipxe=user_class == b"iPXE" or pkt.has(dhcp.OPT_IPXE_ENCAP))

    @property
    def arch_name(self) -> str:
        return self.arch.name if self.arch else f"arch-{self.arch_code}"


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
Lookup = Callable[[str], Any]


def _u32(n: int) -> bytes:
    return struct.pack("!I", max(0, min(int(n), 0xFFFFFFFF)))


def boot_file_for(req: "BootRequest", config: Any) -> tuple[str | None, str]:
    """The boot file of a PXE client, or (None, why).

    ``boot.ipxe_chain`` false: the file of the client's family (``bios``,
    ``uefi_x64``, ``uefi_ia32``, ``arm64``), iPXE or not.  True: a client that
    is already iPXE gets ``http://<server>:<http.port>/boot/<mac>.ipxe`` (so
    iPXE is never chainloaded in a loop); BIOS and x64 EFI firmware get the iPXE
    binary (``ipxe_bios``, ``ipxe_efi``); IA32 and arm64 keep their own file (no
    iPXE binary is configured for them).  UEFI HTTP boot clients get the file
    as ``http://<server>:<http.port>/<file>``.
    """
    files, http = config.boot.boot_files, config.http
    base = f"http://{req.server_ip}:{http.port}"
    if req.arch is None:
        return None, f"unsupported client architecture {req.arch_code} (option 93)"
    if config.boot.ipxe_chain and req.ipxe:
        if not http.enabled:
            return None, "boot.ipxe_chain needs http.enabled for the iPXE script"
        return f"{base}/boot/{req.mac.replace(':', '-')}.ipxe", ""
    family = req.arch.family
    if config.boot.ipxe_chain and family == "bios":
        name = files.ipxe_bios
    elif config.boot.ipxe_chain and family == "uefi_x64":
        name = files.ipxe_efi
    else:
        name = getattr(files, family)
    if not name:
        return None, f"no boot_files.{family} configured for {req.arch.name} (arch {req.arch_code})"
    if req.http_client or req.arch.http:
        if not http.enabled:
            return None, "UEFI HTTP boot client but http.enabled is false"
        return f"{base}/{name}", ""
    return name, ""


def _valid_ethernet(pkt: dhcp.DhcpPacket) -> bool:
    if pkt.htype != dhcp.HTYPE_ETHERNET or pkt.hlen != 6:
        return False
    first = pkt.chaddr[0]
    return not first & 1 and pkt.chaddr[:6] != bytes(6)


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
        if req.http_client:
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


def _dest(req: BootRequest, msg_type: int, config: Any) -> tuple[str, int]:
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


def decide(req: BootRequest, config: Any, lookup: Lookup, *, leases: LeaseDB | None = None,
           reservations: Reservations = NO_RESERVATIONS, now: float = 0.0) -> Decision:
    """Decide the answer to ``req`` under ``config`` (a :class:`sidusd.config.Config`).

    ``lookup(mac)`` returns what the inventory says about the machine (a
    BootTarget, or any truthy value in tests), or None/False when it must not be
    served.  Full mode needs ``leases`` (read here, changed only by the edge
    applying the returned lease), ``reservations`` and ``now``.
    """
    p = req.packet
    mode = config.dhcp.mode
    if p.op != dhcp.BOOTREQUEST:
        return Drop("not_request", "BOOTREPLY received on a server port")
    if req.msg_type is None:
        return Drop("bootp", "plain BOOTP (no option 53) is not served")
    if not _valid_ethernet(p):
        return Drop("bad_chaddr", f"htype {p.htype} hlen {p.hlen}: only Ethernet MACs are served")
    if mode == "off":
        return Drop("disabled", "dhcp.mode is off")
    if req.msg_type in (dhcp.DHCPOFFER, dhcp.DHCPACK, dhcp.DHCPNAK):
        return Drop("not_request", "server message type received")
    if mode == "proxy" and not req.pxe:
        return Drop("not_pxe", "option 60 does not start with PXEClient/HTTPClient")
    if req.via == VIA_PXE and req.msg_type not in (dhcp.DHCPREQUEST, dhcp.DHCPINFORM):
        return Drop("wrong_port", f"{dhcp.MESSAGE_TYPE_NAMES.get(req.msg_type)} on the PXE port")
    target = lookup(req.mac)
    if not target:
        return Drop("unknown_host", "not in the inventory and dhcp.unknown_hosts is ignore")
    boot: str | None = None
    if req.pxe:
        boot, why = boot_file_for(req, config)
        if boot is None:
            return Drop("no_boot_file", why)
    if mode == "proxy" or req.via == VIA_PXE:
        return _proxy(req, config, boot)
    if leases is None:
        return Drop("no_pool", "full mode without a lease database")
    return _full(req, config, target, boot, leases, reservations, now)


def _proxy(req: BootRequest, config: Any, boot: str | None) -> Decision:
    """proxyDHCP (PXE 2.1 §2.2.5): boot information only, yiaddr 0, no lease options."""
    t = req.msg_type
    if req.via == VIA_DHCP:
        if t == dhcp.DHCPDISCOVER:
            pkt = build_reply(req, dhcp.DHCPOFFER, boot=boot)
            return Reply("offer", pkt, _dest(req, dhcp.DHCPOFFER, config), boot)
        if t == dhcp.DHCPREQUEST:
            sid = req.packet.option(dhcp.OPT_SERVER_ID)
            if sid != req.server_ip.packed:
                # The client is taking its address from the site DHCP server: not ours,
                # but worth noting (iPXE skips the 4011 request when the proxy OFFER
                # already carries the boot file, so this is the only time we see it).
                seen = _ip_opt(req.packet, dhcp.OPT_REQUESTED_IP) or req.packet.ciaddr
                return Drop("other_server", "REQUEST on the DHCP port for another server",
                            seen_ip=seen if seen != ZERO else None)
            # Quirk: some PXE ROMs send the ProxyDHCP REQUEST to port 67 (broadcast,
            # server id = us) instead of unicasting it to 4011; answer it the same way.
            pkt = build_reply(req, dhcp.DHCPACK, boot=boot)
            return Reply("ack", pkt, _dest(req, dhcp.DHCPACK, config), boot)
        return Drop("ignored", f"{dhcp.MESSAGE_TYPE_NAMES.get(t)} is for the site DHCP server")
    pkt = build_reply(req, dhcp.DHCPACK, boot=boot)
    return Reply("ack", pkt, _dest(req, dhcp.DHCPACK, config), boot)


def _lease_options(config: Any, target: Any, lease_s: int | None) -> tuple[tuple[int, bytes], ...]:
    """Options 1, 3, 6, 15, 12 and 51/58/59 (RFC 2132 §3, §9.2, §9.11, §9.12)."""
    pool = config.dhcp.pool
    opts: list[tuple[int, bytes]] = [(dhcp.OPT_SUBNET_MASK, pool.network.netmask.packed)]
    if pool.router is not None:
        opts.append((dhcp.OPT_ROUTER, pool.router.packed))
    if pool.dns_servers:
        opts.append((dhcp.OPT_DNS_SERVERS, b"".join(a.packed for a in pool.dns_servers)))
    if pool.domain:
        opts.append((dhcp.OPT_DOMAIN_NAME, pool.domain.encode()))
    hostname = getattr(target, "hostname", None)
    if hostname:
        opts.append((dhcp.OPT_HOSTNAME, hostname.encode()))
    if lease_s is not None:
        opts += [(dhcp.OPT_LEASE_TIME, _u32(lease_s)),
                 (dhcp.OPT_RENEWAL_TIME, _u32(lease_s // 2)),            # T1 = 0.5 (§4.4.5)
                 (dhcp.OPT_REBINDING_TIME, _u32(lease_s * 7 // 8))]      # T2 = 0.875
    return tuple(opts)


def _nak(req: BootRequest, config: Any, why: str) -> Reply:
    pkt = build_reply(req, dhcp.DHCPNAK, options=((dhcp.OPT_MESSAGE, why.encode()[:200]),))
    return Reply("nak", pkt, _dest(req, dhcp.DHCPNAK, config), None)


def _ip_opt(pkt: dhcp.DhcpPacket, code: int) -> IPv4Address | None:
    v = pkt.option(code)
    return IPv4Address(v) if v else None


def _expected(db: LeaseDB, res: Reservations, mac: str) -> IPv4Address | None:
    """The address this server knows for ``mac``: its reservation, else its lease."""
    if mac in res.by_mac:
        return res.by_mac[mac]
    cur = db.by_mac(mac)
    return cur.ip if cur is not None else None


def _full(req: BootRequest, config: Any, target: Any, boot: str | None, db: LeaseDB,
          res: Reservations, now: float) -> Decision:
    """Full DHCP server (RFC 2131 §4.3): DISCOVER, REQUEST, DECLINE, RELEASE, INFORM."""
    p, t, mac = req.packet, req.msg_type, req.mac
    lease_s = config.dhcp.pool.lease_time_s
    server_id = _ip_opt(p, dhcp.OPT_SERVER_ID)
    requested = _ip_opt(p, dhcp.OPT_REQUESTED_IP)
    if t == dhcp.DHCPDISCOVER:
        ip = db.choose(mac, now, requested, res)
        if ip is None:
            return Drop("pool_exhausted", "no free address in dhcp.pool")
        lease = Lease(ip, mac, "offered", now + OFFER_HOLD_S)
        pkt = build_reply(req, dhcp.DHCPOFFER, yiaddr=ip, boot=boot,
                          options=_lease_options(config, target, lease_s))
        return Reply("offer", pkt, _dest(req, dhcp.DHCPOFFER, config), boot, lease)
    if t == dhcp.DHCPREQUEST:
        if server_id is not None and server_id != req.server_ip:
            return Drop("other_server", "client selected another server (RFC 2131 §4.3.2)")
        if server_id is not None:                       # SELECTING
            ip = requested
        elif requested is not None:                     # INIT-REBOOT
            ip = requested
            if p.ciaddr != ZERO:
                return _nak(req, config, "ciaddr must be 0 in INIT-REBOOT")
            if ip not in config.dhcp.pool.network:
                return _nak(req, config, "wrong network")
            expected = _expected(db, res, mac)
            if expected is None:
                return Drop("unknown_lease", "INIT-REBOOT from a client without a lease here")
            if ip != expected:
                return _nak(req, config, f"{ip} is not this client's address")
        else:                                           # RENEWING / REBINDING
            ip = p.ciaddr
            if ip == ZERO:
                return Drop("malformed_request", "REQUEST without server id, option 50 or ciaddr")
            expected = _expected(db, res, mac)
            if expected is None:
                return Drop("unknown_lease", "renewal of a lease this server does not hold")
            if ip != expected:
                return _nak(req, config, f"{ip} is not this client's address")
        if ip is None:
            return _nak(req, config, "no requested address")
        if not db.available_to(ip, mac, now, res) or res.by_mac.get(mac, ip) != ip:
            return _nak(req, config, f"{ip} is not available to this client")
        lease = Lease(ip, mac, "bound", now + lease_s)
        pkt = build_reply(req, dhcp.DHCPACK, yiaddr=ip, boot=boot,
                          options=_lease_options(config, target, lease_s))
        return Reply("ack", pkt, _dest(req, dhcp.DHCPACK, config), boot, lease)
    if t == dhcp.DHCPINFORM:                            # RFC 2131 §4.3.5: no lease, no 51
        pkt = build_reply(req, dhcp.DHCPACK, boot=boot,
                          options=_lease_options(config, target, None))
        return Reply("ack", pkt, _dest(req, dhcp.DHCPACK, config), boot)
    if server_id is not None and server_id != req.server_ip:
        return Drop("other_server", "RELEASE/DECLINE for another server")
    if t == dhcp.DHCPRELEASE:                           # RFC 2131 §4.3.4
        cur = db.by_mac(mac)
        if cur is None or cur.ip != p.ciaddr:
            return Drop("unknown_lease", "RELEASE of a lease this client does not hold")
        return LeaseChange("release", Lease(cur.ip, mac, "free", now))
    if t == dhcp.DHCPDECLINE:                           # RFC 2131 §4.3.3
        if requested is None or not db.in_range(requested):
            return Drop("unknown_lease", "DECLINE without an address of the pool")
        return LeaseChange("decline", Lease(requested, mac, "declined", now + DECLINE_HOLD_S))
    return Drop("unknown_type", f"message type {t}")
