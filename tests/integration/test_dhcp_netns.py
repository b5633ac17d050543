"""The real sidusd DHCP service in a network namespace, spoken to by scapy-built packets.

Two namespaces made here (server, client) joined by a veth pair.  The daemon
(``python3 -m sidusd --config FILE``) runs in the server namespace on ports 67
and 4011 of ``vs0``.  The client side is a UDP socket on port 68 of ``vc0``
created from a thread that entered the client namespace; scapy builds every
request and parses every reply (an encoder/decoder independent of sidus').
Counters are read with ``sidusctl --json status``.
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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from conftest import require_root, require_tool
from netns import NetNs, socket_in_netns, veth_link

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "golden" / "dhcp"
SERVER_IP = "10.77.0.1"
CLIENT_IP = "10.77.0.50"
WAIT_S = 3.0                     # bound on every wait for a reply
SILENCE_S = 1.5                  # how long "no answer" is listened for


def client_socket() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    s.setsockopt(socket.SOL_SOCKET, 25, b"vc0")          # SO_BINDTODEVICE
    s.bind(("0.0.0.0", 68))
    return s


class Lab:
    def __init__(self, tmp: Path, server: NetNs, client: NetNs):
        self.tmp, self.server, self.client = tmp, server, client
        self.proc: subprocess.Popen | None = None
        self.log_path = tmp / "sidusd.log"
        self.sock = socket_in_netns(client.name, client_socket)
        self.sock.settimeout(0.2)
        self.blast = socket_in_netns(client.name, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        for d in ("state", "tftp", "images/demo"):
            (tmp / d).mkdir(parents=True, exist_ok=True)

    def configure(self, mode: str, chain: bool = False, hosts: list | None = None) -> None:
        dhcp_cfg: dict = {"mode": mode, "interfaces": ["vs0"]}
        if mode == "full":
            dhcp_cfg["pool"] = {"network": "10.77.0.0/24", "range_start": "10.77.0.100",
                                "range_end": "10.77.0.102", "router": SERVER_IP,
                                "dns_servers": [SERVER_IP], "domain": "lab.test",
                                "lease_time_s": 600, "lease_file": str(self.tmp / "state" / "leases.jsonl")}
        cfg = {"state_dir": str(self.tmp / "state"), "inventory_file": str(self.tmp / "inventory.yaml"),
               "log": {"format": "json", "level": "info"},
               "control": {"socket_path": str(self.tmp / "control.sock")},
               "dhcp": dhcp_cfg, "boot": {"ipxe_chain": chain},
               "http": {"enabled": True, "port": 8080},
               "tftp": {"enabled": False, "root": str(self.tmp / "tftp")},
               "nfs": {"backend": "none"},
               "images": {"demo": {"root": str(self.tmp / "images" / "demo"),
                                   "kernel": "images/demo/vmlinuz", "initrd": "images/demo/initrd.img"}}}
        (self.tmp / "sidus.yaml").write_text(yaml.safe_dump(cfg))
        inv = {"profiles": {"default": {"image": "demo", "overlay": "tmpfs", "append": ""}},
               "hosts": hosts or []}
        (self.tmp / "inventory.yaml").write_text(yaml.safe_dump(inv))

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.proc = self.server.popen([sys.executable, "-m", "sidusd", "--config",
                                       str(self.tmp / "sidus.yaml")], stdout=log,
                                      stderr=subprocess.STDOUT, cwd=REPO)
        log.close()
        deadline = time.monotonic() + 20
        start_len = len(self.events())
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"sidusd exited {self.proc.returncode}:\n{self.log_tail()}")
            if any(e.get("event") == "daemon.ready" for e in self.events()[start_len:]):
                return
            time.sleep(0.05)
        raise AssertionError(f"sidusd not ready:\n{self.log_tail()}")

    def close(self) -> None:
        """Stop sidusd (if it runs) and close the client sockets."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)
        self.sock.close()
        self.blast.close()

    def kill9(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def events(self) -> list[dict]:
        out = []
        if self.log_path.exists():
            for line in self.log_path.read_text().splitlines():
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

    def log_tail(self) -> str:
        return "\n".join(self.log_path.read_text().splitlines()[-30:]) if self.log_path.exists() else ""

    def ctl_json(self, *args: str):
        r = subprocess.run([sys.executable, "-m", "sidusd.ctl", "--socket", str(self.tmp / "control.sock"),
                            "--json", *args], capture_output=True, text=True, cwd=REPO, timeout=30)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def counters(self) -> dict:
        return self.ctl_json("status")["counters"]

    # -- the client side -------------------------------------------------------
    def drain(self) -> None:
        self.sock.settimeout(0)
        try:
            while True:
                self.sock.recvfrom(4096)
        except (TimeoutError, BlockingIOError):
            pass
        self.sock.settimeout(0.2)

    def exchange(self, data: bytes, dest: tuple[str, int], xid: int, wait_s: float = WAIT_S):
        """Send ``data``; return (reply BOOTP parsed by scapy, source address) or None."""
        from scapy.layers.dhcp import BOOTP
        self.sock.sendto(data, dest)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                raw, src = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            reply = BOOTP(raw)
            if reply.xid == xid and reply.op == 2:
                return reply, src
        return None


@contextmanager
def netns_lab(tmp_path: Path, prefix: str, *tools: str) -> Iterator[Lab]:
    """A :class:`Lab` in namespaces ``<prefix>s`` (sidusd) and ``<prefix>c`` (the client) on a
    veth; at the end sidusd is stopped and the sockets closed (the namespaces go with it)."""
    require_root()
    for tool in ("ip", *tools):
        require_tool(tool)
    pytest.importorskip("scapy", reason="missing tool: scapy (installed by .ci/run)")
    with NetNs(f"{prefix}s") as s, NetNs(f"{prefix}c") as c:
        veth_link(s, c, SERVER_IP, CLIENT_IP)
        lab = Lab(tmp_path, s, c)
        try:
            yield lab
        finally:
            lab.close()


@pytest.fixture
def lab(tmp_path):
    with netns_lab(tmp_path, "sidus-t-dhcp") as lab:
        yield lab


# -- packets, built by scapy ---------------------------------------------------------

UUID = b"\x00" + bytes(range(0x20, 0x30))


def request(mac: str, xid: int, msg: str, vci: bytes | None, arch: int | None = None, ipxe=False,
            uuid: bytes | None = UUID, ciaddr="0.0.0.0", extra=()) -> bytes:
    from scapy.layers.dhcp import BOOTP, DHCP
    from scapy.utils import mac2str
    opts: list = [("message-type", msg)]
    if arch is not None:
        opts.append(("pxe_client_architecture", arch.to_bytes(2, "big")))
    if vci is not None:
        opts.append(("vendor_class_id", vci))
    if uuid is not None:
        opts.append(("pxe_client_machine_identifier", uuid))
    if ipxe:
        opts += [("user_class", b"iPXE"), (175, bytes([0x13, 1, 1]))]
    opts += list(extra) + ["end"]
    return bytes(BOOTP(op=1, xid=xid, flags=0x8000, ciaddr=ciaddr, chaddr=mac2str(mac)) / DHCP(options=opts))


def opts_of(reply) -> dict:
    from scapy.layers.dhcp import DHCP
    return {o[0]: (o[1] if len(o) == 2 else o[1:]) for o in reply[DHCP].options if isinstance(o, tuple)}


def check_proxy_reply(reply, xid: int, mac: str, kind: int, file: str, uuid: bytes | None):
    """Every field of a ProxyDHCP OFFER/ACK (PXE 2.1 §2.2.5)."""
    from scapy.utils import mac2str
    assert reply.op == 2 and reply.xid == xid
    assert reply.chaddr[:6] == mac2str(mac)
    assert reply.yiaddr == "0.0.0.0"
    assert reply.siaddr == SERVER_IP
    assert reply.file.rstrip(b"\0") == file.encode()
    o = opts_of(reply)
    assert o["message-type"] == kind
    assert o["server_id"] == SERVER_IP
    assert o["vendor_class_id"] == b"PXEClient"
    assert o["vendor_specific"] == bytes([6, 1, 8, 255])
    if uuid is None:
        assert "pxe_client_machine_identifier" not in o
    else:
        assert o["pxe_client_machine_identifier"] == uuid
    for absent in ("lease_time", "subnet_mask", "router", "renewal_time", "rebinding_time"):
        assert absent not in o


FIRMWARE = [
    # name,    mac,                 arch, vci,                                   ipxe,  uuid, file (chain off)
    ("bios",  "52:54:00:00:10:01", 0,    b"PXEClient:Arch:00000:UNDI:002001",   False, UUID, "pxelinux.0"),
    ("uefi",  "52:54:00:00:10:02", 7,    b"PXEClient:Arch:00007:UNDI:003016",   False, None, "syslinux.efi"),
    ("ipxe",  "52:54:00:00:10:03", 0,    b"PXEClient:Arch:00000:UNDI:002001",   True,  UUID, "pxelinux.0"),
]


def test_proxy_offer_and_ack_for_bios_uefi_ipxe(lab):
    lab.configure("proxy")
    lab.start()
    for i, (name, mac, arch, vci, ipxe, uuid, file) in enumerate(FIRMWARE):
        xid = 0x1000 + i
        got = lab.exchange(request(mac, xid, "discover", vci, arch, ipxe, uuid), ("255.255.255.255", 67), xid)
        assert got is not None, f"{name}: no proxy OFFER\n{lab.log_tail()}"
        reply, src = got
        assert src == (SERVER_IP, 67)
        check_proxy_reply(reply, xid, mac, 2, file, uuid)
        # then the ProxyDHCP REQUEST, unicast to port 4011 with ciaddr set
        xid2 = 0x2000 + i
        req = request(mac, xid2, "request", vci, arch, ipxe, uuid, ciaddr=CLIENT_IP,
                      extra=[("server_id", SERVER_IP)])
        got = lab.exchange(req, (SERVER_IP, 4011), xid2)
        assert got is not None, f"{name}: no proxy ACK\n{lab.log_tail()}"
        reply, src = got
        assert src == (SERVER_IP, 4011)
        check_proxy_reply(reply, xid2, mac, 5, file, uuid)
        assert reply.ciaddr == CLIENT_IP
    c = lab.counters()
    assert c["dhcp.offers"] == 3 and c["dhcp.acks"] == 3
    replies = [e for e in lab.events() if e.get("event") == "dhcp.reply"]
    assert [(e["mac"], e["port"], e["file"]) for e in replies] == [
        (m, p, f) for _, m, _, _, _, _, f in FIRMWARE for p in (67, 4011)]


def test_proxy_ignores_non_pxe_and_site_requests(lab):
    lab.configure("proxy")
    lab.start()
    mac = "52:54:00:00:20:01"
    assert lab.exchange(request(mac, 0x3001, "discover", b"MSFT 5.0", None), ("255.255.255.255", 67),
                        0x3001, wait_s=SILENCE_S) is None
    site = request(mac, 0x3002, "request", b"PXEClient:Arch:00000:UNDI:002001", 0,
                   extra=[("server_id", "10.77.0.254"), ("requested_addr", "10.77.0.60")])
    assert lab.exchange(site, ("255.255.255.255", 67), 0x3002, wait_s=SILENCE_S) is None
    c = lab.counters()
    assert c["dhcp.drop.not_pxe"] == 1 and c["dhcp.drop.other_server"] == 1
    assert "dhcp.offers" not in c and "dhcp.acks" not in c
    # the address the PXE client takes from the site server is noted for its timeline
    clients = lab.ctl_json("clients")
    mine = [x for x in clients if x["mac"] == mac]
    assert mine and mine[0]["ip"] == "10.77.0.60", clients
    assert [e["event"] for e in mine[0]["timeline"]] == ["dhcp.site_request"]


def test_chain_gives_ipxe_binary_then_script_url(lab):
    lab.configure("proxy", chain=True)
    lab.start()
    mac = "52:54:00:00:30:01"
    vci = b"PXEClient:Arch:00000:UNDI:002001"
    reply, _ = lab.exchange(request(mac, 0x4001, "discover", vci, 0), ("255.255.255.255", 67), 0x4001)
    check_proxy_reply(reply, 0x4001, mac, 2, "undionly.kpxe", UUID)
    reply, _ = lab.exchange(request(mac, 0x4002, "discover", vci, 0, ipxe=True), ("255.255.255.255", 67), 0x4002)
    check_proxy_reply(reply, 0x4002, mac, 2, f"http://{SERVER_IP}:8080/boot/52-54-00-00-30-01.ipxe", UUID)


def test_full_mode_lease_survives_kill_9(lab):
    known = "52:54:00:00:40:01"
    lab.configure("full", hosts=[{"mac": known, "hostname": "node07", "profile": "default"}])
    lab.start()
    lab.drain()
    vci = b"PXEClient:Arch:00000:UNDI:002001"

    def lease(mac, xid, pxe=True):
        offer, _ = lab.exchange(request(mac, xid, "discover", vci if pxe else None, 0 if pxe else None),
                                ("255.255.255.255", 67), xid)
        ip = offer.yiaddr
        ack, _ = lab.exchange(request(mac, xid + 1, "request", vci if pxe else None, 0 if pxe else None,
                                      extra=[("server_id", SERVER_IP), ("requested_addr", ip)]),
                              ("255.255.255.255", 67), xid + 1)
        return offer, ack

    other_offer, other_ack = lease("52:54:00:00:40:99", 0x5000, pxe=False)      # a plain Linux client
    assert other_offer.yiaddr == "10.77.0.100" and opts_of(other_ack)["message-type"] == 5
    assert other_ack.file.rstrip(b"\0") == b"" and other_ack.siaddr == "0.0.0.0"
    offer, ack = lease(known, 0x5010)
    assert offer.yiaddr == ack.yiaddr == "10.77.0.101"
    o = opts_of(ack)
    assert o["message-type"] == 5 and o["server_id"] == SERVER_IP and o["lease_time"] == 600
    assert o["subnet_mask"] == "255.255.255.0" and o["router"] == SERVER_IP
    assert o["name_server"] == SERVER_IP and o["domain"] == b"lab.test" and o["hostname"] == b"node07"
    assert o["renewal_time"] == 300 and o["rebinding_time"] == 525
    assert ack.siaddr == SERVER_IP and ack.file.rstrip(b"\0") == b"pxelinux.0"
    assert o["vendor_class_id"] == b"PXEClient" and o["vendor_specific"] == bytes([6, 1, 8, 255])
    lab.kill9()                                    # right after the ACK: nothing may be lost
    lab.start()
    lab.drain()
    # INIT-REBOOT (RFC 2131 §4.3.2) is only answered for a lease the server remembers
    reboot = request(known, 0x5020, "request", None, None, extra=[("requested_addr", "10.77.0.101")])
    got = lab.exchange(reboot, ("255.255.255.255", 67), 0x5020)
    assert got is not None and opts_of(got[0])["message-type"] == 5 and got[0].yiaddr == "10.77.0.101"
    newcomer, _ = lease("52:54:00:00:40:55", 0x5030)
    assert newcomer.yiaddr == "10.77.0.102"        # .100 and .101 are still leased
    again, ack2 = lease(known, 0x5040)
    assert again.yiaddr == ack2.yiaddr == "10.77.0.101"
    exhausted = lab.exchange(request("52:54:00:00:40:66", 0x5050, "discover", vci, 0),
                             ("255.255.255.255", 67), 0x5050, wait_s=SILENCE_S)
    assert exhausted is None and lab.counters()["dhcp.drop.pool_exhausted"] == 1


def test_barrage_of_garbage_then_normal_exchange(lab):
    lab.configure("proxy")
    lab.start()
    rng = random.Random(1234)
    goldens = [bytes.fromhex(p.read_text().replace("\n", "")) for p in sorted(GOLDEN.glob("*.hex"))]
    sent = 0
    for i in range(3000):
        kind = i % 3
        if kind == 0:
            data = rng.randbytes(rng.randrange(0, 600))
        elif kind == 1:
            g = rng.choice(goldens)
            data = g[:rng.randrange(0, len(g))]                       # every kind of truncation
        else:
            g = bytearray(rng.choice(goldens))
            g[rng.randrange(240, len(g))] = 0xff if rng.random() < 0.5 else rng.randrange(256)
            data = bytes(g[:rng.randrange(240, len(g))])                # corrupted and cut
        port = 67 if i % 2 else 4011
        lab.blast.sendto(data, (SERVER_IP, port))
        sent += 1
        if i % 200 == 199:
            time.sleep(0.02)                       # let the server drain its socket buffer
    mac = "52:54:00:00:50:01"
    got = lab.exchange(request(mac, 0x6001, "discover", b"PXEClient:Arch:00000:UNDI:002001", 0),
                       ("255.255.255.255", 67), 0x6001)
    assert got is not None, lab.log_tail()
    check_proxy_reply(got[0], 0x6001, mac, 2, "pxelinux.0", UUID)
    assert lab.proc.poll() is None
    c = lab.counters()
    assert 0 < c["dhcp.malformed"] <= sent
    assert c["dhcp.rx"] >= c["dhcp.malformed"] + 1 and "dhcp.errors" not in c
    assert any(e.get("event") == "dhcp.malformed" for e in lab.events())
