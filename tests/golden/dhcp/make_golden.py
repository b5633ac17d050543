"""Regenerate the golden DHCP packets of this directory.

    python3 tests/golden/dhcp/make_golden.py

scapy is the independent encoder for the first three (sidus' own codec is not
used here).  ``ipxe_request_4011.hex`` is written by hand, byte by byte, from
the option layout of iPXE's ``src/net/udp/dhcp.c`` (``dhcp_request_options_data``
then what ``dhcp_create_request`` appends) for a ProxyDHCPREQUEST sent to port
4011: ciaddr set, option 54 = the proxy server.  The files are the UDP payload
in hex, 32 bytes a line.
"""

from __future__ import annotations

import struct
from pathlib import Path

HERE = Path(__file__).resolve().parent
MAC = "52:54:00:12:34:56"
UUID = bytes.fromhex("00") + bytes(range(0x10, 0x20))     # type 0 + 16 bytes (RFC 4578 §2.3)


def write_hex(name: str, data: bytes) -> None:
    lines = [data[i:i + 32].hex() for i in range(0, len(data), 32)]
    (HERE / name).write_text("\n".join(lines) + "\n")


def scapy_packets() -> dict[str, bytes]:
    from scapy.layers.dhcp import BOOTP, DHCP
    from scapy.utils import mac2str

    chaddr = mac2str(MAC)
    bios = BOOTP(op=1, xid=0x12345678, secs=4, flags=0x8000, chaddr=chaddr) / DHCP(options=[
        ("message-type", "discover"),
        ("max_dhcp_size", 1260),
        ("param_req_list", [1, 2, 3, 5, 6, 11, 12, 13, 15, 16, 17, 18, 43, 54, 60, 67, 128,
                            129, 130, 131, 132, 133, 134, 135]),
        ("pxe_client_architecture", b"\x00\x00"),
        ("pxe_client_network_interface", b"\x01\x02\x01"),
        ("pxe_client_machine_identifier", UUID),
        ("vendor_class_id", b"PXEClient:Arch:00000:UNDI:002001"),
        "end"])
    uefi = BOOTP(op=1, xid=0x0badcafe, secs=0, chaddr=mac2str("52:54:00:00:00:07")) / DHCP(options=[
        ("message-type", "discover"),
        ("max_dhcp_size", 1472),
        ("param_req_list", [1, 2, 3, 4, 5, 6, 12, 13, 15, 17, 18, 22, 23, 28, 40, 41, 42,
                            43, 50, 51, 54, 58, 59, 60, 66, 67, 97, 128, 129, 130, 131,
                            132, 133, 134, 135]),
        ("pxe_client_machine_identifier", UUID),
        ("pxe_client_network_interface", b"\x01\x03\x00"),
        ("pxe_client_architecture", b"\x00\x07"),
        ("vendor_class_id", b"PXEClient:Arch:00007:UNDI:003000"),
        "end"])
    features = bytes([0x13, 1, 1, 0x11, 1, 1, 0x15, 1, 1, 0x24, 1, 1, 0xeb, 3, 1, 21, 1])
    ipxe = BOOTP(op=1, xid=0x00123456, chaddr=chaddr) / DHCP(options=[
        ("message-type", "discover"),
        ("max_dhcp_size", 1472),
        ("pxe_client_architecture", b"\x00\x00"),
        ("pxe_client_network_interface", b"\x01\x02\x01"),
        ("vendor_class_id", b"PXEClient:Arch:00000:UNDI:002001"),
        ("user_class", b"iPXE"),
        ("param_req_list", [1, 3, 6, 7, 12, 15, 17, 26, 43, 60, 66, 67, 119, 128, 129, 130,
                            131, 132, 133, 134, 135, 175, 203]),
        (175, features),
        ("client_id", b"\x01" + chaddr),
        ("pxe_client_machine_identifier", UUID),
        "end"])
    return {"bios_discover.hex": bytes(bios), "uefi_x64_discover.hex": bytes(uefi),
            "ipxe_discover.hex": bytes(ipxe)}


def ipxe_request_by_hand() -> bytes:
    """iPXE ProxyDHCPREQUEST to port 4011, from iPXE's dhcp.c layout."""
    head = bytes([1, 1, 6, 0])                        # op BOOTREQUEST, htype 1, hlen 6, hops 0
    head += bytes.fromhex("00123456")                 # xid: iPXE uses the MAC's last 4 bytes
    head += struct.pack("!HH", 0, 0)                  # secs, flags (unicast: ciaddr is set)
    head += bytes([10, 0, 0, 50])                     # ciaddr = address from the site DHCP ACK
    head += bytes(4) + bytes(4) + bytes(4)            # yiaddr, siaddr, giaddr
    head += bytes.fromhex("525400123456").ljust(16, b"\0")
    head += bytes(64) + bytes(128)                    # sname, file
    opts = bytes([53, 1, 3])                          # DHCP_MESSAGE_TYPE = REQUEST
    opts += bytes([57, 2]) + struct.pack("!H", 1500 - 20 - 8)   # DHCP_MAX_MESSAGE_SIZE
    opts += bytes([93, 2, 0, 0])                      # DHCP_CLIENT_ARCHITECTURE: x86 BIOS
    opts += bytes([94, 3, 1, 2, 1])                   # DHCP_CLIENT_NDI: UNDI 2.1
    vci = b"PXEClient:Arch:00000:UNDI:002001"
    opts += bytes([60, len(vci)]) + vci               # DHCP_VENDOR_CLASS_ID
    opts += bytes([77, 4]) + b"iPXE"                  # DHCP_USER_CLASS_ID
    prl = [1, 3, 6, 7, 12, 15, 17, 26, 43, 60, 66, 67, 119, 128, 129, 130, 131, 132,
           133, 134, 135, 175, 203]
    opts += bytes([55, len(prl)]) + bytes(prl)        # DHCP_PARAMETER_REQUEST_LIST
    opts += bytes([54, 4, 10, 0, 0, 1])               # DHCP_SERVER_IDENTIFIER = proxy server
    feat = bytes([0x13, 1, 1, 0x11, 1, 1, 0x15, 1, 1, 0x24, 1, 1, 0xeb, 3, 1, 21, 1])
    feat += bytes([0xb1, 5, 1, 0x1a, 0xf4, 0x10, 0x00])   # DHCP_EB_BUS_ID: PCI 1af4:1000
    opts += bytes([175, len(feat)]) + feat            # DHCP_EB_ENCAP
    opts += bytes([61, 7, 1]) + bytes.fromhex("525400123456")   # DHCP_CLIENT_ID
    opts += bytes([97, 17]) + UUID                    # DHCP_CLIENT_UUID
    opts += bytes([255])                              # DHCP_END (iPXE does not pad)
    return head + bytes.fromhex("63825363") + opts


def main() -> None:
    for name, data in scapy_packets().items():
        write_hex(name, data)
    write_hex("ipxe_request_4011.hex", ipxe_request_by_hand())


if __name__ == "__main__":
    main()
