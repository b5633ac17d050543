"""A qemu guest's PXE firmware talking TFTP to a server on loopback, with no netns.

qemu's ``-netdev socket,udp=...`` carries the guest's raw Ethernet frames in
UDP datagrams on 127.0.0.1.  :class:`PxeRelay` reads them (scapy decodes),
answers DHCP (a fixed lease, ``filename``/``next-server``) and ARP, and relays
the guest's TFTP (UDP to 10.99.0.1:69 and to the server's transfer ports) to a
real TFTP server on 127.0.0.1, wrapping the replies back into frames.  Every
first datagram of a guest TFTP flow can be recorded (golden RRQs from iPXE,
pxelinux...).  Nothing leaves the host's loopback.

    python3 tests/golden/tftp/pxe_relay.py --tftp-port 16969 --capture DIR

Used by tests/golden/tftp/capture_pxe.sh (re-capture) and by
tests/integration/test_tftp_clients.py (iPXE -> pxelinux through sidus TFTP).
"""

from __future__ import annotations

import select
import socket
import threading
from pathlib import Path

from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import ARP, Ether

SERVER_IP, GUEST_IP, SERVER_MAC = "10.99.0.1", "10.99.0.10", "02:00:00:99:00:01"


class PxeRelay:
    def __init__(self, tftp_port: int, bootfile: str = "pxelinux.0", capture: Path | None = None):
        self.tftp_port = tftp_port
        self.bootfile = bootfile
        self.capture = capture
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]       # qemu: udp=127.0.0.1:<port>
        self.qemu_addr: tuple[str, int] | None = None
        self.guest_mac: str | None = None
        self.flows: dict[int, socket.socket] = {}     # guest port -> host socket
        self.back: dict[socket.socket, int] = {}
        self.rrqs: list[bytes] = []                   # first payload of each flow
        self.first_packets: list[bytes] = []          # every guest payload to port 69
        self.guest_payloads: list[bytes] = []         # every guest TFTP payload
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> PxeRelay:
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(5)
        for s in list(self.flows.values()):
            s.close()
        self.sock.close()

    def _send_frame(self, frame) -> None:
        if self.qemu_addr:
            self.sock.sendto(bytes(frame), self.qemu_addr)

    def _run(self) -> None:
        while not self._stop.is_set():
            socks = [self.sock, *self.flows.values()]
            ready, _, _ = select.select(socks, [], [], 0.2)
            for s in ready:
                if s is self.sock:
                    data, addr = s.recvfrom(65536)
                    self.qemu_addr = addr
                    try:
                        self._on_frame(Ether(data))
                    except Exception:       # a frame we do not understand: ignore
                        pass
                else:
                    data, (_, sport) = s.recvfrom(65536)
                    gport = self.back[s]
                    # replies from the real server's port P look like 10.99.0.1:P
                    self._send_frame(Ether(src=SERVER_MAC, dst=self.guest_mac) /
                                     IP(src=SERVER_IP, dst=GUEST_IP) /
                                     UDP(sport=69 if sport == self.tftp_port else sport, dport=gport) / data)

    def _on_frame(self, f) -> None:
        if f.haslayer(ARP) and f[ARP].op == 1 and f[ARP].pdst == SERVER_IP:
            self._send_frame(Ether(src=SERVER_MAC, dst=f.src) /
                             ARP(op=2, hwsrc=SERVER_MAC, psrc=SERVER_IP, hwdst=f.src, pdst=f[ARP].psrc))
        elif f.haslayer(DHCP):
            self._on_dhcp(f)
        elif f.haslayer(UDP) and f.haslayer(IP) and f[IP].dst == SERVER_IP:
            payload = bytes(f[UDP].payload)
            self.guest_payloads.append(payload)
            gport, dport = f[UDP].sport, f[UDP].dport
            if dport == 69:
                self.first_packets.append(payload)
                if self.capture is not None:
                    self.rrqs.append(payload)
                s = self.flows.get(gport)
                if s is None:
                    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    s.bind(("127.0.0.1", 0))
                    self.flows[gport] = s
                    self.back[s] = gport
                s.sendto(payload, ("127.0.0.1", self.tftp_port))
            elif gport in self.flows:
                self.flows[gport].sendto(payload, ("127.0.0.1", dport))

    def _on_dhcp(self, f) -> None:
        opts = {o[0]: o[1] for o in f[DHCP].options if isinstance(o, tuple)}
        mtype = {1: "offer", 3: "ack"}.get(opts.get("message-type"))
        if mtype is None:
            return
        self.guest_mac = f.src
        reply = (Ether(src=SERVER_MAC, dst=f.src) / IP(src=SERVER_IP, dst="255.255.255.255") /
                 UDP(sport=67, dport=68) /
                 BOOTP(op=2, xid=f[BOOTP].xid, flags=f[BOOTP].flags, yiaddr=GUEST_IP, siaddr=SERVER_IP,
                       chaddr=f[BOOTP].chaddr, file=self.bootfile.encode()) /
                 DHCP(options=[("message-type", mtype), ("server_id", SERVER_IP),
                               ("subnet_mask", "255.255.255.0"), ("lease_time", 3600), "end"]))
        self._send_frame(reply)


OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")


def qemu_argv(relay_port: int, serial_log: Path, mac: str = "52:54:00:12:34:56",
              uefi_vars: Path | None = None) -> list[str]:
    """A BIOS VM whose iPXE ROM (qemu's default efi-virtio.rom, from ipxe-qemu)
    netboots over the relay (TCG, no display).  ``localaddr`` needs a real port."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        local = s.getsockname()[1]
    return ["qemu-system-x86_64", "-accel", "tcg", "-m", "256", "-boot", "n", "-no-reboot",
            "-nographic", "-display", "none", "-monitor", "none", "-serial", f"file:{serial_log}",
            "-netdev", f"socket,id=n0,udp=127.0.0.1:{relay_port},localaddr=127.0.0.1:{local}",
            "-device", f"virtio-net-pci,netdev=n0,mac={mac}"] + (
                [] if uefi_vars is None else
                ["-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
                 "-drive", f"if=pflash,format=raw,file={uefi_vars}"])
