"""The metrics endpoint, scraped by a real Prometheus server during a scripted boot.

sidusd runs in a namespace made here (tests/integration/scripted_boot.py: full
DHCP, TFTP, HTTP, metrics on the namespace's loopback); Prometheus (Debian's
``prometheus``, its own config and data directory under the test's tmp, on
the same loopback, stopped by PID) scrapes it every second while the machine
boots (scapy DHCP, tftpy, curl up-reports).  The boot is then found with
PromQL through Prometheus' HTTP API; ``promtool check metrics`` checks the
endpoint's text; the Grafana dashboard's metric names all exist in it.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from conftest import require_root, require_tool
from observers import Prometheus
from scripted_boot import METRICS_PORT, boot_lab

pytestmark = pytest.mark.netns

MAC = "52:54:00:00:17:02"
PROM_PORT = 9090
DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana" / "sidus.json"


@pytest.fixture
def lab(tmp_path):
    require_root()
    for tool in ("ip", "curl", "prometheus", "promtool"):
        require_tool(tool)
    pytest.importorskip("scapy", reason="missing tool: scapy (pip, pyproject test extra)")
    pytest.importorskip("tftpy", reason="missing tool: tftpy (pip, pyproject test extra)")
    with boot_lab(tmp_path, [{"mac": MAC, "hostname": "node172", "profile": "default"}], "sidus-t-prom") as lab:
        yield lab


def test_prometheus_scrapes_a_boot(lab):
    lab.start()
    prom = Prometheus(lab.server.name, lab.tmp, f"127.0.0.1:{METRICS_PORT}", PROM_PORT)
    try:
        prom.wait_value('up{job="sidus"}', lambda v: v == 1.0)        # the target is scraped
        lab.boot(MAC)
        now = lab.metrics()            # a scrape waits for the worker's counters: exact at once
        assert 'sidus_up_reports_total{result="accepted"} 2.0' in now, now
        prom.wait_value('sidus_tftp_transfers_total{result="done"}', lambda v: v >= 4)
        prom.wait_value('sidus_dhcp_replies_total{kind="offer"}', lambda v: v >= 1)
        prom.wait_value("sidus_boots_total", lambda v: v == 1)
        for stage in ("first_file", "kernel", "initrd", "root", "up"):
            prom.wait_value(f'sidus_boot_stage_seconds_count{{stage="{stage}"}}', lambda v: v == 1)
        # the boot took well under a minute: its "up" lies in the first buckets
        prom.wait_value('sidus_boot_stage_seconds_bucket{stage="up",le="60.0"}', lambda v: v == 1)
        prom.wait_value('sidus_up_reports_total{result="accepted"}', lambda v: v == 2)
        prom.wait_value("sidus_tftp_sent_bytes_total", lambda v: v >= 540_000)
        prom.wait_value("sidus_tftp_transfer_duration_seconds_count", lambda v: v >= 4)
        prom.wait_value('sidus_worker_up', lambda v: v == 1)
    finally:
        prom.close()

    text = lab.metrics()
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "sidus_transfers_in_flight{service=\"tftp\"} 0.0" in text, text
    # every metric the dashboard queries is in the endpoint's output
    from tests.unit.test_metrics_dashboard import dashboard_metric_names, exposed_names
    missing = dashboard_metric_names(DASHBOARD) - exposed_names(text)
    assert not missing, missing


def test_a_transfer_in_flight_is_seen_at_the_scrape(lab):
    """The worker serves the transfer; the supervisor's endpoint still sees it, at once (a scrape
    waits for the worker's report), and sees it end."""
    import socket

    from netns import socket_in_netns
    from scripted_boot import SERVER_IP

    lab.start()
    sock = socket_in_netns(lab.client.name, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    try:
        # an RRQ that is never ACKed: the transfer stays in flight, retransmitting
        sock.sendto(b"\x00\x01images/demo/vmlinuz\x00octet\x00", (SERVER_IP, 69))
        deadline = time.monotonic() + 3
        text = ""
        while 'sidus_transfers_in_flight{service="tftp"} 1.0' not in text:
            assert time.monotonic() < deadline, text
            text = lab.metrics()
        sock.settimeout(5)
        _, tid = sock.recvfrom(65536)                       # a DATA block from the transfer's port
        sock.sendto(b"\x00\x05\x00\x00client gave up\x00", tid)   # ERROR: the client aborts
        deadline = time.monotonic() + 20
        while 'sidus_tftp_transfers_total{result="failed"} 1.0' not in text:
            assert time.monotonic() < deadline, text
            time.sleep(0.5)
            text = lab.metrics()
        assert 'sidus_transfers_in_flight{service="tftp"} 0.0' in text
    finally:
        sock.close()
