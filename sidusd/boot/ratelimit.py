"""Token buckets keyed by a name, bounded (pure: the caller passes ``now``, monotonic seconds).

Used by the full-DHCP edge to limit DHCPDECLINE (RFC 2131 §4.3.3) per MAC and
per interface: each accepted DECLINE sets an address aside for
:data:`~sidusd.boot.leases.DECLINE_HOLD_S`, so a client that DORAs and
declines in a loop would empty the pool; past the limit a DECLINE is dropped
(the lease stays as it was) and counted ``dhcp.drop.decline_rate``.
"""

from __future__ import annotations

import collections
from collections.abc import Hashable

DECLINE_PER_MAC_BURST = 3           # a client meeting several conflicts in a row (RFC 2131 §4.4.1)
DECLINE_PER_MAC_EVERY_S = 60.0      # then one DECLINE a minute per MAC
DECLINE_PER_IFACE_BURST = 20        # a segment full of clients that found one conflict each
DECLINE_PER_IFACE_EVERY_S = 1.0     # then one a second per interface
MAX_KEYS = 4096                     # buckets remembered (least recently used one forgotten)


class TokenBuckets:
    """``burst`` tokens per key, one more every ``every_s``; at most ``max_keys`` keys."""

    def __init__(self, burst: int, every_s: float, max_keys: int = MAX_KEYS):
        if burst < 1 or every_s <= 0 or max_keys < 1:
            raise ValueError("burst >= 1, every_s > 0 and max_keys >= 1")
        self.burst, self.every_s, self.max_keys = burst, every_s, max_keys
        self._buckets: collections.OrderedDict[Hashable, tuple[float, float]] = collections.OrderedDict()

    def _tokens(self, key: Hashable, now: float) -> float:
        got = self._buckets.get(key)
        if got is None:
            return float(self.burst)
        tokens, at = got
        return min(float(self.burst), tokens + max(0.0, now - at) / self.every_s)

    def has(self, key: Hashable, now: float) -> bool:
        """True if ``key`` has a token now (nothing is taken)."""
        return self._tokens(key, now) >= 1.0

    def take(self, key: Hashable, now: float) -> None:
        """Take one token from ``key`` (call after :meth:`has` said yes)."""
        self._buckets[key] = (self._tokens(key, now) - 1.0, now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)


class DeclineLimiter:
    """May this DECLINE change a lease?  Both the MAC's and the interface's bucket must allow it."""

    def __init__(self, per_mac: TokenBuckets | None = None, per_iface: TokenBuckets | None = None):
        # "is None", not "or": an empty TokenBuckets has len 0 (issue 14 item 1's bug class)
        self.per_mac = per_mac if per_mac is not None else TokenBuckets(
            DECLINE_PER_MAC_BURST, DECLINE_PER_MAC_EVERY_S)
        self.per_iface = per_iface if per_iface is not None else TokenBuckets(
            DECLINE_PER_IFACE_BURST, DECLINE_PER_IFACE_EVERY_S)

    def allow(self, mac: str, iface: str, now: float) -> bool:
        """True (and both tokens taken) if ``mac`` on ``iface`` may decline now."""
        if not (self.per_mac.has(mac, now) and self.per_iface.has(iface, now)):
            return False
        self.per_mac.take(mac, now)
        self.per_iface.take(iface, now)
        return True
