"""UEFI HTTP Boot and the loader choice, against the real daemon (full DHCP, privsep) in two network
namespaces made here (tests/integration/scripted_boot.py): a scapy-built DISCOVER as OVMF's
HttpBootDxe sends it (option 60 ``HTTPClient:Arch:00016:UNDI:003001``, option 93 = 16) is offered
iPXE's ``snponly.efi`` as a URL with option 60 ``HTTPClient`` in the reply; curl in the client
namespace fetches that URL from sidusd's HTTP server and gets Debian's snponly.efi, an x64 EFI
program.  A PXE client of a profile with ``boot.loader.profiles.<name>: grub`` is offered shim.
"""

from __future__ import annotations

import shutil
import struct
import time
from pathlib import Path

import pytest
import yaml
from conftest import require_tool
from scripted_boot import CLIENT_IP, HTTP_PORT, SERVER_IP, boot_lab

pytestmark = pytest.mark.netns

SNPONLY = Path("/usr/lib/ipxe/snponly.efi")
HTTP_MAC = "52:54:00:18:48:01"
SB_MAC = "52:54:00:18:48:02"


def discover(mac: str, xid: int, arch: int, vci: bytes) -> bytes:
    from scapy.layers.dhcp import BOOTP, DHCP
    from scapy.utils import mac2str
    opts = [("message-type", "discover"), ("pxe_client_architecture", struct.pack("!H", arch)),
            ("vendor_class_id", vci), "end"]
    return bytes(BOOTP(op=1, xid=xid, flags=0x8000, chaddr=mac2str(mac)) / DHCP(options=opts))


def ask(lab, mac: str, xid: int, arch: int, vci: bytes):
    from scapy.layers.dhcp import BOOTP, DHCP
    lab.sock.sendto(discover(mac, xid, arch, vci), ("255.255.255.255", 67))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            raw, _ = lab.sock.recvfrom(4096)
        except TimeoutError:
            continue
        reply = BOOTP(raw)
        if reply.xid == xid and reply.op == 2:
            opts = {o[0]: o[1] for o in reply[DHCP].options if isinstance(o, tuple)}
            return reply, opts
    raise AssertionError(f"no offer for {mac}:\n{lab.log_tail()}")


def is_x64_efi(data: bytes) -> bool:
    """A PE32+ image for x86-64 (EFI programs are PE): 'MZ', then 'PE\\0\\0' and machine 0x8664."""
    if data[:2] != b"MZ" or len(data) < 0x40:
        return False
    pe = struct.unpack_from("<I", data, 0x3C)[0]
    return data[pe:pe + 4] == b"PE\0\0" and struct.unpack_from("<H", data, pe + 4)[0] == 0x8664


def start(lab, tmp_path: Path, boot: dict | None) -> None:
    tftp = tmp_path / "tftp"
    shutil.copyfile(SNPONLY, tftp / "snponly.efi")
    for name in ("shimx64.efi", "grubx64.efi"):          # only their presence matters here
        (tftp / name).write_bytes(b"MZ" + name.encode())
    cfg = yaml.safe_load((tmp_path / "sidus.yaml").read_text())
    cfg["dhcp"]["pool"]["range_end"] = "10.78.0.60"
    if boot is not None:
        cfg["boot"] = boot
    (tmp_path / "sidus.yaml").write_text(yaml.safe_dump(cfg))
    inv = yaml.safe_load((tmp_path / "inventory.yaml").read_text())
    inv["profiles"]["secure"] = {"image": "demo", "overlay": "tmpfs", "append": ""}
    (tmp_path / "inventory.yaml").write_text(yaml.safe_dump(inv))
    lab.start()


def need() -> None:
    require_tool("curl")
    if not SNPONLY.is_file():
        pytest.skip(f"missing {SNPONLY} (package ipxe)")


HOSTS = [{"mac": HTTP_MAC, "hostname": "hb1", "profile": "default"},
         {"mac": SB_MAC, "hostname": "sb1", "profile": "secure"}]


def test_http_boot_client_is_offered_ipxe_and_fetches_it(tmp_path):
    """The default config (no boot.loader key): before issue 18 the offer was .../syslinux.efi."""
    need()
    with boot_lab(tmp_path, HOSTS, "sidus-t-hb") as lab:
        start(lab, tmp_path, None)
        reply, opts = ask(lab, HTTP_MAC, 0x1801, 16, b"HTTPClient:Arch:00016:UNDI:003001")
        url = reply.file.rstrip(b"\0").decode()
        assert url == f"http://{SERVER_IP}:{HTTP_PORT}/snponly.efi", (url, lab.log_tail())
        assert opts.get("vendor_class_id") == b"HTTPClient", opts      # UEFI takes no offer without it
        assert "vendor_specific" not in opts, opts                    # no PXE option 43 for HTTP Boot
        assert reply.yiaddr == CLIENT_IP, reply

        got = tmp_path / "got.efi"
        r = lab.client.run("curl", "-fsS", "-o", str(got), url, check=False)
        assert r.returncode == 0, r.stderr + lab.log_tail()
        assert got.read_bytes() == SNPONLY.read_bytes() and is_x64_efi(got.read_bytes())
        assert lab.stop() == 0


def test_a_profile_chooses_its_loader_but_not_over_http_boot(tmp_path):
    need()
    with boot_lab(tmp_path, HOSTS, "sidus-t-hl") as lab:
        start(lab, tmp_path, {"loader": {"profiles": {"secure": "grub"}}})
        reply, opts = ask(lab, SB_MAC, 0x1802, 7, b"PXEClient:Arch:00007:UNDI:003016")
        assert reply.file.rstrip(b"\0") == b"shimx64.efi", (reply.file, lab.log_tail())
        assert opts.get("vendor_class_id") == b"PXEClient", opts
        reply, _ = ask(lab, HTTP_MAC, 0x1803, 7, b"PXEClient:Arch:00007:UNDI:003016")
        assert reply.file.rstrip(b"\0") == b"syslinux.efi", reply.file       # another profile
        # the grub profile over UEFI HTTP Boot: GRUB's TFTP path cannot go on after it, iPXE is offered
        reply, _ = ask(lab, SB_MAC, 0x1804, 16, b"HTTPClient:Arch:00016:UNDI:003001")
        assert reply.file.rstrip(b"\0").decode().endswith("/snponly.efi"), reply.file
        assert lab.stop() == 0
