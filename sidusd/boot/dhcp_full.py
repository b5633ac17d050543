"""Full DHCP decisions (pure; RFC 2131 §4.3): addresses from the pool, with the PXE fields.

:func:`decide_full` is what :func:`sidusd.boot.policy.decide` does for a
client it serves in ``dhcp.mode: full`` once the common checks have passed:
DISCOVER, REQUEST (SELECTING, INIT-REBOOT, RENEWING/REBINDING), DECLINE,
RELEASE and INFORM.  It reads ``leases``; only the edge changes them, by
applying the lease the decision returns.
"""

from __future__ import annotations

import struct
from ipaddress import IPv4Address
from typing import Any

from sidusd.boot.dhcp_reply import ZERO, Decision, Drop, LeaseChange, Reply, build_reply, ip_option, reply_dest
from sidusd.boot.dhcp_request import BootRequest
from sidusd.boot.leases import DECLINE_HOLD_S, OFFER_HOLD_S, Lease, LeaseDB, Reservations
from sidusd.proto import dhcp


def _u32(n: int) -> bytes:
    return struct.pack("!I", max(0, min(int(n), 0xFFFFFFFF)))


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
    return Reply("nak", pkt, reply_dest(req, dhcp.DHCPNAK, config), None)


def _expected(db: LeaseDB, res: Reservations, mac: str) -> IPv4Address | None:
    """The address this server knows for ``mac``: its reservation, else its lease."""
    if mac in res.by_mac:
        return res.by_mac[mac]
    cur = db.by_mac(mac)
    return cur.ip if cur is not None else None


def decide_full(req: BootRequest, t: int, config: Any, target: Any, boot: str | None, db: LeaseDB,
                res: Reservations, now: float) -> Decision:
    """Full DHCP server (RFC 2131 §4.3): DISCOVER, REQUEST, DECLINE, RELEASE, INFORM.

    ``t`` is the request's message type (option 53), ``target`` what the
    inventory says about the machine, ``boot`` its boot file (None: not a PXE
    client), ``db`` and ``res`` the pool's leases and reservations.
    """
    p, mac = req.packet, req.mac
    lease_s = config.dhcp.pool.lease_time_s
    server_id = ip_option(p, dhcp.OPT_SERVER_ID)
    requested = ip_option(p, dhcp.OPT_REQUESTED_IP)
    if t == dhcp.DHCPDISCOVER:
        ip = db.choose(mac, now, requested, res)
        if ip is None and mac in res.by_mac:
            return Drop("reserved_in_use", f"{res.by_mac[mac]} (reserved) is still leased to another MAC")
        if ip is None:
            return Drop("pool_exhausted", "no free address in dhcp.pool")
        lease = Lease(ip, mac, "offered", now + OFFER_HOLD_S)
        pkt = build_reply(req, dhcp.DHCPOFFER, yiaddr=ip, boot=boot,
                          options=_lease_options(config, target, lease_s))
        return Reply("offer", pkt, reply_dest(req, dhcp.DHCPOFFER, config), boot, lease)
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
        return Reply("ack", pkt, reply_dest(req, dhcp.DHCPACK, config), boot, lease)
    if t == dhcp.DHCPINFORM:                            # RFC 2131 §4.3.5: no lease, no 51
        pkt = build_reply(req, dhcp.DHCPACK, boot=boot,
                          options=_lease_options(config, target, None))
        return Reply("ack", pkt, reply_dest(req, dhcp.DHCPACK, config), boot)
    if server_id is not None and server_id != req.server_ip:
        return Drop("other_server", "RELEASE/DECLINE for another server")
    if t == dhcp.DHCPRELEASE:                           # RFC 2131 §4.3.4
        cur = db.by_mac(mac)
        if cur is None or cur.ip != p.ciaddr:
            return Drop("unknown_lease", "RELEASE of a lease this client does not hold")
        return LeaseChange("release", Lease(cur.ip, mac, "free", now))
    if t == dhcp.DHCPDECLINE:                           # RFC 2131 §4.3.3
        # Only the client the address was offered to (or is bound to) may decline it:
        # a DECLINE from any other MAC would evict someone else's lease.
        cur = db.by_ip(requested) if requested is not None else None
        if cur is None or cur.mac != mac or cur.state not in ("offered", "bound"):
            return Drop("decline_not_holder", "DECLINE of an address this client was not given")
        return LeaseChange("decline", Lease(cur.ip, mac, "declined", now + DECLINE_HOLD_S))
    return Drop("unknown_type", f"message type {t}")
