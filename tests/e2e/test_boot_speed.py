"""iPXE's idle time between its DHCP ACK and its first TFTP request, with dhcp.ipv6_no_router on.

The qemu NIC ROM (Debian ipxe-qemu, iPXE 1.0.0+git-20190125) runs its IPv6
configurator beside DHCP and boots only when both are done; unanswered, its
router solicitations give up after ~16 s, so on this IPv4-only lab the ROM
idled ~13 s after the site server's DHCPACK (pcap, docs/quirks.md).  With
``dhcp.ipv6_no_router`` sidusd answers the first solicitation with a lifetime-0,
prefix-less router advertisement and the ROM asks for pxelinux.0 at once.

The figures come from a pcap of the lab bridge taken inside the test's own
namespace (bench/bootcompare.py reads it): the RA reaches the VM before its
first RRQ, and ACK -> first RRQ is under 5 s (13.1 s without the key, 0.1 s with
it, on a loaded 2-core machine).  The VM is stopped once pxelinux.0 is sent.
"""

from __future__ import annotations

import subprocess
import time

from bench.bootwire import pcap_packets, wire_timeline
from sidusd.lab.demo import HostSpec
from sidusd.lab.proc import terminate
from sidusd.lab.vm import mac_for


def test_ipv6_no_router_ends_ipxe_idle_after_dhcp_ack(make_lab, demo_image, tmp_path):
    mac = mac_for(7)
    lab = make_lab("proxy", [HostSpec(mac, "speed1", "sidus.demo=poweroff")], demo_image,
                   dhcp_extra={"ipv6_no_router": True})
    pcap = tmp_path / "br0.pcap"
    dump = subprocess.Popen(lab.topology.lab_argv(["tcpdump", "-i", "br0", "-U", "-s", "400", "-w", str(pcap)]),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        time.sleep(1.0)
        vm = lab.boot_vm(mac)
        tl = lab.timeline(vm)
        assert lab.follow(vm, tl, 240, until="pxelinux.0"), lab.diagnostics(vm)
        time.sleep(0.5)
    finally:
        terminate(dump, 5)
    wire = wire_timeline(pcap_packets(pcap.read_bytes()), mac)
    assert wire.ack is not None and wire.files, "no DHCPACK or no TFTP request on the wire"
    first_rrq = wire.files[0][1]
    assert wire.files[0][0] == "pxelinux.0"
    assert first_rrq - wire.ack < 5.0, f"iPXE idled {first_rrq - wire.ack:.1f} s after its DHCPACK"
    assert wire.ra is not None and wire.ra < first_rrq, "no router advertisement reached the VM before its RRQ"
