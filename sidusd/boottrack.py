"""Boots, cut out of a machine's timeline: when one starts and which stages it reached (pure).

A machine's timeline (:class:`sidusd.observability.Observer`) is a list of
entries ``{"t", "event", ...}``.  :func:`step` reads one entry against the
boot in progress and says which boot that is now and which stages it just
reached, each with its time since the boot began.  No clock is read: the
entries carry their times.  Used by the metrics (stage histograms,
:mod:`sidusd.metrics`) and by the up-reports (:mod:`sidusd.net.http_up`:
"up after N s").

* A boot **starts** with a DHCP reply that names a boot file (``dhcp.offer`` /
  ``dhcp.ack`` with ``file``), unless a boot is already in progress that has
  not yet fetched its kernel: a PXE ROM's offer, its ACK and iPXE's own DHCP
  after a chainload are one boot.  A reply naming the boot's first boot file
  again after the first file was fetched (the ROM starting over), or one that
  comes ``BOOT_IDLE_S`` after the boot's last entry, starts a new boot.
* Stages (:data:`STAGES`): ``first_file`` (the first file sent in full over
  TFTP or HTTP), ``kernel`` and ``initrd`` (the files of the machine's boot
  target, given by the caller as ``files``), ``root`` and ``up`` (the
  machine's own reports: ``up`` entries with ``stage`` ``root`` /
  ``multiuser``).  Each stage counts once per boot.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

STAGES = ("first_file", "kernel", "initrd", "root", "up")
REPORT_STAGES = {"root": "root", "multiuser": "up"}     # the stage= of an up-report -> our stage
BOOT_IDLE_S = 900.0          # a boot without any entry for this long is over


@dataclass
class Boot:
    """One boot of one machine: when it started, from which boot file, what it reached (times)."""

    start: float
    boot_file: str | None
    last: float
    reached: dict[str, float] = field(default_factory=dict)

    def seconds(self, stage: str) -> float | None:
        """Seconds from the start to ``stage``, or None if not reached."""
        t = self.reached.get(stage)
        return None if t is None else round(t - self.start, 3)


def _transfer_file(e: Mapping[str, Any]) -> str | None:
    """The file of a transfer entry that sent a whole file, else None."""
    ev = e.get("event")
    if ev == "tftp" and e.get("outcome") in ("ok", "done"):
        name = e.get("file")
    elif ev == "http" and e.get("outcome") == "ok" and e.get("status") in (200, 206):
        name = e.get("file")
    else:
        return None
    return name.lstrip("/") if isinstance(name, str) else None


def starts_boot(boot: Boot | None, e: Mapping[str, Any]) -> bool:
    """Whether entry ``e`` begins a new boot after ``boot`` (the module docstring's rule)."""
    if e.get("event") not in ("dhcp.offer", "dhcp.ack") or not e.get("file"):
        return False
    t = float(e.get("t") or 0.0)
    if boot is None or "kernel" in boot.reached or "up" in boot.reached:
        return True
    if t - boot.last >= BOOT_IDLE_S:
        return True
    return "first_file" in boot.reached and e.get("file") == boot.boot_file


def step(boot: Boot | None, e: Mapping[str, Any],
         files: tuple[str, str] | None = None) -> tuple[Boot | None, list[tuple[str, float]]]:
    """The boot after entry ``e`` and the stages it reached with it: ``[(stage, seconds)]``.

    ``files``: the (kernel, initrd) names of the machine's boot target, relative
    to the TFTP root as requested, or None when unknown.
    """
    try:
        t = float(e.get("t") or 0.0)
    except (TypeError, ValueError):
        return boot, []
    if starts_boot(boot, e):
        return Boot(start=t, boot_file=str(e.get("file")), last=t), []
    if boot is None:
        return None, []
    boot.last = max(boot.last, t)
    if t - boot.start >= BOOT_IDLE_S * 4:    # far too late to belong to this boot
        return boot, []
    new: list[str] = []
    name = _transfer_file(e)
    if name is not None:
        new.append("first_file")
        if files is not None:
            if name == files[0].lstrip("/"):
                new.append("kernel")
            elif name == files[1].lstrip("/"):
                new.append("initrd")
    elif e.get("event") == "up":
        stage = REPORT_STAGES.get(str(e.get("stage")))
        if stage is not None:
            new.append(stage)
    out = []
    for stage in new:
        if stage not in boot.reached:
            boot.reached[stage] = t
            out.append((stage, max(0.0, round(t - boot.start, 3))))
    return boot, out


def current_boot(timeline: list[Mapping[str, Any]] | Any, files: tuple[str, str] | None = None) -> Boot | None:
    """The last boot of a timeline (its entries in order), replayed with :func:`step`."""
    boot: Boot | None = None
    for e in timeline:
        boot, _ = step(boot, e, files)
    return boot


def summary(boot: Boot | None, now: float) -> dict[str, Any]:
    """What a live view shows of a machine's boot (``sidusctl watch``, the web page: issue 17):
    ``state`` (``never``: no boot seen, ``booting``, ``up``, ``stale``: no entry for ``BOOT_IDLE_S``
    before reaching ``up``), the last ``stage`` reached (``dhcp`` before the first file), when the
    boot ``started`` and ``stages``: seconds from the start to each stage reached."""
    if boot is None:
        return {"state": "never", "stage": None, "started": None, "stages": {}}
    reached = [s for s in STAGES if s in boot.reached]
    if "up" in boot.reached:
        state = "up"
    elif now - boot.last >= BOOT_IDLE_S:
        state = "stale"
    else:
        state = "booting"
    return {"state": state, "stage": reached[-1] if reached else "dhcp", "started": boot.start,
            "stages": {s: boot.seconds(s) for s in reached}}
