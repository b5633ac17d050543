"""Secure Boot enforced: OVMF ``OVMF_CODE_4M.secboot.fd`` + ``OVMF_VARS_4M.ms.fd`` (Microsoft keys)
-> Debian's signed shim -> Debian's signed network GRUB -> the host's signed Debian kernel, with the
grub.cfg files sidusd decides for this MAC (``provider.decide``, the one decision the TFTP and HTTP
edges serve); the negative case: the unsigned ``syslinux.efi`` is refused by the firmware.

Scope: the network is qemu's user-mode stack (``restrict=on``: nothing leaves the qemu process),
whose DHCP hands out the boot file and whose built-in TFTP serves a directory that holds the
signed binaries as ``sidusctl tftp-root populate`` places them and the documents sidusd renders.
That sidusd's own TFTP service serves the same names in this order is
tests/integration/test_grub_chain.py; the full lab boot (sidusd proxyDHCP + NFS root) through
this chain is not done yet (issue 18).  No iPXE option ROM on the NIC: it is unsigned, Secure
Boot would refuse it; OVMF's own PXE driver boots.  ~35 s under TCG.
"""

from __future__ import annotations

import glob
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import console_text, require_tool

from sidusd import config
from sidusd.boot import provider
from sidusd.boot.inventory import Host, Inventory, Profile
from sidusd.preflight import SOURCES

pytestmark = [pytest.mark.e2e]

MAC = "52:54:00:18:00:01"
CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd")
VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.ms.fd")
SHIM = Path(SOURCES[("uefi_x64", "shimx64.efi")].path)
GRUB = Path(SOURCES[("uefi_x64", "grubx64.efi")].path)
SYSLINUX_EFI = Path(SOURCES[("uefi_x64", "syslinux.efi")].path)
TIMEOUT_S = 300


def _need() -> Path:
    require_tool("qemu-system-x86_64")
    for path, pkg in ((CODE, "ovmf"), (VARS, "ovmf"), (SHIM, "shim-signed"), (GRUB, "grub-efi-amd64-signed"),
                      (SYSLINUX_EFI, "syslinux-efi")):
        if not path.is_file():
            pytest.skip(f"missing {path} (package {pkg})")
    kernels = sorted(glob.glob("/boot/vmlinuz-*"))
    if not kernels:
        pytest.skip("missing /boot/vmlinuz-* (package linux-image-amd64, signed by Debian)")
    return Path(kernels[-1])


def _tree(tmp: Path, kernel: Path) -> Path:
    root = tmp / "tftp"
    (root / "grub").mkdir(parents=True)
    (root / "demo").mkdir()
    shutil.copyfile(SHIM, root / "shimx64.efi")
    shutil.copyfile(GRUB, root / "grubx64.efi")
    shutil.copyfile(SYSLINUX_EFI, root / "syslinux.efi")
    shutil.copyfile(kernel, root / "demo" / "vmlinuz")
    (root / "demo" / "initrd.img").write_bytes(b"070701" + b"0" * 104)   # never used: the test stops at the panic
    cfg = config.parse(f"""
dhcp: {{mode: proxy, interfaces: [eth1], unknown_hosts: ignore}}
tftp: {{root: {root}}}
images:
  demo: {{root: /srv/images/demo, kernel: demo/vmlinuz, initrd: demo/initrd.img, append: console=ttyS0}}
""")
    # panic=-1: the kernel reboots when it finds no root, and qemu -no-reboot exits
    inv = Inventory({"default": Profile("default", "demo", "tmpfs", "panic=-1")},
                    {MAC: Host(MAC, "default", hostname="sb1", append="sidus.test=secureboot a;reboot")})
    asker = provider.Asker("10.0.2.2", "10.0.2.15", MAC)
    for name in ("grub/grub.cfg", "grub/grub.cfg-01-" + MAC):
        doc = provider.decide(name, asker, cfg, inv, lambda mac, ip: None)
        assert isinstance(doc, provider.Document), doc
        (root / name).write_bytes(doc.body)
    return root


def _boot(tmp: Path, root: Path, bootfile: str, until: str) -> str:
    vars_copy = tmp / f"{bootfile}-VARS.fd"
    shutil.copyfile(VARS, vars_copy)
    log = tmp / f"{bootfile}.log"
    argv = ["qemu-system-x86_64", "-name", "sidus-sb", "-accel", "tcg", "-machine", "q35,smm=on", "-m", "512",
            "-global", "driver=cfi.pflash01,property=secure,value=on",
            "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={CODE}",
            "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}",
            "-netdev", f"user,id=n0,restrict=on,tftp={root},bootfile={bootfile}",
            "-device", f"virtio-net-pci,netdev=n0,mac={MAC},romfile=,bootindex=1",
            "-nographic", "-serial", f"file:{log}", "-display", "none", "-monitor", "none", "-no-reboot"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None:
            if until in console_text(log):
                break
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
    return console_text(log)


def test_shim_grub_signed_kernel_with_secure_boot_on(tmp_path):
    kernel = _need()
    root = _tree(tmp_path, kernel)
    console = _boot(tmp_path, root, "shimx64.efi", "end Kernel panic")
    assert "Fetching Netboot Image grubx64.efi" in console, console[-3000:]      # shim's second stage
    assert "sidus: booting image demo" in console, console[-3000:]               # our per-MAC grub.cfg
    assert "secureboot: Secure boot enabled" in console, console[-3000:]         # enforced, and the kernel passed
    line = next(l for l in console.splitlines() if "Kernel command line:" in l)
    # the per-host argument arrives, the hostile one stays a single argument (no GRUB command ran)
    assert "sidus.test=secureboot a;reboot" in line and "BOOTIF=01-52-54-00-18-00-01" in line, line
    assert "sidus.hostname=sb1" in line and "nfsroot=10.0.2.2:/srv/images/demo,tcp,vers=3" in line, line


def test_unsigned_syslinux_efi_is_refused_by_the_firmware(tmp_path):
    kernel = _need()
    root = _tree(tmp_path, kernel)
    console = _boot(tmp_path, root, "syslinux.efi", "Access Denied")
    refused = [l for l in console.splitlines() if "Access Denied" in l]
    # OVMF: "BdsDxe: failed to load Boot0001 "UEFI PXEv4 (MAC:...)" from ...: Access Denied"
    assert refused and "failed to load" in refused[0] and "PXEv4" in refused[0], console[-3000:]
    assert "Kernel command line" not in console and "ldlinux" not in console


# -- the whole lab: sidusd (full DHCP) + NFS root + overlay, through shim -> GRUB ---------------

@pytest.mark.netns
def test_lab_secure_boot_through_sidusd_to_the_marker(tmp_path, demo_image):
    """sidusd as the DHCP server (``dhcp.mode: full``: Debian's GRUB reads only the DHCP ACK, see
    docs/quirks.md) serves shim, GRUB, both grub.cfg and the image over its own TFTP; the guest
    checks Secure Boot and reaches READY with its per-host argument."""
    from conftest import require_lab

    from sidusd.lab.demo import HostSpec, Lab, boot_markers
    from sidusd.lab.topology import netns_list
    from sidusd.lab.vm import Vm, mac_for

    require_lab()
    _need()

    class SbVm(Vm):
        """The lab's UEFI VM with the Secure Boot firmware, the MS-keys store and no (unsigned) NIC ROM."""

        def argv(self) -> list[str]:
            out = super().argv()
            i = out.index("-drive")
            out[i:i + 4] = ["-machine", "q35,smm=on", "-global", "driver=cfi.pflash01,property=secure,value=on",
                            "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={CODE}",
                            "-drive", f"if=pflash,format=raw,unit=1,file={self.ovmf_vars}"]
            return [a.split(",romfile=")[0] + ",romfile=,bootindex=1" if ",romfile=" in a else a for a in out]

    class SbLab(Lab):
        def publish_tftp(self, image) -> None:
            super().publish_tftp(image)
            shutil.copyfile(SHIM, self.tftp_root / "shimx64.efi")
            shutil.copyfile(GRUB, self.tftp_root / "grubx64.efi")

        def config_dict(self, exports_file, pid_file):
            cfg = super().config_dict(exports_file, pid_file)
            cfg["boot"] = {**cfg.get("boot", {}), "boot_files": {"uefi_x64": "shimx64.efi"}}
            return cfg

    mac = mac_for(32)
    lab = SbLab(tmp_path / "lab", mode="full", progress=lambda msg: None)
    names: list[str] = []
    try:
        lab.up(demo_image, [HostSpec(mac, "e2e-sb", "sidus.demo=poweroff sidus.test=secureboot")])
        names = [lab.topology.lab_ns] if lab.topology is not None else []
        tap = lab.topology.add_tap()
        vm = SbVm(lab.topology, tap, mac, lab.workdir, name="sb1", uefi=True)
        lab.vms.append(vm)
        vm.workdir.mkdir(parents=True, exist_ok=True)
        vm.console_log.write_bytes(b"")
        t0 = time.monotonic()
        _start_with_secboot_vars(vm)
        deadline = t0 + 600
        while time.monotonic() < deadline and vm.running() and "READY" not in boot_markers(vm.console_text()):
            time.sleep(1)
        took = time.monotonic() - t0
        console = vm.console_text()
        markers = boot_markers(console)
        assert "READY" in markers, (took, console[-4000:], lab.sidusd_log_tail(30))
        assert "secureboot: Secure boot enabled" in console, console[-3000:]
        cmdline = " ".join(m.split(":", 1)[1] for m in markers if m.startswith("cmdline:"))
        assert "sidus.test=secureboot" in cmdline, markers
        assert "writable: yes" in markers, markers
        # every file of the chain came from sidusd's TFTP, in GRUB's order
        clients = lab.sidusctl("clients", mac)
        files = [str(e.get("file")).lstrip("/") for e in clients[0]["timeline"] if e["event"] == "tftp"]
        chain = ["shimx64.efi", "grubx64.efi", "grub/grub.cfg", "grub/grub.cfg-01-" + mac, "demo/vmlinuz",
                 "demo/initrd.img"]
        assert list(dict.fromkeys(f for f in files if f in chain)) == chain, files
        print(f"secure boot lab: READY after {took:.0f} s; TFTP: {files}")
    finally:
        lab.close()
    assert not set(names) & set(netns_list()), "lab namespaces left behind"


def _start_with_secboot_vars(vm) -> None:
    """Vm.start with this VM's copy of the Microsoft-keys variable store instead of OVMF_VARS.fd."""
    import subprocess as sp
    shutil.copyfile(VARS, vm.ovmf_vars)
    errlog = open(vm.workdir / f"{vm.name}-qemu.stderr", "wb")
    try:
        vm.proc = sp.Popen(vm.topology.lab_argv(vm.argv()), stdin=sp.DEVNULL, stdout=errlog, stderr=errlog,
                           start_new_session=True)
    finally:
        errlog.close()
    vm.started_at = time.monotonic()
