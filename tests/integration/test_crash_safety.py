"""Crash safety of the state sidusd writes, against the real daemon.

* kill -9 at random moments while ``hosts.add`` writes stream in over the
  control socket (the client library sidusctl uses): after every kill the
  inventory file parses, holds every acknowledged record (the write in flight
  may or may not have landed: old or new, never partial), and the daemon
  restarts; the figures are printed.
* disk full (a tiny tmpfs holds the inventory): sidusd keeps serving TFTP and
  status, refuses the write with a clear error (sidusctl exits 1 and says so),
  and the file on disk is byte-for-byte the old one; once space is back,
  writes work again.
* full-DHCP leases: the daemon in a network namespace, a client in another
  (requests built and replies parsed by scapy) taking leases for thousands of
  distinct MACs and renewing earlier ones; kill -9 at random moments.  After
  every kill the journal, read with the daemon's own loader, holds every ACKed
  lease with its address; every restart succeeds and offers sampled ACKed MACs
  the same address; at the end every ACKed MAC is asked again.
* the lease journal's compaction killed at random and the moment its temp file
  appears: the journal is always one whole version.
* generated files (NFS exports for kernel nfsd, ganesha EXPORT blocks, the
  iSCSI secrets file, sidus-image's images file) rewritten by the real writers
  in a child process that is killed at random: each file is always the
  previous or the new version.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import require_root, require_tool
from daemon_fixture import REPO, SidusDaemon
from hardening_util import tracebacks
from netns import NetNs

from sidusd import ctl
from sidusd.boot.inventory import parse_inventory
from sidusd.boot.leases import LeaseDB
from sidusd.fsutil import temp_files

MACS = [f"52:54:00:aa:{i // 256:02x}:{i % 256:02x}" for i in range(48)]
TARGET_WRITES = 2000
MAX_ROUNDS = 200


class Writer(threading.Thread):
    """Streams hosts.add until the daemon dies; remembers what was acknowledged."""

    def __init__(self, sock: str, seq0: int, acked: dict[str, str]):
        super().__init__(daemon=True)
        self.sock, self.seq, self.acked = sock, seq0, acked
        self.in_flight: tuple[str, str] | None = None
        self.writes = 0

    def run(self) -> None:
        while True:
            mac, name = MACS[self.seq % len(MACS)], f"h{self.seq}"
            self.in_flight = (mac, name)
            try:
                r = ctl.call(self.sock, "hosts.add", {"mac": mac, "profile": "default", "hostname": name},
                             timeout_s=10)
            except ctl.CtlError:
                return                                   # the daemon is gone
            assert r.ok, r.error
            self.acked[mac] = name
            self.in_flight = None
            self.writes += 1
            self.seq += 1


def check_inventory(path: Path, acked: dict[str, str], in_flight: tuple[str, str] | None) -> None:
    inv = parse_inventory(path.read_text(), str(path))         # must parse after every kill
    got = {mac: h.hostname for mac, h in inv.hosts.items()}
    for mac, name in acked.items():
        ok = got.get(mac) == name or (in_flight is not None and in_flight == (mac, got.get(mac)))
        assert ok, f"acknowledged {mac}={name} lost: file has {got.get(mac)}"
    for mac, name in got.items():                                 # nothing never sent
        assert mac in acked or (in_flight and in_flight[0] == mac), (mac, name)
    if in_flight is not None and got.get(in_flight[0]) == in_flight[1]:
        acked[in_flight[0]] = in_flight[1]     # landed before the kill: durable from now on


@pytest.mark.background          # loopback, a free port: no namespace, no fixed name
def test_kill_9_during_inventory_writes(tmp_path):
    d = SidusDaemon(tmp_path)
    inv_path = tmp_path / "inventory.yaml"
    rng = random.Random(8)
    acked: dict[str, str] = {}
    total, rounds, seq, mid_write_kills = 0, 0, 0, 0
    try:
        while total < TARGET_WRITES and rounds < MAX_ROUNDS:
            d.log_path = tmp_path / f"sidusd-{rounds}.log"     # start() waits for this run's ready
            d.start(timeout_s=60)                               # every restart must succeed
            assert not tracebacks(d.events())
            w = Writer(str(d.socket_path), seq, acked)
            w.start()
            # a random moment: after a random number of acknowledged writes (so the
            # count of writes does not depend on how loaded the machine is), then a
            # random fraction of a write's duration
            want, t_end = w.writes + rng.randint(1, 60), time.monotonic() + 10
            while w.writes < want and w.is_alive() and time.monotonic() < t_end:
                time.sleep(0.001)
            time.sleep(rng.uniform(0, 0.03))
            os.killpg(d.proc.pid, signal.SIGKILL)
            d.proc.wait(10)
            d._log.close()
            w.join(30)
            assert not w.is_alive()
            check_inventory(inv_path, acked, w.in_flight)
            mid_write_kills += w.in_flight is not None
            total, rounds, seq = total + w.writes, rounds + 1, w.seq + 1
        leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".sidus-tmp")]
        d.log_path = tmp_path / "sidusd-final.log"
        d.start(timeout_s=60)
        listed = {h["mac"]: h["hostname"] for h in d.ctl_json("hosts", "list")}
        assert listed == acked
        print(f"\ncrash safety: {total} acknowledged writes, {rounds} kill -9, {mid_write_kills} with a "
              f"write in flight, 0 lost, {len(leftovers)} temp files left by killed writes")
        assert total >= TARGET_WRITES, f"only {total} writes in {rounds} rounds"
        assert not tracebacks(d.events())
    finally:
        d.stop()
        if getattr(d, "_log", None):
            d._log.close()


@pytest.fixture
def tiny_fs(tmp_path):
    require_root()
    mnt = tmp_path / "state-fs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "sidus-test", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_keeps_serving_and_refuses_writes(tmp_path, tiny_fs):
    require_tool("mount")
    d = SidusDaemon(tmp_path)
    d.config["state_dir"] = str(tiny_fs)
    d.config["inventory_file"] = str(tiny_fs / "inventory.yaml")
    d.write_config(d.config)
    (tiny_fs / "inventory.yaml").write_text((tmp_path / "inventory.yaml").read_text())
    (tmp_path / "tftp" / "images" / "demo" / "vmlinuz").write_bytes(os.urandom(100_000))
    with d:
        d.ctl("hosts", "add", "52:54:00:00:00:01", "--profile", "default", "--hostname", "before")
        before = (tiny_fs / "inventory.yaml").read_bytes()
        filler = tiny_fs / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)   # fill the file system
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError:
            pass
        finally:
            os.close(fd)
        r = d.ctl("hosts", "add", "52:54:00:00:00:02", "--profile", "default", "--hostname", "after",
                  check=False)
        print(f"\ndisk full: sidusctl rc={r.returncode} stderr={r.stderr.strip()!r}")
        assert r.returncode == ctl.EXIT_ERROR
        assert "no space" in r.stderr.lower(), r.stderr
        assert (tiny_fs / "inventory.yaml").read_bytes() == before            # never truncated
        assert not [p for p in tiny_fs.iterdir() if p.name.endswith(".sidus-tmp")]
        assert len(d.tftp_get("images/demo/vmlinuz")) == 100_000               # keeps serving
        assert d.ctl_json("status")["counters"]
        filler.unlink()
        d.ctl("hosts", "add", "52:54:00:00:00:02", "--profile", "default", "--hostname", "after")
        hosts = {h["mac"]: h["hostname"] for h in d.ctl_json("hosts", "list")}
        assert hosts == {"52:54:00:00:00:01": "before", "52:54:00:00:00:02": "after"}
        assert d.proc.poll() is None
    assert not tracebacks(d.events())


# -- full-DHCP leases under kill -9 ---------------------------------------------------

LEASE_SERVER_IP = "10.78.0.1"
LEASE_NET = ipaddress.IPv4Network("10.78.0.0/20")
LEASE_RANGE = (ipaddress.IPv4Address("10.78.1.0"), ipaddress.IPv4Address("10.78.15.250"))
TARGET_LEASES = 3000
LEASE_MAX_ROUNDS = 150
COMPACT_EVERY = 150              # SIDUSD_LEASE_COMPACT_AFTER: compactions during the run


def lease_mac(i: int) -> str:
    return f"52:54:01:{i >> 16 & 0xff:02x}:{i >> 8 & 0xff:02x}:{i & 0xff:02x}"


class LeaseLab:
    """sidusd in full-DHCP mode in one namespace, the client socket in another."""

    def __init__(self, tmp: Path, server: NetNs, client: NetNs):
        from test_dhcp_netns import client_socket, socket_in_netns
        self.tmp, self.server = tmp, server
        self.state = tmp / "state"
        self.journal = self.state / "leases.jsonl"
        for d in ("state", "tftp", "images/demo"):
            (tmp / d).mkdir(parents=True, exist_ok=True)
        cfg = {"state_dir": str(self.state), "inventory_file": str(tmp / "inventory.yaml"),
               "log": {"format": "json", "level": "info"},
               "control": {"socket_path": str(tmp / "control.sock")},
               "dhcp": {"mode": "full", "interfaces": ["vs0"],
                        "pool": {"network": str(LEASE_NET), "range_start": str(LEASE_RANGE[0]),
                                 "range_end": str(LEASE_RANGE[1]), "lease_time_s": 86400,
                                 "lease_file": str(self.journal)}},
               "tftp": {"enabled": False, "root": str(tmp / "tftp")},
               "nfs": {"backend": "none"},
               "images": {"demo": {"root": str(tmp / "images" / "demo"),
                                   "kernel": "images/demo/vmlinuz", "initrd": "images/demo/initrd.img"}}}
        (tmp / "sidus.yaml").write_text(yaml.safe_dump(cfg))
        (tmp / "inventory.yaml").write_text(yaml.safe_dump(
            {"profiles": {"default": {"image": "demo", "overlay": "tmpfs", "append": ""}}, "hosts": []}))
        self.sock = socket_in_netns(client.name, client_socket)
        self.proc: subprocess.Popen | None = None
        self.log_path = tmp / "sidusd-0.log"
        self.runs = 0

    def start(self) -> None:
        self.runs += 1
        self.log_path = self.tmp / f"sidusd-{self.runs}.log"
        env = dict(os.environ, SIDUSD_LEASE_COMPACT_AFTER=str(COMPACT_EVERY))
        with open(self.log_path, "ab") as log:
            self.proc = self.server.popen([sys.executable, "-m", "sidusd", "--config",
                                           str(self.tmp / "sidus.yaml")], stdout=log,
                                          stderr=subprocess.STDOUT, cwd=REPO, env=env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"restart {self.runs} failed: rc={self.proc.returncode}\n"
                                     f"{self.log_path.read_text()[-3000:]}")
            if any(e.get("event") == "daemon.ready" for e in self.events()):
                return
            time.sleep(0.05)
        raise AssertionError(f"restart {self.runs} not ready:\n{self.log_path.read_text()[-3000:]}")

    def kill9(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill9()
        self.sock.close()

    def events(self) -> list[dict]:
        out = []
        if self.log_path.exists():
            for line in self.log_path.read_text().splitlines():
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

    def exchange(self, pkt: bytes, xid: int, wait_s: float):
        """Broadcast ``pkt``; the reply with ``xid`` (scapy BOOTP) or None."""
        from scapy.layers.dhcp import BOOTP
        self.sock.sendto(pkt, ("255.255.255.255", 67))
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                raw, _ = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            try:
                reply = BOOTP(raw)
            except Exception:
                continue
            if reply.op == 2 and reply.xid == xid:
                return reply
        return None

    def offer_for(self, mac: str, xid: int, wait_s: float = 1.0) -> str | None:
        from test_dhcp_netns import request
        r = self.exchange(request(mac, xid, "discover", None, None, uuid=None), xid, wait_s)
        return None if r is None else r.yiaddr

    def lease(self, mac: str, xid: int, wait_s: float = 1.0) -> tuple[str, str | None]:
        """DISCOVER then REQUEST: ("acked", ip), ("offered", ip) when the ACK never came,
        ("none", None) when not even the OFFER came."""
        from test_dhcp_netns import opts_of, request
        ip = self.offer_for(mac, xid, wait_s)
        if ip is None:
            return "none", None
        r = self.exchange(request(mac, xid + 1, "request", None, None, uuid=None,
                                  extra=[("server_id", LEASE_SERVER_IP), ("requested_addr", ip)]),
                          xid + 1, wait_s)
        if r is None:
            return "offered", ip
        assert opts_of(r)["message-type"] == 5 and r.yiaddr == ip, (mac, ip, r.summary())
        return "acked", ip


    def renew(self, mac: str, ip: str, xid: int, wait_s: float = 1.0) -> bool:
        """INIT-REBOOT REQUEST for ``ip`` (RFC 2131 §4.3.2): True if ACKed with that address."""
        from test_dhcp_netns import opts_of, request
        r = self.exchange(request(mac, xid, "request", None, None, uuid=None,
                                  extra=[("requested_addr", ip)]), xid, wait_s)
        if r is None:
            return False
        assert opts_of(r)["message-type"] == 5 and r.yiaddr == ip, (mac, ip, r.summary())
        return True


class LeaseClient(threading.Thread):
    """Takes leases for fresh MACs, and renews one of the earlier ones every third
    time (more journal lines than leases), until the daemon stops answering."""

    def __init__(self, lab: LeaseLab, first: int, acked: dict[str, str], rng: random.Random):
        super().__init__(daemon=True)
        self.lab, self.i, self.acked, self.rng = lab, first, acked, rng
        self.in_flight: str | None = None
        self.count = self.renewals = 0

    def run(self) -> None:
        while True:
            if self.acked and self.count % 3 == 2:
                mac = self.rng.choice(sorted(self.acked)[-500:])
                self.in_flight = mac
                if not self.lab.renew(mac, self.acked[mac], 0x40000000 + self.i * 4):
                    return
                self.renewals += 1
            mac = lease_mac(self.i)
            self.in_flight = mac
            status, ip = self.lab.lease(mac, (self.i * 4 + 4) & 0xFFFFFFFF)
            if status != "acked":
                return                               # the daemon is gone (mac stays in flight)
            self.acked[mac] = ip
            self.in_flight = None
            self.count += 1
            self.i += 1


def read_journal(path: Path) -> tuple[LeaseDB, int]:
    """The journal through the daemon's own loader (LeaseDB.replay), read only."""
    db = LeaseDB(LEASE_NET, *LEASE_RANGE)
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines() if path.exists() else []
    return db, db.replay(lines)


def check_leases(db: LeaseDB, acked: dict[str, str], sent: set[str]) -> None:
    for mac, ip in acked.items():
        lease = db.by_mac(mac)
        assert lease is not None, f"acknowledged lease of {mac} ({ip}) lost"
        assert lease.state == "bound" and str(lease.ip) == ip, (mac, ip, lease)
    for lease in db.leases():
        assert lease.mac in sent, f"a lease for {lease.mac}, which never asked"
    ips = [l.ip for l in db.leases()]
    assert len(ips) == len(set(ips))


def compaction_temps(state: Path) -> list[str]:
    return [p.name for p in temp_files(state / "leases.jsonl")]


@pytest.mark.netns
def test_kill_9_during_lease_writes(tmp_path):
    require_root()
    require_tool("ip")
    pytest.importorskip("scapy", reason="missing tool: scapy")
    rng = random.Random(67)
    acked: dict[str, str] = {}
    sent: set[str] = set()
    rounds = kills_in_compaction = torn_total = renewals = compactions = 0
    last_inode = None
    nxt = 0
    with NetNs("sidus-t-lks") as srv, NetNs("sidus-t-lkc") as cli:
        srv.run("ip", "link", "add", "vs0", "type", "veth", "peer", "name", "vc0", "netns", cli.name)
        srv.run("ip", "addr", "add", f"{LEASE_SERVER_IP}/20", "dev", "vs0")
        srv.run("ip", "link", "set", "vs0", "up")
        cli.run("ip", "addr", "add", "10.78.0.50/20", "dev", "vc0")
        cli.run("ip", "link", "set", "vc0", "up")
        lab = LeaseLab(tmp_path, srv, cli)
        lab.sock.settimeout(0.1)
        try:
            while len(acked) < TARGET_LEASES and rounds < LEASE_MAX_ROUNDS:
                lab.start()                                  # every restart must succeed
                loaded = [e for e in lab.events() if e.get("event") == "dhcp.leases.loaded"]
                assert loaded and loaded[-1]["leases"] >= len(acked), loaded
                # after a restart, ACKed clients get their address again
                for mac in rng.sample(sorted(acked), min(3, len(acked))):
                    assert lab.offer_for(mac, rng.getrandbits(31)) == acked[mac], mac
                client = LeaseClient(lab, nxt, acked, random.Random(rounds))
                client.start()
                # a random moment: after a random number of ACKs (independent of the
                # machine's load), then a random part of an exchange
                want, t_end = rng.randint(20, 300), time.monotonic() + 20
                while client.count < want and client.is_alive() and time.monotonic() < t_end:
                    time.sleep(0.002)
                time.sleep(rng.uniform(0, 0.02))
                lab.kill9()
                client.join(30)
                assert not client.is_alive()
                kills_in_compaction += bool(compaction_temps(lab.state))
                renewals += client.renewals
                inode = lab.journal.stat().st_ino
                compactions += inode != last_inode
                last_inode = inode
                sent.update(lease_mac(i) for i in range(nxt, client.i + 1))
                db, torn = read_journal(lab.journal)
                torn_total = torn
                check_leases(db, acked, sent)
                if client.in_flight is not None and db.by_mac(client.in_flight) is not None:
                    acked[client.in_flight] = str(db.by_mac(client.in_flight).ip)   # landed: durable
                nxt = client.i + 1
                rounds += 1
            lab.start()
            assert not compaction_temps(lab.state)           # temp files of killed compactions removed
            wrong = {mac: (ip, got) for mac, ip in acked.items()
                     if (got := lab.offer_for(mac, rng.getrandbits(31))) != ip}
            assert not wrong, f"{len(wrong)} ACKed MACs got another address: {list(wrong.items())[:5]}"
            logs = [json.loads(l) for f in sorted(tmp_path.glob("sidusd-*.log"))
                    for l in f.read_text().splitlines() if l.startswith("{")]
            print(f"\nlease crash safety: {len(acked)} acknowledged leases + {renewals} renewals, "
                  f"{rounds} kill -9 ({kills_in_compaction} during a compaction), {rounds + 1} restarts "
                  f"all ready, journal rewritten by compaction in {compactions} rounds, 0 lost, "
                  f"{torn_total} torn journal lines skipped at the end")
            assert len(acked) >= TARGET_LEASES, f"only {len(acked)} leases in {rounds} rounds"
            assert compactions >= 1                          # compaction ran under the kills
            assert not tracebacks(logs)
        finally:
            lab.stop()


# -- the lease journal's compaction, killed in the middle ------------------------------

COMPACTOR = r"""
import asyncio, ipaddress, sys
from sidusd.boot.leases import Lease, LeaseDB
from sidusd.net.leasestore import LeaseStore
net = ipaddress.IPv4Network("10.80.0.0/16")
first, last = ipaddress.IPv4Address("10.80.0.10"), ipaddress.IPv4Address("10.80.255.200")
def version(expires):
    db = LeaseDB(net, first, last)
    for i in range(int(sys.argv[2])):
        db.apply(Lease(first + i, "52:54:02:%02x:%02x:%02x" % (i >> 16 & 255, i >> 8 & 255, i & 255),
                       "bound", expires))
    return db
dbs = [version(1e10), version(2e10)]
store = LeaseStore(sys.argv[1], compact_after=1)
asyncio.run(store.load(LeaseDB(net, first, last)))
store.compact(dbs[0], now=0.0)
print("ready", store.stale_temps_removed, flush=True)
k = 1
while True:                      # the real compaction, back to back, A B A B ...
    store.compact(dbs[k % 2], now=0.0)
    k += 1
"""


def test_kill_9_during_lease_compaction(tmp_path):
    """LeaseStore.compact (temp + fsync + rename) killed at random moments and, every
    other time, the moment its temp file appears: the journal always replays to one
    whole version (all 20,000 leases of A, or all of B), and the temp file a killed
    compaction leaves is removed by the next load."""
    journal, n = tmp_path / "leases.jsonl", 20_000
    rng = random.Random(4)
    kills = mid = cleaned = 0
    versions: dict[float, int] = {}
    for _ in range(25):
        child = subprocess.Popen([sys.executable, "-c", COMPACTOR, str(journal), str(n)],
                                 stdout=subprocess.PIPE, text=True, cwd=REPO)
        try:
            ready = child.stdout.readline().split()
            assert ready[:1] == ["ready"], ready
            cleaned += int(ready[1])
            if kills % 2:
                time.sleep(rng.uniform(0.02, 0.6))
            else:                    # the moment a compaction has its temp file open
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline and not compaction_temps(tmp_path):
                    pass
        finally:
            child.kill()
            child.wait(10)
            child.stdout.close()
        kills += 1
        temps = compaction_temps(tmp_path)
        mid += bool(temps)
        db = LeaseDB(ipaddress.IPv4Network("10.80.0.0/16"), ipaddress.IPv4Address("10.80.0.10"),
                     ipaddress.IPv4Address("10.80.255.200"))
        bad = db.replay(journal.read_text().splitlines())
        expiries = {l.expires for l in db.leases()}
        assert bad == 0 and len(db) == n and len(expiries) == 1, (bad, len(db), expiries)
        version = expiries.pop()
        versions[version] = versions.get(version, 0) + 1
    print(f"\nlease compaction: {kills} kill -9, {mid} inside a compaction (temp file left), "
          f"{cleaned} stale temp files removed at the next load; journal versions seen {versions}")
    assert mid >= 1 and cleaned >= mid - 1          # the last kill's temp is not reloaded
    assert len(versions) == 2                          # both versions were seen whole


# -- generated files: old or new, never partial ------------------------------------

WRITER = r"""
import asyncio, ipaddress, os, sys
from pathlib import Path
from sidusd.storage.nfs import Export, KernelNfsBackend, render_ganesha_exports
from sidusd.storage.iscsi import SecretStore
from sidusd.storage.runner import RecordingRunner
from sidusd.fsutil import atomic_write
from sidusd.image.publish import write_images_file
d, k = Path(sys.argv[1]), int(sys.argv[2])
def images(k):
    return {f"img{i}": {"root": f"/srv/sidus/img{i}", "kernel": f"sidus-images/img{i}/gen-{k:04d}/vmlinuz",
                        "initrd": f"sidus-images/img{i}/gen-{k:04d}/initrd.img"} for i in range(k % 100 + 1)}
def exports(k):
    return [Export(i + 1, Path(f"/srv/sidus/img{i:04d}"), f"/srv/sidus/img{i:04d}",
                   (ipaddress.IPv4Network("10.0.0.0/8"),), (f"img{i}",)) for i in range(k % 150 + 1)]
macs = ["52:54:03:00:%02x:%02x" % (i >> 8, i & 255) for i in range(4000)]
async def main(k):
    kernel = KernelNfsBackend(RecordingRunner(), d / "sidus.exports")
    secrets = SecretStore(d / "secrets.json")
    progress = os.open(d / "progress", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    print("ready", flush=True)
    while True:                  # version k: noted first, then written (a killed version is redone)
        os.write(progress, b"%d\n" % k)
        os.fsync(progress)
        await kernel.apply(exports(k))                                   # real writer: exports(5)
        atomic_write(d / "ganesha.conf", render_ganesha_exports(exports(k)).encode())   # GaneshaBackend's call
        secrets.ensure(macs[:k])                                         # real writer: CHAP secrets
        write_images_file(d / "images.yaml", images(k))                  # real writer: sidus-image
        k += 1
asyncio.run(main(k))
"""


def test_kill_9_during_generated_file_writes(tmp_path):
    """The files sidus generates (kernel nfsd exports, ganesha EXPORT blocks, the
    iSCSI CHAP secrets, sidus-image's images file) are rewritten in a loop by the
    real writers in a child process killed at random: each file is always the
    version before or the version being written, never partial, never empty."""
    from sidusd.fsutil import remove_stale_temps
    from sidusd.storage.nfs import Export, render_ganesha_exports, render_kernel_exports
    macs = [f"52:54:03:00:{i >> 8:02x}:{i & 255:02x}" for i in range(4000)]

    def exports(k):
        return [Export(i + 1, Path(f"/srv/sidus/img{i:04d}"), f"/srv/sidus/img{i:04d}",
                       (ipaddress.IPv4Network("10.0.0.0/8"),), (f"img{i}",)) for i in range(k % 150 + 1)]

    from sidusd.image.publish import write_images_file

    def images_text(k):
        entries = {f"img{i}": {"root": f"/srv/sidus/img{i}", "kernel": f"sidus-images/img{i}/gen-{k:04d}/vmlinuz",
                               "initrd": f"sidus-images/img{i}/gen-{k:04d}/initrd.img"} for i in range(k % 100 + 1)}
        ref = tmp_path / "ref" / "images.yaml"
        write_images_file(ref, entries)
        return ref.read_text()

    rng = random.Random(5)
    k, kills, checked = 1, 0, 0
    for _ in range(40):
        child = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(k)],
                                 stdout=subprocess.PIPE, text=True, cwd=REPO)
        try:
            assert child.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.01, 0.4))
        finally:
            child.kill()
            child.wait(10)
            child.stdout.close()
        kills += 1
        done = [int(x) for x in (tmp_path / "progress").read_text().split() if x.isdigit()]
        if not done:
            continue
        k = done[-1]
        allowed = {k - 1, k} if k > 1 else {k}
        if (tmp_path / "sidus.exports").exists():
            text = (tmp_path / "sidus.exports").read_text()
            assert text in {render_kernel_exports(exports(j)) for j in allowed}, text[-300:]
            checked += 1
        if (tmp_path / "ganesha.conf").exists():
            text = (tmp_path / "ganesha.conf").read_text()
            assert text in {render_ganesha_exports(exports(j)) for j in allowed}, text[-300:]
        if (tmp_path / "secrets.json").exists():
            keys = set(json.loads((tmp_path / "secrets.json").read_text()))
            assert keys in [set(macs[:j]) for j in allowed], len(keys)
            assert (tmp_path / "secrets.json").stat().st_mode & 0o777 == 0o600
        if (tmp_path / "images.yaml").exists():
            text = (tmp_path / "images.yaml").read_text()
            assert text in {images_text(j) for j in allowed}, text[-300:]
    temps = [p.name for p in tmp_path.iterdir() if p.name.endswith(".sidus-tmp")]
    removed = sum(remove_stale_temps(tmp_path / f)
                  for f in ("sidus.exports", "ganesha.conf", "secrets.json", "images.yaml"))
    print(f"\ngenerated files: {kills} kill -9 over {k} rewrites of each file, every file old or new; "
          f"{len(temps)} temp files left by killed writes, {removed} removed by fsutil.remove_stale_temps")
    assert checked >= kills // 2 and kills // 2 < k < 4000
    assert removed == len(temps)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ganesha.conf", "images.yaml", "progress", "ref",
                                                         "secrets.json", "sidus.exports"]
