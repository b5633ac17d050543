"""Whole boot, qemu start to up: sidus against dnsmasq (proxyDHCP + TFTP), dnsmasq + tftpd-hpa, and
on the iPXE path dnsmasq + an HTTP server (busybox httpd).

    sudo .venv/bin/python -m bench.bootcompare [--boots N] [--paths bios,uefi,ipxe] [--servers ...]
                                               [--workdir DIR] [--json FILE]

One run, one lab (:mod:`sidusd.lab`: the namespaces, the site DHCP server that
hands out addresses only, nfs-ganesha, the demo image), one VM MAC.  Each
round boots the same VM once per server and path, the servers' order rotated
every round (interleaved).  Paths (qemu's NIC ROM is iPXE in all three):

* ``bios``  SeaBIOS + the iPXE ROM of ipxe-qemu, handed pxelinux.0 (TFTP: pxelinux.0, ldlinux.c32,
            pxelinux.cfg/01-<mac>, kernel, initrd);
* ``uefi``  OVMF + iPXE's EFI ROM, handed syslinux.efi (the same over TFTP);
* ``ipxe``  SeaBIOS + the iPXE ROM, handed an iPXE script that loads kernel and initrd.

Servers:

* ``sidus``          sidusd: proxyDHCP + TFTP + HTTP (and the NFS export), as shipped, plus
                     ``dhcp.ipv6_no_router: true`` (``--sidus-ra off`` leaves it out); on the
                     ipxe path ``boot.ipxe_chain: true``: script, kernel and initrd over its HTTP.
* ``dnsmasq``        dnsmasq ``--dhcp-range=...,proxy --pxe-service=... --enable-tftp`` (the recipe
                     of bench/peers.py) on the lab bridge; on the ipxe path
                     ``--dhcp-match=set:ipxe,175 --dhcp-boot=tag:ipxe,<script>``: script, kernel
                     and initrd over its TFTP.
* ``dnsmasq+hpa``    the same dnsmasq for proxyDHCP, TFTP by tftpd-hpa (bench/peers.py
                     fetches it into bench/.peers/).
* ``dnsmasq+httpd``  ipxe path only: the same dnsmasq handing out the script's URL on busybox
                     httpd, which serves script, kernel and initrd over HTTP.

For the peers sidusd is restarted with ``dhcp.mode: off`` and TFTP off: it only
keeps the NFS export (the same nfs-ganesha, the same image) and the HTTP server
that takes the guest's ``sidus.up`` report.  They serve a copy of the lab's TFTP
root plus the ``pxelinux.cfg/01-<mac>`` and the iPXE script that sidusd renders
for that MAC (fetched from sidusd first; the script's kernel and initrd URLs
pointed at the peer), so every server sends the same bytes.

The timeline of a boot comes from the wire, the same way for every server: a
pcap of the lab bridge (tcpdump in the lab namespace, lab traffic only) read by
:func:`wire_timeline` (the VM's first DHCPDISCOVER, the site server's DHCPACK,
each TFTP RRQ or HTTP GET and the client's last ACK of each transfer), and from
the guest console (``Linux version``, the ``SIDUS-BOOT:`` markers ``root
mounted`` and ``READY``, seen by polling every 0.2 s).  "up" is ``READY``.
Phases: firmware (qemu start -> first DISCOVER), dhcp (-> ACK), idle (ACK ->
first file request), each file (its request -> its last ACK), kernel (initrd
end -> Linux banner), root (-> root mounted), init (-> READY).

Prints every boot's timeline, then per path and server the median of each
phase and of the whole boot, and the ratio sidus / peer of the medians.
Needs root (namespaces, qemu on a tap) and the lab's packages.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

SITE_IP = "10.13.20.2"
SERVER_IP = "10.13.20.1"
HTTP_PORT = 8080                     # sidusd's HTTP server in the lab (sidusd.lab.demo.HTTP_PORT)
PEER_HTTP_PORT = 8081                # busybox httpd, the dnsmasq+httpd peer (ipxe path only)
SERVERS = ("sidus", "dnsmasq", "dnsmasq+hpa", "dnsmasq+httpd")
PATHS = ("bios", "uefi", "ipxe")
#: the servers that take part in a path (dnsmasq+httpd: an HTTP server only the iPXE path can use)
PATH_SERVERS = {"bios": SERVERS[:3], "uefi": SERVERS[:3], "ipxe": SERVERS}
BOOT_TIMEOUT_S = 400.0
PHASES = ("firmware", "dhcp", "idle", "files", "kernel", "root", "init")


# -- the wire: a pcap of the lab bridge, read without any library (pure) -----------------------

def pcap_packets(data: bytes) -> list[tuple[float, bytes]]:
    """``(time, ethernet frame)`` of a classic pcap file (tcpdump -w), either byte order."""
    if len(data) < 24:
        return []
    magic = data[:4]
    endian = {b"\xd4\xc3\xb2\xa1": "<", b"\xa1\xb2\xc3\xd4": ">",
              b"\x4d\x3c\xb2\xa1": "<", b"\xa1\xb2\x3c\x4d": ">"}.get(magic)
    if endian is None:
        raise ValueError("not a pcap file")
    nano = magic in (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d")
    out, i = [], 24
    while i + 16 <= len(data):
        sec, frac, incl, _orig = struct.unpack_from(endian + "IIII", data, i)
        i += 16
        out.append((sec + frac / (1e9 if nano else 1e6), data[i:i + incl]))
        i += incl
    return out


def _udp(frame: bytes) -> tuple[str, str, int, int, bytes] | None:
    """``(src ip, dst ip, sport, dport, payload)`` of an Ethernet/IPv4/UDP frame, else None."""
    if len(frame) < 42 or frame[12:14] != b"\x08\x00":
        return None
    ihl = (frame[14] & 0x0F) * 4
    if frame[23] != 17 or len(frame) < 14 + ihl + 8:
        return None
    src, dst = socket.inet_ntoa(frame[26:30]), socket.inet_ntoa(frame[30:34])
    sport, dport = struct.unpack_from("!HH", frame, 14 + ihl)
    return src, dst, sport, dport, frame[14 + ihl + 8:]


class Segment(NamedTuple):
    """An Ethernet/IPv4/TCP frame: ``length`` from the IP header (the capture may be cut short:
    tcpdump -s), ``payload`` what was captured of it."""

    src: str
    dst: str
    sport: int
    dport: int
    flags: int
    seq: int
    ack: int
    length: int
    payload: bytes


TCP_FIN, TCP_SYN, TCP_RST = 0x01, 0x02, 0x04


def _tcp(frame: bytes) -> Segment | None:
    if len(frame) < 54 or frame[12:14] != b"\x08\x00" or frame[23] != 6:
        return None
    ihl = (frame[14] & 0x0F) * 4
    total = struct.unpack_from("!H", frame, 16)[0]
    off = 14 + ihl
    if len(frame) < off + 20:
        return None
    sport, dport, seq, ack = struct.unpack_from("!HHII", frame, off)
    thl = (frame[off + 12] >> 4) * 4
    length = total - ihl - thl
    if thl < 20 or length < 0:
        return None
    return Segment(socket.inet_ntoa(frame[26:30]), socket.inet_ntoa(frame[30:34]), sport, dport,
                   frame[off + 13], seq, ack, length, frame[off + thl:off + thl + length])


def _dhcp_type(payload: bytes) -> tuple[int, bytes] | None:
    """(option 53 message type, chaddr[:6]) of a BOOTP/DHCP payload, else None."""
    if len(payload) < 240 or payload[236:240] != b"\x63\x82\x53\x63":
        return None
    i = 240
    while i < len(payload):
        code = payload[i]
        if code == 255:
            break
        if code == 0:
            i += 1
            continue
        if i + 1 >= len(payload):
            break
        ln = payload[i + 1]
        if code == 53 and ln >= 1 and i + 2 < len(payload):
            return payload[i + 2], payload[28:34]
        i += 2 + ln
    return None


@dataclass
class WireTimeline:
    """What a boot did on the wire (absolute times): see :func:`wire_timeline`."""

    discover: float | None = None
    ack: float | None = None                       # the last DHCPACK before the first RRQ
    ra: float | None = None                        # first Router Advertisement to the VM, if any
    files: list[tuple[str, float, float]] = field(default_factory=list)   # (name, RRQ/GET, last ACK)


@dataclass
class _HttpConn:
    """One TCP connection of an HTTP client: its current request and how far the server's data went."""

    index: int                     # the current GET's entry in WireTimeline.files
    data_end: int | None = None    # sequence number just after the server's last data byte


def _http_step(tl: WireTimeline, conns: dict[tuple[str, int, str, int], _HttpConn], t: float,
               seg: Segment) -> None:
    """One TCP segment: a GET opens a file (keep-alive: the next GET on the connection opens the
    next one); the server's data and the client's ACK of it move the file's end; the ACK of a FIN
    (a connection iPXE closes when it boots the kernel) does not."""
    key = (seg.src, seg.sport, seg.dst, seg.dport)
    if seg.length > 0 and seg.payload[:4] == b"GET ":
        path = seg.payload[4:].split(b" ", 1)[0].decode("ascii", "replace")
        tl.files.append((path.lstrip("/"), t, t))
        conns[key] = _HttpConn(len(tl.files) - 1)
        return
    back = (seg.dst, seg.dport, seg.src, seg.sport)
    if back in conns and seg.length > 0:                    # server -> client: data
        c = conns[back]
        c.data_end = (seg.seq + seg.length) & 0xFFFFFFFF
    elif key in conns and seg.length == 0 and not seg.flags & (TCP_FIN | TCP_SYN | TCP_RST):
        c = conns[key]                                      # client -> server: a pure ACK
        if c.data_end is not None and (c.data_end - seg.ack) & 0xFFFFFFFF < 1 << 31:   # <= data end
            name, start, _ = tl.files[c.index]
            tl.files[c.index] = (name, start, t)


def wire_timeline(packets: list[tuple[float, bytes]], mac: str) -> WireTimeline:
    """The VM's first DHCPDISCOVER, the DHCPACK before its first file request, its TFTP RRQs and
    HTTP GETs (file names) and the client's last ACK of each transfer (TFTP: by client and
    server port, so a transfer the client abandoned ends at its last ACK, whatever the server
    retransmits after it; HTTP: the client's last TCP ACK of the server's data for that GET)."""
    want = bytes.fromhex(mac.replace(":", ""))
    tl = WireTimeline()
    acks: list[float] = []
    transfers: dict[tuple[int, int], int] = {}      # (client port, server port) -> index in files
    pending: dict[int, int] = {}                     # client port -> index, until the server answers
    conns: dict[tuple[str, int, str, int], _HttpConn] = {}    # (client ip, port, server ip, port)
    for t, frame in packets:
        if len(frame) >= 62 and frame[12:14] == b"\x86\xdd" and frame[20] == 58 and frame[54] == 134 \
                and frame[0:6] == want and tl.ra is None:
            tl.ra = t
            continue
        seg = _tcp(frame)
        if seg is not None:
            _http_step(tl, conns, t, seg)
            continue
        u = _udp(frame)
        if u is None:
            continue
        src, dst, sport, dport, payload = u
        if sport == 68 and dport == 67:
            d = _dhcp_type(payload)
            if d and d[1] == want and d[0] == 1 and tl.discover is None:
                tl.discover = t
        elif sport == 67 and dport == 68:
            d = _dhcp_type(payload)
            if d and d[1] == want and d[0] == 5 and not tl.files:
                acks.append(t)
        elif dport == 69 and payload[:2] == b"\x00\x01":
            name = payload[2:].split(b"\x00", 1)[0].decode("ascii", "replace")
            tl.files.append((name, t, t))
            pending[sport] = len(tl.files) - 1
        elif payload[:2] in (b"\x00\x03", b"\x00\x06") and dport in pending \
                and (dport, sport) not in transfers:
            transfers[(dport, sport)] = pending[dport]   # the server's first answer names its port
        elif payload[:2] == b"\x00\x04" and (sport, dport) in transfers:
            idx = transfers[(sport, dport)]                # the client ACKs: the transfer goes on
            name, start, _ = tl.files[idx]
            tl.files[idx] = (name, start, t)
    tl.ack = acks[-1] if acks else None
    return tl


def tftp_turnaround(packets: list[tuple[float, bytes]], name: str) -> tuple[int, float, float] | None:
    """Where a lockstep TFTP transfer of ``name`` spent its time, from a pcap of the bridge:
    ``(blocks, server s, client s)``: the server's share is the sum of each ACK -> the first
    DATA of the next block, the client's of each block's first DATA -> its ACK (the first
    transfer of ``name``; retransmissions and other ports left out; None if there is none)."""
    cport: int | None = None
    sport: int | None = None
    sent: dict[int, float] = {}            # block -> its first DATA, until ACKed
    acked: tuple[int, float] | None = None  # the last block ACKed and when
    server = client = 0.0
    blocks = 0
    for t, frame in packets:
        u = _udp(frame)
        if u is None:
            continue
        _src, _dst, sp, dp, payload = u
        if dp == 69 and payload[:2] == b"\x00\x01":
            if cport is not None:
                break                                       # the next file: this one is over
            if payload[2:].split(b"\x00", 1)[0].decode("ascii", "replace") == name:
                cport = sp
            continue
        if cport is None or len(payload) < 4:
            continue
        if dp == cport and sport is None and payload[:2] in (b"\x00\x03", b"\x00\x06"):
            sport = sp                                      # the server's first answer names its port
        if dp == cport and payload[:2] == b"\x00\x03" and sp == sport:
            block = struct.unpack_from("!H", payload, 2)[0]
            if acked is not None and block == (acked[0] + 1) & 0xFFFF and block not in sent:
                server += t - acked[1]
            sent.setdefault(block, t)
        elif sp == cport and dp == sport and payload[:2] == b"\x00\x04":
            block = struct.unpack_from("!H", payload, 2)[0]
            if block in sent:
                client += t - sent.pop(block)
                blocks += 1
            if acked is None or block != acked[0]:          # a repeated ACK moves nothing
                acked = (block, t)
    return (blocks, round(server, 2), round(client, 2)) if blocks else None


def ipxe_script_for(script: str, base: str, new_base: str) -> str:
    """sidusd's iPXE script with the kernel and initrd fetched from ``new_base`` instead of ``base``
    (``http://<server>:<port>``): the same script, kernel command line included (its
    ``sidus.up=`` URL stays: that report goes to sidusd whichever server booted the VM), for a
    peer that serves the files over TFTP (``tftp://<server>``) or its own HTTP server."""
    out = []
    for line in script.splitlines(keepends=True):
        words = line.split(" ")
        if words[0] == "kernel" and len(words) > 1 and words[1].startswith(base + "/"):
            words[1] = new_base + words[1][len(base):]
        elif words[0] == "initrd" and words[-1].rstrip("\n").startswith(base + "/"):
            words[-1] = new_base + words[-1][len(base):]
        out.append(" ".join(words))
    text = "".join(out)
    if text.count(new_base + "/") != 2:
        raise ValueError(f"not a sidus iPXE script with a kernel and an initrd under {base}: {script!r}")
    return text


def phases(wire: WireTimeline, t0: float, console: dict[str, float]) -> dict[str, float | None]:
    """Seconds per phase (:data:`PHASES`, ``file:<name>`` for each file) and ``total`` (t0 -> READY).

    ``console``: absolute times of ``linux``, ``root``, ``ready`` (None-less: missing keys absent).
    Only files that were sent (a size probe the client abandoned counts into the next)."""
    out: dict[str, float | None] = {}

    def gap(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else round(b - a, 2)

    first_rrq = wire.files[0][1] if wire.files else None
    out["firmware"] = gap(t0, wire.discover)
    out["dhcp"] = gap(wire.discover, wire.ack)
    out["idle"] = gap(wire.ack, first_rrq)
    for name, start, end in wire.files:
        key = f"file:{name}"
        out[key] = round((out.get(key) or 0.0) + (end - start), 2)
    last_end = max((e for _, _, e in wire.files), default=None)
    out["files"] = gap(first_rrq, last_end)
    out["kernel"] = gap(last_end, console.get("linux"))
    out["root"] = gap(console.get("linux"), console.get("root"))
    out["init"] = gap(console.get("root"), console.get("ready"))
    out["total"] = gap(t0, console.get("ready"))
    return out


def summarize(results: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """``{path: {server: {phase: median seconds}}}`` over the boots that reached READY."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for r in results:
        if r["phases"].get("total") is None:
            continue
        out.setdefault(r["path"], {}).setdefault(r["server"], {})
    for path, servers in out.items():
        for server in servers:
            boots = [r["phases"] for r in results if r["path"] == path and r["server"] == server
                     and r["phases"].get("total") is not None]
            keys = [k for k in (*PHASES, "total") if all(b.get(k) is not None for b in boots)]
            servers[server] = {k: round(statistics.median(b[k] for b in boots), 2) for k in keys}
            servers[server]["n"] = len(boots)
    return out


# -- the lab (root, qemu): everything below runs the real thing ---------------------------------

def _console_times(vm: Any, follower: Any, lab: Any, timeout_s: float) -> dict[str, float]:
    times: dict[str, float] = {}

    def on_step(step: Any) -> None:
        if step.key in ("linux", "root", "ready") and step.key not in times:
            times[step.key] = time.time()
    lab.follow(vm, follower, timeout_s, until="ready", on_step=on_step)
    return times


class Rig:
    """One lab and the servers that take turns on it."""

    def __init__(self, workdir: Path, mac: str, sidus_ra: bool):
        from sidusd.lab.demo import HostSpec, Lab
        from sidusd.lab.image import build_demo_image
        self.workdir, self.mac = workdir, mac
        self.image = build_demo_image(workdir / "image", progress=lambda m: print("   " + m, flush=True))
        self.lab = Lab(workdir / "lab", mode="proxy", progress=lambda m: print("== " + m, flush=True),
                       dhcp_extra={"ipv6_no_router": True} if sidus_ra else {})
        self.host = HostSpec(mac, "bench1", "sidus.demo=poweroff")
        self.peer_root = workdir / "peer-tftp"
        self.peer_http_root = workdir / "peer-http"
        self.script_name = f"boot/{mac.replace(':', '-')}.ipxe"      # the path sidusd serves it under
        self.procs: list[subprocess.Popen] = []
        self.sidus_mode = "serve"

    def up(self) -> None:
        self.lab.up(self.image, [self.host])
        self._make_peer_root()

    def _make_peer_root(self) -> None:
        """A copy of the TFTP root with the pxelinux.cfg/01-<mac> sidusd renders (fetched over TFTP)
        and its iPXE script (fetched over HTTP) with the kernel and initrd URLs pointed at the peer:
        ``tftp://`` in the TFTP root, the peer's httpd in ``peer-http/`` (:func:`ipxe_script_for`)."""
        for d in (self.peer_root, self.peer_http_root):
            if d.exists():
                shutil.rmtree(d)
        shutil.copytree(self.lab.tftp_root, self.peer_root)
        shutil.copytree(self.lab.tftp_root / "demo", self.peer_http_root / "demo", copy_function=os.link)
        url = f"http://{SERVER_IP}:{HTTP_PORT}/{self.script_name}"
        res = subprocess.run(self.lab.topology.lab_argv(["curl", "-sSf", url]), check=True, timeout=30,
                             capture_output=True, text=True)
        base = f"http://{SERVER_IP}:{HTTP_PORT}"
        for root, new_base in ((self.peer_root, f"tftp://{SERVER_IP}"),
                               (self.peer_http_root, f"http://{SERVER_IP}:{PEER_HTTP_PORT}")):
            (root / self.script_name).parent.mkdir(parents=True, exist_ok=True)
            (root / self.script_name).write_text(ipxe_script_for(res.stdout, base, new_base))
        cfg_name = "pxelinux.cfg/01-" + self.mac.replace(":", "-")
        (self.peer_root / "pxelinux.cfg").mkdir(exist_ok=True)
        out = self.peer_root / cfg_name
        argv = self.lab.topology.lab_argv(["busybox", "tftp", "-g", "-r", cfg_name, "-l", str(out), SERVER_IP])
        subprocess.run(argv, check=True, timeout=30, capture_output=True)
        text = out.read_text()
        if "demo/vmlinuz" not in text:
            raise RuntimeError(f"sidusd rendered no kernel line for {cfg_name}: {text!r}")

    def _sidusd(self, mode: str) -> None:
        """Restart sidusd serving (``serve``; ``serve-ipxe``: with ``boot.ipxe_chain``, so the NIC's
        iPXE is handed its script over HTTP) or keeping only the NFS export and the HTTP server
        that takes the guest's ``sidus.up`` report (``nfs-only``)."""
        if mode == self.sidus_mode:
            return
        lab = self.lab
        lab.stop_sidusd()
        orig = lab.config_dict

        def cfg(exports_file: Path, pid_file: Path) -> dict[str, Any]:
            c = orig(exports_file, pid_file)
            if mode == "nfs-only":
                c["dhcp"] = {"mode": "off"}
                c["tftp"] = dict(c["tftp"], enabled=False)
            elif mode == "serve-ipxe":
                c["boot"] = dict(c.get("boot", {}), ipxe_chain=True)
            return c
        exports = lab.workdir / "ganesha-exports.conf"
        lab.config_dict = cfg  # type: ignore[method-assign]   (this lab object only)
        try:
            lab.write_config(exports, lab.ganesha.pid_file)
        finally:
            del lab.config_dict
        lab.start_sidusd()
        lab.ganesha.wait_exported(str(self.image.root), 30.0)
        self.sidus_mode = mode

    def dnsmasq_argv(self, server: str, path: str) -> list[str]:
        """The peer's dnsmasq: proxyDHCP on br0 (``--pxe-service`` per architecture); on the ipxe
        path a client that is already iPXE (option 175) gets the script instead (``--dhcp-boot``:
        over TFTP from this host, or the httpd's URL), the usual recipe; ``dnsmasq``: its TFTP too."""
        ipxe = "tag:!ipxe," if path == "ipxe" else ""
        argv = [shutil.which("dnsmasq") or "/usr/sbin/dnsmasq", "--keep-in-foreground",
                "--conf-file=/dev/null", "--port=0", "--user=root", "--pid-file=",
                "--interface=br0", "--bind-interfaces", f"--listen-address={SERVER_IP}",
                "--dhcp-range=10.13.20.0,proxy,255.255.255.0",
                f'--pxe-service={ipxe}x86PC,"sidus",pxelinux',
                f'--pxe-service={ipxe}BC_EFI,"sidus",syslinux.efi',
                f'--pxe-service={ipxe}X86-64_EFI,"sidus",syslinux.efi',
                f"--dhcp-leasefile={self.workdir / 'peer.leases'}",
                f"--log-facility={self.workdir / 'peer-dnsmasq.log'}", "--log-dhcp"]
        if path == "ipxe":
            # ",,<address>": the OFFER's siaddr; without it dnsmasq sends 0.0.0.0 with a URL and this
            # iPXE asks the proxy on port 4011 again and again, then says "Nothing to boot"
            script = (f"http://{SERVER_IP}:{PEER_HTTP_PORT}/{self.script_name}" if server == "dnsmasq+httpd"
                      else self.script_name)
            argv += ["--dhcp-match=set:ipxe,175", f"--dhcp-boot=tag:ipxe,{script},,{SERVER_IP}"]
        if server == "dnsmasq":
            argv += ["--enable-tftp", f"--tftp-root={self.peer_root}"]
        return argv

    def start(self, server: str, path: str) -> None:
        from bench.peers import ensure_peers
        self._sidusd(("serve-ipxe" if path == "ipxe" else "serve") if server == "sidus" else "nfs-only")
        if server == "sidus":
            return
        topo = self.lab.topology

        def spawn(argv: list[str]) -> None:
            self.procs.append(subprocess.Popen(topo.lab_argv(argv), stdin=subprocess.DEVNULL,
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                               start_new_session=True))
        spawn(self.dnsmasq_argv(server, path))
        if server == "dnsmasq+hpa":
            hpa = ensure_peers(["tftpd-hpa"])["tftpd-hpa"]
            spawn([str(hpa), "-L", "-u", "root", "-s", str(self.peer_root), "-a", f"{SERVER_IP}:69"])
        elif server == "dnsmasq+httpd":
            spawn([shutil.which("busybox") or "/bin/busybox", "httpd", "-f",
                   "-p", f"{SERVER_IP}:{PEER_HTTP_PORT}", "-h", str(self.peer_http_root)])
        time.sleep(1.0)
        for p in self.procs:
            if p.poll() is not None:
                raise RuntimeError(f"{server}: {p.args[-1]!r}... exited with {p.returncode}")

    def stop_peers(self) -> None:
        from bench.peers import stop_server
        procs, self.procs = self.procs, []
        for p in procs:
            stop_server(p)

    def boot(self, server: str, path: str, index: int) -> dict[str, Any]:
        """One boot of the VM through ``server``; its phases."""
        from sidusd.lab.proc import terminate
        lab = self.lab
        pcap = self.workdir / f"boot-{index:02d}-{path}-{server.replace('+', '-')}.pcap"
        dump = subprocess.Popen(lab.topology.lab_argv(["tcpdump", "-i", "br0", "-U", "-s", "400", "-w", str(pcap)]),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(1.0)
        vm = lab.boot_vm(self.mac, name=f"b{index:02d}", uefi=path == "uefi")
        t0 = time.time()
        follower = lab.timeline(vm)
        follower.t0 = t0
        try:
            console = _console_times(vm, follower, lab, BOOT_TIMEOUT_S)
            vm.wait_exit(20)
        finally:
            vm.stop()
            lab.vms.remove(vm)
            time.sleep(0.5)
            terminate(dump, 5)
        wire = wire_timeline(pcap_packets(pcap.read_bytes()), self.mac)
        ph = phases(wire, t0, console)
        turn = tftp_turnaround(pcap_packets(pcap.read_bytes()), "demo/initrd.img")
        return {"server": server, "path": path, "round": index, "phases": ph, "pcap": str(pcap),
                "initrd_turnaround": turn,
                "ra": None if wire.ra is None else round(wire.ra - t0, 2),
                "files": [(n, round(s - t0, 2), round(e - t0, 2)) for n, s, e in wire.files]}

    def close(self) -> None:
        self.stop_peers()
        self.lab.close()


def print_boot(r: dict[str, Any]) -> None:
    ph = r["phases"]

    def f(v: float | None) -> str:
        return "  -  " if v is None else f"{v:5.1f}"
    files = " ".join(f"{k[5:]}={v:.2f}" for k, v in ph.items() if k.startswith("file:") and v is not None)
    print(f"  {r['path']:4} {r['server']:12} total {f(ph['total'])} s | " + " ".join(
        f"{p} {f(ph[p])}" for p in PHASES) + f" | {files}", flush=True)


def print_summary(summary: dict[str, dict[str, dict[str, float]]]) -> None:
    for path, servers in summary.items():
        print(f"\n{path}: median seconds (n boots)")
        print("  server       " + " ".join(f"{p:>8}" for p in (*PHASES, "total")) + "   n")
        for server, med in servers.items():
            print(f"  {server:12} " + " ".join(f"{med.get(p, float('nan')):8.2f}" for p in (*PHASES, "total"))
                  + f"   {med['n']:.0f}")
        if "sidus" in servers:
            for peer, med in servers.items():
                if peer != "sidus":
                    print(f"  ratio sidus/{peer}: {servers['sidus']['total'] / med['total']:.2f}")


def _short(name: str) -> str:
    """A file's name in the tables: ``cfg`` for pxelinux.cfg/01-<mac>, ``script`` for the iPXE
    script, else its last component."""
    if name.startswith("pxelinux.cfg/"):
        return "cfg"
    return "script" if name.endswith(".ipxe") else name.rsplit("/", 1)[-1]


def markdown(results: list[dict[str, Any]]) -> str:
    """docs/performance.md tables of a run: the medians per path and server with the ratio
    sidus / server of the median totals, then every boot in run order with its files."""
    summary = summarize(results)
    cols = (*PHASES, "total")
    out = ["| path | server | " + " | ".join(cols) + " | n | sidus / it |",
           "| --- | --- | " + " | ".join("---:" for _ in cols) + " | ---: | ---: |"]
    for path, servers in summary.items():
        sidus = servers.get("sidus", {}).get("total")
        for server, med in sorted(servers.items(), key=lambda kv: SERVERS.index(kv[0])):
            ratio = "" if server == "sidus" or sidus is None else f"**{sidus / med['total']:.2f}**"
            cells = [f"{med[c]:.2f}" if c in med else "-" for c in cols]
            out.append(f"| {path.upper() if path != 'ipxe' else 'iPXE'} | {server} | " + " | ".join(cells)
                       + f" | {med['n']:.0f} | {ratio} |")
    out += ["", "| # | path | server | " + " | ".join(cols)
            + " | each file (request -> last ACK, s) | initrd: server / client s |",
            "| ---: | --- | --- | " + " | ".join("---:" for _ in cols) + " | --- | ---: |"]
    for i, r in enumerate(results):
        ph = r["phases"]
        files = " ".join(f"{_short(k[5:])}={v:.2f}" for k, v in ph.items() if k.startswith("file:") and v is not None)
        cells = ["-" if ph.get(c) is None else f"{ph[c]:.1f}" for c in cols]
        turn = r.get("initrd_turnaround")
        split = "" if not turn else f"{turn[1]:.1f} / {turn[2]:.1f}"
        out.append(f"| {i} | {r['path']} | {r['server']} | " + " | ".join(cells) + f" | {files} | {split} |")
    return "\n".join(out) + "\n\n" + timeline_table(results)


def median_boot(results: list[dict[str, Any]], path: str, server: str) -> dict[str, Any] | None:
    """The boot of ``server`` on ``path`` whose total is the median (the lower middle of an even
    count) of those that reached READY."""
    boots = sorted((r for r in results if r["path"] == path and r["server"] == server
                    and r["phases"].get("total") is not None), key=lambda r: r["phases"]["total"])
    return boots[(len(boots) - 1) // 2] if boots else None


def timeline_table(results: list[dict[str, Any]]) -> str:
    """One boot per path and server (:func:`median_boot`) as a timeline: seconds from qemu start
    to the first DISCOVER, the ACK, each file (request-last ACK), the Linux banner, root mounted
    and READY."""
    out = ["| path | server | boot # | DISCOVER | ACK | files (request-last ACK) | Linux | root mounted | READY |",
           "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
    seen: list[tuple[str, str]] = []
    for r in results:
        if (r["path"], r["server"]) not in seen:
            seen.append((r["path"], r["server"]))
    for path, server in sorted(seen, key=lambda k: (PATHS.index(k[0]), SERVERS.index(k[1]))):
        r = median_boot(results, path, server)
        if r is None:
            continue
        ph = r["phases"]
        t, marks = 0.0, {}
        for name in PHASES:
            t += ph.get(name) or 0.0
            marks[name] = t
        files = ", ".join(f"{_short(n)} {s:.1f}-{e:.1f}" for n, s, e in r.get("files", []))
        out.append(f"| {path} | {server} | {results.index(r)} | {marks['firmware']:.1f} | {marks['dhcp']:.1f} | "
                   f"{files} | {marks['kernel']:.1f} | {marks['root']:.1f} | {ph['total']:.1f} |")
    return "\n".join(out) + "\n"


def schedule(servers: list[str], paths: list[str], rnd: int) -> list[tuple[str, str]]:
    """The boots of round ``rnd``: the servers' order rotated by one each round (interleaved),
    each server's paths in turn, a server only on the paths it takes part in (:data:`PATH_SERVERS`)."""
    k = rnd % len(servers)
    return [(s, p) for s in servers[k:] + servers[:k] for p in paths if s in PATH_SERVERS[p]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--boots", type=int, default=3, help="boots per server and path (default 3)")
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--servers", default=",".join(SERVERS))
    ap.add_argument("--sidus-ra", choices=("on", "off"), default="on",
                    help="dhcp.ipv6_no_router for sidus (default on)")
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/sidus-bootcompare"))
    ap.add_argument("--json", type=Path, help="write every boot's phases here")
    ap.add_argument("--markdown", type=Path, help="write the tables of docs/performance.md here")
    ap.add_argument("--from-json", type=Path, help="no boots: summarize (and --markdown) an earlier --json")
    args = ap.parse_args(argv)
    if args.from_json:
        results = json.loads(args.from_json.read_text())
        for i, r in enumerate(results):            # a run from before initrd_turnaround: its pcaps
            pcap = args.workdir / f"boot-{i:02d}-{r['path']}-{r['server'].replace('+', '-')}.pcap"
            if r.get("initrd_turnaround") is None and pcap.exists():
                r["initrd_turnaround"] = tftp_turnaround(pcap_packets(pcap.read_bytes()), "demo/initrd.img")
        for r in results:
            print_boot(r)
        print_summary(summarize(results))
        if args.markdown:
            args.markdown.write_text(markdown(results))
        return 0
    paths = [p for p in args.paths.split(",") if p]
    servers = [s for s in args.servers.split(",") if s]
    for s in servers:
        if s not in SERVERS:
            ap.error(f"unknown server {s!r} (known: {', '.join(SERVERS)})")
    for p in paths:
        if p not in PATHS:
            ap.error(f"unknown path {p!r} (known: {', '.join(PATHS)})")
    from sidusd.lab.vm import mac_for
    rig = Rig(args.workdir, mac_for(0), args.sidus_ra == "on")
    results: list[dict[str, Any]] = []
    try:
        rig.up()
        for rnd in range(args.boots):
            for server, path in schedule(servers, paths, rnd):
                rig.start(server, path)
                try:
                    r = rig.boot(server, path, len(results))
                    results.append(r)
                    print_boot(r)
                finally:
                    rig.stop_peers()
    finally:
        rig.close()
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    print_summary(summarize(results))
    if args.markdown:
        args.markdown.write_text(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
