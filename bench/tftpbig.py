"""Lockstep TFTP throughput by block size: sidusd against dnsmasq, tftpd-hpa and atftpd, interleaved.

    sudo python3 -m bench.tftpbig                     # blksize 1468,8972,65464 x N 1,32,64,128, 3 rounds
    sudo python3 -m bench.tftpbig --link veth         # the same over a veth pair, MTU 9000, netns to netns
    sudo python3 -m bench.tftpbig --link tun          # over TUN + a relay adding 100 us per round trip
    sudo python3 -m bench.tftpbig --link tun --fragment   # sidusd grants blocks over the MTU too
    sudo python3 -m bench.tftpbig --quick             # tiny sizes: checks it runs, not how fast

All four servers run at once for the whole run, each on its own address
(127.0.0.1-4 on loopback; with ``--link veth`` 10.78.0.1-4 on the server end of a
veth pair whose other end is in a second network namespace, where the clients
run; with ``--link tun`` the same over two TUN devices joined by a relay that
adds ``--rtt-us`` (100) to every round trip: bench/tftplink.py), all on port 69,
inside a private network namespace (``unshare --net``).
One *case* is (block size, N): N atftp clients (C, lockstep: one block in flight,
``--option "blksize B"``) fetch the same file at once from one server; the
cases run in rotation (round -> block size -> N -> server), so a noisy machine
hurts every server alike and each ratio sidusd/peer comes from the same
minute.  The servers' order turns by one at each (block size, N) (:func:`case_order`),
with a ``SETTLE_S`` pause before each case.  In a fixed order with no pause, sidusd's N = 1
case always began the moment atftpd's N = 32 case ended, and measured 0.76-0.80x at 65464
over the tun link where its turn in the rotation gives 1.11-1.22x (session 13, the same
code; the C servers' figures did not move).  Client 0's bytes go to a file on tmpfs,
hashed (sha256) after the case, the others to /dev/null (their exit status is checked).
Per case: aggregate MB/s (N x file size / time until the last client ended) and the
server's CPU seconds per GB (cgroup cpuacct of the server and its children: tftpd-hpa forks
per transfer).
Printed: per (block size, N) the median MB/s and CPU/GB of each server over the
rounds, and sidusd's ratios to the best C server (per round, then median);
``uptime`` before and after each round; JSON in bench/results/.

The file is ``--file-mb`` (50) MB for N = 1 and ``--total-mb`` / N (at least
4 MB) for larger N, so that every case moves a few hundred MB.  This kernel has
no netem qdisc (CONFIG_NET_SCH_NETEM unset), so the veth case has no added
per-packet delay: it models a jumbo-frame LAN's MTU; the tun case models its
turnaround too (the round trip of a UDP echo through it is printed and kept in the JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .measure import CpuMeter
from .peers import BENCH, REPO, SERVERS, BenchSetupError, ensure_peers, pushers_keys, server_spec, stop_server
from .tftplink import ECHO_PROBES, LINKS, Link, addresses

MB = 1_000_000
_INNER = "SIDUS_TFTPBIG_IN_NETNS"
CLIENT_NS = "sidus-tftpbig-cl"        # + the outer pid: the clients' namespace (veth, tun)
FILE = "big"                          # + .<size>: the file a case fetches
SETTLE_S = 0.3                        # the pause before each case


def case_order(servers: list[str], k: int) -> list[str]:
    """The servers' order in the run's ``k``-th (block size, N): turned by ``k``, so each
    server comes first (after another server's case) as often as the others."""
    i = k % len(servers)
    return servers[i:] + servers[:i]


def client_argv(host: str, name: str, blksize: int, out: str, ns: str | None) -> list[str]:
    argv = ["atftp", "--option", f"blksize {blksize}", "--tftp-timeout", "2", "-g", "-r", name,
            "-l", out, host, "69"]
    return ["ip", "netns", "exec", ns, *argv] if ns else argv


async def one_client(host: str, name: str, blksize: int, out: str,
                     ns: str | None) -> int:
    """The client's exit status; it writes what it got to ``out``.

    Client 0 writes to a file on tmpfs, hashed after the case: through a pipe, the bench's
    own event loop woke for every block and stood between the client's writes, one more
    process in each lockstep turn (a third of the CPU at N = 1 in perf).
    """
    proc = await asyncio.create_subprocess_exec(
        *client_argv(host, name, blksize, out, ns),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    return await proc.wait()


def sha256_of(path: Path) -> str | None:
    try:
        with path.open("rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return None


async def one_case(server: str, host: str, meter: CpuMeter, pid: int, blksize: int, n: int,
                   size: int, expect: str, ns: str | None, timeout_s: float) -> dict[str, Any]:
    hashed = Path(tempfile.mkdtemp(prefix="sidus-tftpbig-", dir="/dev/shm")) / "client0"
    cpu0 = meter.seconds(pid)
    t0 = time.monotonic()
    tasks = [asyncio.create_task(one_client(host, f"{FILE}.{size}", blksize,
                                            str(hashed) if i == 0 else "/dev/null", ns))
             for i in range(n)]
    done, pending = await asyncio.wait(tasks, timeout=timeout_s)
    wall = time.monotonic() - t0
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    await asyncio.sleep(0.05)
    cpu = meter.seconds(pid) - cpu0
    ok = sum(1 for t in done if t.result() == 0)
    digest = sha256_of(hashed)
    shutil.rmtree(hashed.parent, ignore_errors=True)
    total = n * size
    return {"server": server, "blksize": blksize, "clients": n, "file_bytes": size,
            "wall_s": round(wall, 4), "mb_s": round(total / MB / wall, 1),
            "cpu_s": round(cpu, 3), "cpu_s_per_gb": round(cpu / (total / 1e9), 3),
            "failures": n - ok, "sha256_ok": digest == expect}


async def wait_serving(host: str, ns: str | None, proc: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchSetupError(f"server on {host} exited with {proc.returncode}")
        p = await asyncio.create_subprocess_exec(
            *client_argv(host, "probe.bin", 1468, "/dev/null", ns), stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        if await p.wait() == 0:
            return
        await asyncio.sleep(0.3)
    raise BenchSetupError(f"server on {host} not serving after {timeout_s}s")


def summarize(runs: list[dict[str, Any]], servers: list[str]) -> list[dict[str, Any]]:
    """Per (blksize, N): each server's median MB/s and CPU/GB, sidusd's ratios round by round."""
    out = []
    for (bs, n) in sorted({(r["blksize"], r["clients"]) for r in runs}):
        rs = [r for r in runs if r["blksize"] == bs and r["clients"] == n]
        row: dict[str, Any] = {"blksize": bs, "clients": n}
        for s in servers:
            mine = [r for r in rs if r["server"] == s]
            row[s] = {"mb_s": statistics.median(r["mb_s"] for r in mine),
                      "cpu_s_per_gb": statistics.median(r["cpu_s_per_gb"] for r in mine),
                      "failures": sum(r["failures"] for r in mine),
                      "sha_bad": sum(1 for r in mine if not r["sha256_ok"])}
        peers = [s for s in servers if s != "sidusd"]
        if "sidusd" in servers and peers:
            vs_best, cpu_vs_dnsmasq = [], []
            for rd in sorted({r["round"] for r in rs}):
                by = {r["server"]: r for r in rs if r["round"] == rd}
                if "sidusd" not in by or not all(p in by for p in peers):
                    continue
                vs_best.append(by["sidusd"]["mb_s"] / max(by[p]["mb_s"] for p in peers))
                if "dnsmasq" in by and by["dnsmasq"]["cpu_s_per_gb"] > 0:
                    cpu_vs_dnsmasq.append(by["sidusd"]["cpu_s_per_gb"] / by["dnsmasq"]["cpu_s_per_gb"])
            row["vs_best_c"] = [round(x, 2) for x in vs_best]
            row["cpu_vs_dnsmasq"] = [round(x, 2) for x in cpu_vs_dnsmasq]
        out.append(row)
    return out


def print_table(summary: list[dict[str, Any]], servers: list[str]) -> None:
    head = f"{'blksize':>7} {'N':>4} " + " ".join(f"{s + ' MB/s':>15} {'CPU s/GB':>8}" for s in servers)
    print(head + "  sidusd/best-C (rounds)     sidusd/dnsmasq CPU")
    for row in summary:
        cells = " ".join(f"{row[s]['mb_s']:>15.0f} {row[s]['cpu_s_per_gb']:>8.2f}" for s in servers)
        ratios = row.get("vs_best_c", [])
        cpu = row.get("cpu_vs_dnsmasq", [])
        med = lambda xs: f"{statistics.median(xs):.2f}" if xs else "-"     # noqa: E731
        print(f"{row['blksize']:>7} {row['clients']:>4} {cells}  {med(ratios):>5} {ratios!s:<20} "
              f"{med(cpu):>5} {cpu}")


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


async def inner(a: argparse.Namespace) -> int:
    servers = [s for s in a.servers.split(",") if s]
    blksizes = [int(x) for x in a.blksizes.split(",")]
    clients = [int(x) for x in a.clients.split(",")]
    ns = f"{CLIENT_NS}-{os.getppid()}" if a.link != "lo" else None
    link: Link | None = None
    work = Path(tempfile.mkdtemp(prefix="sidus-tftpbig-"))
    procs: list[tuple[subprocess.Popen, CpuMeter]] = []
    runs: list[dict[str, Any]] = []
    loads: list[str] = []
    try:
        link = Link(a.link, ns or "", a.rtt_us)
        root = work / "root"
        root.mkdir()
        root.chmod(0o755)
        sizes = {n: int((a.file_mb if n == 1 else max(4.0, a.total_mb / n)) * MB) for n in clients}
        blobs = {}
        for size in sorted(set(sizes.values())):
            data = os.urandom(size)
            (root / f"{FILE}.{size}").write_bytes(data)
            blobs[size] = hashlib.sha256(data).hexdigest()
        (root / "probe.bin").write_bytes(b"x" * 1000)
        for p in root.iterdir():
            p.chmod(0o644)
        hosts = dict(zip(SERVERS, addresses(a.link), strict=True))
        started: dict[str, tuple[subprocess.Popen, CpuMeter]] = {}
        for s in servers:
            spec = server_spec(s, root, work / s, max_transfers=max(256, 2 * max(clients)),
                               address=hosts[s], sidusd_tftp=sidusd_tftp(a))
            meter = CpuMeter(f"big-{s}")
            log = open(spec.workdir / "server.log", "ab")
            proc = subprocess.Popen(spec.argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    preexec_fn=meter.preexec)
            started[s] = (proc, meter)
            procs.append((proc, meter))
        for s, (proc, _m) in started.items():
            await wait_serving(hosts[s], ns, proc)
        rtt = link.echo_rtt(hosts[servers[0]])
        if rtt is not None:
            loads.append(f"echo rtt clients -> {hosts[servers[0]]}: {rtt:.3f} ms (median of {ECHO_PROBES})")
            print(loads[-1], flush=True)
        for rd in range(a.rounds):
            loads.append(f"round {rd} start: {uptime()}")
            print(loads[-1], flush=True)
            for c, (bs, n) in enumerate((bs, n) for bs in blksizes for n in clients):
                size = sizes[n]
                for s in case_order(servers, rd * len(blksizes) * len(clients) + c):
                    await asyncio.sleep(SETTLE_S)
                    proc, meter = started[s]
                    r = await one_case(s, hosts[s], meter, proc.pid, bs, n, size, blobs[size], ns,
                                       a.timeout)
                    r["round"] = rd
                    runs.append(r)
                    print(json.dumps(r), flush=True)
        loads.append(f"end: {uptime()}")
        print(loads[-1])
    finally:
        for proc, meter in procs:
            stop_server(proc)
            meter.close()
        if link is not None:
            relay = link.close()
            if relay:
                loads.append(relay)
                print(relay)
        shutil.rmtree(work, ignore_errors=True)
    summary = summarize(runs, servers)
    print_table(summary, servers)
    out = BENCH / "results"
    out.mkdir(exist_ok=True)
    path = out / f"tftpbig-{a.link}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"args": vars(a), "machine": platform.platform(), "cpus": os.cpu_count(),
                                "loads": loads, "summary": summary, "runs": runs}, indent=1))
    print(f"results: {path}")
    return 1 if any(r["failures"] or not r["sha256_ok"] for r in runs) else 0


def sidusd_tftp(a: argparse.Namespace) -> dict:
    """The keys of sidusd's ``tftp:`` section the options set (``--fragment``, ``--pushers``)."""
    return {"fragment": a.fragment, **(pushers_keys(a.pushers) or {})}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python3 -m bench.tftpbig", description=__doc__.split("\n")[0])
    p.add_argument("--servers", default=",".join(SERVERS))
    p.add_argument("--blksizes", default="1468,8972,65464")
    p.add_argument("--clients", default="1,32,64,128")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--file-mb", type=float, default=50.0, help="file size for N = 1 (MB)")
    p.add_argument("--total-mb", type=float, default=512.0, help="bytes per case for N > 1 (MB)")
    p.add_argument("--link", choices=LINKS, default="lo")
    p.add_argument("--rtt-us", type=int, default=100,
                   help="with --link tun: the round trip the relay adds (half each way)")
    p.add_argument("--fragment", action="store_true",
                   help="sidusd with tftp.fragment: true (blocks over the link's MTU, as the C "
                        "servers send them); the default caps blksize at the MTU less 32")
    p.add_argument("--pushers", default=None,
                   help="sidusd's tftp.pushers (auto or 0..16; default: sidusd's default, auto)")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--quick", action="store_true", help="1 round, 1 MB files, N 1,4")
    a = p.parse_args(argv)
    if a.quick:
        a.rounds, a.file_mb, a.total_mb, a.clients = 1, 1.0, 4.0, "1,4"
    return a


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    try:
        if os.environ.get(_INNER) == "1":
            return asyncio.run(inner(a))
        for tool in ("atftp", "unshare", "ip", "uptime"):
            if not shutil.which(tool):
                raise BenchSetupError(f"missing tool: {tool}")
        if os.geteuid() != 0:
            raise BenchSetupError("needs root (network namespaces, servers on port 69)")
        ensure_peers([s for s in ("tftpd-hpa", "atftpd") if s in a.servers.split(",")])
        env = {**os.environ, _INNER: "1", "PYTHONPATH": os.pathsep.join(
            [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
        return subprocess.run(["unshare", "--net", sys.executable, "-m", "bench.tftpbig", *argv],
                              cwd=REPO, env=env).returncode
    except BenchSetupError as exc:
        print(f"bench.tftpbig: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
