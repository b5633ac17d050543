"""The Grafana dashboard (docs/grafana/sidus.json) parses, has the panels the operator needs, and
queries only metric names the endpoint exports (checked here on the collector's output after a
simulated boot, and in tests/integration/test_metrics_prometheus.py on the real daemon's)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import generate_latest

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana" / "sidus.json"
NAME = re.compile(r"\bsidus_[a-z0-9_]+")
MAC = "52:54:00:00:17:09"


def dashboard_metric_names(path: Path) -> set[str]:
    """The sidus_ metric names every panel's PromQL uses."""
    dash = json.loads(path.read_text())
    return {n for p in dash["panels"] for t in p["targets"] for n in NAME.findall(t["expr"])}


def exposed_names(text: str) -> set[str]:
    """Metric names of an exposition text: every sample name and every ``# TYPE`` line's name."""
    out = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            out.add(line.split()[2])
        elif line and not line.startswith("#"):
            out.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return out


class _Runtime:
    def __init__(self):
        from sidusd.observability import Observer
        self.observer = Observer(clock=lambda: 1000.0)
        self.backend_status = {"nfs": {"ok": True}}
        self.started_at, self.generation = 1.0, 1
        self.process_info = lambda: [{"role": "supervisor"}, {"role": "worker", "state": "running"}]

    def refresh_backend_status(self):
        pass


def simulated_output() -> str:
    from sidusd.metrics import make_registry
    rt = _Runtime()
    reg, boots = make_registry(rt, lambda: {"tftp": 0, "http": 0}, lambda mac: ("k/vmlinuz", "k/initrd"))
    rt.observer.listeners.append(boots.on_event)
    for t, ev, fields in ((0.0, "dhcp.offer", {"file": "pxelinux.0"}),
                          (1.0, "tftp", {"file": "pxelinux.0", "outcome": "ok", "duration_s": 0.1}),
                          (3.0, "tftp", {"file": "k/vmlinuz", "outcome": "ok", "duration_s": 1.5}),
                          (4.0, "http", {"file": "k/initrd", "outcome": "ok", "status": 200, "duration_s": 0.5}),
                          (9.0, "up", {"stage": "root"}), (20.0, "up", {"stage": "multiuser"})):
        rt.observer.record(MAC, 100.0 + t, ev, fields)
    return generate_latest(reg).decode()


def test_dashboard_parses_and_has_the_operator_panels():
    dash = json.loads(DASHBOARD.read_text())
    titles = " | ".join(p["title"].lower() for p in dash["panels"])
    for want in ("boots per minute", "stage duration", "failures", "throughput"):
        assert want in titles, titles
    assert all(t["expr"] for p in dash["panels"] for t in p["targets"])
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])


def test_every_dashboard_metric_is_exported():
    names = dashboard_metric_names(DASHBOARD)
    assert {"sidus_boots_total", "sidus_boot_stage_seconds_bucket", "sidus_tftp_sent_bytes_total"} <= names
    missing = names - exposed_names(simulated_output())
    assert not missing, missing


def test_the_simulated_boot_is_in_the_histograms():
    text = simulated_output()
    assert 'sidus_boot_stage_seconds_count{stage="up"} 1.0' in text
    assert 'sidus_boot_stage_seconds_sum{stage="up"} 20.0' in text
    assert 'sidus_boot_stage_seconds_sum{stage="kernel"} 3.0' in text
    assert 'sidus_boot_stage_seconds_sum{stage="initrd"} 4.0' in text
    assert "sidus_boots_total 1.0" in text
    assert "sidus_tftp_transfer_duration_seconds_count 2.0" in text
    assert "sidus_http_transfer_duration_seconds_count 1.0" in text
