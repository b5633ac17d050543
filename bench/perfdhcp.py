"""Full-DHCP load test with ISC's perfdhcp (Debian ``kea-admin``): sidusd vs dnsmasq, one run.

    python3 -m bench.perfdhcp [--seconds 10] [--rate 1000] [--clients 20000] [--rounds 3] [--base TREE]

Self-contained (root): it makes two network namespaces joined by a veth pair
(server ``pd-s0`` 10.78.0.1/16, client ``pd-c0`` 10.78.0.2/16), starts each
server in turn in the server namespace with a fresh lease file and a pool of
10.78.1.0 - 10.78.250.255, runs ``perfdhcp -4`` in the client namespace
(DISCOVER-OFFER-REQUEST-ACK from ``--clients`` distinct MACs at ``--rate``
exchanges/s; perfdhcp acts as a relay agent, giaddr 10.78.0.2), and removes
everything at the end.  Servers, interleaved ``--rounds`` times:

* ``sidusd`` (``security.privsep: false``: the lease journal is written by the
  process that decides, group commit: one fsync per loop turn, before its ACKs),
* ``sidusd-privsep`` (the default: the worker asks the root supervisor, which
  fsyncs every lease before answering),
* ``dnsmasq`` (``--dhcp-authoritative``, its own lease file).

Per-lease log lines are off on all three (sidusd ``log.level: warning``,
dnsmasq ``--quiet-dhcp``), and dnsmasq does not ping an address before
offering it (``--no-ping``: sidusd does not either; with the ping dnsmasq
waits up to 3 s per new address).  Reported per run: ACKs received per second
(leases/s), the share of exchanges completed, and p50/p99 of the whole DORA
(DISCOVER sent to ACK received, from perfdhcp's ``-x t`` timers).  One JSON
object per run on stdout, then a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SERVER_IF, CLIENT_IF = "pd-s0", "pd-c0"
SERVER_IP, CLIENT_IP = "10.78.0.1", "10.78.0.2"
POOL = ("10.78.0.0/16", "10.78.1.0", "10.78.250.255")


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), check=check, capture_output=True, text=True, timeout=60)


class Namespaces:
    """Server and client namespaces with the veth between them (removed on exit)."""

    def __init__(self, tag: str = ""):
        tag = tag or str(os.getpid())
        self.server, self.client = f"sidus-pds-{tag}", f"sidus-pdc-{tag}"

    def __enter__(self) -> Namespaces:
        for ns in (self.server, self.client):
            _run("ip", "netns", "add", ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        _run("ip", "-n", self.server, "link", "add", SERVER_IF, "type", "veth", "peer", "name", CLIENT_IF,
             "netns", self.client)
        for ns, dev, ip in ((self.server, SERVER_IF, SERVER_IP), (self.client, CLIENT_IF, CLIENT_IP)):
            _run("ip", "-n", ns, "addr", "add", f"{ip}/16", "dev", dev)
            _run("ip", "-n", ns, "link", "set", dev, "up")
        return self

    def __exit__(self, *exc: Any) -> None:
        for ns in (self.server, self.client):
            _run("ip", "netns", "del", ns, check=False)


def sidusd_config(work: Path, privsep: bool) -> Path:
    """A full-mode sidusd.yaml under ``work`` (fresh lease file)."""
    import yaml
    for d in ("state", "tftp", "images/demo"):
        (work / d).mkdir(parents=True, exist_ok=True)
    lease_file = work / "state" / "leases.jsonl"
    lease_file.unlink(missing_ok=True)
    cfg = {"state_dir": str(work / "state"), "inventory_file": str(work / "inventory.yaml"),
           "log": {"format": "json", "level": "warning"},
           "control": {"socket_path": str(work / "control.sock")},
           "security": {"privsep": privsep},
           "dhcp": {"mode": "full", "interfaces": [SERVER_IF],
                    "pool": {"network": POOL[0], "range_start": POOL[1], "range_end": POOL[2],
                             "router": SERVER_IP, "lease_time_s": 3600, "lease_file": str(lease_file)}},
           "tftp": {"enabled": False, "root": str(work / "tftp")},
           "http": {"enabled": False}, "nfs": {"backend": "none"},
           "images": {"demo": {"root": str(work / "images" / "demo"),
                               "kernel": "images/demo/vmlinuz", "initrd": "images/demo/initrd.img"}}}
    (work / "inventory.yaml").write_text(yaml.safe_dump({"profiles": {"default": {"image": "demo"}},
                                                         "hosts": []}))
    path = work / "sidus.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def start_server(name: str, ns: Namespaces, work: Path, base: Path | None = None) -> subprocess.Popen:
    """Start ``name`` in the server namespace; returns once it answers (or raises).

    ``base-sidusd*``: the sidusd of the source tree ``base`` (``--base``: before / after)."""
    log = open(work / f"{name}.log", "ab")
    tree = REPO
    if name.startswith("base-"):
        assert base is not None
        tree, name = base, name[len("base-"):]
    if name.startswith("sidusd"):
        cfg = sidusd_config(work, privsep=name == "sidusd-privsep")
        argv = [sys.executable, "-m", "sidusd", "--config", str(cfg)]
    else:
        leases = work / "dnsmasq.leases"
        leases.unlink(missing_ok=True)
        argv = [shutil.which("dnsmasq") or "dnsmasq", "--keep-in-foreground", "--no-daemon",
                "--conf-file=/dev/null", "--port=0", f"--interface={SERVER_IF}", "--bind-interfaces",
                f"--dhcp-range={POOL[1]},{POOL[2]},255.255.0.0,1h", "--dhcp-authoritative",
                f"--dhcp-leasefile={leases}", f"--dhcp-lease-max={1 << 20}", "--quiet-dhcp", "--no-ping",
                f"--pid-file={work / 'dnsmasq.pid'}", "--user=root"]
    proc = subprocess.Popen(["ip", "netns", "exec", ns.server, *argv], stdout=log, stderr=subprocess.STDOUT,
                            cwd=tree, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(tree)})
    log.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited {proc.returncode}: {(work / f'{name}.log').read_text()[-2000:]}")
        probe = perfdhcp(ns, rate=10, clients=1, seconds=1, base_mac="02:00:00:00:00:00")
        if probe["acks"] > 0:
            return proc
    stop_server(proc)
    raise RuntimeError(f"{name} does not answer perfdhcp")


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (started by us), SIGKILL if it lingers."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _section(out: str, title: str) -> str:
    m = re.search(r"\*\*\*" + re.escape(title) + r"\*\*\*\n(.*?)(?=\n\*\*\*|\Z)", out, re.S)
    return m.group(1) if m else ""


def _count(section: str, name: str) -> int:
    m = re.search(r"^" + re.escape(name) + r":\s*(\d+)", section, re.M)
    return int(m.group(1)) if m else 0


def _delays(section: str) -> list[float]:
    """Seconds from send to receive of each successful exchange (``-x t`` timestamps)."""
    return sorted(float(r) - float(s) for s, r in
                  re.findall(r"sent / received: (\d+\.\d+) / (\d+\.\d+)", section))


def _pct(values: list[float], p: float) -> float | None:
    return round(values[min(len(values) - 1, int(p * len(values)))] * 1000, 2) if values else None


def parse(out: str, seconds: float) -> dict[str, Any]:
    """Counts and latencies from perfdhcp's report (``-x t`` for the per-exchange timers).

    perfdhcp times the two legs (DISCOVER-OFFER, REQUEST-ACK) separately and does
    not pair them per client; the DORA figure is the sum of the legs' percentiles
    (an upper bound of the DORA percentile: perfdhcp sends the REQUEST as soon as
    the OFFER is in)."""
    do, ra = _section(out, "Statistics for: DISCOVER-OFFER"), _section(out, "Statistics for: REQUEST-ACK")
    do_t = _delays(_section(out, "Timestamps for packets: DISCOVER-OFFER"))
    ra_t = _delays(_section(out, "Timestamps for packets: REQUEST-ACK"))
    sent, acks = _count(do, "sent packets"), _count(ra, "received packets")
    got: dict[str, Any] = {"discovers": sent, "offers": _count(do, "received packets"), "acks": acks,
                           "leases_per_s": round(acks / seconds, 1),
                           "completed": round(acks / sent, 3) if sent else 0.0,
                           "non_unique": _count(do, "non unique addresses") + _count(ra, "non unique addresses"),
                           "rejected": _count(do, "rejected leases") + _count(ra, "rejected leases")}
    for leg, t in (("offer", do_t), ("ack", ra_t)):
        got[f"{leg}_p50_ms"], got[f"{leg}_p99_ms"] = _pct(t, 0.50), _pct(t, 0.99)
    if do_t and ra_t:
        got["dora_p99_ms"] = round(got["offer_p99_ms"] + got["ack_p99_ms"], 2)
    return got


def perfdhcp(ns: Namespaces, rate: int, clients: int, seconds: float, base_mac: str = "02:11:00:00:00:00",
             timers: bool = False) -> dict[str, Any]:
    """Run perfdhcp in the client namespace against the server; parsed report."""
    argv = ["ip", "netns", "exec", ns.client, "perfdhcp", "-4", "-l", CLIENT_IF, "-r", str(rate),
            "-R", str(clients), "-p", str(int(seconds)), "-b", f"mac={base_mac}", "-W", "1000000"]
    if timers:
        argv += ["-x", "t"]       # the timestamps of every successful exchange
    r = subprocess.run([*argv, SERVER_IP], capture_output=True, text=True, timeout=seconds + 60)
    out = r.stdout + r.stderr
    got = parse(out, seconds)
    got["rc"] = r.returncode
    return got


SERVERS = ("sidusd", "sidusd-privsep", "dnsmasq")


def bench(servers: tuple[str, ...], rate: int, clients: int, seconds: float, rounds: int,
          base: Path | None = None) -> list[dict]:
    """Every server ``rounds`` times, interleaved, each with a fresh lease file; one dict per run."""
    if os.geteuid() != 0:
        raise SystemExit("bench.perfdhcp: run as root (network namespaces)")
    for tool in ("perfdhcp", "ip", *(["dnsmasq"] if "dnsmasq" in servers else [])):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench.perfdhcp: missing tool {tool} (apt-get install kea-admin dnsmasq-base)")
    results = []
    with Namespaces() as ns, tempfile.TemporaryDirectory(prefix="sidus-perfdhcp-") as tmp:
        for r in range(rounds):
            for i, name in enumerate(servers):
                work = Path(tmp) / name
                work.mkdir(exist_ok=True)
                proc = start_server(name, ns, work, base)
                try:
                    load = os.getloadavg()[0]
                    got = perfdhcp(ns, rate, clients, seconds, base_mac=f"02:{0x20 + r:02x}:{i:02x}:00:00:00",
                                   timers=True)
                finally:
                    stop_server(proc)
                got.update(server=name, round=r + 1, rate=rate, clients=clients, seconds=seconds,
                           load1=round(load, 2))
                print(json.dumps(got), flush=True)
                results.append(got)
    return results


def table(results: list[dict]) -> str:
    """Markdown: per server, the median run of leases/s (and its latencies)."""
    rows = ["| server | leases/s (median of runs) | completed | OFFER p50 / p99 ms | ACK p50 / p99 ms "
            "| DORA p99 ms (sum of legs) | non-unique |", "|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["server"] for r in results):
        runs = sorted((r for r in results if r["server"] == name), key=lambda r: r["leases_per_s"])
        m = runs[len(runs) // 2]
        rows.append(f"| {name} | {m['leases_per_s']} ({', '.join(str(r['leases_per_s']) for r in runs)}) "
                    f"| {m['completed']:.0%} | {m.get('offer_p50_ms')} / {m.get('offer_p99_ms')} "
                    f"| {m.get('ack_p50_ms')} / {m.get('ack_p99_ms')} | {m.get('dora_p99_ms')} "
                    f"| {sum(r['non_unique'] for r in runs)} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m bench.perfdhcp", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="perfdhcp test period per run (-p)")
    ap.add_argument("--rate", type=int, default=1000, help="DORA exchanges started per second (-r)")
    ap.add_argument("--clients", type=int, default=20000, help="distinct MACs (-R)")
    ap.add_argument("--rounds", type=int, default=3, help="runs per server, interleaved")
    ap.add_argument("--servers", default=",".join(SERVERS), help=f"comma list of {', '.join(SERVERS)}")
    ap.add_argument("--base", type=Path, help="a sidus source tree (e.g. `git archive` of an older commit, "
                    "with its C module built): its sidusd and sidusd-privsep run too, as base-sidusd*")
    a = ap.parse_args(argv)
    servers = tuple(s for s in a.servers.split(",") if s)
    unknown = [s for s in servers if s not in SERVERS]
    if a.base is not None:
        servers += tuple(f"base-{s}" for s in servers if s.startswith("sidusd"))
    if unknown:
        ap.error(f"unknown server {unknown[0]!r}: choose among {', '.join(SERVERS)}")
    results = bench(servers, a.rate, a.clients, a.seconds, a.rounds, a.base)
    print(f"\nperfdhcp -r {a.rate} -R {a.clients} -p {a.seconds:g}, {a.rounds} rounds, "
          f"{os.cpu_count()} CPUs, load average at start of runs: "
          f"{', '.join(str(r['load1']) for r in results)}\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
