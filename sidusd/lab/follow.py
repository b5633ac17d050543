"""Following a boot as it happens: the file reading and the clock around :class:`BootTimeline`.

:class:`BootFollower` reads what is new in sidusd's JSON log (from a byte
offset on, a line still being written left for the next read), the guest's
serial console log and the site DHCP server's leases, and feeds them with the
time now to the pure :class:`~sidusd.lab.timeline.BootTimeline`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .timeline import BootTimeline, Step, parse_events


def read_events(path: Path, offset: int = 0) -> list[dict[str, Any]]:
    """sidusd's JSON log events from byte ``offset`` on (complete lines; others skipped)."""
    return read_new_events(path, offset)[0]


def read_new_events(path: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    """The complete events from byte ``offset`` on, and the offset to read from next time."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    events, used = parse_events(data)
    return events, offset + used


class BootFollower:
    """Follows one VM's boot in sidusd's log and the guest console; yields the steps reached.

    The steps and the ``path`` argument are :class:`BootTimeline`'s;
    ``site_leases`` (proxy mode) returns the site DHCP server's leases
    ``{mac: ip}``; ``clock`` gives the time now (:func:`time.time`, the clock of
    sidusd's timestamps); ``t0`` is when the VM started (default: now).
    """

    def __init__(self, mac: str, sidusd_log: Path, console_log: Path, log_offset: int = 0,
                 kernel: str = "demo/vmlinuz", initrd: str = "demo/initrd.img",
                 site_leases: Callable[[], dict[str, str]] | None = None, path: str = "bios",
                 clock: Callable[[], float] = time.time):
        self.sidusd_log, self.console_log = sidusd_log, console_log
        self._offset = log_offset
        self.site_leases = site_leases
        self._clock = clock
        self.timeline = BootTimeline(mac, clock(), kernel=kernel, initrd=initrd,
                                     site_dhcp=site_leases is not None, path=path)

    @property
    def t0(self) -> float:
        return self.timeline.t0

    @t0.setter
    def t0(self, value: float) -> None:
        self.timeline.t0 = value

    @property
    def order(self) -> list[str]:
        return self.timeline.order

    @property
    def reached(self) -> dict[str, Step]:
        return self.timeline.reached

    def poll(self) -> list[Step]:
        """Read what is new; the steps reached since the last call (in the order seen)."""
        events, self._offset = read_new_events(self.sidusd_log, self._offset)
        site_ip = None
        if self.site_leases is not None and "address" not in self.timeline.reached:
            site_ip = self.site_leases().get(self.timeline.mac)
        try:
            console = self.console_log.read_bytes().decode("utf-8", "replace")
        except FileNotFoundError:
            console = ""
        return self.timeline.feed(events, console, self._clock(), site_ip)

    def first_missing(self) -> str | None:
        """Label of the first step (in boot order) not reached, or None if all were."""
        return self.timeline.first_missing()
