"""Up-reports: a booted machine tells sidusd it reached its root and multi-user (``/up`` of the HTTP server).

``POST /up?stage=root|multiuser[&mac=aa:bb:...]`` (GET works too, for the
smallest shells), sent by the sidus initramfs hook (``stage=root``, from
``init-bottom``) and by the image once it is up (``stage=multiuser``; the
demo image's init).  The report adds an ``up`` entry to the machine's boot
timeline, ``{"event": "up", "stage", "after_s"}`` (seconds since the boot's
DHCP reply, :mod:`sidusd.boottrack`), which ends ``sidusctl clients`` with
"up after N s" and gives the boot-stage histograms their end points.

Unauthenticated, so hostile and bounded (docs/security.md "Up-reports"):

* the machine is the one whose DHCP exchange came from the request's source
  address (``mac_for_ip``, as for the per-MAC secret guard); a ``mac=`` that
  names another machine is refused (``not_yours``).  Without L2/L3 spoofing a
  client can only report for itself; with it, it could as well have booted as
  that machine.  A report changes nothing but the timeline and the metrics;
* only a machine with a boot in progress (a DHCP reply with a boot file in its
  timeline, not too long ago) is accepted, each stage once per boot (a repeat
  is answered 200 and changes nothing);
* every request costs a token of one bucket (``RATE_PER_S``, ``BURST``):
  over it 429, before anything else is looked at; refusals are counted
  (``http.up.refused.<reason>``) and logged at most once per ``LOG_EVERY_S``.

Counters: ``http.up.accepted``, ``http.up.repeated``, ``http.up.refused.<rate|method|
stage|mac|unknown|not_yours|not_booting>``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from ..boottrack import REPORT_STAGES, current_boot
from ..observability import LogLimiter, RepeatBackoff

UP_PATH = "/up"
RATE_PER_S = 20.0
BURST = 100.0
LOG_EVERY_S = 10.0


def normalize_mac(text: str) -> str | None:
    """``aa:bb:cc:dd:ee:ff`` from that or ``aa-bb-...`` (any case), else None."""
    t = text.strip().lower().replace("-", ":")
    parts = t.split(":")
    if len(parts) != 6 or not all(len(p) == 2 and all(c in "0123456789abcdef" for c in p) for p in parts):
        return None
    return t


def target_files(runtime: Any, mac: str) -> tuple[str, str] | None:
    """(kernel, initrd) of ``mac``'s boot target, or None."""
    try:
        target = runtime.inventory.resolve(mac, runtime.config)
    except Exception:  # noqa: BLE001 (an inventory that cannot resolve: no stage names)
        return None
    return None if target is None else (target.kernel, target.initrd)


class UpReports:
    """The ``/up`` answers of one HTTP service (``runtime``: its :class:`~sidusd.runtime_view.RuntimeView`)."""

    def __init__(self, runtime: Any, log: Any, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic):
        self.runtime, self.log = runtime, log
        self.rlog = LogLimiter(log)          # one line per accepted report, keyed by peer: bounded
        self._clock, self._mono = clock, monotonic
        self._tokens, self._at = BURST, monotonic()
        self._backoff = RepeatBackoff(LOG_EVERY_S, LOG_EVERY_S)

    def _take(self) -> bool:
        now = self._mono()
        self._tokens = min(BURST, self._tokens + (now - self._at) * RATE_PER_S)
        self._at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def _refuse(self, status: int, reason: str, peer_ip: str) -> web.Response:
        self.runtime.observer.count(f"http.up.refused.{reason}")
        if self._backoff.failed("", self._mono()):
            self.log.info("http.up_refused", peer=peer_ip, reason=reason,
                          suppressed=self._backoff.take_suppressed())
        return web.Response(status=status, text=f"refused: {reason}\n")

    async def answer(self, request: web.BaseRequest, peer_ip: str) -> web.Response:
        """The response to one ``/up`` request (never raises for any input)."""
        if not self._take():
            return self._refuse(429, "rate", peer_ip)
        if request.method not in ("POST", "GET"):
            return self._refuse(405, "method", peer_ip)
        q = request.rel_url.query
        stage = q.get("stage", "")
        if stage not in REPORT_STAGES:
            return self._refuse(400, "stage", peer_ip)
        obs = self.runtime.observer
        mac = obs.mac_for_ip(peer_ip)
        if mac is None:
            return self._refuse(403, "unknown", peer_ip)
        if "mac" in q:
            claimed = normalize_mac(q["mac"][:64])
            if claimed is None:
                return self._refuse(400, "mac", peer_ip)
            if claimed != mac:
                return self._refuse(403, "not_yours", peer_ip)
        rec = getattr(obs, "clients", {}).get(mac)
        now = round(self._clock(), 3)
        boot = current_boot(list(rec.timeline), target_files(self.runtime, mac)) if rec is not None else None
        if boot is None or now - boot.last > 3600.0:
            return self._refuse(409, "not_booting", peer_ip)
        if REPORT_STAGES[stage] in boot.reached:
            obs.count("http.up.repeated")
            return web.Response(status=200, text=f"already reported: {stage}\n")
        after_s = round(max(0.0, now - boot.start), 1)
        obs.count("http.up.accepted")
        obs.timeline(mac, "up", stage=stage, after_s=after_s)
        self.rlog.info("http.up", key=peer_ip, mac=mac, peer=peer_ip, stage=stage, after_s=after_s)
        return web.Response(status=200, text=f"up after {after_s} s ({stage})\n")
