"""Prometheus metrics: sidusd's own counters, read at scrape time, plus the boot histograms.

Nothing is counted twice: :class:`SidusCollector` reads the observer's
counters (the dotted names of every edge; with privilege separation the
worker's deltas already reached the supervisor's observer in its periodic
``events`` reports, no per-packet IPC) when Prometheus scrapes, and maps them
to families named after the Prometheus conventions (``sidus_`` prefix,
``_total`` counters, base units, labels for kinds and reasons) by the table
:data:`FAMILIES`, :data:`COUNTERS` / :data:`PREFIXES`.  A counter name the table does not know
is still exported, as ``sidus_events_total{name="..."}`` (bounded:
``privsep.reports.MAX_COUNTER_NAMES``).  The known counters are exported from
the start, at 0 until they count, so a rate() over them has no gaps.

The histograms are observed once per boot stage and once per finished
transfer, by :class:`BootMetrics`, an observer listener fed the timeline
entries (never on the packet path): ``sidus_boot_stage_seconds{stage}`` (from
the boot's DHCP reply to ``first_file``, ``kernel``, ``initrd``, ``root``,
``up``; :mod:`sidusd.boottrack`), ``sidus_tftp_transfer_duration_seconds`` and
``sidus_http_transfer_duration_seconds`` (transfers attributed to a machine:
after its DHCP exchange or by a per-MAC name), ``sidus_boots_total``.
The HTTP endpoint is :mod:`sidusd.metrics_server`.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from . import __version__
from .boottrack import STAGES, Boot, current_boot, step

MAX_TRACKED = 4096           # machines whose boot in progress is followed (oldest forgotten)
STAGE_BUCKETS = (1, 2, 5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300, 600, 1200)
TRANSFER_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

# family (without sidus_ and _total) -> (help, label name or None): each said once
FAMILIES: dict[str, tuple[str, str | None]] = {
    "dhcp_received_datagrams": ("DHCP datagrams received", None),
    "dhcp_replies": ("DHCP replies sent, by kind", "kind"),
    "dhcp_dropped": ("DHCP requests dropped, by reason", "reason"),
    "dhcp_errors": ("DHCP socket and internal errors, by kind", "kind"),
    "tftp_transfers_started": ("TFTP transfers started", None),
    "tftp_transfers": ("TFTP transfers ended, by result", "result"),
    "tftp_sent_bytes": ("TFTP file bytes sent (acknowledged transfers)", None),
    "tftp_retransmits": ("TFTP DATA blocks sent again", None),
    "tftp_received_datagrams": ("TFTP datagrams received", None),
    "tftp_dropped": ("TFTP datagrams dropped, by reason", "reason"),
    "tftp_errors": ("TFTP socket and internal errors, by kind", "kind"),
    "http_requests": ("HTTP boot requests", None),
    "http_connections": ("HTTP boot connections accepted", None),
    "http_transfers": ("HTTP responses ended, by result", "result"),
    "http_sent_bytes": ("HTTP body bytes sent", None),
    "http_range_requests": ("HTTP responses to a byte range (206)", None),
    "http_dropped": ("HTTP requests dropped, by reason", "reason"),
    "http_errors": ("HTTP read and internal errors, by kind", "kind"),
    "up_reports": ("Up-reports of booted machines, by result", "result"),
    "worker_starts": ("Network worker processes started", None),
    "worker_restarts": ("Network worker restarts after it died", None),
    "worker_killed": ("Network workers killed for not stopping", None),
    "worker_events_dropped": ("Worker events dropped while the supervisor was slow", None),
    "reloads": ("Configuration reloads, by result", "result"),
    "render_errors": ("Boot configs that could not be rendered", None),
    "render_secret_refused": ("Per-MAC configs with a secret refused to another address", None),
    "control_requests": ("sidusctl requests", None),
    "tftp_refused": ("TFTP requests refused, by reason", "reason"),
    "http_refused": ("HTTP requests refused, by reason", "reason"),
    "http_timeouts": ("HTTP connections cut, by kind", "kind"),
    "worker_messages_refused": ("Worker messages refused by the supervisor, by code", "code"),
    "state_events": ("Events for the shared state, by result (queued, sent, dropped: queue full)", "result"),
    "state_snapshots": ("Shared-state snapshots, by result", "result"),
    "state_db_errors": ("Shared-state database connections lost or refused", None),
}
# dotted counter -> (family, its label's value or None)
COUNTERS: dict[str, tuple[str, str | None]] = {
    "dhcp.rx": ("dhcp_received_datagrams", None),
    "dhcp.offers": ("dhcp_replies", "offer"),
    "dhcp.acks": ("dhcp_replies", "ack"),
    "dhcp.naks": ("dhcp_replies", "nak"),
    "dhcp.malformed": ("dhcp_dropped", "malformed"),
    "dhcp.recv_errors": ("dhcp_errors", "recv"),
    "dhcp.send_errors": ("dhcp_errors", "send"),
    "dhcp.errors": ("dhcp_errors", "internal"),
    "dhcp.lease_write_errors": ("dhcp_errors", "lease_write"),
    "tftp.transfers.started": ("tftp_transfers_started", None),
    "tftp.transfers.done": ("tftp_transfers", "done"),
    "tftp.transfers.failed": ("tftp_transfers", "failed"),
    "tftp.transfers.probe": ("tftp_transfers", "probe"),
    "tftp.bytes": ("tftp_sent_bytes", None),
    "tftp.retransmits": ("tftp_retransmits", None),
    "tftp.rx": ("tftp_received_datagrams", None),
    "tftp.malformed": ("tftp_dropped", "malformed"),
    "tftp.wrong_tid": ("tftp_dropped", "wrong_tid"),
    "tftp.late": ("tftp_dropped", "late"),
    "tftp.duplicate_rrq": ("tftp_dropped", "duplicate_rrq"),
    "tftp.unexpected": ("tftp_dropped", "unexpected"),
    "tftp.send_errors": ("tftp_errors", "send"),
    "tftp.rx_errors": ("tftp_errors", "recv"),
    "tftp.internal_errors": ("tftp_errors", "internal"),
    "http.requests": ("http_requests", None),
    "http.connections": ("http_connections", None),
    "http.transfers.done": ("http_transfers", "done"),
    "http.transfers.failed": ("http_transfers", "failed"),
    "http.bytes": ("http_sent_bytes", None),
    "http.ranges": ("http_range_requests", None),
    "http.malformed": ("http_dropped", "malformed"),
    "http.read_errors": ("http_errors", "read"),
    "http.internal_errors": ("http_errors", "internal"),
    "http.up.accepted": ("up_reports", "accepted"),
    "http.up.repeated": ("up_reports", "repeated"),
    "privsep.worker_starts": ("worker_starts", None),
    "privsep.worker_restarts": ("worker_restarts", None),
    "privsep.worker_killed": ("worker_killed", None),
    "privsep.events_dropped": ("worker_events_dropped", None),
    "reload.ok": ("reloads", "ok"),
    "reload.refused": ("reloads", "refused"),
    "render.errors": ("render_errors", None),
    "render.secret_refused": ("render_secret_refused", None),
    "control.requests": ("control_requests", None),
    "state.events.queued": ("state_events", "queued"),
    "state.events.sent": ("state_events", "sent"),
    "state.events.dropped": ("state_events", "dropped"),
    "state.snapshots.applied": ("state_snapshots", "applied"),
    "state.snapshots.refused": ("state_snapshots", "refused"),
    "state.db_errors": ("state_db_errors", None),
}
# dotted prefix -> family: the rest of the name is the label's value
PREFIXES: dict[str, str] = {
    "dhcp.drop.": "dhcp_dropped",
    "tftp.refused.": "tftp_refused",
    "http.refused.": "http_refused",
    "http.timeouts.": "http_timeouts",
    "http.up.refused.": "up_reports",
    "privsep.refused.": "worker_messages_refused",
}


class SidusCollector:
    """Reads the daemon's state at scrape time (a prometheus_client custom collector)."""

    def __init__(self, runtime: Any, transfers: Callable[[], dict[str, int]]):
        self.runtime = runtime
        self.transfers = transfers

    def families(self, counters: dict[str, int]) -> list[Metric]:
        """The counter families of ``counters`` (dotted names; pure, for tests)."""
        fams: dict[str, CounterMetricFamily] = {}
        other = CounterMetricFamily("sidus_events", "Other sidusd counters, by dotted name", labels=["name"])
        # every known counter is exported from the start (0 until it counts), every family too
        for name, value in sorted({**dict.fromkeys(COUNTERS, 0), **counters}.items()):
            spec = COUNTERS.get(name)
            if spec is not None:
                fam_name, lvalue = spec
            else:
                pre = next((p for p in PREFIXES if name.startswith(p)), None)
                if pre is None:
                    other.add_metric([name], value)
                    continue
                fam_name, lvalue = PREFIXES[pre], name[len(pre):]
            label = FAMILIES[fam_name][1]
            fam = fams.get(fam_name)
            if fam is None:
                fam = fams[fam_name] = CounterMetricFamily("sidus_" + fam_name, FAMILIES[fam_name][0],
                                                           labels=[label] if label else None)
            fam.add_metric([str(lvalue)] if label else [], value)
        for fam_name in PREFIXES.values():
            if fam_name not in fams:
                help_, label = FAMILIES[fam_name]
                fams[fam_name] = CounterMetricFamily("sidus_" + fam_name, help_, labels=[label] if label else None)
        return [*fams.values(), other]

    def collect(self) -> Iterator[Metric]:
        rt = self.runtime
        yield from self.families(dict(rt.observer.counters))
        g = GaugeMetricFamily("sidus_transfers_in_flight", "Transfers being sent now, by service",
                              labels=["service"])
        for service, n in sorted(self.transfers().items()):
            g.add_metric([service], n)
        yield g
        up = GaugeMetricFamily("sidus_backend_up", "Storage backend healthy (1) or not (0)", labels=["backend"])
        try:
            rt.refresh_backend_status()
        except Exception:  # noqa: BLE001 (a status read failing is a backend down, below)
            pass
        for backend, st in sorted(getattr(rt, "backend_status", {}).items()):
            up.add_metric([backend], 1.0 if st.get("ok") else 0.0)
        yield up
        info = getattr(rt, "process_info", None)
        if info is not None:
            worker: dict[str, Any] = next((p for p in info() if p.get("role") == "worker"), {})
            yield GaugeMetricFamily("sidus_worker_up", "The network worker is running (1) or not (0)",
                                    value=1.0 if worker.get("state") == "running" else 0.0)
        yield GaugeMetricFamily("sidus_clients", "Machines in the client history (sidusctl clients)",
                                value=len(rt.observer.clients))
        yield GaugeMetricFamily("sidus_start_time_seconds", "When sidusd started (Unix time)",
                                value=float(getattr(rt, "started_at", 0.0)))
        yield GaugeMetricFamily("sidus_config_generation", "Configuration snapshot number (reloads, edits)",
                                value=float(getattr(rt, "generation", 0)))
        b = GaugeMetricFamily("sidus_build_info", "sidusd's version", labels=["version"])
        b.add_metric([__version__], 1.0)
        yield b


class BootMetrics:
    """The boot and transfer histograms, observed from timeline entries (an observer listener)."""

    def __init__(self, registry: CollectorRegistry, files: Callable[[str], tuple[str, str] | None]):
        self.files = files
        self.boots: collections.OrderedDict[str, Boot] = collections.OrderedDict()
        self.stage = Histogram("sidus_boot_stage_seconds", "Seconds from a boot's DHCP reply to each stage",
                               ["stage"], buckets=STAGE_BUCKETS, registry=registry)
        for s in STAGES:
            self.stage.labels(s)
        self.started = Counter("sidus_boots", "Boots begun (a DHCP reply with a boot file)", registry=registry)
        self.tftp = Histogram("sidus_tftp_transfer_duration_seconds", "Duration of finished TFTP transfers",
                              buckets=TRANSFER_BUCKETS, registry=registry)
        self.http = Histogram("sidus_http_transfer_duration_seconds", "Duration of finished HTTP responses",
                              buckets=TRANSFER_BUCKETS, registry=registry)

    def seed(self, clients: Any) -> None:
        """Boots in progress from timelines read back at start (nothing observed for them)."""
        for mac, rec in clients.items():
            boot = current_boot(list(rec.timeline), self.files(mac))
            if boot is not None:
                self._keep(mac, boot)

    def _keep(self, mac: str, boot: Boot) -> None:
        self.boots[mac] = boot
        self.boots.move_to_end(mac)
        while len(self.boots) > MAX_TRACKED:
            self.boots.popitem(last=False)

    def on_event(self, mac: str, kind: str, entry: dict[str, Any]) -> None:
        if kind != "tl":
            return
        ev = entry.get("event")
        d = entry.get("duration_s")
        if ev in ("tftp", "http") and isinstance(d, (int, float)) and d >= 0:
            (self.tftp if ev == "tftp" else self.http).observe(float(d))
        old = self.boots.get(mac)
        files = self.files(mac) if ev in ("tftp", "http") else None
        boot, reached = step(old, entry, files)
        if boot is None:
            return
        if boot is not old:
            self.started.inc()
            self._keep(mac, boot)
        for stage, seconds in reached:
            self.stage.labels(stage).observe(seconds)


def make_registry(runtime: Any, transfers: Callable[[], dict[str, int]],
                  files: Callable[[str], tuple[str, str] | None]) -> tuple[CollectorRegistry, BootMetrics]:
    """A registry with the collector and the boot histograms (the listener still to attach)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(SidusCollector(runtime, transfers))   # type: ignore[arg-type]
    return reg, BootMetrics(reg, files)
