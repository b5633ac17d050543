"""Full DHCP across servers: Kea HA (hot-standby) gives the leases, two proxy-mode sidusd the boot file.

docs/scale.md "Full DHCP across servers".  One segment: a bridge in the client's namespace, and
four namespaces on it, each with its own veth: kea1 (HA primary), kea2 (HA standby), sidusd A and
sidusd B (``dhcp.mode: proxy``).  Debian's kea-dhcp4 is started by the test with a generated
kea-dhcp4.conf (libdhcp_lease_cmds + libdhcp_ha, hot-standby, the HA peers talking over the
dhcp4 process's own HTTP listener) and stopped by PID.  The PXE client is scripted (scapy-built
packets on a UDP socket in the client namespace): DISCOVER, then the site's OFFER (an address)
and proxy OFFERs (a boot file) are told apart, REQUEST to Kea, REQUEST to a proxy on port 4011.

The second test: two Kea without HA on one PostgreSQL lease database (a private postgres on a
unix socket, Kea's own schema), next to a proxy-mode sidusd.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from conftest import require_root, require_tool
from netns import NetNs, socket_in_netns

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parents[2]
HOOKS = Path("/usr/lib/x86_64-linux-gnu/kea/hooks")
NET = "10.78.0"
CLIENT_IP = f"{NET}.250"            # the scripted client's own address on the bridge (outside the pool)
KEA = {"kea1": f"{NET}.11", "kea2": f"{NET}.12"}
SIDUS = {"sa": f"{NET}.21", "sb": f"{NET}.22"}
POOL = (f"{NET}.100", f"{NET}.150")
HA_PORT = 8001


def kea_db_config(name: str, tmp: Path, pg_socket_dir: str) -> dict:
    """Kea without HA on a shared PostgreSQL lease database (the other supported set-up)."""
    cfg = kea_config(name, tmp)
    d = cfg["Dhcp4"]
    del d["hooks-libraries"], d["multi-threading"]
    d["lease-database"] = {"type": "postgresql", "name": "kea", "user": "postgres", "host": pg_socket_dir}
    return cfg


def kea_config(name: str, tmp: Path) -> dict:
    peers = [{"name": "kea1", "url": f"http://{KEA['kea1']}:{HA_PORT}/", "role": "primary", "auto-failover": True},
             {"name": "kea2", "url": f"http://{KEA['kea2']}:{HA_PORT}/", "role": "standby", "auto-failover": True}]
    return {"Dhcp4": {
        "interfaces-config": {"interfaces": ["e0"], "dhcp-socket-type": "raw"},
        "lease-database": {"type": "memfile", "persist": True, "name": str(tmp / f"{name}-leases.csv"),
                           "lfc-interval": 0},
        "valid-lifetime": 600, "renew-timer": 300, "rebind-timer": 500,
        "multi-threading": {"enable-multi-threading": True, "thread-pool-size": 2, "packet-queue-size": 16},
        "hooks-libraries": [
            {"library": str(HOOKS / "libdhcp_lease_cmds.so")},
            {"library": str(HOOKS / "libdhcp_ha.so"), "parameters": {"high-availability": [{
                "this-server-name": name, "mode": "hot-standby",
                "heartbeat-delay": 1000, "max-response-delay": 3000, "max-ack-delay": 1000,
                "max-unacked-clients": 0, "sync-timeout": 10000,
                "multi-threading": {"enable-multi-threading": True, "http-dedicated-listener": True,
                                    "http-listener-threads": 1, "http-client-threads": 1},
                "peers": peers}]}}],
        "subnet4": [{"id": 1, "subnet": f"{NET}.0/24", "pools": [{"pool": f"{POOL[0]} - {POOL[1]}"}],
                     "option-data": [{"name": "routers", "data": f"{NET}.1"}]}],
        "loggers": [{"name": "kea-dhcp4", "severity": "INFO",
                     "output_options": [{"output": str(tmp / f"{name}.log")}]}],
    }}


def sidus_config(name: str, tmp: Path) -> Path:
    d = tmp / name
    for sub in ("state", "tftp", "images/demo"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    cfg = {"state_dir": str(d / "state"), "inventory_file": str(d / "inventory.yaml"),
           "log": {"format": "json", "level": "info"}, "control": {"socket_path": str(d / "control.sock")},
           "dhcp": {"mode": "proxy", "interfaces": ["e0"]},
           "tftp": {"enabled": False, "root": str(d / "tftp")}, "nfs": {"backend": "none"},
           "images": {"demo": {"root": str(d / "images" / "demo"), "kernel": "images/demo/vmlinuz",
                               "initrd": "images/demo/initrd.img"}}}
    (d / "inventory.yaml").write_text(yaml.safe_dump(
        {"profiles": {"default": {"image": "demo", "overlay": "tmpfs", "append": ""}}, "hosts": []}))
    (d / "sidus.yaml").write_text(yaml.safe_dump(cfg))
    return d


@dataclass
class Segment:
    tmp: Path
    client: NetNs
    nodes: dict[str, NetNs] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def attach(self, name: str, ip: str) -> NetNs:
        ns = NetNs(f"sidus-t-kea{name}").__enter__()
        self.nodes[name] = ns
        port = f"p{name}"
        self.client.run("ip", "link", "add", port, "type", "veth", "peer", "name", "e0", "netns", ns.name)
        self.client.run("ip", "link", "set", port, "master", "br0", "up")
        ns.run("ip", "addr", "add", f"{ip}/24", "dev", "e0")
        ns.run("ip", "link", "set", "e0", "up")
        return ns

    def start_kea(self, name: str, cfg: dict | None = None) -> None:
        conf = self.tmp / f"{name}.conf"
        conf.write_text(json.dumps(cfg or kea_config(name, self.tmp), indent=1))
        env = dict(os.environ, KEA_PIDFILE_DIR=str(self.tmp / name), KEA_LOCKFILE_DIR=str(self.tmp / name))
        (self.tmp / name).mkdir(exist_ok=True)
        check = self.nodes[name].run("kea-dhcp4", "-t", str(conf), check=False, env=env, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
        out = open(self.tmp / f"{name}.out", "ab")
        self.procs[name] = self.nodes[name].popen(["kea-dhcp4", "-c", str(conf)], stdout=out,
                                                  stderr=subprocess.STDOUT, env=env)
        out.close()

    def start_sidus(self, name: str) -> None:
        d = sidus_config(name, self.tmp)
        log = open(d / "sidusd.log", "ab")
        self.procs[name] = self.nodes[name].popen([sys.executable, "-m", "sidusd", "--config", str(d / "sidus.yaml")],
                                                  stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.procs[name].poll() is None, (d / "sidusd.log").read_text()[-3000:]
            if '"daemon.ready"' in (d / "sidusd.log").read_text():
                return
            time.sleep(0.1)
        raise AssertionError(f"sidusd {name} not ready:\n" + (d / "sidusd.log").read_text()[-3000:])

    def kill(self, name: str) -> None:
        p = self.procs[name]
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(20)

    def log(self, name: str, tail: int = 4000) -> str:
        p = self.tmp / f"{name}.log"
        return p.read_text()[-tail:] if p.exists() else ""

    def close(self) -> None:
        for ns in self.nodes.values():
            ns.close()                      # its processes: SIGTERM then SIGKILL, by process group


@pytest.fixture
def segment(tmp_path):
    require_root()
    for t in ("ip", "kea-dhcp4"):
        require_tool(t)
    for hook in ("libdhcp_ha.so", "libdhcp_lease_cmds.so"):
        if not (HOOKS / hook).is_file():
            pytest.skip(f"missing tool: {HOOKS / hook} (kea-common)")
    pytest.importorskip("scapy", reason="missing tool: scapy (installed by .ci/run)")
    with NetNs("sidus-t-keac") as client:
        client.run("ip", "link", "add", "br0", "type", "bridge")
        client.run("ip", "addr", "add", f"{CLIENT_IP}/24", "dev", "br0")
        client.run("ip", "link", "set", "br0", "up")
        seg = Segment(tmp_path, client)
        try:
            for name, ip in {**KEA, **SIDUS}.items():
                seg.attach(name, ip)
            yield seg
        finally:
            seg.close()


# -- the scripted PXE client (scapy builds and parses every packet) -----------------------------------

VCI = b"PXEClient:Arch:00000:UNDI:002001"


def packet(mac: str, xid: int, msg: str, extra=()) -> bytes:
    from scapy.layers.dhcp import BOOTP, DHCP
    from scapy.utils import mac2str
    opts = [("message-type", msg), ("vendor_class_id", VCI),
            ("pxe_client_architecture", b"\x00\x00"), ("client_id", b"\x01" + mac2str(mac)), *extra, "end"]
    return bytes(BOOTP(op=1, xid=xid, flags=0x8000, chaddr=mac2str(mac)) / DHCP(options=opts))


def opts_of(reply) -> dict:
    from scapy.layers.dhcp import DHCP
    return {o[0]: o[1] for o in reply[DHCP].options if isinstance(o, tuple) and len(o) >= 2}


class Client:
    def __init__(self, ns: NetNs):
        def make() -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            s.setsockopt(socket.SOL_SOCKET, 25, b"br0")          # SO_BINDTODEVICE
            s.bind(("0.0.0.0", 68))
            return s
        self.sock = socket_in_netns(ns.name, make)
        self.sock.settimeout(0.2)

    def close(self) -> None:
        self.sock.close()

    def collect(self, data: bytes, dest: tuple[str, int], xid: int, wait_s: float) -> list:
        from scapy.layers.dhcp import BOOTP
        self.sock.sendto(data, dest)
        out, deadline = [], time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                raw, _ = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            r = BOOTP(raw)
            if r.op == 2 and r.xid == xid:
                out.append(r)
        return out

    def boot(self, mac: str) -> dict | None:
        """One PXE boot's DHCP: the lease (address, Kea's server id) and the boot file (proxy's id),
        or None when an answer is missing."""
        xid = random.randrange(1, 2**32)
        offers = self.collect(packet(mac, xid, "discover"), ("255.255.255.255", 67), xid, 2.0)
        site = [o for o in offers if o.yiaddr != "0.0.0.0" and opts_of(o).get("message-type") == 2]
        proxies = [o for o in offers if o.yiaddr == "0.0.0.0" and opts_of(o).get("vendor_class_id") == b"PXEClient"]
        if not site or not proxies:
            return None
        lease, kea_id = site[0].yiaddr, opts_of(site[0])["server_id"]
        acks = self.collect(packet(mac, xid, "request", [("server_id", kea_id), ("requested_addr", lease)]),
                            ("255.255.255.255", 67), xid, 2.0)
        acks = [a for a in acks if opts_of(a).get("message-type") == 5 and a.yiaddr == lease]
        if not acks:
            return None
        proxy = proxies[0]
        pid = opts_of(proxy)["server_id"]
        xid2 = xid ^ 0x5A5A
        packs = self.collect(packet(mac, xid2, "request", [("server_id", pid)]), (pid, 4011), xid2, 2.0)
        if not packs:
            return None
        return {"address": lease, "dhcp_server": kea_id, "proxies": sorted({opts_of(p)["server_id"] for p in proxies}),
                "proxy_offer_file": proxy.file.rstrip(b"\0").decode(), "boot_server": opts_of(packs[0])["server_id"],
                "boot_file": packs[0].file.rstrip(b"\0").decode(), "site_file": site[0].file.rstrip(b"\0").decode()}


def boot_until(client: Client, mac: str, timeout_s: float, want=lambda r: True) -> dict:
    """Retry the boot (a PXE ROM retransmits too) until it completes and ``want`` holds."""
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        last = client.boot(mac)
        if last is not None and want(last):
            return last
    raise AssertionError(f"no complete boot of {mac} in {timeout_s} s: last {last}")


def in_pool(ip: str) -> bool:
    return int(POOL[0].rsplit(".", 1)[1]) <= int(ip.rsplit(".", 1)[1]) <= int(POOL[1].rsplit(".", 1)[1])


def test_kea_ha_leases_and_two_proxy_sidusd_boot_files_survive_failures(segment):
    seg = segment
    seg.start_kea("kea1")
    seg.start_kea("kea2")
    seg.start_sidus("sa")
    seg.start_sidus("sb")
    client = Client(seg.client)
    try:
        # both sidusd answer; the address comes from the HA primary (the standby stays silent)
        first = boot_until(client, "52:54:00:78:00:01", 90, lambda r: r["proxies"] == sorted(SIDUS.values()))
        assert first["dhcp_server"] == KEA["kea1"], first
        assert in_pool(first["address"]) and first["site_file"] == ""      # Kea gives no boot file
        assert first["proxy_offer_file"] == first["boot_file"] == "pxelinux.0"
        assert first["boot_server"] in SIDUS.values()

        # one sidusd killed: the other one alone gives the boot file
        seg.kill("sa")
        second = boot_until(client, "52:54:00:78:00:02", 30)
        assert second["proxies"] == [SIDUS["sb"]] and second["boot_server"] == SIDUS["sb"], second
        assert second["boot_file"] == "pxelinux.0" and second["dhcp_server"] == KEA["kea1"]
        assert second["address"] != first["address"]

        # the HA primary killed: the standby takes over (partner-down) and leases, knowing the
        # leases the primary gave (lease updates): the first machine keeps its address
        seg.kill("kea1")
        t_kill = time.monotonic()
        third = boot_until(client, "52:54:00:78:00:03", 90)
        print(f"kea failover: a complete boot {time.monotonic() - t_kill:.1f} s after the primary was killed")
        assert third["dhcp_server"] == KEA["kea2"], (third, seg.log("kea2"))
        assert third["boot_server"] == SIDUS["sb"] and in_pool(third["address"])
        assert third["address"] not in (first["address"], second["address"])
        again = boot_until(client, "52:54:00:78:00:01", 30)
        assert again["dhcp_server"] == KEA["kea2"] and again["address"] == first["address"], again
    finally:
        client.close()
    log2 = seg.log("kea2", tail=10**7)
    assert "transitions from READY to HOT-STANDBY" in log2 and "transitions from HOT-STANDBY to PARTNER-DOWN" in log2


# -- Kea with a shared lease database (PostgreSQL) ---------------------------------------------------

PG_BIN = Path("/usr/lib/postgresql/15/bin")


@pytest.fixture
def postgres():
    """A private PostgreSQL (Debian's postgresql-15) on a unix socket only, the Kea schema loaded;
    stopped by PID.  Its directory is outside pytest's 0700 tmp (the server runs as postgres)."""
    import tempfile
    if not (PG_BIN / "postgres").is_file():
        pytest.skip(f"missing tool: {PG_BIN / 'postgres'} (postgresql)")
    require_tool("psql")
    schema = Path("/usr/share/kea/scripts/pgsql/dhcpdb_create.pgsql")
    if not schema.is_file():
        pytest.skip(f"missing tool: {schema} (kea-common)")
    d = Path(tempfile.mkdtemp(prefix="sidus-t-keapg-"))
    os.chown(d, *_pg_ids())
    proc = None
    try:
        subprocess.run(["runuser", "-u", "postgres", "--", str(PG_BIN / "initdb"), "-D", str(d / "data"),
                        "-U", "postgres", "--auth=trust", "-E", "UTF8"], check=True, capture_output=True, timeout=120)
        log = open(d / "pg.log", "ab")
        proc = subprocess.Popen(["runuser", "-u", "postgres", "--", str(PG_BIN / "postgres"), "-D", str(d / "data"),
                                 "-k", str(d), "-c", "listen_addresses=", "-p", "5432"],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 60
        while subprocess.run(["psql", "-h", str(d), "-U", "postgres", "-tAc", "select 1"],
                             capture_output=True).returncode != 0:
            assert proc.poll() is None and time.monotonic() < deadline, (d / "pg.log").read_text()
            time.sleep(0.2)
        psql = ["psql", "-q", "-v", "ON_ERROR_STOP=1", "-h", str(d), "-U", "postgres"]
        subprocess.run([*psql, "-c", "create database kea"], check=True, capture_output=True, timeout=60)
        subprocess.run([*psql, "-d", "kea", "-f", str(schema)], check=True, capture_output=True, timeout=120)
        yield str(d)
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)          # fast shutdown
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        subprocess.run(["rm", "-rf", str(d)], check=False)


def _pg_ids() -> tuple[int, int]:
    import pwd
    pw = pwd.getpwnam("postgres")
    return pw.pw_uid, pw.pw_gid


def leases_in_db(pg: str) -> dict[str, str]:
    """MAC -> address of the lease4 table (Kea stores hwaddr as bytea, address as an integer)."""
    out = subprocess.run(["psql", "-h", pg, "-U", "postgres", "-d", "kea", "-tA", "-F", " ", "-c",
                          "select encode(hwaddr, 'hex'), address from lease4 where state = 0"],
                         check=True, capture_output=True, text=True, timeout=30).stdout
    res = {}
    for line in out.split("\n"):
        if line.strip():
            hw, addr = line.split()
            a = int(addr)
            res[":".join(hw[i:i + 2] for i in range(0, 12, 2))] = ".".join(str((a >> s) & 255) for s in (24, 16, 8, 0))
    return res


def test_two_kea_on_one_postgresql_lease_database_next_to_proxy_sidusd(segment, postgres):
    seg = segment
    seg.start_kea("kea1", kea_db_config("kea1", seg.tmp, postgres))
    seg.start_sidus("sa")
    client = Client(seg.client)
    try:
        macs = [f"52:54:00:78:01:0{i}" for i in range(1, 5)]
        given = {}
        for m in macs[:3]:                          # three leases from kea1 (kea2 not started yet)
            r = boot_until(client, m, 90)
            assert r["dhcp_server"] == KEA["kea1"] and in_pool(r["address"]), r
            assert r["boot_file"] == "pxelinux.0" and r["boot_server"] == SIDUS["sa"]
            given[m] = r["address"]
        assert len(set(given.values())) == 3 and leases_in_db(postgres) == given
        # kea2 starts fresh (its allocator at the pool's start), kea1 is killed: a new machine gets
        # an address none of kea1's machines holds (kea2 reads the shared database), and a known
        # machine gets its own address back from kea2
        seg.start_kea("kea2", kea_db_config("kea2", seg.tmp, postgres))
        seg.kill("kea1")
        new = boot_until(client, macs[3], 60)
        assert new["dhcp_server"] == KEA["kea2"] and in_pool(new["address"]), new
        assert new["address"] not in given.values(), (new, given)
        again = boot_until(client, macs[0], 30)
        assert again["dhcp_server"] == KEA["kea2"] and again["address"] == given[macs[0]], again
        assert leases_in_db(postgres) == {**given, macs[3]: new["address"]}
    finally:
        client.close()
