"""The boot-storm bench's own clients (pure parts): the PXE DHCP requests it sends, read by scapy
(an encoder/decoder independent of sidus'), the boot item it asks dnsmasq for, and the iPXE
script parser of the HTTP mode, run on what sidus renders; the check of the storm's spooled
kernel and initrd copies."""

from __future__ import annotations

import hashlib
from pathlib import Path

from scapy.layers.dhcp import BOOTP, DHCP

from bench.clients import INITRD, KERNEL, verify_spooled
from bench.dhcpclient import PXE_BOOT_ITEM, PXE_BOOT_MENU, boot_item, request_packet
from bench.httpboot import script_urls
from sidusd.boot.inventory import BootTarget
from sidusd.boot.render import RenderContext, ipxe_script
from sidusd.proto import dhcp

MAC = "52:54:00:be:01:02"


def _opts(pkt: BOOTP) -> dict:
    return {o[0]: o[1] for o in pkt[DHCP].options if isinstance(o, tuple)}


def test_discover_is_what_a_pxe_rom_sends():
    raw = request_packet(dhcp.DHCPDISCOVER, 0x1234ABCD, MAC, ipxe=False)
    pkt = BOOTP(raw)
    assert pkt.op == 1 and pkt.xid == 0x1234ABCD and pkt.ciaddr == "0.0.0.0"
    assert pkt.chaddr[:6] == bytes.fromhex(MAC.replace(":", ""))
    o = _opts(pkt)
    assert o["message-type"] == 1
    assert o["vendor_class_id"] == b"PXEClient:Arch:00000:UNDI:002001"
    assert o["pxe_client_architecture"] == b"\x00\x00"                 # RFC 4578: x86 BIOS
    assert o["pxe_client_network_interface"] == b"\x01\x02\x01"        # UNDI 2.1
    uuid = o["pxe_client_machine_identifier"]
    assert len(uuid) == 17 and uuid[0] == 0                          # type 0 + 16-byte UUID
    assert "server_id" not in o and "user_class" not in o and 175 not in o   # a ROM, not iPXE
    assert len(raw) >= dhcp.BOOTP_MIN_LEN


def test_ipxe_request_to_4011_carries_77_175_server_id_and_boot_item():
    item = dhcp.encode_suboptions([(PXE_BOOT_ITEM, b"\x80\x00\x00\x00")])
    raw = request_packet(dhcp.DHCPREQUEST, 7, MAC, ipxe=True, ciaddr="10.77.0.2",
                         server_id=bytes([10, 77, 0, 1]), item=item)
    pkt = BOOTP(raw)
    assert pkt.ciaddr == "10.77.0.2"
    o = _opts(pkt)
    assert o["message-type"] == 3
    assert o["server_id"] == "10.77.0.1"
    assert o["user_class"] == b"iPXE" and o[175] == b"\x13\x01\x01"
    # sidus' own decoder agrees with scapy on the options sidusd's policy reads
    ours = dhcp.decode(raw)
    assert ours.option(dhcp.OPT_USER_CLASS) == b"iPXE" and ours.has(dhcp.OPT_IPXE_ENCAP)
    assert dict(dhcp.decode_suboptions(ours.option(dhcp.OPT_VENDOR_SPECIFIC))) == {PXE_BOOT_ITEM: b"\x80\x00\x00\x00"}


def test_boot_item_is_the_first_menu_entry_or_nothing():
    menu = b"\x80\x00\x05sidus" + b"\x80\x01\x03two"
    offer = dhcp.DhcpPacket(op=dhcp.BOOTREPLY, xid=1, chaddr=b"\x52\x54\x00\xbe\x01\x02", options=(
        (dhcp.OPT_MESSAGE_TYPE, b"\x02"),
        (dhcp.OPT_VENDOR_SPECIFIC, dhcp.encode_suboptions([(6, b"\x03"), (PXE_BOOT_MENU, menu)]))))
    assert dict(dhcp.decode_suboptions(boot_item(offer))) == {PXE_BOOT_ITEM: b"\x80\x00\x00\x00"}
    # sidusd's OFFER: option 43 with discovery control only (boot file in the packet): no item
    plain = offer.with_options((dhcp.OPT_VENDOR_SPECIFIC, dhcp.pxe_vendor_options()))
    assert boot_item(plain) is None
    assert boot_item(offer.with_options((dhcp.OPT_VENDOR_SPECIFIC, b"\x09\x05ab"))) is None   # overrun
    no43 = dhcp.DhcpPacket(op=dhcp.BOOTREPLY, xid=1, chaddr=b"\x52\x54\x00\xbe\x01\x02",
                           options=((dhcp.OPT_MESSAGE_TYPE, b"\x02"),))
    assert boot_item(no43) is None


def test_script_urls_reads_what_sidus_renders():
    target = BootTarget(mac=MAC, hostname="n1", profile="default", image="demo",
                        image_root=Path("/srv/images/demo"),
                        kernel="images/demo/vmlinuz", initrd="images/demo/initrd.img",
                        overlay="tmpfs", append="console=ttyS0")
    text = ipxe_script(target, RenderContext(server_ip="10.77.0.1", nfs_server="10.77.0.1",
                                             http_base="http://10.77.0.1:8080")).decode()
    assert script_urls(text) == ("http://10.77.0.1:8080/images/demo/vmlinuz",
                                 "http://10.77.0.1:8080/images/demo/initrd.img")
    assert script_urls("#!ipxe\ninitrd http://x/i\nkernel http://x/k a=b\n") == ("http://x/k", "http://x/i")
    assert script_urls("#!ipxe\nboot\n") == (None, None)
    assert script_urls("initrd --name\n") == (None, None)


def test_spooled_copies_are_hashed_after_the_storm_and_removed(tmp_path):
    """A spooled copy that differs is a mismatch, one that is gone a failure; none is left."""
    good, bad, gone = tmp_path / "0.0", tmp_path / "0.1", tmp_path / "1.0"
    good.write_bytes(b"kernel")
    bad.write_bytes(b"initrd, but cut")
    expect = {KERNEL: hashlib.sha256(b"kernel").hexdigest(), INITRD: hashlib.sha256(b"initrd").hexdigest()}
    a = {"failed": [], "mismatch": [], "spooled": [(KERNEL, good), (INITRD, bad)]}
    b = {"failed": [], "mismatch": [], "spooled": [(KERNEL, gone)]}
    verify_spooled(a, expect)
    verify_spooled(b, expect)
    assert (a["mismatch"], a["failed"], "spooled" in a) == ([INITRD], [], False)
    assert b["mismatch"] == [] and len(b["failed"]) == 1 and "unreadable" in b["failed"][0]
    assert list(tmp_path.iterdir()) == []
