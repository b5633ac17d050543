"""proxyDHCP latency, idle and while TFTP is saturated: sidusd against dnsmasq.

For each DHCP server (sidusd ``dhcp.mode: proxy``; dnsmasq ``dhcp-range=...,proxy``
+ ``pxe-service``), started alone with its TFTP server on, over the bench's DHCP
link (:mod:`bench.dhcplink`):

* **idle**: ``probes`` exchanges one after the other, 10 ms apart, each
  DISCOVER -> OFFER then REQUEST on port 4011 -> ACK, timed separately from
  send to receipt by the client process (:mod:`bench.dhcpclient`);
* **loaded**: a TFTP storm of ``load_clients`` atftp clients (lockstep,
  blksize 1468: the most datagrams per byte) against the same server, and
  the same probes, 20 ms apart, from 0.2 s after the storm started until it
  ends (at most ``max_probes``); a storm shorter than ``MIN_LOADED_S`` (the
  tiny files of ``--quick``) is run again so the probes always see load.

Reported per server and phase: probes, OFFER and ACK latency p50/p99/max (ms),
lost replies (none within 2 s); per phase the ratios sidusd/dnsmasq.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from .clients import run_client, wait_ready
from .dhcplink import DhcpLink
from .measure import CpuMeter, pct
from .peers import DHCP_SERVERS, REPO, DhcpSide, server_spec, stop_server

MIN_LOADED_S = 2.0       # probes under load at least this long (small --quick storms run again)


def _stats(vals: list[float]) -> dict[str, Any]:
    v = sorted(vals)
    if not v:
        return {"n": 0, "p50": None, "p99": None, "max": None}
    return {"n": len(v), "p50": round(pct(v, 50), 3), "p99": round(pct(v, 99), 3), "max": round(v[-1], 3)}


async def latency_one(server: str, link: DhcpLink, root: Path, work: Path, expect: dict[str, str],
                      probes: int, max_probes: int, load_clients: int, load_mode: str,
                      timeout_s: float) -> dict[str, Any]:
    """Idle and loaded probes against ``server``; its record."""
    spec = server_spec(server, root, work / f"{server}-dhcp", max_transfers=max(64, 2 * load_clients),
                       dhcp=DhcpSide())
    log = open(spec.workdir / "server.log", "ab")
    meter = CpuMeter(f"{server}-dhcp")
    proc = subprocess.Popen(spec.argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=meter.preexec)
    tasks: list[asyncio.Task] = []
    t_probe = 0.0
    try:
        await wait_ready(proc, 69)
        for _ in range(50):                               # DHCP answers too
            if (await link.boot("52:54:00:d1:00:00", False)).get("ok"):
                break
            await asyncio.sleep(0.2)
        idle = await link.start_probe(probes, 0.01)
        t0 = time.monotonic()
        clients: list[dict[str, Any]] = []
        pending: set[asyncio.Task] = set()
        rounds = 0
        loaded_f = None
        # storm rounds until the probes have had MIN_LOADED_S under load (one round at real sizes)
        while rounds == 0 or (time.monotonic() - t_probe < MIN_LOADED_S and not pending):
            rounds += 1
            tasks = [asyncio.create_task(run_client(i, load_mode, 69, expect, 0.0, None))
                     for i in range(load_clients)]
            if loaded_f is None:
                await asyncio.sleep(0.2)                  # the storm is under way
                loaded_f = link.start_probe(max_probes, 0.02)
                t_probe = time.monotonic()
            done, pending = await asyncio.wait(tasks, timeout=timeout_s)
            clients += [t.result() for t in done]
        storm_s = time.monotonic() - t0
        link.stop_probe()
        loaded = await loaded_f
        for t in pending:
            t.cancel()
        alive = proc.poll() is None
    finally:
        stop_server(proc)
        log.close()
        meter.close()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
    total = sum(c["bytes"] for c in clients)
    return {
        "server": server, "load_clients": load_clients, "load_mode": load_mode,
        "storm_rounds": rounds, "storm_s": round(storm_s, 3),
        "storm_mb_s": round(total / 1e6 / storm_s, 1) if storm_s > 0 else 0.0,
        "storm_failures": len(pending) + sum(1 for c in clients if c["failed"]),
        "storm_sha256_mismatches": sum(len(c["mismatch"]) for c in clients),
        "server_survived": alive,
        "idle": {"offer_ms": _stats(idle["offer_ms"]), "ack_ms": _stats(idle["ack_ms"]),
                 "lost_offer": idle["lost_offer"], "lost_ack": idle["lost_ack"]},
        "loaded": {"offer_ms": _stats(loaded["offer_ms"]), "ack_ms": _stats(loaded["ack_ms"]),
                   "lost_offer": loaded["lost_offer"], "lost_ack": loaded["lost_ack"]},
        "raw": {"idle": idle, "loaded": loaded},
    }


def summarize_latency(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (server, phase): medians over repeats of p50/p99, losses; ratios sidusd/dnsmasq by repeat."""
    out = []
    by = {(r["server"], r["repeat"]): r for r in runs}
    for server in DHCP_SERVERS:
        rs = [r for r in runs if r["server"] == server]
        if not rs:
            continue
        for phase in ("idle", "loaded"):
            row: dict[str, Any] = {"server": server, "phase": phase, "repeats": len(rs),
                                   "probes": sum(r[phase]["offer_ms"]["n"] for r in rs),
                                   "lost": sum(r[phase]["lost_offer"] + r[phase]["lost_ack"] for r in rs)}
            for kind in ("offer_ms", "ack_ms"):
                for q in ("p50", "p99", "max"):
                    vals = [r[phase][kind][q] for r in rs if r[phase][kind][q] is not None]
                    row[f"{kind}_{q}"] = round(statistics.median(vals), 3) if vals else None
            if server != "sidusd":
                for kind in ("offer_ms", "ack_ms"):
                    for q in ("p50", "p99"):
                        vals = [by[("sidusd", r["repeat"])][phase][kind][q] / r[phase][kind][q] for r in rs
                                if ("sidusd", r["repeat"]) in by and r[phase][kind][q]
                                and by[("sidusd", r["repeat"])][phase][kind][q] is not None]
                        row[f"sidusd_over_{kind}_{q}"] = (
                            {"median": round(statistics.median(vals), 2), "min": round(min(vals), 2),
                             "max": round(max(vals), 2)} if vals else None)
            out.append(row)
    return out


def latency_table(summary: list[dict[str, Any]]) -> str:
    """The human table of DHCP latency (ms, medians over repeats)."""
    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}"

    def r(v: Any) -> str:
        if v is None:
            return ""
        return f"{v['median']:.2f}" if v["min"] == v["max"] else f"{v['median']:.2f} [{v['min']:.2f}-{v['max']:.2f}]"
    head = (f"{'phase':7} {'server':8} {'probes':>6} {'OFFER p50':>9} {'OFFER p99':>9} {'OFFER max':>9} "
            f"{'ACK p50':>8} {'ACK p99':>8} {'lost':>4} {'sidusd/peer OFFER p99':>22} {'ACK p99':>18}")
    lines = [head, "-" * len(head)]
    for row in sorted(summary, key=lambda x: (x["phase"], DHCP_SERVERS.index(x["server"]))):
        lines.append(f"{row['phase']:7} {row['server']:8} {row['probes']:>6} {f(row['offer_ms_p50']):>9} "
                     f"{f(row['offer_ms_p99']):>9} {f(row['offer_ms_max']):>9} {f(row['ack_ms_p50']):>8} "
                     f"{f(row['ack_ms_p99']):>8} {row['lost']:>4} "
                     f"{r(row.get('sidusd_over_offer_ms_p99')):>22} {r(row.get('sidusd_over_ack_ms_p99')):>18}")
    return "\n".join(lines)
