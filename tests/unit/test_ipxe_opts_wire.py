"""bench/bootwire.py's wire timeline: a boot's DHCP and TFTP steps read from a pcap (pure).

The frames are built here the way they appear on the lab bridge (Ethernet/IPv4/UDP, a DHCP
message with option 53, TFTP RRQ/OACK/DATA, an ICMPv6 router advertisement to the VM)."""

from __future__ import annotations

import socket
import struct

from bench.bootreport import summarize
from bench.bootwire import pcap_packets, phases, wire_timeline

VM = bytes.fromhex("525400132001")
SRV = bytes.fromhex("6a7acdb8adfd")


def udp(src, dst, sport, dport, payload, dmac=VM, smac=SRV):
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28 + len(payload), 0, 0, 64, 17, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    return dmac + smac + b"\x08\x00" + ip + struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def dhcp(msgtype, mac=VM):
    bootp = bytearray(240)
    bootp[28:34] = mac
    bootp[236:240] = b"\x63\x82\x53\x63"
    return bytes(bootp) + bytes((53, 1, msgtype, 255))


def ra_frame():
    ip6 = struct.pack("!IHBB16s16s", 6 << 28, 16, 58, 255, b"\xfe\x80" + bytes(14), b"\xfe\x80" + bytes(14))
    return VM + SRV + b"\x86\xdd" + ip6 + bytes((134, 0)) + bytes(14)


def pcap(packets):
    out = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)
    for t, frame in packets:
        out += struct.pack("<IIII", int(t), int(round((t - int(t)) * 1e6)), len(frame), len(frame)) + frame
    return out


BOOT = [
    (100.0, udp("0.0.0.0", "255.255.255.255", 68, 67, dhcp(1), dmac=b"\xff" * 6, smac=VM)),    # DISCOVER
    (100.001, udp("10.13.20.1", "255.255.255.255", 67, 68, dhcp(2))),                        # proxy OFFER
    (100.002, udp("0.0.0.0", "255.255.255.255", 68, 67, dhcp(1, mac=bytes(6)))),             # another machine
    (100.5, ra_frame()),
    (103.0, udp("10.13.20.2", "10.13.20.198", 67, 68, dhcp(2))),                             # site OFFER
    (103.01, udp("0.0.0.0", "255.255.255.255", 68, 67, dhcp(3))),                            # REQUEST
    (103.02, udp("10.13.20.2", "10.13.20.198", 67, 68, dhcp(5))),                            # ACK
    (116.1, udp("10.13.20.198", "10.13.20.1", 2000, 69, b"\x00\x01pxelinux.0\x00octet\x00")),
    (116.101, udp("10.13.20.1", "10.13.20.198", 50000, 2000, b"\x00\x06tsize\x0042\x00")),
    (116.15, udp("10.13.20.198", "10.13.20.1", 2000, 50000, b"\x00\x04\x00\x00")),     # ACK of the OACK
    (116.19, udp("10.13.20.1", "10.13.20.198", 50000, 2000, b"\x00\x03\x00\x01" + bytes(42))),
    (116.2, udp("10.13.20.198", "10.13.20.1", 2000, 50000, b"\x00\x04\x00\x01")),
    (116.3, udp("10.13.20.198", "10.13.20.1", 2001, 69, b"\x00\x01ldlinux.c32\x00octet\x00")),
    (116.35, udp("10.13.20.1", "10.13.20.198", 50001, 2001, b"\x00\x03\x00\x01" + bytes(9))),
    (116.4, udp("10.13.20.198", "10.13.20.1", 2001, 50001, b"\x00\x04\x00\x01")),
    (125.0, udp("10.13.20.1", "10.13.20.198", 50000, 2000, b"\x00\x03\x00\x01" + bytes(42))),  # a late
    # retransmission nobody ACKs does not stretch the transfer
    (130.0, udp("0.0.0.0", "255.255.255.255", 68, 67, dhcp(1), dmac=b"\xff" * 6, smac=VM)),    # the kernel's DHCP
    (130.1, udp("10.13.20.2", "10.13.20.198", 67, 68, dhcp(5))),
]


def test_wire_timeline_finds_discover_ack_ra_and_each_transfer():
    wire = wire_timeline(pcap_packets(pcap(BOOT)), "52:54:00:13:20:01")
    assert abs(wire.discover - 100.0) < 1e-3
    assert abs(wire.ack - 103.02) < 1e-3                 # the ACK before the first RRQ, not the kernel's
    assert abs(wire.ra - 100.5) < 1e-3
    assert [(n, round(s, 3), round(e, 3)) for n, s, e in wire.files] == [
        ("pxelinux.0", 116.1, 116.2), ("ldlinux.c32", 116.3, 116.4)]


def test_phases_and_medians():
    wire = wire_timeline(pcap_packets(pcap(BOOT)), "52:54:00:13:20:01")
    ph = phases(wire, 98.0, {"linux": 118.0, "root": 125.0, "ready": 126.0})
    assert (ph["firmware"], ph["dhcp"], ph["idle"], ph["files"]) == (2.0, 3.02, 13.08, 0.3)
    assert (ph["kernel"], ph["root"], ph["init"], ph["total"]) == (1.6, 7.0, 1.0, 28.0)
    assert ph["file:pxelinux.0"] == 0.1
    runs = [{"server": "sidus", "path": "bios", "phases": dict(ph, total=t)} for t in (28.0, 20.0, 22.0)]
    runs.append({"server": "sidus", "path": "bios", "phases": dict(ph, total=None)})   # never READY
    med = summarize(runs)["bios"]["sidus"]
    assert med["total"] == 22.0 and med["n"] == 3


def test_not_a_pcap_and_empty():
    assert pcap_packets(b"") == []
    try:
        pcap_packets(b"x" * 40)
    except ValueError:
        pass
    else:
        raise AssertionError("garbage accepted as a pcap")
