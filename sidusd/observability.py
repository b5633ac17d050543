"""Logging, counters and the per-client boot timeline.

* :func:`setup_logging` configures structlog: JSON lines when stderr is not a
  terminal (journald), readable console output when it is.
* :class:`LogLimiter` is the one rate limit of log lines that a peer can cause
  (one per packet, per connection, per request): a budget per event name,
  and the number of suppressed lines reported (``suppressed=N``) when that
  event is written again.  :class:`RepeatBackoff` is for a check that keeps
  failing (a backend down), logged ever more rarely until it recovers.
* :class:`Observer` is the one object every edge receives.  It owns counters
  (monotonic integers with fixed dotted names, e.g. ``dhcp.rx``,
  ``dhcp.malformed``, ``tftp.transfers.done``) and a bounded history of recently
  seen machines with their boot timeline.  Everything here is bounded.

Event names are fixed strings; context is bound with keyword fields
(``mac``, ``xid``, ``peer``, ``file``).
"""

from __future__ import annotations

import collections
import logging
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TextIO, cast

import structlog

from sidusd.boot.claims import Claims

CLAIM_REFUSED = "dhcp.claim_refused"   # timeline event: a PXE claim our lease table contradicts
MAX_CLIENTS = 1024          # machines remembered by `sidusctl clients`
MAX_TIMELINE = 64           # events remembered per machine
LOG_BURST = 20              # lines of one event written at once ...
LOG_PER_S = 1.0             # ... then this many per second (LogLimiter)
LOG_FLUSH_S = 10.0          # a suppressed count is reported at the latest this long after the flood
MAX_LOG_KEYS = 512          # (event, key) buckets; beyond, a new key shares its event's bucket


class _Stderr:
    """``sys.stderr`` as it is when a line is written, not when logging was set up (a stream
    swapped or closed since, e.g. by a test's capture, must not break every later line)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def setup_logging(fmt: str = "auto", level: str = "info") -> None:
    """Configure structlog once for the process.

    ``fmt`` is ``auto`` (console on a tty, JSON otherwise), ``json`` or ``console``.
    """
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: Any = (structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
                     if fmt == "console" else structlog.processors.JSONRenderer())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=cast(TextIO, _Stderr())),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str = "sidusd", **ctx: Any) -> Any:
    """A structlog logger with ``component=name`` and ``ctx`` bound."""
    # lazy proxy: loggers made before setup_logging() still follow it
    return structlog.get_logger(name, component=name, **ctx)


class RepeatBackoff:
    """The one rate limiter of log lines: the first of a repeating event at once, then rarely.

    A background check that fails every few seconds (tgtd down) must not fill
    the journal with one identical error per check, nor may a flood of
    malformed DHCP datagrams or refused worker messages.  :meth:`failed`
    returns True for the first event, for an event whose ``text`` changed,
    and then when ``first_s``, 2x, 4x ... up to ``max_s`` have passed since
    the last logged one; :meth:`take_suppressed` says how many were not
    logged in between.  ``RepeatBackoff(first_s=10, max_s=10)`` with a
    constant ``text`` ("") is a fixed "at most one line per 10 s" limit.
    :meth:`recovered` returns how many failures the streak had (0: there was
    none) and resets.  Pure: the caller passes the time.
    """

    def __init__(self, first_s: float = 30.0, max_s: float = 600.0):
        self.first_s, self.max_s = first_s, max_s
        self.streak = 0           # failures since the last success
        self.suppressed = 0       # failures not logged since the last logged one
        self._text: str | None = None
        self._next_at = 0.0
        self._interval = first_s

    def failed(self, text: str, now: float) -> bool:
        self.streak += 1
        if self.streak == 1 or text != self._text or now >= self._next_at:
            if self.streak > 1 and text == self._text:
                self._interval = min(self._interval * 2, self.max_s)
            else:
                self._interval = self.first_s
            self._text, self._next_at = text, now + self._interval
            return True
        self.suppressed += 1
        return False

    def take_suppressed(self) -> int:
        """Events not logged since the last logged one (then 0 again)."""
        n, self.suppressed = self.suppressed, 0
        return n

    def recovered(self) -> int:
        n = self.streak
        self.streak, self.suppressed, self._text = 0, 0, None
        self._interval = self.first_s
        return n


class LogLimiter:
    """The one rate limit of per-packet / per-connection log lines, counting what it suppresses.

    ``rlog = LogLimiter(log)`` wraps a structlog logger; ``rlog.info("http.refused", peer=...)``
    (likewise ``debug``, ``warning``, ``error``, ``exception``) writes the line while its
    event has budget: a token bucket per event name (per ``(event, key)`` when ``key=``
    is given) of ``burst`` lines, refilled at ``per_s`` lines per second.  Beyond it
    the line is counted, not written, and the next line written for that bucket
    carries ``suppressed=N``.  When the flood stops and the event never comes back,
    the count is reported as ``log.suppressed`` (``of=<event>``, ``suppressed=N``)
    by the next call of any event, at most ``flush_s`` later.  A boot storm (every
    machine's transfer summaries) fits in the burst; 500 000 refused connections
    write ``burst + per_s * seconds`` lines.  Bounded: at most ``max_keys`` keyed
    buckets; a key beyond them shares its event's bucket (spoofed sources cannot
    buy themselves a budget each).  Key by source only where it cannot be
    spoofed (a TCP peer: ``http.transfer`` is keyed by client IP, so every
    machine of a boot storm gets its lines).  Returns whether the line was written.
    """

    def __init__(self, log: Any, burst: float = LOG_BURST, per_s: float = LOG_PER_S,
                 clock: Any = time.monotonic, flush_s: float = LOG_FLUSH_S, max_keys: int = MAX_LOG_KEYS):
        self.log, self.burst, self.per_s, self.clock = log, float(burst), float(per_s), clock
        self.flush_s, self.max_keys = flush_s, max_keys
        self._buckets: dict[tuple[str, str | None], list[float]] = {}   # key -> [tokens, at, suppressed]
        self._next_flush = 0.0

    def debug(self, event: str, /, key: str | None = None, **fields: Any) -> bool:
        return self._line("debug", event, key, fields)

    def info(self, event: str, /, key: str | None = None, **fields: Any) -> bool:
        return self._line("info", event, key, fields)

    def warning(self, event: str, /, key: str | None = None, **fields: Any) -> bool:
        return self._line("warning", event, key, fields)

    def error(self, event: str, /, key: str | None = None, **fields: Any) -> bool:
        return self._line("error", event, key, fields)

    def exception(self, event: str, /, key: str | None = None, **fields: Any) -> bool:
        return self._line("exception", event, key, fields)

    def suppressed(self) -> int:
        """Lines counted and not (yet) reported, over all events."""
        return sum(int(b[2]) for b in self._buckets.values())

    def _take(self, b: list[float], now: float) -> bool:
        b[0] = min(self.burst, b[0] + (now - b[1]) * self.per_s)
        b[1] = now
        if b[0] >= 1.0:
            b[0] -= 1.0
            return True
        return False

    def _line(self, level: str, event: str, key: str | None, fields: dict[str, Any]) -> bool:
        now = self.clock()
        if now >= self._next_flush:
            self._flush(now)
        k = (event, key)
        b = self._buckets.get(k)
        if b is None:
            if key is not None and len(self._buckets) >= self.max_keys:
                return self._line(level, event, None, fields)
            b = self._buckets[k] = [self.burst, now, 0]
        if not self._take(b, now):
            b[2] += 1
            return False
        if b[2]:
            fields["suppressed"], b[2] = int(b[2]), 0
        getattr(self.log, level)(event, **fields)
        return True

    def _flush(self, now: float) -> None:
        """Report the counts of floods that stopped; forget idle buckets that are full again."""
        self._next_flush = now + self.flush_s
        for k, b in list(self._buckets.items()):
            if b[2] and self._take(b, now):
                n, b[2] = int(b[2]), 0
                self.log.warning("log.suppressed", of=k[0], key=k[1], suppressed=n)
            elif not b[2] and min(self.burst, b[0] + (now - b[1]) * self.per_s) >= self.burst:
                del self._buckets[k]


@dataclass
class ClientRecord:
    """What sidusd knows about one recently seen machine."""

    mac: str
    ip: str | None = None
    arch: str | None = None
    first_seen: float = 0.0
    last_seen: float = 0.0
    timeline: collections.deque = field(
        default_factory=lambda: collections.deque(maxlen=MAX_TIMELINE))
    claims: Claims = field(default_factory=Claims)      # the addresses this MAC was claimed from
    # full DHCP mode: addresses that stated this MAC against our lease table (boot.claims.pxe_claim)
    attempts: Claims = field(default_factory=Claims)

    def as_dict(self) -> dict[str, Any]:
        return {"mac": self.mac, "ip": self.ip, "arch": self.arch,
                "first_seen": self.first_seen, "last_seen": self.last_seen,
                "timeline": list(self.timeline),
                # as of the last time it was seen (boot.claims: a conflict withholds disk secrets)
                "claimed_from": list(self.claims.recent(self.last_seen)),
                "conflict": self.claims.conflict(self.last_seen),
                "claim_attempts": list(self.attempts.recent(self.last_seen))}


class Observer:
    """Counters + bounded client history + logger.  Not thread-safe (one loop)."""

    def __init__(self, clock=time.time, max_clients: int = MAX_CLIENTS):
        self._clock = clock
        self._max_clients = max_clients
        self.counters: collections.Counter[str] = collections.Counter()
        self.clients: collections.OrderedDict[str, ClientRecord] = collections.OrderedDict()
        # ip -> mac of the last DHCP exchange seen for that ip (bounded with clients)
        self._ip_to_mac: dict[str, str] = {}
        # the MACs the inventory lists (set_known, at start / reload / snapshot): never evicted by
        # others; the records of the other MACs, least recently seen first (at most max_clients)
        self._known: frozenset[str] = frozenset()
        self._unknown: collections.OrderedDict[str, None] = collections.OrderedDict()
        # called after each client change: (mac, "seen", {ip, arch, t}) or (mac, "tl", entry);
        # the history journal and the boot metrics listen here (none in the worker)
        self.listeners: list[Callable[[str, str, dict[str, Any]], None]] = []
        self.log = get_logger("sidusd")

    # -- counters --------------------------------------------------------
    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to counter ``name`` (dotted, fixed names)."""
        self.counters[name] += n

    # -- clients ---------------------------------------------------------
    def set_known(self, macs: Iterable[str]) -> None:
        """The MACs the inventory lists (the runtime calls this with each new snapshot).

        Their records are never evicted by other MACs (a flood of made-up MACs must not
        erase a host's claims: boot.claims); they are bounded by the inventory's size, the
        others by ``max_clients`` (least recently seen evicted, as in boot.booted)."""
        self._known = frozenset(macs)
        self._unknown = collections.OrderedDict((m, None) for m in self.clients if m not in self._known)
        self._evict()

    def _evict(self) -> None:
        while len(self._unknown) > self._max_clients:
            old_mac, _ = self._unknown.popitem(last=False)
            old = self.clients.pop(old_mac)
            if old.ip and self._ip_to_mac.get(old.ip) == old_mac:
                del self._ip_to_mac[old.ip]

    def client(self, mac: str) -> ClientRecord:
        """The record for ``mac`` (lower-case, colon separated), created if new."""
        now = self._clock()
        rec = self.clients.get(mac)
        if rec is None:
            rec = ClientRecord(mac=mac, first_seen=now, last_seen=now)
            self.clients[mac] = rec
            if mac not in self._known:
                self._unknown[mac] = None
                self._evict()
        else:
            self.clients.move_to_end(mac)
            if mac in self._unknown:
                self._unknown.move_to_end(mac)
        rec.last_seen = now
        return rec

    def claim_attempt(self, mac: str, ip: str) -> None:
        """``ip`` stated ``mac`` against our lease table (full DHCP mode): shown, not a claim."""
        self.count("dhcp.claims_refused")
        self.timeline(mac, CLAIM_REFUSED, ip=ip)      # through the timeline: forwarded by privsep

    def clear_claims(self, mac: str) -> bool:
        """Forget the addresses ``mac`` was claimed from (``sidusctl hosts clear-conflict``)."""
        rec = self.clients.get(mac)
        if rec is None:
            return False
        rec.claims, rec.attempts = Claims(), Claims()
        return True

    def client_seen(self, mac: str, ip: str | None = None, arch: str | None = None) -> ClientRecord:
        """Note that ``mac`` spoke to us (from ``ip``, with firmware ``arch``)."""
        rec = self.client(mac)
        before = (rec.ip, rec.arch) if rec.timeline or rec.ip or rec.arch else None
        if ip and ip != "0.0.0.0":
            if rec.ip and self._ip_to_mac.get(rec.ip) == mac:
                del self._ip_to_mac[rec.ip]
            rec.ip = ip
            self._ip_to_mac[ip] = mac
            rec.claims.note(ip, rec.last_seen)
        if arch:
            rec.arch = arch
        if self.listeners and before != (rec.ip, rec.arch):     # new, or its address / firmware changed
            self._notify(mac, "seen", {"ip": rec.ip, "arch": rec.arch, "t": round(rec.last_seen, 3)})
        return rec

    def claimed_from(self, mac: str) -> tuple[str, ...]:
        """The addresses ``mac`` was claimed from recently, newest first (``boot.claims``)."""
        rec = self.clients.get(mac)
        return rec.claims.recent(self._clock()) if rec is not None else ()

    def mac_for_ip(self, ip: str) -> str | None:
        """The MAC whose last known address is ``ip`` (for TFTP/HTTP timelines)."""
        return self._ip_to_mac.get(ip)

    def timeline(self, mac: str | None, event: str, **fields: Any) -> None:
        """Append ``event`` to the boot timeline of ``mac`` (ignored if None)."""
        if not mac:
            return
        self.record(mac, round(self._clock(), 3), event, fields)

    def record(self, mac: str, t: float, event: str, fields: dict[str, Any]) -> dict[str, Any]:
        """Append the entry ``{"t", "event", **fields}`` (time given) to ``mac``'s timeline."""
        rec = self.client(mac)
        entry = {"t": t, "event": event, **fields}
        rec.timeline.append(entry)
        if event == CLAIM_REFUSED and isinstance(fields.get("ip"), str):
            rec.attempts.note(fields["ip"], t)
        if self.listeners:
            self._notify(mac, "tl", entry)
        return entry

    def _notify(self, mac: str, kind: str, data: dict[str, Any]) -> None:
        for fn in list(self.listeners):
            try:
                fn(mac, kind, data)
            except Exception as exc:  # a listener's bug must not stop the packet path
                self.counters["observer.listener_errors"] += 1
                self.log.error("observer.listener_failed", error=repr(exc))

    def restore(self, records: list[ClientRecord]) -> None:
        """Put ``records`` (oldest first, e.g. read back from the history journal) behind the
        machines seen since the start; a machine in both keeps the older entries first."""
        merged: collections.OrderedDict[str, ClientRecord] = collections.OrderedDict()
        for r in records:
            merged[r.mac] = r
            merged.move_to_end(r.mac)
        for mac, rec in self.clients.items():
            old = merged.pop(mac, None)
            if old is not None:
                entries = list(old.timeline) + list(rec.timeline)
                rec.timeline = collections.deque(entries, maxlen=MAX_TIMELINE)
                rec.first_seen = min(rec.first_seen, old.first_seen)
                rec.ip, rec.arch = rec.ip or old.ip, rec.arch or old.arch
            merged[mac] = rec
        self.clients = merged
        self.set_known(self._known)
        self._ip_to_mac = {}
        for mac, rec in merged.items():
            if rec.ip:
                self._ip_to_mac[rec.ip] = mac

    def snapshot(self) -> dict[str, Any]:
        """Counters as a plain dict (for `sidusctl status`)."""
        return dict(sorted(self.counters.items()))
