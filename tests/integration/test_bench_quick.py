"""bench/storm.py --quick: the boot-storm benchmark runs end to end against all four servers.

Checks that it runs and that what it reports is well-formed and true (every
client got every file with the right sha256), not how fast anyone is: the TFTP
modes against every server, the HTTP mode (proxyDHCP, iPXE chainload, script,
kernel + initrd over HTTP) against sidusd with the peers marked as having no
HTTP server, and proxyDHCP latency of sidusd and dnsmasq, idle and under a
TFTP storm.
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
IPXE = Path("/usr/lib/ipxe/undionly.kpxe")


def test_quick_storm_all_servers(tmp_path):
    require_root()
    for tool in ("atftp", "curl", "dnsmasq", "unshare", "taskset", "ip", "apt-get", "dpkg-deb"):
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
    # every (N, TFTP mode, server) ran once, and the HTTP mode against sidusd only
    assert sorted((x["clients"], x["mode"], x["server"]) for x in runs) == sorted(
        [(n, m, s) for n in (1, 4) for m in ("lockstep", "window16") for s in SERVERS]
        + [(n, "http", "sidusd") for n in (1, 4)])
    static = PXE.stat().st_size + LDLINUX.stat().st_size + 1_000_000 + 3_000_000
    http_static = IPXE.stat().st_size + 1_000_000 + 3_000_000
    tftp_runs = [x for x in runs if x["mode"] != "http"]
    http_runs = [x for x in runs if x["mode"] == "http"]
    for x in http_runs:
        where = f"http N={x['clients']}: {x['errors']}"
        assert x["failures"] == 0 and x["sha256_mismatches"] == 0 and x["server_survived"], where
        # undionly.kpxe, the iPXE script (a few hundred bytes) and kernel + initrd, per client
        assert x["clients"] * http_static < x["bytes"] < x["clients"] * (http_static + 4096), where
        assert x["time_to_last_s"] > 0 and x["aggregate_mb_s"] > 0 and x["peak_rss_mb"] > 0
        assert x["client_p50_s"] <= x["client_p99_s"] and x["slowest_over_median"] >= 1.0
        # two DHCP exchanges as a PXE ROM (OFFER + ACK) and one as iPXE (OFFER) per client
        assert x["dhcp_exchange_ms"]["n"] == 3 * x["clients"], x["dhcp_exchange_ms"]
    for x in tftp_runs:
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
    unsupported = [row for row in summary if row.get("unsupported")]
    assert sorted((row["clients"], row["server"], row["mode"], row["unsupported"]) for row in unsupported) == sorted(
        (n, s, "http", "no HTTP server") for n in (1, 4) for s in SERVERS[1:])
    measured = [row for row in summary if not row.get("unsupported")]
    assert len(measured) == len(runs)
    for row in measured:
        if row["server"] != "sidusd":
            assert row["ratio_mb_s"]["median"] > 0, row
        if row["mode"] == "http":
            # the HTTP storm's time over each TFTP storm's, sidusd's and every peer's
            ratios = row["http_time_over_tftp"]
            assert set(ratios) == {f"{s} {m}" for s in SERVERS for m in ("lockstep", "window16")}, ratios
            assert all(v["median"] > 0 for v in ratios.values()), ratios
    # proxyDHCP latency: both DHCP servers answered every probe, idle and under a TFTP storm
    lat = doc["dhcp_latency"]
    assert sorted(r["server"] for r in lat["runs"]) == ["dnsmasq", "sidusd"]
    for lr in lat["runs"]:
        assert lr["server_survived"] and lr["storm_failures"] == 0 and lr["storm_sha256_mismatches"] == 0, lr
        assert lr["storm_mb_s"] > 0
        idle, loaded = lr["idle"], lr["loaded"]
        # every probe counted once: answered or lost (no reply within 2 s); nearly all answered
        assert idle["offer_ms"]["n"] + idle["lost_offer"] == 30, idle
        assert idle["offer_ms"]["n"] >= 25 and idle["ack_ms"]["n"] >= 25, idle
        # >= 2 s of probes 20 ms apart under load (the storm is rerun until then)
        assert loaded["offer_ms"]["n"] >= 20 and loaded["ack_ms"]["n"] >= 20, loaded
        for phase in ("idle", "loaded"):
            for kind in ("offer_ms", "ack_ms"):
                st = lr[phase][kind]
                assert 0 < st["p50"] <= st["p99"] <= st["max"] < 2000, (phase, kind, st)
    rows = {(row["server"], row["phase"]): row for row in lat["summary"]}
    assert set(rows) == {(s, p) for s in ("sidusd", "dnsmasq") for p in ("idle", "loaded")}
    for p in ("idle", "loaded"):
        assert rows[("dnsmasq", p)]["sidusd_over_offer_ms_p99"]["median"] > 0
        assert rows[("dnsmasq", p)]["sidusd_over_ack_ms_p99"]["median"] > 0
    for words in ("proxyDHCP latency", "no HTTP server", "HTTP sidusd / sidusd lockstep"):
        assert words in r.stdout
    # the table names every server, and the results file it wrote
    for s in SERVERS:
        assert s in r.stdout
    assert str(out) in r.stdout
