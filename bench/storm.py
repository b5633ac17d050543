"""Boot storm: N simulated PXE clients against sidusd, dnsmasq, tftpd-hpa and atftpd.

    python3 -m bench.storm                      # N = 1,32,64,128, all modes, 3 repeats, DHCP latency
    python3 -m bench.storm --quick              # tiny sizes: checks it runs, not how fast
    python3 -m bench.storm --clients 32 --modes lockstep --repeats 5 --servers sidusd,dnsmasq

Each client fetches what PXELINUX firmware fetches, one file after the other:
pxelinux.0, ldlinux.c32, pxelinux.cfg/01-<mac>, a kernel (10 MB) and an initrd
(50 MB), with the atftp C client (so the client side costs little Python).  The
kernel and the initrd are written to a spool on tmpfs and hashed after the storm
(bench.clients.verify_spooled): hashed in the bench's one Python thread as they came,
they capped window16 at ~481 MB/s for every server on session 13's machine.
``lockstep`` is blksize 1468 with one block in flight (PXE ROMs, iPXE);
``window16`` adds windowsize 16 (RFC 7440; U-Boot, UEFI, atftp).  Servers that
do not implement windowsize answer without it and run lockstep.

The whole run happens in a private network namespace (``unshare --net``): every
server listens on 127.0.0.1:69 there, one at a time, taken in rotation
(repeat -> N -> mode -> server), so a noisy machine hurts all servers alike and
the ratios sidusd/peer come from the same minutes.  Reported per server: time
until the last client finished, aggregate MB/s, per-client p50/p99 and
slowest/median, server CPU seconds per GB (utime+stime of the server and its
reaped children, /proc/<pid>/stat), peak RSS (VmHWM), failures and sha256
mismatches; medians and ranges over repeats; a table on stdout and a JSON file
in bench/results/.

``http`` mode (sidusd only: the C peers have no HTTP server, the table says
so): the server also answers proxyDHCP on a veth link and serves HTTP; each
client boots like a BIOS machine chainloading iPXE (bench.httpboot): DHCP,
undionly.kpxe over TFTP, DHCP as iPXE, its iPXE script, then kernel + initrd
over HTTP/1.1 with one curl process.  Reported like TFTP, plus the ratio of
the HTTP storm's time to the TFTP storms' (sidusd's and each peer's).

Then proxyDHCP latency (bench.latency): OFFER and ACK (port 4011) p50/p99 of
sidusd and dnsmasq, idle and while a TFTP storm saturates the same server.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .clients import (
    BLKSIZE,
    INITRD,
    KERNEL,
    MODES,
    fetch,
    mac_of,
    run_client,
    spool_dir,
    verify_spooled,
    wait_http,
    wait_ready,
)
from .dhcplink import DhcpLink
from .httpboot import IPXE_BINARY, run_http_client
from .latency import latency_one, latency_table, summarize_latency
from .measure import CpuMeter, pct, proc_hwm_mb
from .peers import (
    BENCH,
    DHCP_SERVERS,
    HTTP_SERVERS,
    REPO,
    SERVERS,
    BenchSetupError,
    DhcpSide,
    ensure_peers,
    pushers_keys,
    server_spec,
    stop_server,
)

MB = 1_000_000
HTTP = "http"                                    # kernel + initrd over HTTP (sidusd only)
ALL_MODES = (*MODES, HTTP)
HTTP_PORT = 8080
_INNER = "SIDUS_BENCH_IN_NETNS"


# -- the tree every server serves ------------------------------------------------
def make_tree(root: Path, kernel_mb: float, initrd_mb: float) -> dict[str, str]:
    """Write the boot files; returns sha256 per static name (same bytes for every server)."""
    files = {
        "pxelinux.0": Path("/usr/lib/PXELINUX/pxelinux.0").read_bytes(),
        "ldlinux.c32": Path("/usr/lib/syslinux/modules/bios/ldlinux.c32").read_bytes(),
        IPXE_BINARY: Path("/usr/lib/ipxe/undionly.kpxe").read_bytes(),
        KERNEL: os.urandom(int(kernel_mb * MB)),
        INITRD: os.urandom(int(initrd_mb * MB)),
    }
    out = {}
    for name, data in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        out[name] = hashlib.sha256(data).hexdigest()
    (root / "pxelinux.cfg").mkdir(exist_ok=True)
    for d in [root, *[p for p in root.rglob("*") if p.is_dir()]]:
        d.chmod(0o755)
    return out


def write_static_configs(root: Path, n: int) -> None:
    """The per-MAC pxelinux configs the C servers serve as files (sidusd renders its own)."""
    for i in range(n):
        p = root / "pxelinux.cfg" / ("01-" + mac_of(i).replace(":", "-"))
        p.write_text(f"DEFAULT sidus\nLABEL sidus\n  KERNEL {KERNEL}\n  APPEND initrd={INITRD}\n")
        p.chmod(0o644)


# -- one server ----------------------------------------------------------------------
async def run_one(server: str, n: int, mode: str, root: Path, work: Path, expect: dict[str, str],
                  spread_s: float, timeout_s: float, port: int = 69, link: DhcpLink | None = None,
                  sizes: dict[str, int] | None = None, sidusd_tftp: dict | None = None) -> dict[str, Any]:
    """Start ``server``, run a storm of ``n`` clients, stop it; the run's record.

    Mode ``http``: the server also answers proxyDHCP on the bench's DHCP link
    (``link``) and serves HTTP; each client boots the iPXE way (bench.httpboot).
    """
    http = mode == HTTP
    spec = server_spec(server, root, work / server, max_transfers=max(64, 2 * n), port=port,
                       dhcp=DhcpSide() if http else None, http_port=HTTP_PORT if http else None,
                       http_clients=n, sidusd_tftp=sidusd_tftp)
    argv = spec.argv
    pin_server = pin_client = None
    if n == 1 and (os.cpu_count() or 1) >= 2:      # single client: server and client on their own cores
        pin_server, pin_client = "0", "1"
        argv = ["taskset", "-c", pin_server, *argv]
    log = open(spec.workdir / "server.log", "ab")
    meter = CpuMeter(server)
    proc = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, preexec_fn=meter.preexec)
    tasks: list[asyncio.Task] = []
    spool = None if http or sizes is None else spool_dir(n * (sizes[KERNEL] + sizes[INITRD]))
    try:
        await wait_ready(proc, port)
        if http:
            await wait_http(proc, HTTP_PORT)
        cpu0, us0 = meter.seconds(proc.pid), meter.user_sys(proc.pid)
        t0 = time.monotonic()

        def client(i: int, delay: float) -> Any:
            if http:
                assert link is not None and sizes is not None
                return run_http_client(i, link, fetch, expect, sizes, KERNEL, INITRD, mac_of(i),
                                       delay, timeout_s)
            return run_client(i, mode, port, expect, delay, pin_client, spool)
        tasks = [asyncio.create_task(client(i, spread_s * i / n if n > 1 else 0.0)) for i in range(n)]
        done, pending = await asyncio.wait(tasks, timeout=timeout_s)
        for t in pending:
            t.cancel()
        clients = [t.result() for t in done]
        timed_out = len(pending)
        await asyncio.sleep(0.2)                        # let the server reap its children
        cpu = meter.seconds(proc.pid) - cpu0
        us1 = meter.user_sys(proc.pid)
        rss = proc_hwm_mb(proc.pid)
        alive = proc.poll() is None
        for c in clients:                               # after the timing: the spooled copies
            verify_spooled(c, expect)
    finally:
        stop_server(proc)
        log.close()
        meter.close()
        if tasks:                                       # the clients (cancelled ones unwind here)
            await asyncio.gather(*tasks, return_exceptions=True)
        if spool is not None:
            shutil.rmtree(spool, ignore_errors=True)
    total = sum(c["bytes"] for c in clients)
    durs = sorted(c["duration_s"] for c in clients)
    t_last = (max(c["end"] for c in clients) - t0) if clients else float("nan")
    failures = timed_out + sum(1 for c in clients if c["failed"])
    dhcp_ms = sorted(x for c in clients for x in c.get("dhcp_ms", []) if x == x)
    return {
        "server": server, "clients": n, "mode": mode, "spread_s": spread_s,
        "time_to_last_s": round(t_last, 4),
        "aggregate_mb_s": round(total / MB / t_last, 2) if clients and t_last > 0 else 0.0,
        "client_p50_s": round(pct(durs, 50), 4), "client_p99_s": round(pct(durs, 99), 4),
        "slowest_over_median": round(durs[-1] / pct(durs, 50), 3) if durs and pct(durs, 50) > 0 else None,
        "bytes": total, "cpu_s": round(cpu, 3), "cpu_source": meter.source,
        "cpu_user_s": round(us1[0] - us0[0], 2), "cpu_sys_s": round(us1[1] - us0[1], 2),
        "cpu_s_per_gb": round(cpu / (total / 1e9), 3) if total else None,
        "peak_rss_mb": round(rss, 1), "failures": failures,
        "sha256_mismatches": sum(len(c["mismatch"]) for c in clients),
        "hashed_after_storm": spool is not None,
        "server_survived": alive,
        "errors": sorted({e for c in clients for e in c["failed"]})[:10],
        "dhcp_exchange_ms": ({"n": len(dhcp_ms), "p50": round(pct(dhcp_ms, 50), 3),
                              "p99": round(pct(dhcp_ms, 99), 3)} if http else None),
    }


# -- summary ---------------------------------------------------------------------------
_METRICS = ("time_to_last_s", "aggregate_mb_s", "client_p50_s", "client_p99_s", "slowest_over_median",
            "cpu_s_per_gb", "peak_rss_mb")


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median and range per (mode, N, server) and the ratios sidusd/peer, repeat by repeat."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["mode"], r["clients"], r["server"]), []).append(r)
    out = []
    for (mode, n, server), rs in groups.items():
        row: dict[str, Any] = {"mode": mode, "clients": n, "server": server, "repeats": len(rs),
                               "failures": sum(r["failures"] for r in rs),
                               "sha256_mismatches": sum(r["sha256_mismatches"] for r in rs)}
        for m in _METRICS:
            vals = [r[m] for r in rs if r[m] is not None]
            row[m] = ({"median": round(statistics.median(vals), 4), "min": min(vals), "max": max(vals)}
                      if vals else None)
        if mode == HTTP and server == "sidusd":
            # the same storm's time over HTTP / over TFTP, sidusd and each peer's TFTP, repeat by repeat
            row["http_time_over_tftp"] = {}
            for tmode in MODES:
                for peer in SERVERS:
                    theirs = {r["repeat"]: r for r in groups.get((tmode, n, peer), [])}
                    vals = [r["time_to_last_s"] / theirs[r["repeat"]]["time_to_last_s"] for r in rs
                            if r["repeat"] in theirs and theirs[r["repeat"]]["time_to_last_s"]]
                    if vals:
                        row["http_time_over_tftp"][f"{peer} {tmode}"] = {
                            "median": round(statistics.median(vals), 3), "min": round(min(vals), 3),
                            "max": round(max(vals), 3)}
        if server != "sidusd":
            mine = {r["repeat"]: r for r in groups.get((mode, n, "sidusd"), [])}
            for key, name in (("aggregate_mb_s", "ratio_mb_s"), ("cpu_s_per_gb", "ratio_cpu_per_gb"),
                              ("time_to_last_s", "ratio_time_to_last")):
                vals = [mine[r["repeat"]][key] / r[key] for r in rs
                        if r["repeat"] in mine and r[key] and mine[r["repeat"]][key] is not None]
                row[name] = ({"median": round(statistics.median(vals), 3), "min": round(min(vals), 3),
                              "max": round(max(vals), 3)} if vals else None)
        out.append(row)
    return out


def _m(v: Any, fmt: str = "{:.2f}") -> str:
    if v is None:
        return "-"
    if v["min"] == v["max"]:
        return fmt.format(v["median"])
    return f"{fmt.format(v['median'])} [{fmt.format(v['min'])}-{fmt.format(v['max'])}]"


def table(summary: list[dict[str, Any]]) -> str:
    """The human table: medians with [min-max] over repeats; ratios are sidusd / that peer."""
    head = (f"{'mode':9} {'N':>4} {'server':10} {'last client s':>20} {'MB/s':>22} {'p50 s':>8} "
            f"{'p99 s':>8} {'slow/med':>8} {'CPU s/GB':>9} {'RSS MB':>7} {'fail':>4} {'bad':>4} "
            f"{'sidusd/peer MB/s':>22} {'CPU ratio':>9}")
    lines = [head, "-" * len(head)]
    order = {s: i for i, s in enumerate(SERVERS)}
    for r in sorted(summary, key=lambda r: (r["mode"], r["clients"], order.get(r["server"], 9))):
        if r.get("unsupported"):
            lines.append(f"{r['mode']:9} {r['clients']:>4} {r['server']:10} ({r['unsupported']})")
            continue
        lines.append(
            f"{r['mode']:9} {r['clients']:>4} {r['server']:10} {_m(r['time_to_last_s']):>20} "
            f"{_m(r['aggregate_mb_s'], '{:.1f}'):>22} {_m(r['client_p50_s']).split(' ')[0]:>8} "
            f"{_m(r['client_p99_s']).split(' ')[0]:>8} {_m(r['slowest_over_median']).split(' ')[0]:>8} "
            f"{_m(r['cpu_s_per_gb']).split(' ')[0]:>9} {_m(r['peak_rss_mb'], '{:.0f}').split(' ')[0]:>7} "
            f"{r['failures']:>4} {r['sha256_mismatches']:>4} "
            f"{_m(r.get('ratio_mb_s')) if r['server'] != 'sidusd' else '':>22} "
            f"{_m(r.get('ratio_cpu_per_gb')).split(' ')[0] if r['server'] != 'sidusd' else '':>9}")
    http = [r for r in summary if r["mode"] == HTTP and r.get("http_time_over_tftp")]
    if http:
        lines += ["", "sidusd HTTP storm time / TFTP storm time (same N, same repeat; target <= 0.25 at N=64):"]
        for r in sorted(http, key=lambda r: r["clients"]):
            for key, v in r["http_time_over_tftp"].items():
                lines.append(f"  N={r['clients']:<4} HTTP sidusd / {key:20} {_m(v, '{:.3f}')}")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    model = ""
    try:
        model = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                      if ln.startswith("model name")), "")
    except OSError:
        pass
    return {"cpu": model, "cpus": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version(), "loadavg_start": os.getloadavg()}


# -- driver ---------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python3 -m bench.storm", description=__doc__.split("\n\n")[0])
    p.add_argument("--pushers", default=None,
                   help="sidusd's tftp.pushers (auto or 0..16; default: sidusd's default)")
    p.add_argument("--quick", action="store_true",
                   help="N=1,4, 1+3 MB files, 1 repeat, 30 DHCP probes (CI: runs, not speed)")
    p.add_argument("--servers", default=",".join(SERVERS))
    p.add_argument("--clients", default="1,32,64,128", help="comma-separated N values")
    p.add_argument("--modes", default=",".join(ALL_MODES),
                   help="lockstep, window16 (TFTP), http (DHCP + iPXE, kernel+initrd over HTTP; sidusd only)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--kernel-mb", type=float, default=10)
    p.add_argument("--initrd-mb", type=float, default=50)
    p.add_argument("--spread-s", type=float, default=0.0, help="arrivals spread over this window (0: all at once)")
    p.add_argument("--timeout-s", type=float, default=900, help="per run; clients still running count as failures")
    p.add_argument("--out", type=Path, default=None, help="JSON results file (default bench/results/storm-<time>.json)")
    p.add_argument("--no-dhcp-latency", dest="dhcp_latency", action="store_false",
                   help="skip the proxyDHCP latency phase (sidusd and dnsmasq, idle and under a TFTP storm)")
    p.add_argument("--dhcp-probes", type=int, default=200, help="idle probes per server and repeat")
    p.add_argument("--dhcp-max-probes", type=int, default=6000, help="at most this many probes during the storm")
    p.add_argument("--dhcp-load-clients", type=int, default=32, help="TFTP clients (lockstep) loading the server")
    a = p.parse_args(argv)
    if a.quick:
        a.clients, a.repeats, a.kernel_mb, a.initrd_mb = "1,4", 1, 1, 3
        a.dhcp_probes, a.dhcp_load_clients = 30, 4
    a.server_list = [s.strip() for s in a.servers.split(",") if s.strip()]
    a.client_list = [int(x) for x in a.clients.split(",") if x.strip()]
    a.mode_list = [m.strip() for m in a.modes.split(",") if m.strip()]
    for s in a.server_list:
        if s not in SERVERS:
            p.error(f"unknown server {s!r} (known: {', '.join(SERVERS)})")
    for m in a.mode_list:
        if m not in ALL_MODES:
            p.error(f"unknown mode {m!r} (known: {', '.join(ALL_MODES)})")
    if a.dhcp_probes < 1 or a.dhcp_max_probes < 1 or a.dhcp_load_clients < 1:
        p.error("--dhcp-probes, --dhcp-max-probes and --dhcp-load-clients must be >= 1")
    if not a.client_list or min(a.client_list) < 1 or a.repeats < 1:
        p.error("--clients values and --repeats must be >= 1")
    return a


async def storm(a: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="sidus-storm-"))
    work.chmod(0o755)
    try:
        root = work / "root"
        expect = make_tree(root, a.kernel_mb, a.initrd_mb)
        sizes = {name: (root / name).stat().st_size for name in expect}
        write_static_configs(root, max(a.client_list))
        runs: list[dict[str, Any]] = []
        unsupported: list[dict[str, Any]] = []
        lat_runs: list[dict[str, Any]] = []
        link = None
        if HTTP in a.mode_list or a.dhcp_latency:
            link = DhcpLink()
            await link.start()
        try:
            for rep in range(a.repeats):
                for n in a.client_list:
                    for mode in a.mode_list:
                        for server in a.server_list:
                            if mode == HTTP and server not in HTTP_SERVERS:
                                if rep == 0:
                                    unsupported.append({"mode": mode, "clients": n, "server": server,
                                                        "unsupported": "no HTTP server"})
                                continue
                            r = await run_one(server, n, mode, root, work, expect, a.spread_s, a.timeout_s,
                                              link=link, sizes=sizes, sidusd_tftp=pushers_keys(a.pushers))
                            r["repeat"] = rep
                            runs.append(r)
                            print(f"rep {rep} N={n:<3} {mode:8} {server:9} last={r['time_to_last_s']:.2f}s "
                                  f"{r['aggregate_mb_s']:.1f} MB/s cpu/GB={r['cpu_s_per_gb']} "
                                  f"(user {r['cpu_user_s']} s, sys {r['cpu_sys_s']} s) "
                                  f"fail={r['failures']} bad={r['sha256_mismatches']}", file=sys.stderr, flush=True)
                if a.dhcp_latency:
                    for server in [s for s in a.server_list if s in DHCP_SERVERS]:
                        assert link is not None
                        lr = await latency_one(server, link, root, work, expect, a.dhcp_probes,
                                               a.dhcp_max_probes, a.dhcp_load_clients, "lockstep", a.timeout_s)
                        lr["repeat"] = rep
                        lat_runs.append(lr)
                        print(f"rep {rep} dhcp {server:9} idle OFFER p50/p99 {lr['idle']['offer_ms']['p50']}/"
                              f"{lr['idle']['offer_ms']['p99']} ms; under TFTP N={a.dhcp_load_clients} "
                              f"({lr['storm_mb_s']} MB/s) {lr['loaded']['offer_ms']['p50']}/"
                              f"{lr['loaded']['offer_ms']['p99']} ms ({lr['loaded']['offer_ms']['n']} probes)",
                              file=sys.stderr, flush=True)
        finally:
            if link is not None:
                await link.close()
        return {"runs": runs, "summary": summarize(runs) + unsupported,
                "dhcp_latency": {"runs": lat_runs, "summary": summarize_latency(lat_runs),
                                 "load_clients": a.dhcp_load_clients, "load_mode": "lockstep",
                                 "link": "veth sb0 (10.77.0.1, server) <-> sc0 (10.77.0.2, client netns)"}
                if a.dhcp_latency else None}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def inner(a: argparse.Namespace) -> int:
    """In the private namespace: loopback up, then the storm."""
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    if [ln.split(":")[1].strip() for ln in links.splitlines()] != ["lo"]:
        raise BenchSetupError("not in a private network namespace (expected only lo)")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    # glibc's AI_ADDRCONFIG ignores loopback addresses; tftpd-hpa resolves its -a with it.
    subprocess.run(["ip", "addr", "add", "10.255.255.1/32", "dev", "lo"], check=True)
    # SIGTERM unwinds like Ctrl-C: every run's finally stops its server and clients
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    info = machine()
    res = asyncio.run(storm(a))
    doc = {"started": started, "machine": info, "command": " ".join(sys.argv),
           "settings": {"servers": a.server_list, "clients": a.client_list, "modes": a.mode_list,
                        "repeats": a.repeats, "kernel_mb": a.kernel_mb, "initrd_mb": a.initrd_mb,
                        "spread_s": a.spread_s, "blksize": BLKSIZE, "quick": a.quick,
                        "dhcp_latency": a.dhcp_latency, "dhcp_probes": a.dhcp_probes,
                        "dhcp_load_clients": a.dhcp_load_clients}, **res}
    out = a.out or BENCH / "results" / f"storm-{started.replace(':', '')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(table(res["summary"]))
    lat = res["dhcp_latency"]
    if lat is not None:
        print(f"\nproxyDHCP latency (ms; medians over repeats), idle and under a TFTP storm of "
              f"{lat['load_clients']} lockstep clients:")
        print(latency_table(lat["summary"]))
    print(f"\nresults: {out}")
    bad = any(r["failures"] or r["sha256_mismatches"] for r in res["runs"])
    if lat is not None:
        bad = bad or any(r["storm_failures"] or r["storm_sha256_mismatches"] or not r["server_survived"]
                         or not r["idle"]["offer_ms"]["n"] or not r["loaded"]["offer_ms"]["n"]
                         for r in lat["runs"])
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    try:
        if os.environ.get(_INNER) == "1":
            return inner(a)
        for tool in ("atftp", "unshare", "ip", "taskset", *(("curl",) if HTTP in a.mode_list else ())):
            if not shutil.which(tool):
                raise BenchSetupError(f"missing tool: {tool}")
        if os.geteuid() != 0:
            raise BenchSetupError("needs root (a private network namespace, servers on port 69)")
        ensure_peers([s for s in ("tftpd-hpa", "atftpd") if s in a.server_list])
        env = {**os.environ, _INNER: "1", "PYTHONPATH": os.pathsep.join(
            [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
        return subprocess.run(["unshare", "--net", sys.executable, "-m", "bench.storm", *argv],
                              cwd=REPO, env=env).returncode
    except BenchSetupError as exc:
        print(f"bench.storm: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
