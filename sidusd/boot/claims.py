"""Who claimed a MAC, and who may therefore receive its disk secret (pure).

DHCP has no client authentication: a machine is known by the MAC it writes
into ``chaddr`` and the address it states (``ciaddr`` of its 4011 REQUEST,
option 50 of the REQUEST it broadcasts to the site's server, or the address
our full-mode server gave it).  Any host on the LAN can write another
machine's MAC there.  What sidusd can still do (docs/security.md "L2
spoofing: the threat model"):

* remember every address a MAC was claimed from recently (:class:`Claims`):
  a MAC claimed from two addresses within :data:`CLAIM_WINDOW_S` is a
  *conflict*, shown by ``sidusctl clients``, and its disk secret goes to
  neither address until the window has passed (fail closed: the real
  machine's boot falls back, the thief gets nothing);
* when the inventory gives the host a fixed ``ip``, send its secret to that
  address only, whatever the DHCP traffic said (:func:`secret_problem`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sidusd.boot.leases import Lease

CLAIM_WINDOW_S = 600.0        # two addresses for one MAC within this time: a conflict
MAX_ADDRESSES = 4             # addresses remembered per MAC (the oldest forgotten first)


@dataclass
class Claims:
    """The addresses one MAC was claimed from, with the last time of each (bounded)."""

    seen: dict[str, float] = field(default_factory=dict)

    def note(self, ip: str, now: float) -> None:
        """``ip`` claimed this MAC at ``now``."""
        self.seen.pop(ip, None)
        self.seen[ip] = now
        while len(self.seen) > MAX_ADDRESSES:
            del self.seen[min(self.seen, key=self.seen.__getitem__)]

    def recent(self, now: float, window_s: float = CLAIM_WINDOW_S) -> tuple[str, ...]:
        """The addresses that claimed this MAC in the ``window_s`` before ``now``, newest first."""
        live = [(t, ip) for ip, t in self.seen.items() if now - t <= window_s]
        return tuple(ip for _, ip in sorted(live, reverse=True))

    def conflict(self, now: float, window_s: float = CLAIM_WINDOW_S) -> bool:
        """True when two or more addresses claimed this MAC within the window."""
        return len(self.recent(now, window_s)) > 1


def secret_problem(client_ip: str, claimed_from: tuple[str, ...], fixed_ip: str | None) -> str | None:
    """Why a config carrying host ``mac``'s disk secret must not go to ``client_ip``, or None.

    ``claimed_from``: the addresses that claimed the MAC recently (:meth:`Claims.recent`);
    ``fixed_ip``: the host's ``ip`` in the inventory, if any.  (The caller has already
    checked that ``client_ip``'s last DHCP exchange was for that MAC.)
    """
    if fixed_ip is not None and client_ip != fixed_ip:
        return f"the inventory gives this host the address {fixed_ip}; the request came from {client_ip}"
    others = [ip for ip in claimed_from if ip != client_ip]
    if others:
        return (f"the MAC was also claimed from {', '.join(others)} in the last {CLAIM_WINDOW_S:.0f} s "
                "(conflict): disk secrets are withheld from every address until it passes")
    return None


def pxe_claim(ciaddr: str, lease: Lease | None, now: float) -> bool:
    """Full-DHCP mode: is a PXE REQUEST's ``ciaddr`` a claim of the MAC it names?

    There the lease table is the authority for which address a MAC holds: only
    the address our (active) lease binds to that MAC is a claim.  Any other
    ``ciaddr`` -- a spoofer stating its own address with another machine's MAC
    -- moves nothing: the caller counts it and shows it as a conflict attempt
    (:meth:`Claims.note` on the record's ``attempts``), and since the MAC's
    address does not change, its disk secret is not served there.
    ``lease``: the lease table's record for the MAC (``LeaseDB.by_mac``), None without one.
    """
    return lease is not None and lease.active(now) and ciaddr == str(lease.ip)
