"""Full-DHCP address pool: allocation and lease state (pure; RFC 2131 §4.3.1, §4.3.2).

No file and no clock here: time is passed in as ``now`` (seconds, wall clock,
because leases are persisted across restarts) and the journal is a sequence of
JSON lines read and written by :mod:`sidusd.net.leasestore`.

A :class:`LeaseDB` holds at most one :class:`Lease` per address of the pool's
network, so its size is bounded by the network, never by the number of MACs
that talk to us.  Expired leases are kept (RFC 2131 §4.3.1: a returning client
should get its previous address) until the address is needed for someone else.

Journal line (one JSON object)::

    {"ip": "10.0.0.100", "mac": "52:54:00:12:34:56", "state": "bound", "expires": 1700000000.0}

``state`` is ``bound`` (after an ACK), ``free`` (RELEASE: the line removes the
lease) or ``declined`` (DECLINE: the address is set aside until ``expires``).
Offers (``offered``) live in memory only: losing one at a crash is harmless,
the client just sends a new DISCOVER.

Group commit: the edge applies the leases of one loop turn at once (the next
decision must see them), then writes them with one fsync; :meth:`LeaseDB.begin`
/ :meth:`LeaseDB.commit` / :meth:`LeaseDB.rollback` undo the turn's changes
when that write fails (no ACK was sent for them).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

IPv4Address = ipaddress.IPv4Address
STATES = ("offered", "bound", "free", "declined")
OFFER_HOLD_S = 60.0         # how long an OFFERed address stays set aside (RFC 2131 §4.3.1)
DECLINE_HOLD_S = 600.0      # how long a DECLINEd address is not handed out (RFC 2131 §4.3.3)


@dataclass(frozen=True)
class Lease:
    """One address binding (RFC 2131 §1: "lease")."""

    ip: IPv4Address
    mac: str
    state: str
    expires: float

    def active(self, now: float) -> bool:
        """True while the address may not go to another client."""
        return self.state != "free" and now < self.expires

    def to_json(self) -> str:
        return json.dumps({"ip": str(self.ip), "mac": self.mac, "state": self.state,
                           "expires": self.expires}, separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> Lease:
        """Parse one journal line; ValueError if it is not a lease."""
        try:
            d = json.loads(line)
            lease = cls(ip=IPv4Address(d["ip"]), mac=str(d["mac"]), state=str(d["state"]),
                        expires=float(d["expires"]))
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not a lease line: {exc}") from None
        if lease.state not in ("bound", "free", "declined"):
            raise ValueError(f"state {lease.state!r} is not journaled")
        return lease


@dataclass(frozen=True)
class Reservations:
    """Fixed addresses from the inventory (hosts with an ``ip``), both ways."""

    by_mac: Mapping[str, IPv4Address]
    by_ip: Mapping[IPv4Address, str]

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[str, IPv4Address | None]]) -> Reservations:
        by_mac = {mac: ip for mac, ip in pairs if ip is not None}
        return cls(by_mac, {ip: mac for mac, ip in by_mac.items()})


NO_RESERVATIONS = Reservations({}, {})
_MISSING = object()
LEASE_KEY = '{"ip":'          # how every journal line starts (Lease.to_json: compact, "ip" first)


class LeaseDB:
    """Leases of one pool, indexed by address and by MAC.  Not thread-safe (one loop)."""

    def __init__(self, network: ipaddress.IPv4Network, range_start: IPv4Address,
                 range_end: IPv4Address):
        self.network = network
        self.range_start = range_start
        self.range_end = range_end
        self._by_ip: dict[IPv4Address, Lease] = {}
        self._by_mac: dict[str, IPv4Address] = {}
        self._cursor = int(range_start)      # every address below it has had a lease
        self._undo: list[tuple[dict[Any, Any], Any, Any]] | None = None
        self._undo_cursor = self._cursor

    @classmethod
    def for_pool(cls, pool: Any) -> LeaseDB:
        """A LeaseDB for a ``config.dhcp.pool`` (PoolConfig)."""
        return cls(pool.network, pool.range_start, pool.range_end)

    # -- reading ----------------------------------------------------------
    def __len__(self) -> int:
        return len(self._by_ip)

    def __bool__(self) -> bool:
        """Always true: an empty lease table is still a lease table (``if db`` bit
        the reservations once, issue 14 item 1; write ``is not None``)."""
        return True

    def in_range(self, ip: IPv4Address) -> bool:
        return self.range_start <= ip <= self.range_end

    def by_mac(self, mac: str) -> Lease | None:
        """The lease (current or expired, not declined) last given to ``mac``."""
        ip = self._by_mac.get(mac)
        return self._by_ip.get(ip) if ip is not None else None

    def by_ip(self, ip: IPv4Address) -> Lease | None:
        return self._by_ip.get(ip)

    def leases(self) -> list[Lease]:
        """Every lease held, sorted by address (for status and compaction)."""
        return [self._by_ip[ip] for ip in sorted(self._by_ip)]

    def available_to(self, ip: IPv4Address, mac: str, now: float,
                     reservations: Reservations = NO_RESERVATIONS) -> bool:
        """May ``ip`` be given to ``mac`` now?  (in the network, not someone else's)."""
        if ip not in self.network or ip in (self.network.network_address,
                                            self.network.broadcast_address):
            return False
        owner = reservations.by_ip.get(ip)
        lease = self._by_ip.get(ip)
        if owner is not None:
            # A reserved address goes only to its MAC, and not while another MAC still
            # holds a lease on it (one that predates the reservation): never two holders.
            return owner == mac and (lease is None or not lease.active(now)
                                     or (lease.mac == mac and lease.state != "declined"))
        if not self.in_range(ip):
            return False
        if lease is None or not lease.active(now):
            return True
        return lease.mac == mac and lease.state != "declined"

    # -- allocation (RFC 2131 §4.3.1) --------------------------------------
    def choose(self, mac: str, now: float, requested: IPv4Address | None = None,
               reservations: Reservations = NO_RESERVATIONS) -> IPv4Address | None:
        """The address to offer ``mac``, or None when the pool is exhausted (read only).

        Order (RFC 2131 §4.3.1): the inventory reservation; the client's current
        or previous address; the address it asked for (option 50); a never used
        address; the address whose lease expired longest ago.
        """
        reserved = reservations.by_mac.get(mac)
        if reserved is not None:
            return reserved if self.available_to(reserved, mac, now, reservations) else None
        prev = self._by_mac.get(mac)
        if prev is not None and self.available_to(prev, mac, now, reservations):
            return prev
        if requested is not None and self.available_to(requested, mac, now, reservations):
            return requested
        end = int(self.range_end)
        for n in range(self._cursor, end + 1):           # never used addresses first
            ip = IPv4Address(n)
            if ip not in self._by_ip and self.available_to(ip, mac, now, reservations):
                return ip
        best: IPv4Address | None = None
        best_expiry = float("inf")
        for ip, lease in self._by_ip.items():
            if not lease.active(now) and lease.expires < best_expiry \
                    and self.available_to(ip, mac, now, reservations):
                best, best_expiry = ip, lease.expires
        if best is not None:
            return best
        for n in range(int(self.range_start), end + 1):   # released addresses (no lease left)
            ip = IPv4Address(n)
            if ip not in self._by_ip and self.available_to(ip, mac, now, reservations):
                return ip
        return None

    # -- changes -------------------------------------------------------------
    def begin(self) -> None:
        """Record every change from now on, so :meth:`rollback` can undo them."""
        if self._undo is None:
            self._undo, self._undo_cursor = [], self._cursor

    def commit(self) -> None:
        """Keep the changes since :meth:`begin` (they are on disk)."""
        self._undo = None

    def rollback(self) -> None:
        """Undo every change since :meth:`begin` (their journal write failed)."""
        undo, self._undo = self._undo, None
        if undo is None:
            return
        for table, key, old in reversed(undo):
            if old is _MISSING:
                table.pop(key, None)
            else:
                table[key] = old
        self._cursor = self._undo_cursor

    @property
    def in_transaction(self) -> bool:
        return self._undo is not None

    def _set(self, table: dict[Any, Any], key: Any, value: Any) -> None:
        if self._undo is not None:
            self._undo.append((table, key, table.get(key, _MISSING)))
        table[key] = value

    def _del(self, table: dict[Any, Any], key: Any) -> None:
        if self._undo is not None:
            self._undo.append((table, key, table.get(key, _MISSING)))
        del table[key]

    def apply(self, lease: Lease) -> None:
        """Record ``lease`` (from a decision or a journal line); ``free`` removes it.

        An offer to the client that holds the address bound (a PXE client that
        reboots DISCOVERs again, RFC 2131 §4.3.1) leaves the bound lease in
        place: offers live in memory only, so turning the binding into a 60 s
        offer would drop it from the next compaction, and after a restart the
        address could go to someone else while its holder still uses it (found
        by tests/integration/test_crash_safety.py::test_kill_9_during_lease_writes).
        If the binding ends before the offer's hold, it is extended to it.
        """
        if lease.state == "offered":
            cur = self._by_ip.get(lease.ip)
            if cur is not None and cur.mac == lease.mac and cur.state == "bound":
                if cur.expires >= lease.expires:
                    return
                lease = Lease(cur.ip, cur.mac, "bound", lease.expires)
        old_ip = self._by_mac.get(lease.mac)
        if lease.state == "free":
            cur = self._by_ip.get(lease.ip)
            if cur is not None and cur.mac == lease.mac:
                self._del(self._by_ip, lease.ip)
            if old_ip == lease.ip:
                self._del(self._by_mac, lease.mac)
            return
        displaced = self._by_ip.get(lease.ip)
        if displaced is not None and self._by_mac.get(displaced.mac) == lease.ip \
                and displaced.mac != lease.mac:
            self._del(self._by_mac, displaced.mac)
        self._set(self._by_ip, lease.ip, lease)
        while self._cursor <= int(self.range_end) and IPv4Address(self._cursor) in self._by_ip:
            self._cursor += 1
        if lease.state == "declined":
            if old_ip == lease.ip:
                self._del(self._by_mac, lease.mac)
            return
        if old_ip is not None and old_ip != lease.ip:
            prev = self._by_ip.get(old_ip)
            if prev is not None and prev.mac == lease.mac:
                self._del(self._by_ip, old_ip)          # one address per client
        self._set(self._by_mac, lease.mac, lease.ip)

    def replay(self, lines: Iterable[str], refused: list[tuple[int, str]] | None = None) -> int:
        """Apply journal lines in order; returns how many were refused (and skipped).

        A line is refused when it does not parse or its address is outside the
        pool's network (the pool may have changed since it was written); each
        refusal is appended to ``refused`` as ``(line number, reason)`` if given.
        A line that holds a torn record followed by a whole one (a write cut
        short by a full disk, then the next append on the same line, before
        appends truncated their failures away) gives the whole one back: the
        torn part alone is refused.
        """
        bad = 0
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                lease = Lease.from_json(line)
            except ValueError as exc:
                bad += 1
                if refused is not None:
                    refused.append((n, str(exc)))
                cut = line.rfind(LEASE_KEY)
                if cut <= 0:
                    continue
                try:
                    lease = Lease.from_json(line[cut:])
                except ValueError:
                    continue
            if lease.ip not in self.network:
                bad += 1
                if refused is not None:
                    refused.append((n, f"{lease.ip} is outside {self.network}"))
                continue
            self.apply(lease)
        return bad

    def journal_lines(self, now: float) -> list[str]:
        """The lines that rebuild this DB (compaction): bound and declined, not stale offers."""
        return [l.to_json() for l in self.leases()
                if l.state == "bound" or (l.state == "declined" and l.active(now))]
