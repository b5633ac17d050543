"""A hand-made SIDUS adopted by sidus, end to end, on a REAL debootstrap'd bookworm tree.

The site's tree is made the way /work/shared/reference/sidus-documentation.txt does it:
``debootstrap --include=... --exclude=... bookworm /srv/nfsroot/sidus MIRROR`` (the suite's one
debootstrap, tests/debian_tree.py: shared with test_debian_image.py, cached by its command line),
then ``usr/sbin/policy-rc.d`` (exit 101), the aufs ``rootaufs`` init-bottom script, ``aufs`` in
``etc/initramfs-tools/modules``, ``DEVICE=eth0`` in ``initramfs.conf``, ``/etc/hostname`` removed,
plus the site's boot check (a systemd unit printing ``SIDUS-BOOT:`` markers on ttyS0 after
multi-user.target).  ``sidus-image import`` COPIES it (the site's tree stays as it was) into
generation 1: rootaufs out, sidus's overlay hook in, update-initramfs in the chroot.  The hosts come
from the site's dhcpd.conf ``host {}`` block and its pxelinux.cfg/01-<mac> (``sidusctl hosts
import``); one VM PXE-boots the import (qemu + iPXE -> sidusd proxyDHCP next to the site's DHCP ->
pxelinux -> the tree's Debian kernel + the regenerated initrd -> NFS root from nfs-ganesha ->
sidus's overlay, not rootaufs -> systemd to multi-user.target) under the name from dhcpd.conf.
Cost on top of the shared debootstrap (measured at load average 3.5): the site's tree 5 s (a copy),
the import 31 s (a copy, update-initramfs), the lab + hosts import + one Debian boot 73 s."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
from debian_tree import copy_tree
from sidus_tree import ROOTAUFS

from sidusd.lab.demo import Lab
from sidusd.lab.timeline import boot_markers
from sidusd.lab.topology import SERVER_IP
from sidusd.lab.vm import mac_for

pytestmark = [pytest.mark.e2e, pytest.mark.netns, pytest.mark.background]   # its own lab: no fixed name

REPO = Path(__file__).resolve().parents[2]
BOOT_TIMEOUT_S = 900          # ~2.5 min under TCG alone; other VMs may share the 2 cores
NAME = "sidus"
RA = "etc/initramfs-tools/scripts/init-bottom/rootaufs"
CHECK = """#!/bin/sh
# the site's boot check (tests/e2e/test_migration.py): SIDUS-BOOT markers on the serial console
say() { echo "SIDUS-BOOT: $*" > /dev/ttyS0; }
rootline=""
while read -r dev mnt rest; do [ "$mnt" = / ] && rootline="$dev $mnt $rest"; done < /proc/mounts
say "root mounted: $rootline"
say "cmdline: $(cat /proc/cmdline)"
if touch /.sidus-write-probe 2>/dev/null; then rm -f /.sidus-write-probe; w=yes; else w=no; fi
say "writable: $w"
say "hostname: $(cat /proc/sys/kernel/hostname)"
say "failed units: $(systemctl --failed --no-legend --plain | cut -d' ' -f1 | tr '\\n' ' ')"
say READY
"""
CHECK_UNIT = """[Unit]
Description=site boot check: SIDUS-BOOT markers on ttyS0 after multi-user.target
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/site-boot-check

[Install]
WantedBy=multi-user.target
"""


def replace_file(path: Path, text: str, mode: int = 0o644) -> None:
    path.unlink(missing_ok=True)          # a new inode, whatever the old one was
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def sidus_site_tree(debootstrapped: Path, dest: Path) -> Path:
    """The documentation's steps after debootstrap, on a copy of the debootstrap'd tree."""
    tree = copy_tree(debootstrapped, dest)
    replace_file(tree / "usr/sbin/policy-rc.d", "#!/bin/sh\nexit 101\n", 0o755)
    replace_file(tree / RA, ROOTAUFS, 0o755)
    mod = tree / "etc/initramfs-tools/modules"
    replace_file(mod, mod.read_text() + "aufs\n")
    conf = tree / "etc/initramfs-tools/initramfs.conf"
    text, n = re.subn(r"(?m)^DEVICE=.*$", "DEVICE=eth0", conf.read_text())
    replace_file(conf, text if n else text + "DEVICE=eth0\n")
    (tree / "etc/hostname").unlink(missing_ok=True)
    replace_file(tree / "usr/local/sbin/site-boot-check", CHECK, 0o755)
    replace_file(tree / "etc/systemd/system/site-boot-check.service", CHECK_UNIT)
    wants = tree / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / "site-boot-check.service").symlink_to("/etc/systemd/system/site-boot-check.service")
    return tree


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


def test_imported_debootstrapped_sidus_and_hosts_boot_with_the_sidus_overlay(tmp_path_factory, bookworm_tree):
    work = tmp_path_factory.mktemp("migration")
    t0 = time.monotonic()
    tree = sidus_site_tree(bookworm_tree, work / "srv" / "nfsroot" / "sidus")
    kernels = sorted(p.name for p in (tree / "boot").glob("vmlinuz-*"))
    assert kernels and not (tree / "etc/hostname").exists()
    lab = MigratedLab(work / "lab", mode="proxy", progress=lambda msg: None)
    lab.images_file = work / "lab" / "images" / "images.yaml"
    t1 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "sidusd.image", "--images-dir", str(work / "lab" / "images"),
                        "--tftp-root", str(lab.tftp_root), "--images-file", str(lab.images_file),
                        "import", NAME, str(tree)],
                       capture_output=True, text=True, cwd=REPO, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    t2 = time.monotonic()
    gen = (work / "lab" / "images" / NAME / "gen-0001").resolve()
    pub = lab.tftp_root / "images" / NAME / "gen-0001"
    # copy mode: the site's tree is as it was, generation 1 is the changed copy
    assert (tree / RA).is_file() and "aufs" in (tree / "etc/initramfs-tools/modules").read_text().split()
    assert not (gen / RA).exists() and (gen / "etc/initramfs-tools/disabled-by-sidus/init-bottom/rootaufs").is_file()
    assert (pub / "vmlinuz").read_bytes() == (tree / "boot" / kernels[-1]).read_bytes()
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
        "sidus.test=migrated\n")
    try:
        lab.up(types.SimpleNamespace(root=gen, kernel=pub / "vmlinuz", initrd=pub / "initrd.img"), [])
        out = lab.sidusctl("hosts", "import", str(site / "dhcpd.conf"), str(site / "pxelinux.cfg"),
                           "--profile", "default", "--replace")
        assert out["imported"] == 1 and out["replaced"] == [], out
        vm = lab.boot_vm(mac, name="migrated60")
        tl = lab.timeline(vm)
        assert lab.follow(vm, tl, BOOT_TIMEOUT_S, until="ready"), (
            f"the imported image did not boot; first missing step: {tl.first_missing()}\n{lab.diagnostics(vm, 60)}")
        t3 = time.monotonic()
        print(f"migration: site tree {t1 - t0:.0f} s, import {t2 - t1:.0f} s, boot {t3 - t2:.0f} s "
              f"(lab, hosts import, VM to the marker)")
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
        # (sidus.hostname=, set by the import's sidus-hostname unit: the tree has no /etc/hostname)
        assert values(markers, "hostname") == ["migrated60"], markers
        # systemd brought the migrated tree up to multi-user.target with no failed unit
        assert values(markers, "failed units") == [""], markers
    finally:
        lab.close()
