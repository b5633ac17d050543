"""A hand-made SIDUS adopted by sidus, end to end: the tree (tests/sidus_tree.py: a rootaufs
init-bottom script, aufs in modules, DEVICE=eth0, no /etc/hostname; this machine's /usr as hard
links so the real update-initramfs runs inside) imported with ``sidus-image import --in-place``,
the hosts imported from the site's dhcpd.conf and pxelinux.cfg/ with ``sidusctl hosts import``,
then one VM PXE-boots it (qemu + iPXE -> sidusd proxyDHCP next to the site's DHCP -> pxelinux ->
kernel + the regenerated initrd -> NFS root from nfs-ganesha -> sidus's overlay, not rootaufs).
One boot; the tree takes ~6 s to make and the import ~35 s (update-initramfs)."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest
from sidus_tree import make_tree

from sidusd.lab.demo import Lab
from sidusd.lab.timeline import boot_markers
from sidusd.lab.topology import SERVER_IP
from sidusd.lab.vm import mac_for

pytestmark = [pytest.mark.e2e, pytest.mark.netns]

REPO = Path(__file__).resolve().parents[2]
BOOT_TIMEOUT_S = 420
NAME = "sidus"


class MigratedLab(Lab):
    """The demo lab serving the imported image through sidus-image's generated images file."""

    images_file: Path | None = None

    def config_dict(self, exports_file, pid_file):
        cfg = super().config_dict(exports_file, pid_file)
        cfg["images_file"] = str(self.images_file)
        return cfg

    def write_inventory(self, hosts):
        super().write_inventory(hosts)
        self.inventory_file.write_text(self.inventory_file.read_text().replace("image: demo", f"image: {NAME}"))


def values(markers: list[str], key: str) -> list[str]:
    return [m.split(":", 1)[1].strip() for m in markers if m.startswith(key + ":")]


def test_imported_sidus_tree_and_hosts_boot_with_the_sidus_overlay(tmp_path_factory):
    from tests.e2e.conftest import require_lab, require_tool
    require_lab()
    require_tool("update-initramfs")
    from sidusd.lab.image import newest_kernel
    work = tmp_path_factory.mktemp("migration")
    tree = make_tree(work / "srv" / "nfsroot" / "sidus", newest_kernel())
    lab = MigratedLab(work / "lab", mode="proxy", progress=lambda msg: None)
    lab.images_file = work / "lab" / "images" / "images.yaml"
    r = subprocess.run([sys.executable, "-m", "sidusd.image", "--images-dir", str(work / "lab" / "images"),
                        "--tftp-root", str(lab.tftp_root), "--images-file", str(lab.images_file),
                        "import", NAME, str(tree), "--in-place"],
                       capture_output=True, text=True, cwd=REPO, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    gen = (work / "lab" / "images" / NAME / "gen-0001").resolve()
    pub = lab.tftp_root / "images" / NAME / "gen-0001"
    mac = mac_for(60)
    site = work / "site"
    (site / "pxelinux.cfg").mkdir(parents=True)
    (site / "dhcpd.conf").write_text(
        'next-server 10.13.20.13;\nfilename "pxelinux.0";\nallow booting;\n'
        "subnet 10.13.20.0 netmask 255.255.255.0 {\n  group {\n"
        f'    host "node60" {{ hardware ethernet {mac}; option host-name "migrated60"; }}\n  }}\n}}\n')
    (site / "pxelinux.cfg" / ("01-" + mac.replace(":", "-"))).write_text(
        "DEFAULT tmpfs\nLABEL tmpfs\nKERNEL vmlinuz-Sidus\n"
        "APPEND console=ttyS0 root=/dev/nfs initrd=initrd.img-Sidus "
        "nfsroot=10.13.20.13:/srv/nfsroot/sidus,rsize=8192,wsize=8192,tcp ip=dhcp aufs=tmpfs "
        "sidus.demo=poweroff sidus.test=migrated\n")
    try:
        lab.up(types.SimpleNamespace(root=gen, kernel=pub / "vmlinuz", initrd=pub / "initrd.img"), [])
        out = lab.sidusctl("hosts", "import", str(site / "dhcpd.conf"), str(site / "pxelinux.cfg"),
                           "--profile", "default", "--replace")
        assert out["imported"] == 1 and out["replaced"] == [], out
        vm = lab.boot_vm(mac, name="migrated60")
        tl = lab.timeline(vm)
        assert lab.follow(vm, tl, BOOT_TIMEOUT_S, until="ready"), (
            f"the imported image did not boot; first missing step: {tl.first_missing()}\n{lab.diagnostics(vm)}")
        assert vm.wait_exit(60) is not None, "the guest did not power off\n" + lab.diagnostics(vm)
        console = vm.console_text()
        markers = boot_markers(console)
        cmdline = " ".join(values(markers, "cmdline"))
        # the host's extra arguments came from its old pxelinux file, without what sidusd renders
        assert "sidus.test=migrated" in cmdline and f"nfsroot={SERVER_IP}:{gen}," in cmdline, cmdline
        assert "aufs=" not in cmdline and "initrd.img-Sidus" not in cmdline and "/srv/nfsroot" not in cmdline
        # sidus's overlay made the root (rootaufs is out of the regenerated initrd)
        root_line = values(markers, "root mounted")[0].split()
        assert root_line[1:3] == ["/", "overlay"] and "lowerdir=" in root_line[3], root_line
        assert values(markers, "writable") == ["yes"], markers
        assert "ROOTAUFS-RAN" not in console
        # the name comes from the dhcpd.conf's option host-name, through the inventory
        assert values(markers, "hostname") == ["migrated60"], markers
    finally:
        lab.close()
