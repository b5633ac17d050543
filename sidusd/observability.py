"""Logging, counters and the per-client boot timeline.

* :func:`setup_logging` configures structlog: JSON lines when stderr is not a
  terminal (journald), readable console output when it is.
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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

MAX_CLIENTS = 1024          # machines remembered by `sidusctl clients`
MAX_TIMELINE = 64           # events remembered per machine


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
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
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

    def as_dict(self) -> dict[str, Any]:
        return {"mac": self.mac, "ip": self.ip, "arch": self.arch,
                "first_seen": self.first_seen, "last_seen": self.last_seen,
                "timeline": list(self.timeline)}


class Observer:
    """Counters + bounded client history + logger.  Not thread-safe (one loop)."""

    def __init__(self, clock=time.time, max_clients: int = MAX_CLIENTS):
        self._clock = clock
        self._max_clients = max_clients
        self.counters: collections.Counter[str] = collections.Counter()
        self.clients: collections.OrderedDict[str, ClientRecord] = collections.OrderedDict()
        # ip -> mac of the last DHCP exchange seen for that ip (bounded with clients)
        self._ip_to_mac: dict[str, str] = {}
        # called after each client change: (mac, "seen", {ip, arch, t}) or (mac, "tl", entry);
        # the history journal and the boot metrics listen here (none in the worker)
        self.listeners: list[Callable[[str, str, dict[str, Any]], None]] = []
        self.log = get_logger("sidusd")

    # -- counters --------------------------------------------------------
    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to counter ``name`` (dotted, fixed names)."""
        self.counters[name] += n

    # -- clients ---------------------------------------------------------
    def client(self, mac: str) -> ClientRecord:
        """The record for ``mac`` (lower-case, colon separated), created if new."""
        now = self._clock()
        rec = self.clients.get(mac)
        if rec is None:
            rec = ClientRecord(mac=mac, first_seen=now, last_seen=now)
            self.clients[mac] = rec
            while len(self.clients) > self._max_clients:
                old_mac, old = self.clients.popitem(last=False)
                if old.ip and self._ip_to_mac.get(old.ip) == old_mac:
                    del self._ip_to_mac[old.ip]
        else:
            self.clients.move_to_end(mac)
        rec.last_seen = now
        return rec

    def client_seen(self, mac: str, ip: str | None = None, arch: str | None = None) -> ClientRecord:
        """Note that ``mac`` spoke to us (from ``ip``, with firmware ``arch``)."""
        rec = self.client(mac)
        before = (rec.ip, rec.arch) if rec.timeline or rec.ip or rec.arch else None
        if ip and ip != "0.0.0.0":
            if rec.ip and self._ip_to_mac.get(rec.ip) == mac:
                del self._ip_to_mac[rec.ip]
            rec.ip = ip
            self._ip_to_mac[ip] = mac
        if arch:
            rec.arch = arch
        if self.listeners and before != (rec.ip, rec.arch):     # new, or its address / firmware changed
            self._notify(mac, "seen", {"ip": rec.ip, "arch": rec.arch, "t": round(rec.last_seen, 3)})
        return rec

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
        while len(merged) > self._max_clients:
            merged.popitem(last=False)
        self.clients = merged
        self._ip_to_mac = {}
        for mac, rec in merged.items():
            if rec.ip:
                self._ip_to_mac[rec.ip] = mac

    def snapshot(self) -> dict[str, Any]:
        """Counters as a plain dict (for `sidusctl status`)."""
        return dict(sorted(self.counters.items()))
