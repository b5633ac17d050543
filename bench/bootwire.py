"""The wire half of bench/bootcompare.py (pure): a boot's steps read from a pcap of the lab bridge.

:func:`pcap_packets` reads a classic pcap without any library; :func:`wire_timeline` finds the
VM's first DHCPDISCOVER, the site server's DHCPACK, each TFTP RRQ or HTTP GET and the client's
last ACK of each transfer; :func:`tftp_turnaround` splits a lockstep transfer into the server's
and the client's share; :func:`phases` turns a timeline and the console's times into the phases
of :data:`PHASES`.  The names of a comparison (:data:`SERVERS`, :data:`PATHS`) live here too, so
that the report (bench/bootreport.py) and the runner share them.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field
from typing import NamedTuple

SERVERS = ("sidus", "dnsmasq", "dnsmasq+hpa", "dnsmasq+httpd")
PATHS = ("bios", "uefi", "ipxe")
#: the servers that take part in a path (dnsmasq+httpd: an HTTP server only the iPXE path can use)
PATH_SERVERS = {"bios": SERVERS[:3], "uefi": SERVERS[:3], "ipxe": SERVERS}
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
