"""Whether to answer an IPv6 Router Solicitation with "no router here" (pure, time passed in).

Why: iPXE's ``autoboot`` configures the NIC with every configurator at once
(``ifconf``: IPv6 and DHCPv4) and waits until *all* of them are done.  On a
segment without an IPv6 router its router solicitations go unanswered and the
IPv6 configurator gives up only after its retry timer runs out (0.25 s doubling
to past 10 s: ~16 s), so the boot idles ~13 s after the DHCP ACK (docs/quirks.md
"iPXE waits for an IPv6 router").  A Router Advertisement with router lifetime 0
and no prefix ends that configurator at once and configures nothing.

Without harm to a site that runs IPv6: the answer is opt-in
(``dhcp.ipv6_no_router``), only ever solicited and unicast to the soliciting
link-local address, and :class:`NoRouterResponder` stays silent for
``FOREIGN_ROUTER_HOLD_S`` after it hears any other router advertise itself (a
router lifetime above 0, a prefix, or M/O flags): where a real router answers,
iPXE's wait ends by itself and its prefixes must win.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sidusd.proto.ndp import NDP_HOP_LIMIT, ROUTER_ADVERTISEMENT, ROUTER_SOLICITATION, NdpMessage

FOREIGN_ROUTER_HOLD_S = 1800.0     # RFC 4861 §6.2.1: the longest MaxRtrAdvInterval
PER_SOURCE_INTERVAL_S = 1.0        # at most one answer per soliciting address per second
MAX_SOURCES = 4096                 # remembered soliciting addresses (oldest forgotten first)

ANSWER = "answer"


@dataclass
class NoRouterResponder:
    """The decision for one interface: :meth:`on_message` -> ``"answer"`` or the reason not to."""

    foreign_router_until: float = 0.0
    _last: dict[str, float] = field(default_factory=dict)

    def on_message(self, msg: NdpMessage, source: str, hop_limit: int | None, now: float) -> str:
        """``source``: the packet's IPv6 source address (text); ``hop_limit``: its IPv6 hop
        limit (None when the socket did not say).  Returns ``ANSWER`` or a drop reason."""
        if hop_limit is not None and hop_limit != NDP_HOP_LIMIT:
            return "hop_limit"                      # RFC 4861 §6.1.1: not from this link
        if msg.kind == ROUTER_ADVERTISEMENT:
            if msg.router_lifetime_s > 0 or msg.has_prefix or msg.managed or msg.other:
                self.foreign_router_until = now + FOREIGN_ROUTER_HOLD_S
                return "router_heard"
            return "advertisement"                  # a lifetime-0 RA (ours, or another sidus)
        if msg.kind != ROUTER_SOLICITATION:
            return "not_solicitation"
        if not source.lower().startswith("fe80:"):
            return "not_link_local"                 # :: (no address yet) or a global source: no unicast answer
        if now < self.foreign_router_until:
            return "router_present"
        last = self._last.get(source)
        if last is not None and now - last < PER_SOURCE_INTERVAL_S:
            return "rate_limited"
        self._last.pop(source, None)
        self._last[source] = now
        while len(self._last) > MAX_SOURCES:
            del self._last[next(iter(self._last))]
        return ANSWER
