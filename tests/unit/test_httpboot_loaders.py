"""UEFI HTTP Boot and the loader choice (pure): sidusd/boot/loaders.py through boot.policy.decide,
the boot.loader config keys, and what sidusd --check needs for them (sidusd/preflight.py)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from sidusd import config as config_mod
from sidusd import preflight as pf
from sidusd.boot import loaders, policy
from sidusd.errors import ConfigError
from sidusd.proto import dhcp

SERVER = "10.0.0.1"
MAC = "52:54:00:18:00:09"
HTTP_VCI = b"HTTPClient:Arch:00016:UNDI:003001"
EFI_VCI = b"PXEClient:Arch:00007:UNDI:003016"
SCRIPT = f"http://{SERVER}:8080/boot/52-54-00-18-00-09.ipxe"


def conf(boot: str = "", http: bool = True):
    return config_mod.parse(f"""
dhcp: {{mode: proxy, interfaces: [br0]}}
tftp: {{root: /srv/tftp}}
http: {{enabled: {str(http).lower()}, port: 8080}}
boot: {{ {boot} }}
""")


class Target:
    def __init__(self, profile: str):
        self.profile = profile


def offer(cfg, arch: int, vci: bytes, *, profile: str | None = None, ipxe: bool = False):
    opts = [(dhcp.OPT_MESSAGE_TYPE, bytes([dhcp.DHCPDISCOVER])), (dhcp.OPT_CLIENT_ARCH, struct.pack("!H", arch)),
            (dhcp.OPT_VENDOR_CLASS, vci)]
    if ipxe:
        opts.append((dhcp.OPT_IPXE_ENCAP, bytes([0x13, 1, 1])))
    p = dhcp.DhcpPacket(op=1, xid=7, chaddr=bytes.fromhex(MAC.replace(":", "")), options=tuple(opts), flags=0x8000)
    req = policy.BootRequest.from_packet(dhcp.decode(dhcp.encode(p)), policy.VIA_DHCP, SERVER, ("0.0.0.0", 68))
    return policy.decide(req, cfg, lambda mac: Target(profile) if profile else True)


def test_http_boot_client_gets_ipxe_not_syslinux_efi():
    d = offer(conf(), 16, HTTP_VCI)
    assert isinstance(d, policy.Reply), d
    # before issue 18: http://10.0.0.1:8080/syslinux.efi, which cannot go on after an HTTP download
    assert d.boot_file == f"http://{SERVER}:8080/snponly.efi"
    assert d.packet.option(dhcp.OPT_VENDOR_CLASS) == b"HTTPClient"
    assert d.packet.option(dhcp.OPT_VENDOR_SPECIFIC) is None


def test_an_http_architecture_gets_httpclient_in_option_60_even_if_it_said_pxeclient():
    d = offer(conf(), 16, b"PXEClient:Arch:00016")
    assert isinstance(d, policy.Reply) and d.boot_file.startswith("http://"), d
    assert d.packet.option(dhcp.OPT_VENDOR_CLASS) == b"HTTPClient"


def test_http_loader_null_leaves_http_boot_unanswered_with_the_key():
    d = offer(conf("loader: {http: null}"), 16, HTTP_VCI)
    assert isinstance(d, policy.Drop) and d.code == "no_boot_file" and "boot.loader.http" in d.detail, d


def test_http_boot_needs_http_enabled():
    d = offer(conf(http=False), 16, HTTP_VCI)
    assert isinstance(d, policy.Drop) and "http.enabled" in d.detail, d


@pytest.mark.parametrize("boot, profile, arch, vci, ipxe, file", [
    ("", None, 7, EFI_VCI, False, "syslinux.efi"),                                    # as before loaders
    ("loader: {uefi_x64: grub}", None, 7, EFI_VCI, False, "shimx64.efi"),            # per architecture
    ("loader: {profiles: {secure: grub}}", "secure", 7, EFI_VCI, False, "shimx64.efi"),  # per profile
    ("loader: {profiles: {secure: grub}}", "other", 7, EFI_VCI, False, "syslinux.efi"),
    ("loader: {uefi_x64: grub, profiles: {old: pxelinux}}", "old", 7, EFI_VCI, False, "syslinux.efi"),
    ("loader: {bios: ipxe}", None, 0, b"PXEClient:Arch:00000", False, "undionly.kpxe"),
    ("loader: {bios: ipxe}", None, 0, b"PXEClient:Arch:00000", True, SCRIPT),        # iPXE: its script
    ("loader: {uefi_x64: ipxe}", None, 7, EFI_VCI, True, SCRIPT),                    # after HTTP Boot
    ("", None, 7, EFI_VCI, True, "syslinux.efi"),         # an iPXE ROM of a pxelinux machine: syslinux.efi
    ("loader: {profiles: {secure: grub}}", "secure", 16, HTTP_VCI, False, f"http://{SERVER}:8080/snponly.efi"),
    ("loader: {uefi_x64: grub, grub: {uefi_x64: sb/shimx64.efi}}", None, 7, EFI_VCI, False, "sb/shimx64.efi"),
])
def test_loader_decision(boot, profile, arch, vci, ipxe, file):
    d = offer(conf(boot), arch, vci, profile=profile, ipxe=ipxe)
    assert isinstance(d, policy.Reply), d
    assert d.boot_file == file


def test_a_loader_without_a_file_for_the_architecture_is_refused_with_the_reason():
    d = offer(conf("loader: {bios: grub}"), 0, b"PXEClient:Arch:00000")
    assert isinstance(d, policy.Drop) and d.code == "no_boot_file", d
    assert "boot.loader.bios" in d.detail and "boot.loader.grub.bios" in d.detail, d.detail
    d = offer(conf("loader: {uefi_ia32: ipxe}, boot_files: {uefi_ia32: ia32.efi}"), 6, EFI_VCI)
    assert isinstance(d, policy.Drop) and "no iPXE binary for uefi_ia32" in d.detail, d


def test_choose_order():
    c = conf("loader: {uefi_x64: ipxe, profiles: {p: grub}}")
    assert loaders.choose("uefi_x64", c) == loaders.Choice("ipxe", "boot.loader.uefi_x64")
    assert loaders.choose("uefi_x64", c, profile="p") == loaders.Choice("grub", "boot.loader.profiles.p")
    assert loaders.choose("uefi_x64", c, profile="p", http=True) == loaders.Choice("ipxe", "boot.loader.http")
    assert loaders.choose("bios", conf("ipxe_chain: true")) == loaders.Choice("ipxe", "boot.ipxe_chain")


@pytest.mark.parametrize("boot, key, words", [
    ("loader: {http: pxelinux}", "boot.loader.http", "cannot boot after a UEFI HTTP Boot download"),
    ("loader: {http: grub}", "boot.loader.http", "no PXE base code"),
    ("loader: {uefi_x64: lilo}", "boot.loader.uefi_x64", "lilo"),
    ("loader: {profiles: {'bad name': grub}}", "boot.loader.profiles", "a key"),
    ("loader: {grub: {uefi_x64: /abs/shim.efi}}", "boot.loader.grub.uefi_x64", "absolute"),
    ("loader: {grub: {uefi_x64: ../shim.efi}}", "boot.loader.grub.uefi_x64", ".."),
    ("loader: {ppc: grub}", "boot.loader.ppc", "unknown"),
])
def test_bad_loader_config_is_refused_with_key_and_reason(boot, key, words):
    with pytest.raises(ConfigError) as e:
        conf(boot)
    assert e.value.path.startswith(key) and words in str(e.value), (e.value.path, str(e.value))


def files_needed(c) -> dict[str, str]:
    return {n.path: n.key for n in pf.needs(c) if n.kind == pf.FILE}


def test_check_needs_each_loader_in_use_with_its_key():
    c = conf("loader: {profiles: {secure: grub}}")
    paths = files_needed(c)
    assert paths["/srv/tftp/shimx64.efi"] == "boot.loader.profiles.secure (boot.loader.grub.uefi_x64)"
    assert paths["/srv/tftp/grubx64.efi"].endswith("(its companion)")
    # HTTP Boot's iPXE is needed when http is on (the default boot.loader.http)
    assert paths["/srv/tftp/snponly.efi"] == "boot.loader.http (boot.boot_files.ipxe_efi)"
    present = frozenset((n.kind, n.path) for n in pf.needs(c) if n.path != "/srv/tftp/shimx64.efi")
    (p,) = pf.problems(pf.needs(c), present)
    assert p.key.startswith("boot.loader.profiles.secure") and "apt-get install shim-signed" in p.fix, p


def test_check_without_http_or_with_http_loader_null_needs_no_ipxe():
    assert "/srv/tftp/snponly.efi" not in files_needed(conf(http=False))
    assert "/srv/tftp/snponly.efi" not in files_needed(conf("loader: {http: null}"))


def test_the_shipped_config_offers_ipxe_to_http_boot():
    text = (Path(config_mod.__file__).parent / "data" / "sidus.yaml").read_text()
    c = config_mod.parse(text.replace("enabled: false\n  address: 0.0.0.0\n  port: 8080",
                                      "enabled: true\n  address: 0.0.0.0\n  port: 8080"))
    assert c.http.enabled and c.boot.loader.http == "ipxe"
    assert loaders.choose("uefi_x64", c, http=True).loader == "ipxe"
    assert loaders.first_file("ipxe", "uefi_x64", c)[0] == "snponly.efi"
