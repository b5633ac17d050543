"""UEFI HTTP Boot, native: OVMF's HttpBootDxe (Debian ``ovmf``: "Start HTTP Boot over IPv4") asks
sidusd (full DHCP) with option 60 ``HTTPClient`` and option 93 = 16, is offered
``http://<server>:8080/snponly.efi`` (``boot.loader.http: ipxe``), downloads it from sidusd's HTTP
server and runs it; that iPXE does its own DHCP (option 175) and gets its script
(``boot.loader.uefi_x64: ipxe``), then kernel and initrd over HTTP, NFS root, READY.

No NIC option ROM (``romfile=``): the firmware's own network stack boots, and its PXE is turned
off (fw_cfg ``opt/org.tianocore/IPv4PXESupport`` / ``IPv6PXESupport`` = ``n``) so the HTTPv4
boot option is the first that can answer.  Before issue 18 the offer was
``http://.../syslinux.efi``, which stops right after the download (docs/quirks.md).
"""

from __future__ import annotations

import time

import pytest
from conftest import require_lab

from sidusd.lab.demo import HTTP_PORT, HostSpec, Lab, boot_markers
from sidusd.lab.topology import SERVER_IP, netns_list
from sidusd.lab.vm import OVMF_CODE, OVMF_VARS, Vm, mac_for

pytestmark = [pytest.mark.e2e, pytest.mark.netns]

TIMEOUT_S = 600


class HttpBootVm(Vm):
    """The lab's UEFI VM without the iPXE ROM and with OVMF's PXE off: only HTTP Boot is left."""

    def argv(self) -> list[str]:
        out = [a.split(",romfile=")[0] + ",romfile=,bootindex=1" if ",romfile=" in a else a
               for a in super().argv()]
        return out + ["-fw_cfg", "name=opt/org.tianocore/IPv4PXESupport,string=n",
                      "-fw_cfg", "name=opt/org.tianocore/IPv6PXESupport,string=n"]


class HttpBootLab(Lab):
    def config_dict(self, exports_file, pid_file):
        cfg = super().config_dict(exports_file, pid_file)
        cfg["boot"] = {**cfg.get("boot", {}), "loader": {"uefi_x64": "ipxe", "http": "ipxe"}}
        return cfg


def test_ovmf_http_boot_gets_ipxe_and_reaches_the_marker(tmp_path, demo_image):
    require_lab()
    for path in (OVMF_CODE, OVMF_VARS):
        if not path.is_file():
            pytest.skip(f"missing {path} (package ovmf)")
    mac = mac_for(33)
    lab = HttpBootLab(tmp_path / "lab", mode="full", progress=lambda msg: None, http=True)
    names: list[str] = []
    try:
        lab.up(demo_image, [HostSpec(mac, "e2e-httpboot", "sidus.demo=poweroff sidus.test=httpboot")])
        assert lab.topology is not None
        names = [lab.topology.lab_ns]
        vm = HttpBootVm(lab.topology, lab.topology.add_tap(), mac, lab.workdir, name="hb1", uefi=True)
        lab.vms.append(vm)
        t0 = time.monotonic()
        vm.start()
        while (time.monotonic() < t0 + TIMEOUT_S and vm.running()
               and "READY" not in boot_markers(vm.console_text())):
            time.sleep(1)
        took = time.monotonic() - t0
        console = vm.console_text()
        markers = boot_markers(console)
        assert "READY" in markers, (took, console[-4000:], lab.sidusd_log_tail(30))
        assert "Start HTTP Boot over IPv4" in console and "Start PXE over IPv4" not in console, console[-4000:]
        cmdline = " ".join(m.split(":", 1)[1] for m in markers if m.startswith("cmdline:"))
        assert "sidus.test=httpboot" in cmdline, markers
        clients = lab.sidusctl("clients", mac)
        tl = clients[0]["timeline"]
        offers = [e.get("file") for e in tl if e["event"] in ("dhcp.offer", "dhcp.ack")]
        assert f"http://{SERVER_IP}:{HTTP_PORT}/snponly.efi" in offers, tl     # the firmware's offer
        http = [e.get("file") for e in tl if e["event"] == "http" and e.get("status") == 200]
        # every file over HTTP: iPXE, its script, kernel, initrd; nothing over TFTP
        assert http[:1] == ["snponly.efi"] and "demo/vmlinuz" in http and "demo/initrd.img" in http, http
        assert not [e for e in tl if e["event"] == "tftp"], tl
        print(f"UEFI HTTP Boot: READY after {took:.0f} s; HTTP: {http}")
    except BaseException:
        for v in list(lab.vms) or [None]:
            print(lab.diagnostics(v))
        raise
    finally:
        lab.close()
    assert not set(names) & set(netns_list()), "lab namespaces left behind"
