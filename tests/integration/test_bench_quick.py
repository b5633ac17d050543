"""bench/storm.py --quick: the boot-storm benchmark runs end to end against all four servers.

Checks that it runs and that what it reports is well-formed and true (every
client got every file with the right sha256), not how fast anyone is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import require_root, require_tool

REPO = Path(__file__).resolve().parents[2]
SERVERS = ["sidusd", "dnsmasq", "tftpd-hpa", "atftpd"]
PXE = Path("/usr/lib/PXELINUX/pxelinux.0")
LDLINUX = Path("/usr/lib/syslinux/modules/bios/ldlinux.c32")


def test_quick_storm_all_servers(tmp_path):
    require_root()
    for tool in ("atftp", "dnsmasq", "unshare", "taskset", "ip", "apt-get", "dpkg-deb"):
        require_tool(tool)
    out = tmp_path / "storm.json"
    r = subprocess.run([sys.executable, "-m", "bench.storm", "--quick", "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, f"rc {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    doc = json.loads(out.read_text())
    assert doc["settings"]["quick"] is True
    assert doc["settings"]["clients"] == [1, 4]
    runs = doc["runs"]
    # every (N, mode, server) ran once
    assert sorted((x["clients"], x["mode"], x["server"]) for x in runs) == sorted(
        (n, m, s) for n in (1, 4) for m in ("lockstep", "window16") for s in SERVERS)
    static = PXE.stat().st_size + LDLINUX.stat().st_size + 1_000_000 + 3_000_000
    for x in runs:
        where = f"{x['server']} N={x['clients']} {x['mode']}: {x['errors']}"
        assert x["failures"] == 0, where
        assert x["sha256_mismatches"] == 0, where
        assert x["server_survived"], where
        # each client got the four static files plus its (non-empty) config
        assert x["bytes"] > x["clients"] * static, where
        assert x["bytes"] < x["clients"] * (static + 4096), where
        assert x["time_to_last_s"] > 0 and x["aggregate_mb_s"] > 0
        assert x["client_p50_s"] <= x["client_p99_s"]
        assert x["slowest_over_median"] >= 1.0
        assert x["cpu_s"] >= 0 and x["peak_rss_mb"] > 0
    summary = doc["summary"]
    assert len(summary) == len(runs)
    for row in summary:
        if row["server"] != "sidusd":
            assert row["ratio_mb_s"]["median"] > 0, row
    # the table names every server, and the results file it wrote
    for s in SERVERS:
        assert s in r.stdout
    assert str(out) in r.stdout
