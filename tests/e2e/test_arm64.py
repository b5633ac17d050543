"""arm64 UEFI through sidusd: qemu-system-aarch64 (``-M virt -cpu cortex-a57``, TCG) with Debian's
AAVMF firmware asks with option 93 = 11; sidusd (``dhcp.mode: full``, ``boot_files.arm64:
grubaa64.efi``) answers with Debian's signed arm64 network GRUB, which reads the same
``grub/grub.cfg`` and ``grub/grub.cfg-01-<mac>`` as x64's GRUB; GRUB loads the arm64 Debian kernel
and the initramfs with sidus's overlay hook (sidusd.lab.arm64: assembled on the host from the
multiarch ``.deb`` files, cached in lab-state/image-cache/arm64), the root comes over NFS
(nfs-ganesha), the overlay makes it writable, and the guest prints ``machine: aarch64`` and its
per-host argument before READY.  What sidusd serves is a generation made by sidus-image:
``sidus-image import --arch arm64`` of the assembled tree (its own initrd kept: it has sidus's
overlay script; the kernel and initrd checked to be arm64), through the generated images file.

Scope: one boot.  The firmware's own virtio-net driver does PXE (no iPXE: Debian ships none
for arm64).  Measured on 2 cores at load average 3.6-5.0: READY 22-39 s after qemu's start; the
test 26-38 s with the image cached, 52 s from nothing (download + assembly 9 s).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import types

import pytest
from conftest import ROOT, require_lab, require_tool

pytestmark = [pytest.mark.e2e, pytest.mark.netns]

CACHE = ROOT / "lab-state" / "image-cache" / "arm64"
NAME = "arm64-demo"
BOOT_TIMEOUT_S = 900          # TCG on a loaded 2-core machine: generous, never a timed assertion


@pytest.fixture(scope="module")
def arm64_image():
    """The arm64 demo image, built once and cached (a second run reuses it)."""
    require_lab()
    for tool in ("qemu-system-aarch64", "dpkg-deb", "apt-get", "depmod", "cpio"):
        require_tool(tool)
    from sidusd.lab.arm64 import build_arm64_image, missing_requirements, multiarch_enabled
    from sidusd.storage.runner import Runner
    missing = missing_requirements()
    if missing:
        pytest.skip("missing: " + ", ".join(f"{what} (package {pkg})" for what, pkg in missing))
    if not multiarch_enabled(Runner()):
        pytest.skip("dpkg has no arm64 architecture (scripts/setup: dpkg --add-architecture arm64)")
    t0 = time.monotonic()
    image = build_arm64_image(CACHE, progress=print)
    print(f"arm64 image ready in {time.monotonic() - t0:.0f} s")
    return image


def test_arm64_uefi_boots_through_sidusd_to_the_marker(tmp_path, arm64_image):
    from sidusd.lab.arm64 import AAVMF_CODE, AAVMF_VARS
    from sidusd.lab.demo import HostSpec, Lab, boot_markers
    from sidusd.lab.topology import netns_list
    from sidusd.lab.vm import Vm, mac_for

    class Arm64Vm(Vm):
        """The lab VM as an arm64 UEFI machine: AAVMF code + this VM's variable store, no NIC ROM."""

        def argv(self) -> list[str]:
            return ["qemu-system-aarch64", "-name", self.name, "-M", "virt", "-cpu", "cortex-a57",
                    "-accel", "tcg", "-m", str(self.memory_mib), "-nographic", "-display", "none",
                    "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={AAVMF_CODE}",
                    "-drive", f"if=pflash,format=raw,unit=1,file={self.ovmf_vars}",
                    "-netdev", f"tap,id=n0,ifname={self.tap},script=no,downscript=no",
                    "-device", f"virtio-net-pci,netdev=n0,mac={self.mac},romfile=",
                    "-monitor", "none", "-serial", f"file:{self.console_log}", "-no-reboot"]

        def start(self) -> None:
            self.workdir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(AAVMF_VARS, self.ovmf_vars)      # a fresh store per VM (uefi=False: not OVMF's)
            super().start()

    class Arm64Lab(Lab):
        """The lab with sidus.yaml naming sidus-image's generated images file, the default profile
        on the imported image, on the virt machine's PL011 console."""

        def publish_tftp(self, image) -> None:
            super().publish_tftp(image)
            shutil.copyfile(arm64_image.grub, self.tftp_root / "grubaa64.efi")

        def config_dict(self, exports_file, pid_file):
            cfg = super().config_dict(exports_file, pid_file)
            cfg["boot"] = {**cfg.get("boot", {}), "boot_files": {"arm64": "grubaa64.efi"}}
            cfg["images_file"] = str(images_file)
            return cfg

        def write_inventory(self, hosts):
            super().write_inventory(hosts)
            text = self.inventory_file.read_text().replace("image: demo", f"image: {NAME}")
            self.inventory_file.write_text(text.replace("append: ''", "append: console=ttyAMA0"))

    mac = mac_for(64)
    lab = Arm64Lab(tmp_path / "lab", mode="full", progress=lambda msg: None)
    images, images_file = tmp_path / "lab" / "images", tmp_path / "lab" / "images" / "images.yaml"
    # the generation: sidus-image import --arch arm64 of a copy of the assembled tree
    tree = tmp_path / "arm64-tree"
    subprocess.run(["cp", "-a", f"{arm64_image.root}/.", str(tree)], check=True, timeout=300)
    r = subprocess.run([sys.executable, "-m", "sidusd.image", "--images-dir", str(images), "--tftp-root",
                        str(lab.tftp_root), "--images-file", str(images_file), "import", NAME, str(tree),
                        "--arch", "arm64"], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stderr
    from sidusd.image.generations import ImageStore
    store = ImageStore(images)
    meta = store.meta(NAME, 1)
    assert (meta["architecture"], meta["kernel_arch"], meta["own_initrd"]) == ("arm64", "arm64", True), meta
    gen = types.SimpleNamespace(root=store.path(NAME, 1).resolve(),
                                kernel=lab.tftp_root / "images" / NAME / "gen-0001" / "vmlinuz",
                                initrd=lab.tftp_root / "images" / NAME / "gen-0001" / "initrd.img")
    names: list[str] = []
    vm = None
    ok = False
    try:
        lab.up(gen, [HostSpec(mac, "e2e-arm64", "sidus.demo=poweroff sidus.test=arm64")])
        assert lab.topology is not None
        names = [lab.topology.lab_ns]
        vm = Arm64Vm(lab.topology, lab.topology.add_tap(), mac, lab.workdir, name="arm1")
        lab.vms.append(vm)
        t0 = time.monotonic()
        vm.start()
        vm.wait_for(r"SIDUS-BOOT: READY", BOOT_TIMEOUT_S)            # or qemu's exit
        took = time.monotonic() - t0
        console = vm.console_text()
        markers = boot_markers(console)
        assert "READY" in markers, (took, console[-4000:], lab.sidusd_log_tail(30))
        assert "machine: aarch64" in markers, markers                  # uname -m in the guest
        cmdline = " ".join(m.split(":", 1)[1] for m in markers if m.startswith("cmdline:"))
        assert "sidus.test=arm64" in cmdline and "sidus.hostname=e2e-arm64" in cmdline, markers
        assert f"{gen.root}" in cmdline, (cmdline, gen.root)            # the imported generation's root
        assert "writable: yes" in markers, markers                     # the overlay hook ran
        clients = lab.sidusctl("clients", mac)
        assert clients[0]["arch"] == "efi-arm64", clients[0]           # option 93 = 11, answered
        files = [str(e.get("file")).lstrip("/") for e in clients[0]["timeline"] if e["event"] == "tftp"]
        pub = f"images/{NAME}/gen-0001"
        chain = ["grubaa64.efi", "grub/grub.cfg", "grub/grub.cfg-01-" + mac, f"{pub}/vmlinuz", f"{pub}/initrd.img"]
        assert list(dict.fromkeys(f for f in files if f in chain)) == chain, files
        print(f"arm64 lab: READY after {took:.0f} s; TFTP: {files}")
        ok = True
    finally:
        if not ok:
            print(lab.diagnostics(vm))
        lab.close()
    assert not set(names) & set(netns_list()), "lab namespaces left behind"

