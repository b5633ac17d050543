"""What sidus knows about one DHCP request (pure): its client's architecture and kind.

:meth:`BootRequest.from_packet` classifies a decoded packet once, for
:func:`sidusd.boot.policy.decide`: the architecture of option 93 (RFC 4578
§2.1), whether it is a PXE client (option 60, PXE 2.1 §2.2.5) or a UEFI HTTP
boot client, whether it is already iPXE (options 77/175), and which port it
came in on.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from sidusd.proto import dhcp

IPv4Address = ipaddress.IPv4Address
VIA_DHCP = "dhcp"           # arrived on config.dhcp.port (67)
VIA_PXE = "pxe"             # arrived on config.dhcp.pxe_port (4011)


@dataclass(frozen=True)
class Arch:
    """A client architecture (RFC 4578 §2.1 and the IANA "Processor Architecture Types").

    ``family`` names the ``config.boot.boot_files`` entry it boots; ``http``
    marks the UEFI HTTP boot types, which get a URL instead of a TFTP name.
    """

    code: int
    name: str
    family: str
    http: bool = False


ARCHES: dict[int, Arch] = {a.code: a for a in (
    Arch(0, "bios", "bios"),
    Arch(6, "efi-ia32", "uefi_ia32"),
    # Quirk: RFC 4578 lists 7 as "EFI BC" and 9 as "EFI x86-64", but the IANA
    # registry and most x64 firmware (OVMF included) send 7; both mean x64 here.
    Arch(7, "efi-x64", "uefi_x64"),
    Arch(9, "efi-x64", "uefi_x64"),
    Arch(11, "efi-arm64", "arm64"),
    Arch(15, "efi-ia32-http", "uefi_ia32", True),
    Arch(16, "efi-x64-http", "uefi_x64", True),
    Arch(19, "efi-arm64-http", "arm64", True),
)}


def arch_of(code: int) -> Arch | None:
    """The :class:`Arch` of option 93 value ``code``, or None if sidus cannot boot it."""
    return ARCHES.get(code)


@dataclass(frozen=True)
class BootRequest:
    """What sidus needs to know about one received request (RFC 2131, RFC 4578)."""

    packet: dhcp.DhcpPacket
    via: str                            # VIA_DHCP or VIA_PXE
    server_ip: IPv4Address              # address of the interface it came in on
    source: tuple[str, int] | None      # (ip, port) it came from
    mac: str
    msg_type: int | None
    arch: Arch | None                   # None: option 93 names an arch sidus cannot boot
    arch_code: int
    pxe: bool                           # option 60 starts with PXEClient or HTTPClient
    http_client: bool                   # option 60 starts with HTTPClient (UEFI HTTP boot)
    ipxe: bool                          # option 77 "iPXE" or option 175 present

    @classmethod
    def from_packet(cls, pkt: dhcp.DhcpPacket, via: str, server_ip: IPv4Address | str,
                    source: tuple[str, int] | None = None) -> BootRequest:
        """Classify ``pkt`` (RFC 4578 §2.1 option 93, PXE 2.1 option 60, iPXE 77/175)."""
        vendor = pkt.option(dhcp.OPT_VENDOR_CLASS) or b""
        arches = dhcp.client_arches(pkt)
        # RFC 4578 §2.1: a client that sends no option 93 is treated as x86 BIOS.
        code = arches[0] if arches else 0
        user_class = pkt.option(dhcp.OPT_USER_CLASS) or b""
        return cls(packet=pkt, via=via, server_ip=IPv4Address(server_ip), source=source,
                   mac=pkt.mac, msg_type=pkt.message_type, arch=arch_of(code), arch_code=code,
                   pxe=vendor.startswith((b"PXEClient", b"HTTPClient")),
                   http_client=vendor.startswith(b"HTTPClient"),
                   # iPXE sends 77 as the bare string "iPXE" (not RFC 3004 format); the
                   # encapsulated option 175 is iPXE's own and present in every request.
                   ipxe=user_class == b"iPXE" or pkt.has(dhcp.OPT_IPXE_ENCAP))

    @property
    def http_boot(self) -> bool:
        """A UEFI HTTP Boot client: option 60 ``HTTPClient`` or an HTTP architecture (93 = 15/16/19)."""
        return self.http_client or (self.arch is not None and self.arch.http)

    @property
    def arch_name(self) -> str:
        return self.arch.name if self.arch else f"arch-{self.arch_code}"
