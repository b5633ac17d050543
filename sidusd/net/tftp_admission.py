"""Admission of TFTP requests: the caps, and unconfirmed transfers that give way under a flood.

A UDP request's source address costs nothing to forge.  Without a rule for
it, a burst of forged RRQs (one per source address, each under the per-client
cap) fills ``max_transfers`` in a millisecond, and real clients are refused
("server busy") until those transfers time out.  So:

* a transfer is *unconfirmed* until its peer acknowledges something (ACK 0 of
  the OACK, or a DATA block: :func:`~sidusd.net.tftp_transfer.confirmed`);
  a forged source never does, since what we send goes to the address it
  named, not to the sender;
* ``max_transfers`` and ``max_transfers_per_client`` hold as before (a
  request whose file is being opened counts), but when the global cap is
  reached a new request takes the place of an unconfirmed transfer instead of
  being refused: the source with the most transfers among the ``SCAN``
  oldest unconfirmed ones gives up its oldest (fair share per source), ended
  silently (outcome ``evicted``, counted ``tftp.transfers.evicted``, logged
  rate-limited as ``tftp.evicted``);
* confirmed transfers are never evicted: a flood of forged requests only
  recycles the unconfirmed slots, and a real client's request is served as
  long as its ACK comes back before ``(slots left unconfirmed) / (flood rate)``
  seconds (``bench/tftpflood.py`` measures it);
* a request whose file is still being opened holds its slot (at most a
  loop turn's requests, ``tftp_intake.BATCH``, locally; an RPC round trip
  with privilege separation);
* an unconfirmed transfer (or open) younger than ``GRACE_S`` is not
  evicted: a real client's ACK needs a loop turn or two to be read.  When every
  candidate is that young, the request is dropped without an answer (counted
  ``tftp.refused.flood``; the client retransmits it): this bounds what a flood
  can recycle to ``max_transfers / GRACE_S`` requests per second;
* "busy" only when every slot is confirmed or being opened and nothing was
  evicted in the last ``FLOOD_S`` (during a flood, an ERROR would end a real
  client's request for good, a silent drop lets it retransmit).

What this does not stop: an attacker who forges the ACKs too (the server port
is shared and the first block numbers are known) confirms its transfers
blindly; those then count like real ones, up to ``max_transfers_per_client``
per forged source IP (docs/security.md).
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING

from ..observability import RepeatBackoff
from .tftp_transfer import Transfer, confirmed

if TYPE_CHECKING:
    from .tftp_server import TftpService

SCAN = 8                    # oldest unconfirmed transfers compared for the fair-share choice
FLOOD_S = 1.0               # after an eviction, a request finding no slot is dropped, not refused
GRACE_S = 0.05              # an unconfirmed transfer this young is not evicted (its ACK is on the way)

Peer = tuple[str, int]

ADMIT, BUSY, PER_CLIENT, FLOOD = "admit", "busy", "per_client", "flood"


class Admission:
    """Who holds the slots of one :class:`~sidusd.net.tftp_server.TftpService`."""

    def __init__(self, svc: TftpService):
        self.svc = svc
        self.per_client: collections.Counter[str] = collections.Counter()
        self.unconfirmed: collections.OrderedDict[Peer, Transfer] = collections.OrderedDict()
        self._evicted_log = RepeatBackoff(10.0, 10.0)
        self._flood_until = 0.0             # an eviction happened less than FLOOD_S ago

    def decide(self, ip: str, in_use: int, max_transfers: int, max_per_client: int,
               now: float) -> str:
        """ADMIT (after evicting an unconfirmed transfer if the cap is reached), BUSY or PER_CLIENT."""
        full = in_use >= max_transfers
        victim = self.victim(now) if full else None
        if full and victim is None:
            # young unconfirmed transfers, or a flood going on: no answer (the client
            # retransmits; an ERROR would end it); else every slot is held for real
            return FLOOD if self.unconfirmed or now < self._flood_until else BUSY
        if self.per_client[ip] >= max_per_client:
            return PER_CLIENT
        if victim is not None:
            self._flood_until = now + FLOOD_S
            self.svc._evict(victim, now)
            self.svc.runtime.observer.count("tftp.evictions")
            if self._evicted_log.failed("", now):
                self.svc.log.warning("tftp.evicted", peer=f"{victim.peer[0]}:{victim.peer[1]}",
                                     file=victim.file, suppressed=self._evicted_log.take_suppressed(),
                                     reason="max_transfers reached; unconfirmed transfer ended")
        return ADMIT

    def victim(self, now: float) -> Transfer | None:
        """The unconfirmed transfer to end: among the ``SCAN`` oldest (older than ``GRACE_S``),
        the oldest of the source holding the most slots.  Confirmed ones met leave the list."""
        gone: list[Peer] = []
        best: Transfer | None = None
        best_n = 0
        seen = 0
        for peer, t in self.unconfirmed.items():
            if t.finished or confirmed(t):
                gone.append(peer)
                continue
            if t.begun_at > now - GRACE_S:
                break                           # this one and all after it are too young
            n = self.per_client[peer[0]]
            if n > best_n:
                best, best_n = t, n
            seen += 1
            if seen >= SCAN:
                break
        for peer in gone:
            del self.unconfirmed[peer]
        return best

    # -- bookkeeping ---------------------------------------------------------------
    def admitted(self, ip: str) -> None:
        """A request of ``ip`` was admitted: it counts until :meth:`release`."""
        self.per_client[ip] += 1

    def begun(self, t: Transfer) -> None:
        """A transfer began: unconfirmed until its peer acknowledges something."""
        self.unconfirmed[t.peer] = t

    def ended(self, t: Transfer) -> None:
        if self.unconfirmed.get(t.peer) is t:
            del self.unconfirmed[t.peer]

    def release(self, ip: str) -> None:
        """One admitted request of ``ip`` is over (its transfer ended, or never began)."""
        self.per_client[ip] -= 1
        if self.per_client[ip] <= 0:
            del self.per_client[ip]
