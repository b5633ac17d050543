"""A hand-made-SIDUS-style tree for the migration tests, made in seconds without debootstrap.

The documentation's tree is debootstrap'd; what ``sidus-image import`` touches in it is
``etc/initramfs-tools`` (a ``rootaufs`` init-bottom script, ``aufs`` in ``modules``,
``DEVICE=eth0``), ``boot/vmlinuz-K`` + ``initrd.img-K``, ``/etc/hostname`` (removed) and the
programs ``update-initramfs`` runs.  So: this machine's ``/usr`` as hard links (same file
system: no copy, 148k links in ~5 s; nothing in the import writes into /usr, and atomic writes
make new inodes) so that the REAL ``update-initramfs`` runs inside the chroot, the lab's
``/sbin/init`` (it prints the SIDUS-BOOT markers, docs/boot-chain.md), the host's
``/etc/initramfs-tools`` (with MODULES=netboot: a small initrd for the VM) and ``/dev`` nodes as
debootstrap makes them.  Import it with ``--in-place`` (a copy would copy /usr).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

ROOTAUFS = """#!/bin/sh
# rootaufs (SIDUS, after Nicholas A. Schembri's rootaufs): /ro + /rw -> aufs on ${rootmnt}
PREREQ=""
case $1 in prereqs) echo "$PREREQ"; exit 0 ;; esac
echo "ROOTAUFS-RAN"
mkdir -p /ro /rw /aufs
mount -t tmpfs aufs-rw /rw
mount --move ${rootmnt} /ro
mount -t aufs -o dirs=/rw:/ro=ro aufs /aufs
mount --move /aufs ${rootmnt}
"""


def make_tree(dest: Path, kver: str) -> Path:
    """The tree at ``dest`` (must not exist), on the file system of /usr."""
    from sidusd.lab.image import GROUP, INIT, PASSWD
    dest.mkdir(parents=True)
    subprocess.run(["cp", "-al", "/usr", str(dest / "usr")], check=True)
    for name in ("bin", "sbin", "lib", "lib64"):                     # merged /usr, as bookworm
        (dest / name).symlink_to(f"usr/{name}")
    for d in ("etc", "dev", "proc", "sys", "run", "tmp", "root", "mnt", "var/tmp",
              "var/lib/initramfs-tools", "boot"):
        (dest / d).mkdir(parents=True, exist_ok=True)
    # the lab's init (SIDUS-BOOT markers); poweroff/reboot/cttyhack from busybox (no systemd runs)
    for rel in ("usr/sbin/init", "usr/sbin/poweroff", "usr/sbin/reboot", "usr/bin/cttyhack"):
        (dest / rel).unlink(missing_ok=True)
    (dest / "usr/sbin/init").write_text(INIT)
    (dest / "usr/sbin/init").chmod(0o755)
    for rel in ("usr/sbin/poweroff", "usr/sbin/reboot", "usr/bin/cttyhack"):
        (dest / rel).symlink_to("/usr/bin/busybox")
    (dest / "etc/passwd").write_text(PASSWD)
    (dest / "etc/group").write_text(GROUP)
    etc = dest / "etc"
    shutil.copytree("/etc/initramfs-tools", etc / "initramfs-tools", symlinks=True)
    for f in ("ld.so.cache", "ld.so.conf"):
        if Path("/etc", f).exists():
            shutil.copy2(Path("/etc", f), etc / f)
    for d in ("ld.so.conf.d", "udev", "modprobe.d"):            # what the initramfs hooks read
        if Path("/etc", d).is_dir():
            shutil.copytree(Path("/etc", d), etc / d, symlinks=True)
    conf = etc / "initramfs-tools" / "initramfs.conf"
    text = conf.read_text()
    for key, value in (("MODULES", "netboot"), ("DEVICE", "eth0"), ("BOOT", "local")):
        text, n = re.subn(rf"(?m)^{key}=.*$", f"{key}={value}", text)
        if not n:
            text += f"{key}={value}\n"
    conf.write_text(text)
    (etc / "initramfs-tools" / "modules").write_text("# the documentation's line\naufs\n")
    script = etc / "initramfs-tools" / "scripts" / "init-bottom" / "rootaufs"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(ROOTAUFS)
    script.chmod(0o755)
    for name, major, minor in (("null", 1, 3), ("zero", 1, 5), ("random", 1, 8), ("urandom", 1, 9),
                               ("tty", 5, 0), ("console", 5, 1)):
        os.mknod(dest / "dev" / name, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
    for f in (f"vmlinuz-{kver}", f"config-{kver}", f"System.map-{kver}"):     # what linux-image installs
        if Path("/boot", f).exists():
            shutil.copy2(Path("/boot", f), dest / "boot" / f)
    # the site's old initrd (the rootaufs one): replaced by the import's update-initramfs
    (dest / "boot" / f"initrd.img-{kver}").write_bytes(b"old rootaufs initrd\n")
    (etc / "hostname").unlink(missing_ok=True)
    return dest
