"""The demo image of the boot lab: a busybox root, the host's Debian kernel, an NFS initrd.

:func:`build_demo_image` makes, under ``workdir``:

* ``root/``          a busybox root filesystem, exported read-only over NFS.  Its
                     ``/sbin/init`` prints ``SIDUS-BOOT:`` markers on the console
                     (documented in docs/boot-chain.md), acts on ``sidus.demo=``,
                     and with ``sidus.up=<URL>`` sends the up-report
                     ``POST <URL>?stage=multiuser`` (``SIDUS-BOOT: up-report: ...``).
* ``boot/vmlinuz-<kver>``   a copy of the host's ``linux-image-amd64`` kernel.
* ``boot/initrd.img-<kver>`` ``mkinitramfs`` with BOOT=nfs, MODULES=netboot (which
                     has virtio_pci + virtio_net + nfs) and the sidus-overlay hook,
                     init-bottom scripts (sidus-overlay, sidus-up: the root up-report),
                     the nfs-top script sidus-link (the boot NIC up before ipconfig)
                     and module list from sidusd/data/initramfs/.

It is idempotent: each part has a stamp (a hash of everything it is made
from) and is rebuilt only when missing or outdated.  The full Debian image
builder is another module; this one needs no network and no chroot.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sidusd import data
from sidusd.errors import BackendError
from sidusd.storage.runner import Runner

INITRAMFS_SRC = data.INITRAMFS          # the overlay hook: package data (sidusd/data/initramfs/)
BUSYBOX = Path("/bin/busybox")
IMAGE_VERSION = "2"          # bump when the layout below changes
MKINITRAMFS_TIMEOUT_S = 600
#: sidusd/data/initramfs/ parts copied into the conf dir; nfs-top/sidus-link: the boot interface is up
#: before klibc ipconfig's first DHCPDISCOVER (docs/quirks.md "The initramfs waits before its own DHCP")
INITRAMFS_PARTS = ("hooks/sidus-overlay", "scripts/init-bottom/sidus-overlay", "scripts/init-bottom/sidus-up",
                   "scripts/nfs-top/sidus-link")

INIT = r"""#!/bin/sh
# sidus demo image init: prints SIDUS-BOOT markers on the console (see docs/boot-chain.md)
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
[ -e /proc/self ] || mount -t proc proc /proc
[ -d /sys/kernel ] || mount -t sysfs sysfs /sys
[ -c /dev/null ] || mount -t devtmpfs devtmpfs /dev
say() { echo "SIDUS-BOOT: $*"; }

rootline=""
while read -r dev mnt rest; do
  [ "$mnt" = / ] && rootline="$dev $mnt $rest"
done < /proc/mounts
say "root mounted: $rootline"
say "cmdline: $(cat /proc/cmdline)"

probe=absent
[ -e /var/sidus-reboot-probe ] && probe=present
if touch /.sidus-write-probe 2>/dev/null; then rm -f /.sidus-write-probe; w=yes; else w=no; fi
say "writable: $w"
upper=none
while read -r dev mnt fs rest; do
  [ "$mnt" = /run/sidus/rw ] && upper="$fs"
done < /proc/mounts
say "overlay upper: $upper, mode $(cat /run/sidus/mode 2>/dev/null || echo none)"
say "probe-before: $probe"

demo=poweroff
for a in $(cat /proc/cmdline); do
  case "$a" in
  sidus.demo=*) demo="${a#sidus.demo=}" ;;
  sidus.hostname=*) hostname "${a#sidus.hostname=}" ;;
  esac
done
say "hostname: $(hostname)"
# the up-report (sidusd/net/http_up.py): this image is as "up" as it gets, tell sidusd
up=""
for a in $(cat /proc/cmdline); do
  case "$a" in sidus.up=http://*) up="${a#sidus.up=}" ;; esac
done
if [ -n "$up" ]; then
  if answer=$(timeout 5 wget -q -O - --post-data "" "$up?stage=multiuser" 2>&1); then
    say "up-report: $answer"
  else
    say "up-report failed: $answer"
  fi
fi
case "$demo" in
reboot-after-write)
  if echo "written by $(hostname) at boot" > /var/sidus-reboot-probe; then
    say "probe written"
  else
    say "probe write failed"
  fi
  say READY
  sleep 5
  reboot -f ;;
shell)
  say READY
  setsid cttyhack sh -l
  poweroff -f ;;
poweroff) ;;
*) say "unknown sidus.demo=$demo: powering off" ;;
esac
say READY
poweroff -f
sleep 60
"""

PASSWD = "root:x:0:0:root:/root:/bin/sh\n"
GROUP = "root:x:0:\n"


@dataclass(frozen=True)
class DemoImage:
    """Paths of a built demo image and the kernel version it boots."""

    root: Path
    kernel: Path
    initrd: Path
    kver: str


def newest_kernel(boot: Path = Path("/boot")) -> str:
    """The newest ``6.x ... -amd64`` kernel version with a vmlinuz in ``boot``."""
    found = []
    for p in boot.glob("vmlinuz-6.*-amd64"):
        kver = p.name[len("vmlinuz-"):]
        if (Path("/lib/modules") / kver).is_dir():
            found.append(kver)
    if not found:
        raise BackendError("no kernel for the demo image",
                           detail=f"no {boot}/vmlinuz-6.*-amd64 with /lib/modules/<kver> "
                                  "(apt-get install linux-image-amd64)")
    return max(found, key=lambda k: [int(x) if x.isdigit() else x
                                      for x in re.split(r"[.-]", k)])


def _digest(*parts: bytes | str | Path) -> str:
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            h.update(str(part).encode())
            if part.is_file():
                h.update(part.read_bytes())
        else:
            h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()


class _Stamps:
    """``<workdir>/demo-image.stamp``: JSON of part name -> digest of its inputs."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.data = json.loads(path.read_text())
        except (OSError, ValueError):
            self.data = {}

    def fresh(self, part: str, digest: str, *outputs: Path) -> bool:
        return self.data.get(part) == digest and all(o.exists() for o in outputs)

    def mark(self, part: str, digest: str) -> None:
        self.data[part] = digest
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, self.path)


def build_root(root: Path, busybox: Path = BUSYBOX) -> None:
    """A busybox root at ``root`` (replaced whole): applets, /etc basics, /sbin/init."""
    if not busybox.is_file():
        raise BackendError("no busybox for the demo image", detail=f"{busybox} missing "
                           "(apt-get install busybox-static)")
    tmp = root.with_name(root.name + ".new")
    shutil.rmtree(tmp, ignore_errors=True)
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "run", "tmp",
              "etc", "root", "var", "mnt"):
        (tmp / d).mkdir(parents=True, exist_ok=True)
    os.chmod(tmp / "tmp", 0o1777)
    os.chmod(tmp / "root", 0o700)
    shutil.copy2(busybox, tmp / "bin" / "busybox")
    os.chmod(tmp / "bin" / "busybox", 0o755)
    applets = Runner().run([str(busybox), "--list-full"], timeout_s=30).check().out.split()
    for rel in applets:
        link = tmp / rel
        if rel in ("bin/busybox", "sbin/init", "linuxrc") or link.exists():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("/bin/busybox")
    (tmp / "sbin" / "init").write_text(INIT)
    os.chmod(tmp / "sbin" / "init", 0o755)
    (tmp / "etc" / "passwd").write_text(PASSWD)
    (tmp / "etc" / "group").write_text(GROUP)
    # no /etc/hostname: the name comes from DHCP (SIDUS documentation, "Some tricks")
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)


def make_conf_dir(conf: Path, src: Path = INITRAMFS_SRC, modules: str = "netboot") -> None:
    """An initramfs-tools conf dir: /etc/initramfs-tools + BOOT=nfs + the sidus overlay parts."""
    shutil.rmtree(conf, ignore_errors=True)
    shutil.copytree("/etc/initramfs-tools", conf, symlinks=False)
    text = (conf / "initramfs.conf").read_text()
    settings = {"BOOT": "nfs", "MODULES": modules, "BUSYBOX": "y"}
    for key, value in settings.items():
        text, n = re.subn(rf"(?m)^{key}=.*$", f"{key}={value}", text)
        if not n:
            text += f"{key}={value}\n"
    (conf / "initramfs.conf").write_text(text)
    with open(conf / "modules", "a") as f:
        f.write("\n# sidus (sidusd/data/initramfs/modules)\n" + (src / "modules").read_text())
    for rel in INITRAMFS_PARTS:
        (conf / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, conf / rel)     # a copy, not a link: the conf dir stands alone
        os.chmod(conf / rel, 0o755)


def build_demo_image(workdir: Path, progress: Callable[[str], None] = print) -> DemoImage:
    """Build (or reuse) the demo image under ``workdir``; see the module docstring."""
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    stamps = _Stamps(workdir / "demo-image.stamp")
    kver = newest_kernel()
    root = workdir / "root"
    boot = workdir / "boot"
    boot.mkdir(exist_ok=True)
    kernel = boot / f"vmlinuz-{kver}"
    initrd = boot / f"initrd.img-{kver}"

    d_root = _digest(IMAGE_VERSION, INIT, PASSWD, GROUP, BUSYBOX)
    if stamps.fresh("root", d_root, root / "sbin" / "init"):
        progress(f"demo image: root up to date ({root})")
    else:
        progress(f"demo image: building busybox root in {root}")
        build_root(root)
        stamps.mark("root", d_root)

    src_kernel = Path("/boot") / f"vmlinuz-{kver}"
    d_kernel = _digest(IMAGE_VERSION, kver, str(src_kernel.stat().st_size), str(src_kernel.stat().st_mtime_ns))
    if stamps.fresh("kernel", d_kernel, kernel):
        progress(f"demo image: kernel {kver} up to date")
    else:
        progress(f"demo image: copying kernel {src_kernel}")
        for old in boot.glob("vmlinuz-*"):
            old.unlink()
        shutil.copy2(src_kernel, kernel)
        stamps.mark("kernel", d_kernel)

    inputs = sorted(p for p in INITRAMFS_SRC.rglob("*") if p.is_file())
    etc_conf = sorted(p for p in Path("/etc/initramfs-tools").rglob("*") if p.is_file())
    d_initrd = _digest(IMAGE_VERSION, kver, *inputs, *etc_conf)
    if stamps.fresh("initrd", d_initrd, initrd):
        progress(f"demo image: initrd up to date ({initrd})")
    else:
        conf = workdir / "initramfs-conf"
        make_conf_dir(conf)
        progress(f"demo image: mkinitramfs for {kver} (BOOT=nfs, MODULES=netboot, + overlay); about a minute")
        for old in boot.glob("initrd.img-*"):
            old.unlink()
        tmp = boot / f".initrd.img-{kver}.new"
        res = Runner().run(["mkinitramfs", "-d", str(conf), "-o", str(tmp), kver],
                           timeout_s=MKINITRAMFS_TIMEOUT_S)
        if res.rc != 0:
            tmp.unlink(missing_ok=True)
        res.check()
        os.replace(tmp, initrd)
        stamps.mark("initrd", d_initrd)
    return DemoImage(root=root, kernel=kernel, initrd=initrd, kver=kver)


if __name__ == "__main__":   # python3 -m sidusd.lab.image WORKDIR
    import sys
    print(build_demo_image(Path(sys.argv[1] if len(sys.argv) > 1 else "lab-state/image")))
