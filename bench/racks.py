"""Simulated racks (issue #19): N PXE clients over K racks of rack servers vs one server.

    python3 -m bench.racks                                  # 1,000 clients, 4 racks x 2 sidusd, vs 1 server
    python3 -m bench.racks --clients 64 --racks 2 --servers-per-rack 1 --no-single
    python3 -m bench.racks --delay-ms 20 --loss-pct 1       # the links between racks
    python3 -m bench.racks --rollout                        # + a new generation pushed mid-storm (bench.racksroll)

The topology is :mod:`bench.rackslib`'s: each rack a bridge in a network namespace with its
sidusd (proxyDHCP + TFTP, ``state.backend: postgresql``, each in its own namespace) and one
namespace of clients; PostgreSQL in its own namespace behind a core router; delay and loss on
the rack uplinks (``tc netem``, or :mod:`bench.rackwire` where the kernel has no netem).  Every
client is a host in PostgreSQL.  Each client does what a PXE ROM does for proxyDHCP (DISCOVER ->
first OFFER, REQUEST on port 4011 -> ACK; bench/dhcpclient.py), then fetches pxelinux.0 and its
``pxelinux.cfg/01-<mac>`` over TFTP (curl bound to the client's own address) from the server
that answered.  Then the same N clients in one rack with one sidusd (``--no-single`` skips it).

Reported per topology: storm completion (first arrival to the last client done), per-client
DHCP time (first DISCOVER to the ACK, retransmissions included, on the driver's clock) p50/p99,
the successful exchange alone (OFFER + ACK on the DHCP client's own clock, ``exchange_*`` in the
JSON), boot p99, failures and
clients that started over; PostgreSQL during the storm: transactions committed per second
(``pg_stat_database.xact_commit`` delta), the most connections seen (``numbackends``, sampled
every 0.5 s).  A JSON file in bench/results/.  Everything is stopped by PID and the
namespaces removed at the end, on an error, on Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .peers import BENCH, BenchSetupError
from .rackslib import Racks


async def _sample(r: Racks, stop: asyncio.Event, out: dict[str, Any]) -> None:
    while not stop.is_set():
        try:
            conns, _ = await asyncio.to_thread(r.pg_stats)
            out["max_connections"] = max(out.get("max_connections", 0), conns)
        except Exception:           # a sample lost is not a figure lost
            pass
        try:
            await asyncio.wait_for(stop.wait(), 0.5)
        except TimeoutError:
            pass


async def _run(r: Racks, a: argparse.Namespace) -> dict[str, Any]:
    try:
        await r.start_clients()
        slots = asyncio.Semaphore(a.tftp_parallel)      # one for the machine: the same in every topology
        for c in r.clients:
            c.tftp_slots = slots
        stop, load = asyncio.Event(), {}
        sampler = asyncio.create_task(_sample(r, stop, load))
        (_, x0), e0, t0 = r.pg_stats(), r.event_rows(), time.monotonic()
        during = None
        if r.rollout is not None:       # generation 2 pushed mid-storm; rack 0's push cut when there are others
            during = r.rollout.during(r.servers, start_after_s=a.spread_s / 4, interrupt=r.k > 1,
                                      bwlimit_kbps=1000, reload_every_s=1.0,
                                      build_ns=r.pg_ns if a.rollout_ssh else None)
        res = await r.storm(spread_s=a.spread_s, during=during)
        (_, x1), e1, t1 = r.pg_stats(), r.event_rows(), time.monotonic()
        stop.set()
        await sampler
    finally:
        await r.close_clients()
    load["xact_per_s"] = round((x1 - x0) / (t1 - t0), 1)
    load["event_rows_per_s"] = round((e1 - e0) / (t1 - t0), 1)
    with_errors = [x for x in res["records"] if x["errors"]]
    slowest = max(res["records"], key=lambda x: x["duration_s"])
    roll = None
    if r.rollout is not None:
        from .racksroll import check
        d, got = res["during"], check(res["records"], r.rollout, r.servers)
        roll = {"violations": got["violations"][:20], "violation_count": len(got["violations"]),
                "configs_by_rack_and_generation": got["served"], "push_rc": d["push_rc"],
                "push_s": round(d["t_push_end"] - d["t_switch"], 2), "reloads": d["reloads"],
                "reload_errors": d["reload_errors"][:5], "interrupted_rack_0": "t_interrupt" in d}
    t_first = min(x["start"] for x in res["records"])
    return {"racks": r.k, "servers": sum(r.spr), "clients": res["clients"], "link": r.link_kind,
            "time_to_last_s": round(res["time_to_last_s"], 2), "dhcp_p50_ms": round(res["dhcp_p50_ms"], 1),
            "dhcp_p99_ms": round(res["dhcp_p99_ms"], 1), "exchange_p50_ms": round(res["exchange_p50_ms"], 1),
            "exchange_p99_ms": round(res["exchange_p99_ms"], 1), "boot_p99_s": round(res["boot_p99_s"], 2),
            "boot_max_s": round(slowest["duration_s"], 2),
            "slowest": {k: slowest.get(k) for k in ("rack", "client", "server", "dhcp_s", "exchange_ms", "errors")},
            "last_arrival_s": round(max(x["start"] for x in res["records"]) - t_first, 2),
            "failed": len(res["failed"]), "started_over": res["restarted"], "postgresql": load,
            "errors": sorted({str(e) for x in with_errors for e in x["errors"]})[:10],
            "per_server": {s.name: sum(1 for x in res["records"] if x.get("server") == s.ip) for s in r.servers},
            **({"rollout": roll} if roll is not None else {})}


def one(a: argparse.Namespace, racks: int, spr: int, work: Path) -> dict[str, Any]:
    per = -(-a.clients // racks)
    r = Racks(racks, spr, per, delay_ms=a.delay_ms, loss_pct=a.loss_pct, work=work, prefix="sidus-b-rk",
              rollout=a.rollout or a.rollout_ssh, rollout_ssh=a.rollout_ssh)
    try:
        r.build()
        r.start_postgres()
        r.seed()
        r.start_servers()
        print(f"{racks} rack(s) x {spr} sidusd, {per * racks} clients: storm ...", file=sys.stderr, flush=True)
        return asyncio.run(_run(r, a))
    finally:
        r.close()


def table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'racks':>5} {'sidusd':>6} {'clients':>7} {'last done s':>11} {'DHCP p50 ms':>11} "
            f"{'DHCP p99 ms':>11} {'boot p99 s':>10} {'failed':>6} {'over':>5} {'PG xact/s':>9} {'PG conns':>8} "
            f"{'events/s':>8}")
    lines = [head, "-" * len(head)]
    for x in rows:
        lines.append(f"{x['racks']:>5} {x['servers']:>6} {x['clients']:>7} {x['time_to_last_s']:>11} "
                     f"{x['dhcp_p50_ms']:>11} {x['dhcp_p99_ms']:>11} {x['boot_p99_s']:>10} {x['failed']:>6} "
                     f"{x['started_over']:>5} {x['postgresql'].get('xact_per_s', '-'):>9} "
                     f"{x['postgresql'].get('max_connections', '-'):>8} "
                     f"{x['postgresql'].get('event_rows_per_s', '-'):>8}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bench.racks", description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=1000, help="in all, divided over the racks")
    p.add_argument("--racks", type=int, default=4)
    p.add_argument("--servers-per-rack", type=int, default=2, choices=(1, 2))
    p.add_argument("--delay-ms", type=float, default=10.0, help="round trip added on each rack uplink")
    p.add_argument("--loss-pct", type=float, default=0.0, help="loss on each rack uplink, each way")
    p.add_argument("--spread-s", type=float, default=10.0, help="arrivals spread over this window (0: at once)")
    p.add_argument("--tftp-parallel", type=int, default=64,
                   help="curl processes at once, all racks together (the 2-core machine's limit, not the servers')")
    p.add_argument("--rollout", action="store_true",
                   help="each rack serves its own disk; generation 2 is pushed to every rack mid-storm (rack 0's "
                        "push interrupted) and every served config is checked against the racks' markers")
    p.add_argument("--rollout-ssh", action="store_true",
                   help="--rollout, pushed over ssh (an sshd on each rack's first server, the push from the "
                        "database's namespace: across the core and the rack uplinks)")
    p.add_argument("--no-single", dest="single", action="store_false", help="skip the one-server run")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    if a.clients < 1 or a.racks < 1 or a.racks > 8 or a.clients > 250 * 200:
        p.error("--clients >= 1, 1 <= --racks <= 8")
    for tool in ("ip", "curl", *(["rsync"] if a.rollout or a.rollout_ssh else []),
                 *(["ssh", "ssh-keygen"] if a.rollout_ssh else [])):
        if not shutil.which(tool):
            print(f"bench.racks: missing tool: {tool}", file=sys.stderr)
            return 2
    if os.geteuid() != 0:
        print("bench.racks: needs root (network namespaces)", file=sys.stderr)
        return 2
    # SIGTERM unwinds like Ctrl-C: every finally stops its processes and removes its namespaces
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    signal.signal(signal.SIGINT, signal.default_int_handler)   # also when started with SIGINT ignored
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    load0 = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="sidus-racks-"))
    rows = []
    try:
        rows.append(one(a, a.racks, a.servers_per_rack, work / "racks"))
        print(table(rows), file=sys.stderr, flush=True)
        if a.single:
            rows.append(one(a, 1, 1, work / "single"))
    except BenchSetupError as exc:
        print(f"bench.racks: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench.racks: interrupted; everything stopped and removed", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(work, ignore_errors=True)
    doc = {"started": started, "command": " ".join(["python3 -m bench.racks", *(argv or sys.argv[1:])]),
           "loadavg_start": load0, "loadavg_end": os.getloadavg(), "cpus": os.cpu_count(),
           "settings": vars(a) | {"out": str(a.out)}, "runs": rows}
    out = a.out or BENCH / "results" / f"racks-{started.replace(':', '')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(table(rows))
    for x in rows:
        if "rollout" in x:
            ro = x["rollout"]
            print(f"rollout ({x['racks']} rack(s)): push exit {ro['push_rc']} in {ro['push_s']} s, {ro['reloads']} "
                  f"reloads, configs by rack and generation {ro['configs_by_rack_and_generation']}, "
                  f"{ro['violation_count']} served a root that had not arrived")
    print(f"load average at start {load0}, at end {doc['loadavg_end']}; results: {out}")
    return 1 if any(x["failed"] or x.get("rollout", {}).get("violation_count") for x in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
