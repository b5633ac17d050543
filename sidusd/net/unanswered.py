"""Machines that asked and got no answer: noted for ``sidusctl clients``, logged at info, rarely.

A PXE client that gets no answer retries for as long as it is switched on; the
admin must learn why (no boot file for its architecture, an unknown host while
``dhcp.unknown_hosts`` is ``ignore``) without one log line per DISCOVER.  Each
MAC has its own :class:`~sidusd.observability.RepeatBackoff` (the first at
once, then at doubling intervals, again at once when the reason changes); the
table is bounded (least recently seen MAC dropped first).
"""

from __future__ import annotations

import collections

from ..observability import RepeatBackoff

#: the DHCP drop codes that leave a booting machine without an answer it needs
UNANSWERED = frozenset({"unknown_host", "no_boot_file"})
MAX_MACS = 4096


class UnansweredLog:
    """Per-MAC rate limit of the ``dhcp.unanswered`` events."""

    def __init__(self, max_macs: int = MAX_MACS, first_s: float = 60.0, max_s: float = 3600.0):
        self.max_macs, self.first_s, self.max_s = max_macs, first_s, max_s
        self._by_mac: collections.OrderedDict[str, RepeatBackoff] = collections.OrderedDict()

    def note(self, mac: str, code: str, now: float) -> int | None:
        """``mac`` got no answer for ``code`` at ``now``: the number of such events not logged
        since the last logged one when this one is to be logged, else None."""
        b = self._by_mac.pop(mac, None) or RepeatBackoff(self.first_s, self.max_s)
        self._by_mac[mac] = b
        while len(self._by_mac) > self.max_macs:
            self._by_mac.popitem(last=False)
        return b.take_suppressed() if b.failed(code, now) else None

    def answered(self, mac: str) -> None:
        """``mac`` got an answer: the next refusal is logged at once."""
        self._by_mac.pop(mac, None)
