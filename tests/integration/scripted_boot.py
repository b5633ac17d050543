"""A scripted network boot against the real sidusd, in two network namespaces made here.

The daemon (``python3 -m sidusd``, privilege separation on, full DHCP with a
one-address pool, TFTP, HTTP boot, the metrics endpoint on the server
namespace's loopback) runs in the server namespace; the "machine" is a
sequence of real clients in the client namespace: a scapy-built PXE
DHCPDISCOVER (answered with the address and ``pxelinux.0``), tftpy fetching
pxelinux.0, the per-MAC config, the kernel and the initrd, then curl sending
the up-reports (``POST /up?stage=root`` and ``multiuser``), as the initramfs
hook and the image do.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml
from netns import NetNs, socket_in_netns, veth_link

REPO = Path(__file__).resolve().parents[2]
SERVER_IP = "10.78.0.1"
CLIENT_IP = "10.78.0.50"
HTTP_PORT = 8080
METRICS_PORT = 9743
VCI = b"PXEClient:Arch:00000:UNDI:002001"


def client_socket() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    s.setsockopt(socket.SOL_SOCKET, 25, b"vc0")          # SO_BINDTODEVICE
    s.bind(("0.0.0.0", 68))
    s.settimeout(0.2)
    return s


def discover(mac: str, xid: int) -> bytes:
    from scapy.layers.dhcp import BOOTP, DHCP
    from scapy.utils import mac2str
    opts = [("message-type", "discover"), ("pxe_client_architecture", b"\x00\x00"),
            ("vendor_class_id", VCI), "end"]
    return bytes(BOOTP(op=1, xid=xid, flags=0x8000, chaddr=mac2str(mac)) / DHCP(options=opts))


class BootLab:
    """The daemon in ``server``, the scripted machine in ``client``; files under ``tmp``."""

    def __init__(self, tmp: Path, server: NetNs, client: NetNs, hosts: list[dict], privsep: bool = True):
        self.tmp, self.server, self.client = tmp, server, client
        self.log_path = tmp / "sidusd.log"
        self.proc: subprocess.Popen | None = None
        for d in ("state", "tftp/images/demo", "tftp/pxelinux.cfg", "images/demo"):
            (tmp / d).mkdir(parents=True, exist_ok=True)
        self.files = {"pxelinux.0": os.urandom(40_000), "images/demo/vmlinuz": os.urandom(300_000),
                      "images/demo/initrd.img": os.urandom(200_000)}
        for name, data in self.files.items():
            (tmp / "tftp" / name).write_bytes(data)
        cfg = {"state_dir": str(tmp / "state"), "inventory_file": str(tmp / "inventory.yaml"),
               "log": {"format": "json", "level": "info"},
               "control": {"socket_path": str(tmp / "control.sock")},
               "dhcp": {"mode": "full", "interfaces": ["vs0"],
                        "pool": {"network": "10.78.0.0/24", "range_start": CLIENT_IP, "range_end": CLIENT_IP,
                                 "router": SERVER_IP, "lease_time_s": 600,
                                 "lease_file": str(tmp / "state" / "leases.jsonl")}},
               "tftp": {"root": str(tmp / "tftp"), "timeout_s": 0.5, "retries": 10},
               "http": {"enabled": True, "address": SERVER_IP, "port": HTTP_PORT},
               "metrics": {"enabled": True, "address": "127.0.0.1", "port": METRICS_PORT},
               "nfs": {"backend": "none", "server_address": SERVER_IP},
               "security": {"privsep": privsep},
               "images": {"demo": {"root": str(tmp / "images" / "demo"), "kernel": "images/demo/vmlinuz",
                                   "initrd": "images/demo/initrd.img"}}}
        (tmp / "sidus.yaml").write_text(yaml.safe_dump(cfg))
        (tmp / "inventory.yaml").write_text(yaml.safe_dump(
            {"profiles": {"default": {"image": "demo", "overlay": "tmpfs", "append": ""}}, "hosts": hosts}))
        self.sock = socket_in_netns(client.name, client_socket)

    # -- the daemon ------------------------------------------------------------------
    def start(self) -> None:
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = self.server.popen([sys.executable, "-m", "sidusd", "--config", str(self.tmp / "sidus.yaml")],
                                          stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"sidusd exited {self.proc.returncode}:\n{self.log_tail()}")
            if any(e.get("event") == "daemon.ready" for e in self.events(offset)):
                return
            time.sleep(0.1)
        raise AssertionError(f"sidusd not ready:\n{self.log_tail()}")

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.terminate()                 # SIGTERM: the graceful stop
        rc = self.proc.wait(30)
        self.proc = None
        return rc

    def events(self, offset: int = 0) -> list[dict]:
        out = []
        if self.log_path.exists():
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                for line in f.read().decode(errors="replace").splitlines():
                    try:
                        out.append(json.loads(line))
                    except ValueError:
                        pass
        return out

    def log_tail(self) -> str:
        return "\n".join(self.log_path.read_text().splitlines()[-40:]) if self.log_path.exists() else ""

    def ctl(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "sidusd.ctl", "--socket", str(self.tmp / "control.sock"),
                               *args], capture_output=True, text=True, cwd=REPO, timeout=30)

    def metrics(self) -> str:
        """The endpoint's text, fetched with curl inside the server namespace."""
        r = self.server.run("curl", "-fsS", f"http://127.0.0.1:{METRICS_PORT}/metrics", check=False)
        assert r.returncode == 0, r.stderr + self.log_tail()
        return r.stdout

    # -- the machine --------------------------------------------------------------------
    def dhcp(self, mac: str, xid: int, wait_s: float = 5.0) -> object:
        from scapy.layers.dhcp import BOOTP
        self.sock.sendto(discover(mac, xid), ("255.255.255.255", 67))
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                raw, _ = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            reply = BOOTP(raw)
            if reply.xid == xid and reply.op == 2:
                return reply
        raise AssertionError(f"no DHCP offer for {mac}:\n{self.log_tail()}")

    def tftp_get(self, name: str) -> bytes:
        import logging

        import tftpy  # a real client we did not write
        logging.getLogger("tftpy").setLevel(logging.CRITICAL)

        def fetch() -> bytes:
            buf = io.BytesIO()
            tftpy.TftpClient(SERVER_IP, 69, options={"blksize": 1400}).download(name, buf, timeout=5)
            return buf.getvalue()
        return socket_in_netns(self.client.name, fetch)

    def report(self, stage: str, mac: str | None = None) -> tuple[int, str]:
        """``POST /up`` with curl from the machine: (HTTP status, body)."""
        query = f"stage={stage}" + (f"&mac={mac}" if mac else "")
        r = self.client.run("curl", "-sS", "-X", "POST", "-o", "-", "-w", "\n%{http_code}",
                            f"http://{SERVER_IP}:{HTTP_PORT}/up?{query}", check=False)
        body, _, code = r.stdout.rpartition("\n")
        return int(code or 0), body

    def boot(self, mac: str, xid: int = 0x7001) -> None:
        """The whole scripted boot of ``mac``: DHCP, four TFTP fetches, two up-reports."""
        offer = self.dhcp(mac, xid)
        assert offer.yiaddr == CLIENT_IP and offer.file.rstrip(b"\0") == b"pxelinux.0", offer
        assert self.tftp_get("pxelinux.0") == self.files["pxelinux.0"]
        assert b"images/demo/vmlinuz" in self.tftp_get("pxelinux.cfg/01-" + mac.replace(":", "-"))
        assert self.tftp_get("images/demo/vmlinuz") == self.files["images/demo/vmlinuz"]
        assert self.tftp_get("images/demo/initrd.img") == self.files["images/demo/initrd.img"]
        for stage in ("root", "multiuser"):
            code, body = self.report(stage, mac)
            assert code == 200 and "up after" in body, (code, body, self.log_tail())

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.sock.close()


def boot_lab(tmp: Path, hosts: list[dict], prefix: str, privsep: bool = True):
    """``with boot_lab(tmp, hosts, "sidus-t-x") as lab:`` the namespaces, removed at the end."""
    import contextlib

    @contextlib.contextmanager
    def cm():
        with NetNs(prefix + "s") as s, NetNs(prefix + "c") as c:
            veth_link(s, c, SERVER_IP, CLIENT_IP)
            lab = BootLab(tmp, s, c, hosts, privsep)
            try:
                yield lab
            finally:
                lab.close()
    return cm()
