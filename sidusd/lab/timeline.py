"""A boot's timeline, from what the boot leaves behind: pure (no I/O, no clock).

:class:`BootTimeline` is fed sidusd's JSON log events, the guest's serial
console text so far, and the time now (the caller's clock); it returns the boot
steps reached since the last feed, each with its time since the VM started
(sidusd's own event timestamps when there are some, else ``now``).  Reading
the files and the clock is :mod:`sidusd.lab.follow`'s job.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

MARKER_RE = re.compile(r"SIDUS-BOOT: (.*?)\s*$", re.M)


def parse_events(data: bytes) -> tuple[list[dict[str, Any]], int]:
    """sidusd's JSON log events in ``data`` (complete lines only) and how many bytes they took.

    A last line without its newline is still being written: it is left for the
    next read (the count stops before it).  Lines that are not a JSON object (a
    traceback) are skipped.
    """
    end = data.rfind(b"\n") + 1
    events = []
    for line in data[:end].splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue                     # a traceback or a non-JSON line
        if isinstance(ev, dict):
            events.append(ev)
    return events, end


def boot_markers(console: str) -> list[str]:
    """The ``SIDUS-BOOT: ...`` lines the demo image's init printed, in order, without the prefix."""
    return MARKER_RE.findall(console.replace("\r", ""))


KERNEL_BANNER_RE = re.compile(r"Linux version \d", re.M)
READY_RE = re.compile(r"SIDUS-BOOT: READY", re.M)


def next_boot_ready(console: str, after: int) -> re.Match | None:
    """The ``READY`` marker of the next boot that begins after offset ``after``, or None yet.

    A boot that reboots (``sidus.demo=reboot-after-write``) prints its own READY
    after its other markers: the next boot's READY is the first one after the
    next kernel banner, never just the first one after ``after``.
    """
    banner = KERNEL_BANNER_RE.search(console, after)
    return READY_RE.search(console, banner.end()) if banner else None


def _event_time(ev: dict[str, Any]) -> float | None:
    ts = ev.get("timestamp")
    if not isinstance(ts, str):
        return None
    try:
        return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _event_mac(ev: dict[str, Any]) -> str | None:
    mac = ev.get("mac") or ev.get("client_mac")
    return mac.lower().replace("-", ":") if isinstance(mac, str) else None


def _dhcp_reply(ev: dict[str, Any]) -> tuple[str, str | None, str | None] | None:
    """``(kind, ip, boot file)`` of sidusd's ``dhcp.reply`` event for an offer/ack, else None."""
    if ev.get("event") != "dhcp.reply" or ev.get("kind") not in ("offer", "ack"):
        return None
    ip = ev.get("ip")
    return ev["kind"], (ip if ip and ip != "0.0.0.0" else None), ev.get("file")


def _http_file(ev: dict[str, Any]) -> str | None:
    """The file of a complete HTTP response (``http.transfer``, 200/206, outcome ok), else None."""
    if ev.get("event") != "http.transfer" or ev.get("status") not in (200, 206):
        return None
    if ev.get("outcome") != "ok" or ev.get("method") == "HEAD":
        return None
    name = ev.get("file")
    return name.lstrip("/") if isinstance(name, str) else None


def _tftp_file(ev: dict[str, Any]) -> str | None:
    """The file of a *successful* TFTP transfer summary event, else None."""
    if ev.get("event") != "tftp.transfer" or ev.get("error"):
        return None
    if ev.get("outcome", "ok") not in ("ok", "done"):   # e.g. a size probe the client abandoned
        return None
    name = ev.get("file") or ev.get("filename")
    return name.lstrip("/") if isinstance(name, str) else None


@dataclass
class Step:
    """One boot step reached: ``key``, printable ``label``, seconds since the VM started."""

    key: str
    label: str
    t_s: float


class BootTimeline:
    """The steps one VM's boot has reached, from sidusd's events and the guest console.

    Steps, in boot order: ``dhcp`` (sidusd's offer), ``address`` (the site
    DHCP server's lease, proxy mode only: ``site_dhcp``), ``pxelinux.0``,
    ``ldlinux.c32``, ``config`` (pxelinux.cfg/01-<mac>), ``kernel``, ``initrd``
    (TFTP transfer summaries), ``linux`` (the kernel prints its banner),
    ``root`` (NFS root mounted), ``overlay`` (``/`` writable), ``ready``.

    ``path``: ``bios`` (above), ``uefi`` (``syslinux.efi`` and ``ldlinux.e64``
    instead of ``pxelinux.0`` and ``ldlinux.c32``), or ``ipxe-http`` (no TFTP:
    the per-MAC iPXE script, the kernel and the initrd over HTTP).
    ``t0``: when the VM started (seconds, the clock of ``now`` and of sidusd's timestamps).
    """

    def __init__(self, mac: str, t0: float, kernel: str = "demo/vmlinuz", initrd: str = "demo/initrd.img",
                 site_dhcp: bool = False, path: str = "bios"):
        self.mac = mac.lower()
        self.t0 = t0
        cfg = "pxelinux.cfg/01-" + self.mac.replace(":", "-")
        self.files = {"pxelinux.0": "pxelinux.0", "ldlinux.c32": "ldlinux.c32", cfg: "config",
                      kernel: "kernel", initrd: "initrd"}
        self.labels = {"dhcp": "DHCP offer from sidusd", "address": "address from the site DHCP server",
                       "pxelinux.0": "TFTP pxelinux.0",
                       "ldlinux.c32": "TFTP ldlinux.c32", "config": f"TFTP {cfg} (rendered for this MAC)",
                       "kernel": f"TFTP kernel {kernel}", "initrd": f"TFTP initrd {initrd}",
                       "linux": "Linux kernel started", "root": "root mounted",
                       "overlay": "overlay: / is writable (tmpfs)", "ready": "READY"}
        self.http_files: dict[str, str] = {}
        if path == "uefi":
            swap = {"pxelinux.0": "syslinux.efi", "ldlinux.c32": "ldlinux.e64"}
            self.files = {swap.get(f, f): swap.get(k, k) for f, k in self.files.items()}
            self.labels = {swap.get(k, k): f"TFTP {swap[k]}" if k in swap else v
                           for k, v in self.labels.items()}
        elif path == "ipxe-http":
            script = "boot/" + self.mac.replace(":", "-") + ".ipxe"
            self.files = {}
            self.http_files = {script: "config", kernel: "kernel", initrd: "initrd"}
            self.labels = {k: v for k, v in self.labels.items() if k not in ("pxelinux.0", "ldlinux.c32")}
            self.labels.update(config=f"HTTP {script} (rendered for this MAC)",
                               kernel=f"HTTP kernel {kernel}", initrd=f"HTTP initrd {initrd}")
        elif path != "bios":
            raise ValueError(f"path must be bios, uefi or ipxe-http, not {path!r}")
        self.order = [k for k in self.labels if k != "address" or site_dhcp]
        self.reached: dict[str, Step] = {}

    def _reach(self, key: str, t: float | None, now: float, new: list[Step], label: str | None = None) -> None:
        if key not in self.reached:
            step = Step(key, label or self.labels[key], round(max(0.0, (t or now) - self.t0), 1))
            self.reached[key] = step
            new.append(step)

    def feed(self, events: list[dict[str, Any]], console: str, now: float,
             site_ip: str | None = None) -> list[Step]:
        """The steps reached since the last feed (in the order seen).

        ``events``: sidusd's log events new since the last feed; ``console``: the
        whole console text so far; ``site_ip``: the address the site DHCP server
        leased to this MAC, if it did; ``now``: the time of this reading.
        """
        new: list[Step] = []
        for ev in events:
            mac = _event_mac(ev)
            if mac not in (None, self.mac):
                continue
            reply = _dhcp_reply(ev) if mac == self.mac else None
            if reply:
                kind, ip, boot_file = reply
                what = (f"DHCP {kind} from sidusd: address {ip}" if ip
                        else f"proxyDHCP {kind} from sidusd (no address: the site DHCP gives it)")
                self._reach("dhcp", _event_time(ev), now, new,
                            what + (f", boot file {boot_file}" if boot_file else ""))
            key = self.files.get(_tftp_file(ev) or "") or self.http_files.get(_http_file(ev) or "")
            if key:
                self._reach(key, _event_time(ev), now, new)
        if site_ip and "address" in self.order:
            self._reach("address", None, now, new, f"address {site_ip} from the site DHCP server (dnsmasq)")
        if "Linux version" in console:
            self._reach("linux", None, now, new)
        for marker in boot_markers(console):
            if marker.startswith("root mounted"):
                # "root mounted: <dev> / <fstype> <options>" (the / line of /proc/mounts)
                fields = marker.partition(":")[2].split()
                fstype = f" ({fields[0]} {fields[2]})" if len(fields) >= 3 else ""
                self._reach("root", None, now, new, self.labels["root"] + fstype)
            elif marker == "writable: yes":
                self._reach("overlay", None, now, new)
            elif marker == "READY":
                self._reach("ready", None, now, new)
        return new

    def first_missing(self) -> str | None:
        """Label of the first step (in boot order) not reached, or None if all were."""
        for key in self.order:
            if key not in self.reached:
                return self.labels[key]
        return None
