"""UEFI PXE: OVMF + iPXE's EFI driver ROM -> sidusd proxyDHCP (option 93 = 7) -> syslinux.efi
-> ldlinux.e64 -> the per-MAC pxelinux config -> kernel + initrd over TFTP -> NFS root from
nfs-ganesha -> overlay on tmpfs -> the demo image's markers.

The PXE client is the NIC's ROM: qemu loads iPXE's EFI build
(``efi-virtio.rom``), which OVMF runs as a boot option; it asks with option
93 = 7 (x64 UEFI) and option 175 (iPXE), takes its address from the site's
DHCP server (dnsmasq) and the boot file from sidusd's proxy offer (with
``boot.ipxe_chain`` off an iPXE client gets its family's file), then runs
syslinux.efi, which reuses the cached DHCP packets ("Getting cached packet")
to find sidusd as its TFTP server.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import require_lab

from sidusd.lab.demo import LDLINUX_E64, SYSLINUX_EFI, HostSpec, Lab, boot_markers, tree_fingerprint
from sidusd.lab.topology import SERVER_IP, netns_list
from sidusd.lab.vm import EFI_NIC_ROM, OVMF_CODE, OVMF_VARS, mac_for

pytestmark = [pytest.mark.e2e, pytest.mark.netns]

BOOT_TIMEOUT_S = 600         # ~1-2 min under TCG on an idle machine (OVMF is slower than SeaBIOS)


def require_uefi() -> None:
    for path, package in ((OVMF_CODE, "ovmf"), (OVMF_VARS, "ovmf"), (EFI_NIC_ROM, "ipxe-qemu"),
                          (SYSLINUX_EFI, "syslinux-efi"), (LDLINUX_E64, "syslinux-common")):
        if not Path(path).exists():
            pytest.skip(f"missing: {path} (package {package})")


@pytest.fixture
def uefi_lab(request, tmp_path):
    """A proxy-mode lab (site DHCP + sidusd proxyDHCP); closed at the end."""
    require_lab()
    require_uefi()
    lab = Lab(tmp_path / "lab", mode="proxy", progress=lambda msg: None)
    yield lab
    names = [lab.topology.lab_ns, lab.topology.site_ns] if lab.topology is not None else []
    if any(getattr(request.node, f"rep_{w}", None) is not None
           and getattr(request.node, f"rep_{w}").failed for w in ("setup", "call")):
        for vm in list(lab.vms) or [None]:
            print(lab.diagnostics(vm))
    lab.close()
    assert not set(names) & set(netns_list()), "lab namespaces left behind"


def test_uefi_pxe_syslinux_efi_nfs_root_overlay(uefi_lab, demo_image):
    lab, mac = uefi_lab, mac_for(30)
    lab.up(demo_image, [HostSpec(mac, "e2e-uefi", "sidus.demo=poweroff sidus.test=uefi")])
    before = tree_fingerprint(demo_image.root)
    vm = lab.boot_vm(mac, name="uefi1", uefi=True)
    tl = lab.timeline(vm)
    assert lab.follow(vm, tl, BOOT_TIMEOUT_S), (f"no READY; first missing step: {tl.first_missing()}\n"
                                                + lab.diagnostics(vm))
    # every step, from sidusd's own events: the offer, syslinux.efi, ldlinux.e64, the per-MAC
    # config, kernel, initrd; then the kernel banner, the NFS root, the overlay, READY
    assert tl.first_missing() is None, lab.diagnostics(vm)
    assert vm.wait_exit(60) is not None, "the guest did not power off\n" + lab.diagnostics(vm)

    markers = boot_markers(vm.console_text())
    cmdline = " ".join(m.split(":", 1)[1] for m in markers if m.startswith("cmdline:"))
    assert "sidus.test=uefi" in cmdline and f"nfsroot={SERVER_IP}:{demo_image.root}" in cmdline, markers
    assert "writable: yes" in markers, markers
    root = [m for m in markers if m.startswith("root mounted:")][0].split(":", 1)[1].split()
    assert root[1:3] == ["/", "overlay"], root
    assert tree_fingerprint(demo_image.root) == before, "the guest wrote into the NFS root"

    clients = lab.sidusctl("clients", mac)
    assert clients and clients[0]["arch"] == "efi-x64", clients      # option 93 = 7
    seen = [(e["event"], e.get("file")) for e in clients[0]["timeline"]]
    assert ("dhcp.offer", "syslinux.efi") in seen, seen
    assert ("tftp", "pxelinux.cfg/01-" + mac.replace(":", "-")) in seen, seen
    assert not [f for ev, f in seen if f == "pxelinux.0"], "a UEFI client was given the BIOS loader"


def test_uefi_ipxe_fetches_script_kernel_initrd_over_http(tmp_path, demo_image):
    """UEFI iPXE with ``boot.ipxe_chain``: the HTTP script, then kernel (EFI stub) + initrd over HTTP."""
    require_lab()
    require_uefi()
    mac = mac_for(31)
    lab = Lab(tmp_path / "lab", mode="proxy", progress=lambda msg: None, http=True, ipxe_chain=True)
    try:
        lab.up(demo_image, [HostSpec(mac, "e2e-uefi-http", "sidus.demo=poweroff sidus.test=uefi-http")])
        vm = lab.boot_vm(mac, name="uefihttp1", uefi=True)
        tl = lab.timeline(vm)
        assert lab.follow(vm, tl, BOOT_TIMEOUT_S), (f"no READY; first missing step: {tl.first_missing()}\n"
                                                    + lab.diagnostics(vm))
        assert tl.first_missing() is None, lab.diagnostics(vm)
        markers = boot_markers(vm.console_text())
        assert any("sidus.test=uefi-http" in m for m in markers if m.startswith("cmdline:")), markers
        assert "writable: yes" in markers, markers
        clients = lab.sidusctl("clients", mac)
        assert clients[0]["arch"] == "efi-x64", clients
        http = {e["file"]: e for e in clients[0]["timeline"] if e["event"] == "http" and e["status"] == 200}
        assert http.get("demo/vmlinuz", {}).get("bytes") == demo_image.kernel.stat().st_size, http
        assert http.get("demo/initrd.img", {}).get("bytes") == demo_image.initrd.stat().st_size, http
    except BaseException:
        for vm in list(lab.vms) or [None]:
            print(lab.diagnostics(vm))       # shown by pytest with the failure
        raise
    finally:
        names = [lab.topology.lab_ns, lab.topology.site_ns] if lab.topology is not None else []
        lab.close()
    assert not set(names) & set(netns_list()), "lab namespaces left behind"
